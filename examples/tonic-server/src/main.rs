//! A gRPC server (tonic) whose `SayHello` handler queues a slow "welcome
//! email" as a background task that runs after the reply and its
//! `grpc-status` trailer have been sent. It also answers the standard
//! `grpc.health.v1.Health` probes.
//!
//! ```text
//! cargo run -p tonic-server -- --demo  # port 0, one call from a client, then exits
//! cargo run -p tonic-server            # serves 127.0.0.1:50051 (env PORT), Ctrl-C stops it
//! ```
//!
//! It speaks gRPC over plain HTTP/2 only (h2c, no TLS): gRPC clients, or
//! `grpcurl -plaintext`, not a browser or `curl` without `--http2-prior-knowledge`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tonic_server::greeter::{GreeterClient, HelloRequest};
use tonic_server::{describe, spawn_server, tasks, DemoGreeter};
use tower_background::BackgroundLayer;

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
    let server = spawn_server(listener, layer, DemoGreeter::new(started), async {
        let _ = stop_rx.await;
    })
    .await;
    println!("gRPC (HTTP/2 without TLS) listening on http://{addr}");
    println!("services: demo.Greeter, grpc.health.v1.Health");

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
        "[{:>4} ms] shut down: {} finished during the grace period, {} cancelled",
        started.elapsed().as_millis(),
        tasks(report.completed),
        report.cancelled,
    );
    println!("background tasks: {}", describe(&handle.stats()));
    Ok(())
}
