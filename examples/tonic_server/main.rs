//! A minimal gRPC server (tonic) whose `SayHello` handler queues a slow
//! "welcome email" as a background task that runs after the reply and its
//! `grpc-status` trailer have been sent.
//!
//! ```text
//! cargo run --example tonic_server            # serves 127.0.0.1:50051 (env PORT), Ctrl-C stops it
//! cargo run --example tonic_server -- --demo  # port 0, one call from a client, then exits
//! ```
//!
//! The messages and the service are written by hand in `greeter.rs` (what
//! `tonic-build` generates), so no `protoc` is needed.

mod greeter;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;
use tonic::{Request, Response, Status};
use tower_background::{BackgroundLayer, BackgroundTasks};

use greeter::{Greeter, GreeterClient, GreeterServer, HelloReply, HelloRequest};

struct DemoGreeter {
    started: Instant,
}

impl Greeter for DemoGreeter {
    async fn say_hello(
        &self,
        request: Request<HelloRequest>,
    ) -> Result<Response<HelloReply>, Status> {
        // `BackgroundLayer` put the request's queue into the extensions, and
        // tonic keeps them on its `Request`.
        let tasks = request
            .extensions()
            .get::<BackgroundTasks>()
            .cloned()
            .ok_or_else(|| Status::internal("BackgroundLayer is not installed"))?;
        let name = request.into_inner().name;
        let started = self.started;
        let to = name.clone();
        tasks.add(async move {
            // Pretend to talk to a slow mail server.
            tokio::time::sleep(Duration::from_millis(500)).await;
            println!(
                "[{:>4} ms] background task: welcome email sent to {to}",
                started.elapsed().as_millis()
            );
        });
        Ok(Response::new(HelloReply {
            message: format!("Hello {name}!"),
        }))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let started = Instant::now();
    let demo = std::env::args().skip(1).any(|arg| arg == "--demo");
    let port = match std::env::var("PORT") {
        Ok(port) => port.parse()?,
        Err(_) => 50051,
    };
    let addr = SocketAddr::from(([127, 0, 0, 1], if demo { 0 } else { port }));

    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        Server::builder()
            .layer(layer)
            .add_service(GreeterServer::new(DemoGreeter { started }))
            .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
                let _ = stop_rx.await;
            }),
    );
    println!("gRPC server demo.Greeter listening on http://{addr}");

    if demo {
        let mut client = GreeterClient::connect(addr).await?;
        let reply = client
            .say_hello(HelloRequest {
                name: "Ferris".into(),
            })
            .await?;
        println!(
            "[{:>4} ms] reply: {} (grpc-status 0)",
            started.elapsed().as_millis(),
            reply.into_inner().message
        );
        tokio::time::timeout(Duration::from_secs(10), handle.wait_idle()).await?;
    } else {
        println!("Ctrl-C stops the server");
        tokio::signal::ctrl_c().await?;
        println!("Ctrl-C: shutting down");
    }

    // The server's graceful shutdown first (no new requests), then the
    // background tasks get a grace period.
    let _ = stop_tx.send(());
    server.await??;
    let report = handle.shutdown(Duration::from_secs(10)).await;
    println!(
        "[{:>4} ms] background tasks: {} completed, {} cancelled at shutdown; stats {:?}",
        started.elapsed().as_millis(),
        report.completed,
        report.cancelled,
        handle.stats()
    );
    Ok(())
}
