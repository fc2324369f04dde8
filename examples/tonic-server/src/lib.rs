//! A gRPC server (tonic 0.14, plain HTTP/2 without TLS, "h2c") behind
//! [`BackgroundLayer`]:
//!
//! - `demo.Greeter/SayHello` answers at once and queues a slow "welcome
//!   email" that runs after the reply and its `grpc-status` trailer have been
//!   sent;
//! - `grpc.health.v1.Health` (tonic-health) answers the standard health
//!   probes: `SERVING` for the server (`""`) and for `demo.Greeter`.
//!
//! `src/main.rs` runs it; `tests/` call it over real sockets. The greeter is
//! written by hand ([`greeter`]) and tonic-health ships its generated code,
//! so building needs no `protoc`.

pub mod greeter;

use std::future::Future;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;
use tonic::{Request, Response, Status};
use tower_background::{BackgroundLayer, BackgroundTasks, Stats};

use greeter::{Greeter, GreeterServer, HelloReply, HelloRequest};

/// How long the welcome email of `SayHello` takes (a pretend mail server).
pub const EMAIL_DELAY: Duration = Duration::from_millis(500);

/// The `demo.Greeter` of this example: replies `Hello {name}!` and queues
/// the welcome email as a background task.
#[derive(Debug, Clone)]
pub struct DemoGreeter {
    started: Instant,
}

impl DemoGreeter {
    /// A greeter whose task prints its time relative to `started`.
    pub fn new(started: Instant) -> Self {
        Self { started }
    }
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
            tokio::time::sleep(EMAIL_DELAY).await;
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

/// Serves `demo.Greeter` and `grpc.health.v1.Health` on `listener` behind
/// `layer` until `shutdown` resolves (tonic's graceful shutdown: no new
/// calls, the calls in flight finish). The background tasks outlive it:
/// drain them afterwards with the layer's handle.
pub async fn spawn_server(
    listener: TcpListener,
    layer: BackgroundLayer,
    greeter: DemoGreeter,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> JoinHandle<Result<(), tonic::transport::Error>> {
    // The reporter starts with the server itself (service `""`) SERVING;
    // name the greeter too, so that a probe can ask for it by name.
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<GreeterServer<DemoGreeter>>().await;
    tokio::spawn(
        Server::builder()
            .layer(layer)
            .add_service(health)
            .add_service(GreeterServer::new(greeter))
            .serve_with_incoming_shutdown(TcpIncoming::from(listener), shutdown),
    )
}

/// `1 task` / `2 tasks`.
pub fn tasks(n: u64) -> String {
    if n == 1 {
        "1 task".to_owned()
    } else {
        format!("{n} tasks")
    }
}

/// The layer's counters in words: `1 task in all: 1 completed, 0 failed, ...`.
pub fn describe(stats: &Stats) -> String {
    format!(
        "{} in all: {} completed, {} failed, {} panicked, {} timed out, {} discarded, \
         {} cancelled, {} still pending or running",
        tasks(stats.total()),
        stats.completed,
        stats.failed,
        stats.panicked,
        stats.timed_out,
        stats.discarded,
        stats.cancelled,
        stats.pending + stats.running,
    )
}
