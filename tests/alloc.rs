//! Allocation budget of `BackgroundLayer`: heap allocations per
//! request that the layer adds over the bare service, counted by a global
//! allocator on a current-thread runtime (so every allocation of the request,
//! its tasks and their runners happens on the test's own thread), after a
//! warm-up, averaged over many requests.
//!
//! Budgets, beyond the cost of inserting one entry into an empty
//! `http::Extensions` (measured here, not assumed):
//! - a request that queues no task: at most 1 allocation;
//! - each task: at most 1 allocation (its boxed future), plus at most one
//!   `tokio::spawn` per request (the cost of one spawn is measured here too);
//!   with `Execution::Concurrent`, one spawn per task, as documented;
//! - each frame of a streaming body: 0.
//!
//! No tracing subscriber is installed, so spans cost nothing here; with one,
//! each task's span is the subscriber's business.
// The budget of the default build: the `metrics` feature labels its counters
// at every task's end. (`.ci/run` runs this file without features.)
#![cfg(not(feature = "metrics"))]
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::task::JoinHandle;
use tower::{service_fn, Layer, Service, ServiceExt};
use tower_background::{BackgroundLayer, BackgroundTasks, Execution};

/// Counts the allocations made by the current thread.
struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn count_one() {
    // `try_with`: the thread-local may be gone while a thread exits.
    let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
}

// SAFETY: every call is forwarded unchanged to `System`; the counter is a
// const-initialised thread-local `Cell` that never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_one();
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_one();
        System.alloc_zeroed(layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_one();
        System.realloc(ptr, layout, new_size)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

const WARM_UP: u64 = 200;
const REQUESTS: u64 = 2_000;
/// Averages may carry the odd allocation of the runtime's own bookkeeping
/// (a growing list, a timer wheel level): this much per request is noise.
const NOISE: f64 = 0.05;

/// A body of `left` frames of static bytes: it allocates nothing itself.
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

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime")
}

fn request() -> Request<Frames> {
    let mut req = Request::new(Frames { left: 0 });
    *req.uri_mut() = http::Uri::from_static("/alloc");
    req
}

/// Average allocations per run of the async block `$one` on `$rt`, after a
/// warm-up (a macro: the block borrows the service).
macro_rules! per_call {
    ($rt:expr, $one:block) => {
        $rt.block_on(async {
            let bound = tokio::time::timeout(Duration::from_secs(60), async {
                for _ in 0..WARM_UP {
                    $one
                }
                let before = allocations();
                for _ in 0..REQUESTS {
                    $one
                }
                (allocations() - before) as f64 / REQUESTS as f64
            });
            bound.await.expect("the measurement finishes within 60 s")
        })
    };
}

/// Sends one request through `svc` and drains the response body.
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

