//! A small bounded load test over a real loopback server: 2,000 requests at
//! concurrency 32 through a keep-alive hyper client, three tasks each (an
//! async task, an `add_blocking` closure and an `add_with` task). Every task
//! runs exactly once, in its request's order, and the counts add up.
//! `examples/soak.rs` is the large version (not run in CI).

mod support;

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{service_fn, Layer};
use tower_background::{BackgroundLayer, BackgroundTasks};

use support::{within, Server};

const REQUESTS: usize = 2_000;
const CONCURRENCY: usize = 32;
const TASKS: u8 = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_requests_three_tasks_each() {
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    // Per request: how many of its tasks have run (each checks its turn).
    let progress: Arc<Vec<AtomicU8>> = Arc::new((0..REQUESTS).map(|_| AtomicU8::new(0)).collect());
    let out_of_order = Arc::new(AtomicU64::new(0));
    let (p, o) = (Arc::clone(&progress), Arc::clone(&out_of_order));
    let svc = layer.layer(service_fn(move |req: Request<Incoming>| {
        let id: usize = req.uri().path()[1..].parse().unwrap();
        let tasks = req.extensions().get::<BackgroundTasks>().unwrap();
        let step = {
            let (p, o) = (Arc::clone(&p), Arc::clone(&o));
            move |k: u8| {
                if p[id].fetch_add(1, Ordering::SeqCst) != k {
                    o.fetch_add(1, Ordering::SeqCst);
                }
            }
        };
        let s = step.clone();
        tasks.add(async move {
            tokio::task::yield_now().await;
            s(0);
        });
        let s = step.clone();
        tasks.add_blocking(move || s(1));
        tasks.add_with(move |_| async move { step(2) });
        async { Ok::<_, Infallible>(Response::new(Full::<Bytes>::from("ok"))) }
    }));
    let server = Server::start(svc).await;
    let uri = format!("http://{}", server.addr);

    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let next = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..CONCURRENCY {
        let (client, next, uri) = (client.clone(), Arc::clone(&next), uri.clone());
        workers.push(tokio::spawn(async move {
            let mut ok = 0;
            loop {
                let id = next.fetch_add(1, Ordering::SeqCst) as usize;
                if id >= REQUESTS {
                    return ok;
                }
                let res = client
                    .get(format!("{uri}/{id}").parse().unwrap())
                    .await
                    .unwrap();
                assert_eq!(res.status(), 200);
                assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "ok");
                ok += 1;
            }
        }));
    }
    let mut completed_requests = 0;
    for w in workers {
        completed_requests += within("the client workers", w).await.unwrap();
    }
    assert_eq!(completed_requests, REQUESTS);
    within("every task", handle.wait_idle()).await;

    let expected = (REQUESTS * TASKS as usize) as u64;
    let stats = handle.stats();
    assert_eq!(stats.completed, expected, "{stats:?}");
    assert_eq!(stats.total(), expected, "{stats:?}");
    assert!(progress.iter().all(|p| p.load(Ordering::SeqCst) == TASKS));
    assert_eq!(out_of_order.load(Ordering::SeqCst), 0, "tasks ran in order");
    drop(client);
    server.graceful_shutdown().await;
}
