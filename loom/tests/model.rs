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
        let body = thread::spawn(move || drop(res)); // unpolled, with frames to send: Aborted (tasks still run)
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

/// Drops a flag when the task's future is dropped.
struct DropFlag(Arc<AtomicUsize>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn shutdown_cancels_a_task_that_waits_on_its_first_poll() {
    // The runner registers for the close's wakeup after the task's first
    // `Pending`; the close may come before, during or after that.
    loom::model(|| {
        let layer = BackgroundLayer::new();
        let handle = layer.handle();
        let dropped = Arc::new(AtomicUsize::new(0));
        let d = dropped.clone();
        let (fut, _tasks) = call(&layer, 0, true, move |t| {
            let flag = DropFlag(d);
            t.add(async move {
                let _flag = flag;
                std::future::pending::<()>().await
            })
        });
        let res = block_on(fut).unwrap();
        drop(res); // dropped unpolled: its task starts
        let report = block_on(handle.shutdown(Duration::ZERO));
        block_on(handle.wait_idle());
        let stats = handle.stats();
        settled(stats, 1);
        assert_eq!(stats.cancelled, 1, "{stats:?}");
        assert_eq!(report.cancelled, 1, "{report:?}");
        // The loom runner thread ends (it would deadlock otherwise) and drops
        // the task once.
    });
}

#[test]
fn two_shutdowns_on_two_threads_close_once() {
    loom::model(|| {
        let layer = BackgroundLayer::new();
        let handle = layer.handle();
        let (fut, _tasks) = call(&layer, 0, true, |t| t.add(std::future::pending::<()>()));
        let res = block_on(fut).unwrap();
        drop(res);
        let a = {
            let handle = handle.clone();
            thread::spawn(move || block_on(handle.shutdown(Duration::ZERO)))
        };
        let b = block_on(handle.shutdown(Duration::ZERO));
        let a = a.join().unwrap();
        block_on(handle.wait_idle());
        let stats = handle.stats();
        settled(stats, 1);
        assert_eq!(stats.cancelled, 1, "{stats:?}");
        // Each call reports what changed during it: the close is counted by
        // exactly the calls that overlapped it, never twice in the stats.
        assert!(a.cancelled <= 1 && b.cancelled <= 1, "{a:?} {b:?}");
        assert!(a.cancelled + b.cancelled >= 1, "{a:?} {b:?}");
    });
}

#[test]
fn a_request_waiting_for_a_permit_races_shutdown() {
    // max_concurrent_tasks(1): the second request waits in the layer's FIFO
    // while the first one's task runs; the close races the end of that task
    // and the hand-over of its permit.
    loom::model(|| {
        let layer = BackgroundLayer::new().max_concurrent_tasks(1);
        let handle = layer.handle();
        let runs = Runs::new(2);
        let r = runs.clone();
        let (first, _t1) = call(&layer, 0, true, move |t| t.add(r.task(0)));
        let r = runs.clone();
        let (second, _t2) = call(&layer, 0, true, move |t| t.add(r.task(1)));
        let (first, second) = (block_on(first).unwrap(), block_on(second).unwrap());
        drop(first);
        drop(second); // waits for the permit, or runs if the first is done
        let shutdown = {
            let handle = handle.clone();
            thread::spawn(move || block_on(handle.shutdown(Duration::ZERO)))
        };
        shutdown.join().unwrap();
        block_on(handle.wait_idle());
        let stats = handle.stats();
        settled(stats, 2);
        for i in 0..2 {
            assert!(runs.count(i) <= 1, "task {i} ran twice");
        }
        let ran = (runs.count(0) + runs.count(1)) as u64;
        assert!(stats.completed <= ran, "{stats:?}, ran {ran}");
        assert_eq!(stats.completed + stats.cancelled, 2, "{stats:?}");
    });
}

#[test]
fn a_request_waiting_for_a_permit_is_started_by_the_release() {
    loom::model(|| {
        let layer = BackgroundLayer::new().max_concurrent_tasks(1);
        let handle = layer.handle();
        let runs = Runs::new(2);
        let r = runs.clone();
        let (first, _t1) = call(&layer, 0, true, move |t| t.add(r.task(0)));
        let r = runs.clone();
        let (second, _t2) = call(&layer, 0, true, move |t| t.add(r.task(1)));
        let first = block_on(first).unwrap();
        let second = block_on(second).unwrap();
        let other = thread::spawn(move || drop(second));
        drop(first);
        other.join().unwrap();
        block_on(handle.wait_idle());
        assert_eq!((runs.count(0), runs.count(1)), (1, 1));
        let stats = handle.stats();
        settled(stats, 2);
        assert_eq!(stats.completed, 2, "{stats:?}");
    });
}