/// The handler: queues `tasks` trivial tasks (if any) and answers with a
/// body of `frames` frames.
fn handler(
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

fn bare(frames: u32) -> f64 {
    let rt = runtime();
    let mut svc = handler(0, frames, Arc::new(AtomicU64::new(0)));
    per_call!(rt, { call(&mut svc).await })
}

/// Allocations per request through the layer, waiting for the tasks after
/// each request; checks that every task ran.
fn layered(execution: Execution, tasks: usize, frames: u32) -> f64 {
    let rt = runtime();
    let ran = Arc::new(AtomicU64::new(0));
    let layer = BackgroundLayer::new().execution(execution);
    let handle = layer.handle();
    let mut svc = layer.layer(handler(tasks, frames, Arc::clone(&ran)));
    let per = per_call!(rt, {
        call(&mut svc).await;
        if tasks > 0 {
            handle.wait_idle().await;
        }
    });
    let expected = (WARM_UP + REQUESTS) * tasks as u64;
    assert_eq!(ran.load(Ordering::Relaxed), expected, "every task ran");
    assert_eq!(handle.stats().completed, expected, "and was counted");
    per
}

/// Allocations per request of the bare handler that `tokio::spawn`s `tasks`
/// trivial tasks and waits for them through their `JoinHandle`s.
fn spawned(tasks: usize) -> f64 {
    let rt = runtime();
    let ran = Arc::new(AtomicU64::new(0));
    let handles: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::new(Mutex::new(Vec::with_capacity(16)));
    let mut svc = {
        let (ran, handles) = (Arc::clone(&ran), Arc::clone(&handles));
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
    };
    let per = per_call!(rt, {
        call(&mut svc).await;
        loop {
            let next = handles.lock().expect("not poisoned").pop();
            match next {
                Some(handle) => handle.await.expect("the task does not panic"),
                None => break,
            }
        }
    });
    assert_eq!(
        ran.load(Ordering::Relaxed),
        (WARM_UP + REQUESTS) * tasks as u64
    );
    per
}

/// Allocations of inserting one (non zero-sized) value into an empty
/// `http::Extensions`, as the layer does with its `BackgroundTasks`.
fn extension_entry() -> f64 {
    #[derive(Clone)]
    struct Probe(#[allow(dead_code)] u64);
    let before = allocations();
    for i in 0..REQUESTS {
        let mut extensions = http::Extensions::new();
        extensions.insert(Probe(i));
        std::hint::black_box(&extensions);
    }
    (allocations() - before) as f64 / REQUESTS as f64
}

struct Measured {
    bare: f64,
    extension_entry: f64,
    spawn: f64,
}

fn baseline() -> Measured {
    let bare = bare(1);
    let extension_entry = extension_entry();
    let spawn = spawned(1) - bare;
    println!("bare service: {bare:.2} allocations/request");
    println!("one entry in an empty http::Extensions: {extension_entry:.2} allocations");
    println!("one tokio::spawn (+ awaiting its JoinHandle): {spawn:.2} allocations");
    assert!(
        extension_entry >= 1.0,
        "an extension entry is boxed: the counter works"
    );
    assert!(
        spawn >= 1.0,
        "a spawn allocates its task: the counter works"
    );
    Measured {
        bare,
        extension_entry,
        spawn,
    }
}

#[test]
fn no_task_costs_at_most_one_allocation_beyond_the_extension_entry() {
    let m = baseline();
    let layer = layered(Execution::Sequential, 0, 1);
    let extra = layer - m.bare - m.extension_entry;
    println!(
        "layer, no task: {layer:.2} allocations/request, {extra:.2} beyond bare + extension entry (budget 1)"
    );
    assert!(
        extra <= 1.0 + NOISE,
        "no task: {extra:.2} allocations beyond budget 1"
    );
}

#[test]
fn each_task_costs_one_allocation_plus_one_spawn_per_request() {
    let m = baseline();
    let no_task = layered(Execution::Sequential, 0, 1);
    for tasks in [1usize, 10] {
        let layer = layered(Execution::Sequential, tasks, 1);
        let extra = layer - no_task;
        let budget = tasks as f64 + m.spawn;
        println!(
            "layer, {tasks} task(s), sequential: {layer:.2} allocations/request, {extra:.2} beyond no task \
             (budget {tasks} + one spawn = {budget:.2}); tokio::spawn by hand: {:.2} beyond bare",
            m.spawn * tasks as f64
        );
        assert!(
            extra <= budget + NOISE,
            "{tasks} sequential task(s): {extra:.2} allocations, budget {budget:.2}"
        );
    }
    let tasks = 10usize;
    let layer = layered(Execution::Concurrent, tasks, 1);
    let extra = layer - no_task;
    let budget = tasks as f64 * (1.0 + m.spawn);
    println!(
        "layer, {tasks} tasks, concurrent: {layer:.2} allocations/request, {extra:.2} beyond no task \
         (budget {tasks} x (1 + one spawn) = {budget:.2})"
    );
    assert!(
        extra <= budget + NOISE,
        "{tasks} concurrent tasks: {extra:.2} allocations, budget {budget:.2}"
    );
}

#[test]
fn body_frames_cost_no_allocation() {
    let frames = 1_000u32;
    let short = layered(Execution::Sequential, 0, 1) - bare(1);
    let long = layered(Execution::Sequential, 0, frames) - bare(frames);
    let per_frame = (long - short) / f64::from(frames - 1);
    println!(
        "layer over bare: {short:.2} allocations with 1 frame, {long:.2} with {frames} frames: \
         {per_frame:.5} per frame (budget 0)"
    );
    assert!(
        per_frame.abs() < 0.001,
        "{per_frame:.5} allocations per body frame, budget 0"
    );
}
