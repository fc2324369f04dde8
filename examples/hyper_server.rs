//! A minimal hyper server: a plain `tower::service_fn` behind
//! `BackgroundLayer`, served through `hyper_util::service::TowerToHyperService`
//! (HTTP/1.1 and HTTP/2), with graceful shutdown on Ctrl-C followed by
//! `BackgroundHandle::shutdown`.
//!
//! ```text
//! cargo run --example hyper_server          # PORT=8080 to change the port, RUST_LOG=debug for more
//! curl http://127.0.0.1:3000/hello          # answers at once; the task logs half a second later
//! # stop it with Ctrl-C: in-flight responses finish, then tasks get 10 s
//! ```

use std::convert::Infallible;
use std::io::IsTerminal;
use std::net::Ipv4Addr;
use std::pin::pin;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tower::ServiceBuilder;
use tower_background::{BackgroundLayer, BackgroundTasks};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::prelude::*;

/// The handler: answers at once and queues a task that runs after the
/// response has been sent.
async fn hello(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let tasks = req
        .extensions()
        .get::<BackgroundTasks>()
        .expect("BackgroundLayer is installed")
        .clone();
    let path = req.uri().path().to_owned();
    tasks.add(async move {
        tokio::time::sleep(Duration::from_millis(500)).await; // write the analytics...
        tracing::info!(%path, "visit recorded after the response");
    });
    Ok(Response::new(Full::from(
        "hello from hyper; a background task records this visit\n",
    )))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    // `RUST_LOG` as a level or `target=level` list (`debug`,
    // `tower_background=debug`), INFO by default; no colour codes when the
    // output goes to a file or a pipe.
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|s| s.parse::<Targets>().ok())
        .unwrap_or_else(|| Targets::new().with_default(LevelFilter::INFO));
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_ansi(std::io::stdout().is_terminal()))
        .with(filter)
        .init();

    let port: u16 = match std::env::var("PORT") {
        Ok(port) => port.parse()?,
        Err(_) => 3000,
    };
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).await?;
    println!(
        "listening on http://{} (stop with Ctrl-C)",
        listener.local_addr()?
    );

    let layer = BackgroundLayer::new().task_timeout(Duration::from_secs(30));
    let handle = layer.handle();
    let svc = ServiceBuilder::new().layer(layer).service_fn(hello);

    let server = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    let mut ctrl_c = pin!(tokio::signal::ctrl_c());
    loop {
        tokio::select! {
            conn = listener.accept() => {
                let stream = match conn {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::warn!("accept failed: {e}");
                        continue;
                    }
                };
                let conn = server.serve_connection(
                    TokioIo::new(stream),
                    TowerToHyperService::new(svc.clone()),
                );
                let conn = graceful.watch(conn.into_owned());
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!("connection ended with an error: {e}");
                    }
                });
            }
            _ = ctrl_c.as_mut() => break,
        }
    }

    // First the server's own graceful shutdown: no new connections, the
    // responses in flight finish (and so trigger their tasks)...
    drop(listener);
    println!("shutting down: finishing the responses in flight");
    if tokio::time::timeout(Duration::from_secs(10), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after 10 s; closing them");
    }

    // ...then the background tasks get up to 10 seconds.
    let report = handle.shutdown(Duration::from_secs(10)).await;
    println!(
        "background tasks: {} completed during shutdown, {} cancelled",
        tasks(report.completed),
        report.cancelled
    );
    Ok(())
}

/// "1 task", "2 tasks".
fn tasks(n: u64) -> String {
    if n == 1 {
        "1 task".to_owned()
    } else {
        format!("{n} tasks")
    }
}
