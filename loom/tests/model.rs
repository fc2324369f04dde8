//! Model checks of the request state machine: every interleaving (up to
//! loom's preemption bound) of a handler's adds, late adds from other
//! threads, the end or drop of the response body, the drop of the response
//! future, the runners and `shutdown`.
//!
//! Asserted in every interleaving: each task's body is entered at most once
//! (exactly once where it must run), each task ends in exactly one bucket of
//! `Stats`, `pending` and `running` return to zero, and nothing deadlocks
//! (loom reports a deadlock as a failure).
//!
//! ```text
//! cd loom && RUSTFLAGS="--cfg tower_background_loom" LOOM_MAX_PREEMPTIONS=2 cargo test --release
//! ```
#![cfg(tower_background_loom)]

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use loom::future::block_on;
use loom::thread;
use tower_background::{BackgroundLayer, BackgroundTasks, Completion, Execution, Outcome, Stats};
use tower_layer::Layer;
use tower_service::Service;

/// A body of `n` data frames.
struct Frames(usize);

impl Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.0 == 0 {
            return Poll::Ready(None);
        }
        self.0 -= 1;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"x")))))
    }
}

/// A service whose handler runs `queue` synchronously in `call`, then
/// answers at once (or never, with `respond: false`).
struct Handler<F> {
    queue: Option<F>,
    respond: bool,
    frames: usize,
}

type Answer = Pin<Box<dyn Future<Output = Result<Response<Frames>, Infallible>> + Send>>;

impl<F: FnOnce(&BackgroundTasks)> Service<Request<()>> for Handler<F> {
    type Response = Response<Frames>;
    type Error = Infallible;
    type Future = Answer;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<()>) -> Answer {
        let tasks = req.extensions().get::<BackgroundTasks>().unwrap();
        (self.queue.take().unwrap())(tasks);
        if self.respond {
            let frames = self.frames;
            Box::pin(async move { Ok(Response::new(Frames(frames))) })
        } else {
            Box::pin(std::future::pending())
        }
    }
}

/// Counts how often each task's body was entered.
#[derive(Clone)]
struct Runs(Arc<Vec<AtomicUsize>>);

impl Runs {
    fn new(n: usize) -> Self {
        Runs(Arc::new((0..n).map(|_| AtomicUsize::new(0)).collect()))
    }
    fn task(&self, i: usize) -> impl Future<Output = ()> + Send + 'static {
        let runs = self.clone();
        async move {
            runs.0[i].fetch_add(1, Ordering::SeqCst);
        }
    }
    fn count(&self, i: usize) -> usize {
        self.0[i].load(Ordering::SeqCst)
    }
}

/// Calls the layer once; returns the response future and a clone of the
/// request's queue for late adds.
fn call(
    layer: &BackgroundLayer,
    frames: usize,
    respond: bool,
    queue: impl FnOnce(&BackgroundTasks) + 'static,
) -> (
    <tower_background::BackgroundService<Handler<Box<dyn FnOnce(&BackgroundTasks)>>> as Service<
        Request<()>,
    >>::Future,
    BackgroundTasks,
) {
    let slot = Arc::new(Mutex::new(None));
    let s = slot.clone();
    let queue: Box<dyn FnOnce(&BackgroundTasks)> = Box::new(move |t: &BackgroundTasks| {
        *s.lock().unwrap() = Some(t.clone());
        queue(t);
    });
    let mut svc = layer.layer(Handler {
        queue: Some(queue),
        respond,
        frames,
    });
    let fut = svc.call(Request::new(()));
    let tasks = slot.lock().unwrap().take().unwrap();
    (fut, tasks)
}

fn settled(stats: Stats, total: u64) {
    assert_eq!(stats.pending, 0, "{stats:?}");
    assert_eq!(stats.running, 0, "{stats:?}");
    assert_eq!(stats.total(), total, "{stats:?}");
}

#[test]
fn late_add_races_the_end_of_the_body() {
    loom::model(|| {
        let layer = BackgroundLayer::new();
        let handle = layer.handle();
        let runs = Runs::new(3);
        let r = runs.clone();
        let (fut, tasks) = call(&layer, 1, true, move |t| t.add(r.task(0)));
        let res = block_on(fut).unwrap();

        let body = thread::spawn(move || {
            block_on(res.into_body().collect()).unwrap();
        });
        // Two late adds race the end of the body (loom allows few threads:
        // the body thread, this one and up to two runners).
        tasks.add(runs.task(1));
        tasks.add(runs.task(2));
        body.join().unwrap();
        block_on(handle.wait_idle());
        for i in 0..3 {
            assert_eq!(runs.count(i), 1, "task {i}");
        }
        let stats = handle.stats();
        settled(stats, 3);
        assert_eq!(stats.completed, 3);
    });
}

