//! The self-contained demo: a server on 127.0.0.1 whose handler queues a
//! slow "welcome email" as a background task, one request to it, and the
//! times at which the response arrived and the task finished.
//!
//! ```text
//! cargo run --example quickstart
//! ```

use std::convert::Infallible;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tower::ServiceBuilder;
use tower_background::{BackgroundLayer, BackgroundTasks};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let started = Instant::now();
    let layer = BackgroundLayer::new();
    let handle = layer.handle();

    // Any tower service works; with axum, add `.layer(BackgroundLayer::new())`
    // to the router and take `tasks: BackgroundTasks` as an extractor
    // (feature `axum`).
    let service = ServiceBuilder::new().layer(layer).service_fn(
        move |req: Request<hyper::body::Incoming>| async move {
            let tasks = req
                .extensions()
                .get::<BackgroundTasks>()
                .expect("BackgroundLayer is installed");
            tasks.add(async move {
                // Pretend to talk to a slow mail server.
                tokio::time::sleep(Duration::from_millis(500)).await;
                println!(
                    "[{:>4} ms] background task: welcome email sent",
                    started.elapsed().as_millis()
                );
            });
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("registered\n"))))
        },
    );

    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    println!("serving on http://{addr}");
    let server = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let service = TowerToHyperService::new(service.clone());
            tokio::spawn(async move {
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });

    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let res = client
        .request(
            Request::post(format!("http://{addr}/register"))
                .body(Full::default())
                .expect("a valid request"),
        )
        .await?;
    let status = res.status();
    let body = res.into_body().collect().await?.to_bytes();
    println!(
        "[{:>4} ms] response: {status} {}",
        started.elapsed().as_millis(),
        String::from_utf8_lossy(&body).trim()
    );

    // FastAPI's TestClient runs the tasks before it returns; here we wait.
    tokio::time::timeout(Duration::from_secs(10), handle.wait_idle()).await?;
    let stats = handle.stats();
    println!(
        "[{:>4} ms] idle: {} completed, {} failed",
        started.elapsed().as_millis(),
        stats.completed,
        stats.failed
    );

    server.abort();
    let report = handle.shutdown(Duration::from_secs(5)).await;
    println!("shut down: {} cancelled", report.cancelled);
    Ok(())
}
