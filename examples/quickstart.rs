//! The first demo: a complete axum server whose handler queues a slow
//! "welcome email" as a background task, a `/stats` route, and a graceful
//! shutdown that drains the tasks. It sends its own requests and exits, so
//! one command shows the whole story:
//!
//! ```text
//! cargo run --example quickstart
//! ```
//!
//! It prints something like this (the first column is the time since start):
//!
//! ```text
//!   0.000511s  INFO serving on http://127.0.0.1:41327
//!   0.003127s  INFO POST /register: 200 OK, "welcome, ada@example.com"
//!   0.003790s  INFO GET /stats: 200 OK, "1 running, 0 pending, 0 completed, 0 failed"
//!   0.004062s  INFO server stopped; waiting up to 10 s for the background tasks
//!   0.503907s  INFO background_task{method=POST path=/register}: welcome email sent to ada@example.com
//!   0.504091s  INFO shut down: 1 task completed, 0 cancelled
//! ```
//!
//! The handler takes the queue with axum's `Extension` extractor, which needs
//! no feature of this crate, so the command above needs no `--features` (a
//! root dev-dependency on this crate with `features = ["axum"]` would do that
//! too, but it would turn the feature on for every test build of the root,
//! and `cargo test` without features would no longer test the library
//! without it). With the `axum` feature, `tasks: BackgroundTasks` is an
//! extractor of its own, and a missing layer gets an error that names the fix.

use std::error::Error;
use std::io::IsTerminal;
use std::time::Duration;

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Extension, Router};
use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tower_background::{BackgroundHandle, BackgroundLayer, BackgroundTasks};
use tracing_subscriber::filter::LevelFilter;

/// `POST /register` with an email address as the body: answers at once, and
/// the welcome email goes out after the response has been sent.
async fn register(Extension(tasks): Extension<BackgroundTasks>, email: String) -> String {
    let to = email.clone();
    tasks.add(async move {
        // Pretend to talk to a slow mail server.
        tokio::time::sleep(Duration::from_millis(500)).await;
        tracing::info!("welcome email sent to {to}");
    });
    format!("welcome, {email}")
}

/// `GET /stats`: what the layer's tasks are doing, in words.
async fn stats(State(handle): State<BackgroundHandle>) -> String {
    let stats = handle.stats();
    format!(
        "{} running, {} pending, {} completed, {} failed",
        stats.running, stats.pending, stats.completed, stats.failed
    )
}

/// "1 task", "2 tasks".
fn tasks(n: u64) -> String {
    if n == 1 {
        "1 task".to_owned()
    } else {
        format!("{n} tasks")
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error + Send + Sync>> {
    tracing_subscriber::fmt()
        .with_max_level(LevelFilter::INFO)
        .with_timer(tracing_subscriber::fmt::time::uptime())
        .with_target(false)
        // No colour codes when the output goes to a file or a pipe.
        .with_ansi(std::io::stdout().is_terminal())
        .init();

    let layer = BackgroundLayer::new();
    let handle = layer.handle(); // stats, wait_idle, shutdown
    let app = Router::new()
        .route("/register", post(register))
        .route("/stats", get(stats))
        .with_state(handle.clone())
        .layer(layer);

    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tracing::info!("serving on http://{addr}");
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stopped.await; // a real server waits for Ctrl-C or SIGTERM here
            })
            .await
    });

    // A client for the demo; in real life, the rest of the world.
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    for (method, path, body) in [
        (Method::POST, "/register", "ada@example.com"),
        (Method::GET, "/stats", ""),
    ] {
        let req = Request::builder()
            .method(method.clone())
            .uri(format!("http://{addr}{path}"))
            .body(Full::from(body))?;
        let res = client.request(req).await?;
        let status = res.status();
        let body = res.into_body().collect().await?.to_bytes();
        tracing::info!(
            "{method} {path}: {status}, {:?}",
            String::from_utf8_lossy(&body)
        );
    }
    drop(client); // closes its idle connection

    // First the server's graceful shutdown (the responses in flight finish,
    // which starts their tasks), then the background tasks get their grace.
    let _ = stop.send(());
    server.await??;
    let grace = Duration::from_secs(10);
    tracing::info!("server stopped; waiting up to 10 s for the background tasks");
    let report = handle.shutdown(grace).await;
    tracing::info!(
        "shut down: {} completed, {} cancelled",
        tasks(report.completed),
        report.cancelled
    );
    Ok(())
}
