//! Micro-benchmarks of `BackgroundLayer`, each measured in the same
//! run as its baseline: the bare service, and the same service calling
//! `tokio::spawn` by hand.
//!
//! Every case calls the service through `tower::ServiceExt::oneshot` and
//! drains the response body frame by frame on a current-thread runtime.
//! The task cases wait until their tasks have run: through
//! `BackgroundHandle::wait_idle` for the layer, through the `JoinHandle`s for
//! `tokio::spawn`, so both sides do the same work.
//!
//! `layer/1_task_limits` is `layer/1_task` with `max_concurrent_tasks(1024)`,
//! `max_pending_tasks(100_000)`, `max_tasks_per_request(100)` and
//! `task_timeout(30 s)` set, none of them reached;
//! `layer/1_task_count_limits` the same without `task_timeout`.
//!
//! Run with `cargo bench -p perf --bench layer` (about one minute); see
//! docs/PERFORMANCE.md for the figures.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;
use tower::{service_fn, Layer, Service, ServiceExt};
use tower_background::{BackgroundHandle, BackgroundLayer, BackgroundTasks, Execution};

/// A body of `left` frames of 16 static bytes: no allocation per frame.
#[derive(Debug, Clone, Copy)]
struct Frames {
    left: u32,
}

impl Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        self.left -= 1;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
            b"0123456789abcdef",
        )))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(u64::from(self.left) * 16)
    }
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime")
}

fn request() -> Request<Frames> {
    Request::builder()
        .uri(http::Uri::from_static("/bench"))
        .body(Frames { left: 0 })
        .expect("a valid request")
}

/// Sends one request and reads its body to the end.
async fn call<S, B>(svc: &mut S)
where
    S: Service<Request<Frames>, Response = Response<B>, Error = Infallible>,
    B: Body,
    B::Error: std::fmt::Debug,
{
    let res = svc.oneshot(request()).await.expect("infallible");
    let mut body = std::pin::pin!(res.into_body());
    while let Some(frame) = body.frame().await {
        std::hint::black_box(frame.expect("no body error"));
    }
}

/// Runs `$iters` times the async block `$one` one after another on `$rt`
/// and returns the time taken (a macro: the block borrows the service).
macro_rules! run {
    ($rt:expr, $iters:expr, $one:block) => {
        $rt.block_on(async {
            let start = Instant::now();
            for _ in 0..$iters {
                $one
            }
            start.elapsed()
        })
    };
}

/// The handler of every case: `tasks` trivial tasks queued through the layer
/// (or spawned by hand), and a body of `frames` frames.
fn handler_layer(
    tasks: usize,
    frames: u32,
    ran: Arc<AtomicU64>,
) -> impl Service<Request<Frames>, Response = Response<Frames>, Error = Infallible> + Clone {
    service_fn(move |req: Request<Frames>| {
        if tasks > 0 {
            let queue = req
                .extensions()
                .get::<BackgroundTasks>()
                .expect("BackgroundLayer is installed");
            for _ in 0..tasks {
                let ran = Arc::clone(&ran);
                queue.add(async move {
                    ran.fetch_add(1, Ordering::Relaxed);
                });
            }
        }
        std::future::ready(Ok::<_, Infallible>(Response::new(Frames { left: frames })))
    })
}

type Handles = Arc<Mutex<Vec<JoinHandle<()>>>>;

fn handler_spawn(
    tasks: usize,
    ran: Arc<AtomicU64>,
    handles: Handles,
) -> impl Service<Request<Frames>, Response = Response<Frames>, Error = Infallible> + Clone {
    service_fn(move |_req: Request<Frames>| {
        let mut handles = handles.lock().expect("not poisoned");
        for _ in 0..tasks {
            let ran = Arc::clone(&ran);
            handles.push(tokio::spawn(async move {
                ran.fetch_add(1, Ordering::Relaxed);
            }));
        }
        std::future::ready(Ok::<_, Infallible>(Response::new(Frames { left: 1 })))
    })
}