#[test]
fn concurrent_execution_late_add_races_the_end_of_the_body() {
    loom::model(|| {
        let layer = BackgroundLayer::new().execution(Execution::Concurrent);
        let handle = layer.handle();
        let runs = Runs::new(2);
        let r = runs.clone();
        let (fut, tasks) = call(&layer, 1, true, move |t| t.add(r.task(0)));
        let res = block_on(fut).unwrap();
        let body = thread::spawn(move || drop(res)); // unpolled: NoBody
        tasks.add(runs.task(1));
        body.join().unwrap();
        block_on(handle.wait_idle());
        assert_eq!((runs.count(0), runs.count(1)), (1, 1));
        settled(handle.stats(), 2);
    });
}

#[test]
fn abort_without_run_on_abort_races_late_adds() {
    loom::model(|| {
        let layer = BackgroundLayer::new().run_on_abort(false);
        let handle = layer.handle();
        let runs = Runs::new(2);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (fut, tasks) = call(&layer, 2, true, |_| {});
        let res = block_on(fut).unwrap();
        let body = thread::spawn(move || {
            let mut body = res.into_body();
            block_on(body.frame()).unwrap().unwrap();
            drop(body); // mid-stream: aborted
        });
        let late = {
            let (tasks, runs, seen) = (tasks.clone(), runs.clone(), seen.clone());
            thread::spawn(move || {
                tasks.add(runs.task(0));
                let r = runs.clone();
                tasks.add_with(move |c: Completion| {
                    seen.lock().unwrap().push(c.outcome());
                    r.task(1)
                });
            })
        };
        body.join().unwrap();
        late.join().unwrap();
        block_on(handle.wait_idle());
        assert_eq!(runs.count(0), 0, "a plain task ran after an abort");
        assert_eq!(runs.count(1), 1);
        assert_eq!(*seen.lock().unwrap(), [Outcome::Aborted]);
        let stats = handle.stats();
        settled(stats, 2);
        assert_eq!((stats.discarded, stats.completed), (1, 1), "{stats:?}");
    });
}

#[test]
fn a_dropped_response_future_races_a_late_add() {
    loom::model(|| {
        let layer = BackgroundLayer::new();
        let handle = layer.handle();
        let runs = Runs::new(2);
        let r = runs.clone();
        let (fut, tasks) = call(&layer, 1, false, move |t| t.add(r.task(0)));
        let dropper = thread::spawn(move || drop(fut));
        let r = runs.clone();
        tasks.add_with(move |_| r.task(1));
        dropper.join().unwrap();
        block_on(handle.wait_idle());
        assert_eq!((runs.count(0), runs.count(1)), (0, 0));
        let stats = handle.stats();
        settled(stats, 2);
        assert_eq!(stats.discarded, 2);
    });
}

#[test]
fn shutdown_races_the_end_of_the_body_and_a_late_add() {
    loom::model(|| {
        let layer = BackgroundLayer::new();
        let handle = layer.handle();
        let runs = Runs::new(2);
        let r = runs.clone();
        let (fut, tasks) = call(&layer, 1, true, move |t| t.add(r.task(0)));
        let res = block_on(fut).unwrap();
        let body = thread::spawn(move || drop(res));
        let shutdown = {
            let handle = handle.clone();
            thread::spawn(move || block_on(handle.shutdown(Duration::ZERO)))
        };
        tasks.add(runs.task(1));
        body.join().unwrap();
        let report = shutdown.join().unwrap();
        block_on(handle.wait_idle());
        let stats = handle.stats();
        settled(stats, 2);
        for i in 0..2 {
            assert!(runs.count(i) <= 1, "task {i} ran twice");
        }
        // A task counted as completed did run; one that never ran was
        // counted as cancelled (a running task may be cancelled after it
        // was entered).
        let ran = (runs.count(0) + runs.count(1)) as u64;
        assert!(stats.completed <= ran, "{stats:?}, ran {ran}");
        assert_eq!(stats.completed + stats.cancelled, 2, "{stats:?}");
        assert!(report.cancelled <= stats.cancelled);
    });
}