async fn join_all(handles: &Handles) {
    loop {
        let next = handles.lock().expect("not poisoned").pop();
        match next {
            Some(handle) => handle.await.expect("the task does not panic"),
            None => break,
        }
    }
}

fn bench_layer(c: &mut Criterion, name: &str, execution: Execution, tasks: usize, frames: u32) {
    let layer = BackgroundLayer::new().execution(execution);
    bench_layer_with(c, name, layer, tasks, frames);
}

/// The same as `bench_layer` with every limit set, none of them reached:
/// what the production controls cost per request, next to the case without
/// them in the same run.
/// With `timeout` false, the three count limits only.
fn bench_layer_limits(c: &mut Criterion, name: &str, tasks: usize, timeout: bool) {
    let layer = BackgroundLayer::new()
        .max_concurrent_tasks(1024)
        .max_pending_tasks(100_000)
        .max_tasks_per_request(100);
    let layer = if timeout {
        layer.task_timeout(Duration::from_secs(30))
    } else {
        layer
    };
    bench_layer_with(c, name, layer, tasks, 1);
}

fn bench_layer_with(
    c: &mut Criterion,
    name: &str,
    layer: BackgroundLayer,
    tasks: usize,
    frames: u32,
) {
    let rt = runtime();
    let ran = Arc::new(AtomicU64::new(0));
    let handle: BackgroundHandle = layer.handle();
    let mut svc = layer.layer(handler_layer(tasks, frames, Arc::clone(&ran)));
    let mut requests = 0u64;
    c.bench_function(name, |b| {
        b.iter_custom(|iters| {
            requests += iters;
            run!(rt, iters, {
                call(&mut svc).await;
                if tasks > 0 {
                    handle.wait_idle().await;
                }
            })
        })
    });
    assert_eq!(
        ran.load(Ordering::Relaxed),
        requests * tasks as u64,
        "{name}: every task ran"
    );
    assert_eq!(
        handle.stats().completed,
        requests * tasks as u64,
        "{name}: stats agree"
    );
}

fn bench_bare(c: &mut Criterion, name: &str, frames: u32) {
    let rt = runtime();
    let ran = Arc::new(AtomicU64::new(0));
    let mut svc = handler_layer(0, frames, ran);
    c.bench_function(name, |b| {
        b.iter_custom(|iters| run!(rt, iters, { call(&mut svc).await }))
    });
}

fn bench_spawn(c: &mut Criterion, name: &str, tasks: usize) {
    let rt = runtime();
    let ran = Arc::new(AtomicU64::new(0));
    let handles: Handles = Arc::new(Mutex::new(Vec::with_capacity(tasks)));
    let mut svc = handler_spawn(tasks, Arc::clone(&ran), Arc::clone(&handles));
    let mut requests = 0u64;
    c.bench_function(name, |b| {
        b.iter_custom(|iters| {
            requests += iters;
            run!(rt, iters, {
                call(&mut svc).await;
                join_all(&handles).await;
            })
        })
    });
    assert_eq!(
        ran.load(Ordering::Relaxed),
        requests * tasks as u64,
        "{name}: every task ran"
    );
}

fn benches(c: &mut Criterion) {
    bench_bare(c, "bare", 1);
    bench_layer(c, "layer/no_task", Execution::Sequential, 0, 1);

    bench_spawn(c, "spawn/1_task", 1);
    bench_layer(c, "layer/1_task", Execution::Sequential, 1, 1);
    bench_layer_limits(c, "layer/1_task_limits", 1, true);
    bench_layer_limits(c, "layer/1_task_count_limits", 1, false);

    bench_spawn(c, "spawn/10_tasks", 10);
    bench_layer(c, "layer/10_tasks_sequential", Execution::Sequential, 10, 1);
    bench_layer(c, "layer/10_tasks_concurrent", Execution::Concurrent, 10, 1);

    bench_bare(c, "streaming/1000_frames/bare", 1000);
    bench_layer(
        c,
        "streaming/1000_frames/layer",
        Execution::Sequential,
        0,
        1000,
    );
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(60)
}

criterion_group! {
    name = layer;
    config = config();
    targets = benches
}
criterion_main!(layer);
