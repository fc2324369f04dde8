//! Bad input and misuse get a clear answer, never a hang or a silent loss:
//! zero limits and timeouts are rejected by name, a request the layer did not
//! see has no queue, 10,000 tasks on one request all run once and in order,
//! tasks that add tasks to their own request, `shutdown` called twice and
//! concurrently, and `wait_idle` while requests keep arriving.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tokio::sync::{oneshot, Notify};
use tower::{service_fn, Layer, ServiceExt};
use tower_background::{BackgroundLayer, BackgroundTasks, Execution};

use support::{data, within, ChannelBody, Log, Res};

#[test]
#[should_panic(expected = "BackgroundLayer::max_concurrent_tasks")]
fn max_concurrent_tasks_zero_is_rejected_by_name() {
    let _ = BackgroundLayer::new().max_concurrent_tasks(0);
}

#[test]
#[should_panic(expected = "BackgroundLayer::task_timeout")]
fn zero_task_timeout_is_rejected_by_name() {
    let _ = BackgroundLayer::new().task_timeout(Duration::ZERO);
}

#[tokio::test]
async fn a_request_the_layer_did_not_see_has_no_queue() {
    // The same handler, once without and once behind the layer.
    let handler = service_fn(|req: Request<()>| async move {
        let present = req.extensions().get::<BackgroundTasks>().is_some();
        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(if present {
            "present"
        } else {
            "absent"
        }))))
    });
    let bare = handler.oneshot(Request::new(())).await.unwrap();
    assert_eq!(
        bare.into_body().collect().await.unwrap().to_bytes(),
        "absent"
    );
    let layered = BackgroundLayer::new()
        .layer(handler)
        .oneshot(Request::new(()))
        .await
        .unwrap();
    assert_eq!(
        layered.into_body().collect().await.unwrap().to_bytes(),
        "present"
    );
}

/// A one-shot service behind `layer` whose handler runs `queue` and answers
/// with an empty body.
async fn one_request(
    layer: &BackgroundLayer,
    queue: impl FnOnce(&BackgroundTasks) + Send + 'static,
) -> Response<tower_background::BackgroundBody<Full<Bytes>>> {
    let queue = Mutex::new(Some(queue));
    layer
        .layer(service_fn(move |req: Request<()>| {
            let tasks = req.extensions().get::<BackgroundTasks>().unwrap().clone();
            (queue.lock().unwrap().take().unwrap())(&tasks);
            async { Ok::<_, std::convert::Infallible>(Response::new(Full::default())) }
        }))
        .oneshot(Request::new(()))
        .await
        .unwrap()
}

#[tokio::test]
async fn ten_thousand_tasks_on_one_request_run_once_each_in_order() {
    const N: usize = 10_000;
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let order = Arc::new(Mutex::new(Vec::with_capacity(N)));
    let o = Arc::clone(&order);
    let res = one_request(&layer, move |tasks| {
        for i in 0..N {
            let o = Arc::clone(&o);
            tasks.add(async move { o.lock().unwrap().push(i) });
        }
        assert_eq!(tasks.len(), N);
    })
    .await;
    assert_eq!(handle.stats().pending, N as u64, "all wait for the body");
    assert!(
        order.lock().unwrap().is_empty(),
        "none ran before the body ended"
    );
    res.into_body().collect().await.unwrap();
    within("10,000 tasks", handle.wait_idle()).await;
    let order = order.lock().unwrap();
    assert_eq!(
        *order,
        (0..N).collect::<Vec<_>>(),
        "each ran once, in order"
    );
    let stats = handle.stats();
    assert_eq!(stats.completed, N as u64);
    assert_eq!(stats.total(), N as u64);
}

#[tokio::test]
async fn ten_thousand_concurrent_tasks_run_once_each() {
    const N: usize = 10_000;
    let layer = BackgroundLayer::new().execution(Execution::Concurrent);
    let handle = layer.handle();
    let ran: Arc<Vec<AtomicUsize>> = Arc::new((0..N).map(|_| AtomicUsize::new(0)).collect());
    let r = Arc::clone(&ran);
    let res = one_request(&layer, move |tasks| {
        for i in 0..N {
            let r = Arc::clone(&r);
            tasks.add(async move {
                r[i].fetch_add(1, Ordering::SeqCst);
            });
        }
    })
    .await;
    drop(res); // never polled: NoBody, the tasks run
    within("10,000 concurrent tasks", handle.wait_idle()).await;
    assert!(ran.iter().all(|n| n.load(Ordering::SeqCst) == 1));
    assert_eq!(handle.stats().completed, N as u64);
}

#[tokio::test]
async fn a_task_that_adds_to_its_own_queue_runs_behind_the_sequence() {
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let log = Log::default();
    let l = log.clone();
    let res = one_request(&layer, move |tasks| {
        let own = tasks.clone();
        let inner = l.clone();
        tasks.add(async move {
            inner.push("first");
            // Added while the sequence runs: appended behind "third".
            own.add(inner.task("child of first"));
            let again = own.clone();
            let deeper = inner.clone();
            own.add(async move {
                deeper.push("second child of first");
                // Added by a late task, when the queue is empty again.
                again.add(deeper.task("grandchild"));
            });
        });
        tasks.add(l.task("second"));
        tasks.add(l.task("third"));
    })
    .await;
    res.into_body().collect().await.unwrap();
    within("the tasks and their children", handle.wait_idle()).await;
    assert_eq!(
        log.get(),
        [
            "first",
            "second",
            "third",
            "child of first",
            "second child of first",
            "grandchild"
        ]
    );
    assert_eq!(handle.stats().completed, 6);
}

#[tokio::test]
async fn a_chain_of_tasks_each_adding_the_next_runs_to_the_end() {
    const DEPTH: usize = 200;
    fn link(tasks: BackgroundTasks, left: usize, count: Arc<AtomicUsize>) {
        let next = tasks.clone();
        tasks.add(async move {
            count.fetch_add(1, Ordering::SeqCst);
            if left > 1 {
                link(next, left - 1, count);
            }
        });
    }
    for execution in [Execution::Sequential, Execution::Concurrent] {
        let layer = BackgroundLayer::new().execution(execution);
        let handle = layer.handle();
        let count = Arc::new(AtomicUsize::new(0));
        let c = Arc::clone(&count);
        let res = one_request(&layer, move |tasks| link(tasks.clone(), DEPTH, c)).await;
        drop(res);
        within("the chain", handle.wait_idle()).await;
        assert_eq!(count.load(Ordering::SeqCst), DEPTH, "{execution:?}");
        assert_eq!(handle.stats().completed, DEPTH as u64, "{execution:?}");
    }
}

#[tokio::test]
async fn shutdown_twice_and_concurrently_gives_consistent_reports() {
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let log = Log::default();

    // Request A: finished; its first task runs until it is cancelled, two
    // more wait behind it. Request B: still streaming, two tasks wait for it.
    let started = Arc::new(Notify::new());
    let (l, s) = (log.clone(), Arc::clone(&started));
    let res_a = one_request(&layer, move |tasks| {
        let first = l.clone();
        tasks.add(async move {
            first.push("a1 started");
            s.notify_one();
            std::future::pending::<()>().await;
        });
        tasks.add(log_task(&l, "a2"));
        tasks.add(log_task(&l, "a3"));
    })
    .await;
    res_a.into_body().collect().await.unwrap();
    within("a1 to start", started.notified()).await;

    let (tx, body) = ChannelBody::new();
    let body = Mutex::new(Some(body));
    let l = log.clone();
    let svc = layer.layer(service_fn(move |req: Request<()>| {
        let tasks = req.extensions().get::<BackgroundTasks>().unwrap().clone();
        tasks.add(log_task(&l, "b1"));
        tasks.add(log_task(&l, "b2"));
        let body = body.lock().unwrap().take().expect("called once");
        async move { Res::Ok(Response::new(body)) }
    }));
    let res_b = svc.oneshot(Request::new(())).await.unwrap();
    let mut body_b = res_b.into_body();
    tx.send(data("partial")).unwrap();
    body_b.frame().await.unwrap().unwrap();
    assert_eq!(handle.stats().pending, 4);
    assert_eq!(handle.stats().running, 1);

    let grace = Duration::from_millis(50);
    let (r1, r2) = within("two concurrent shutdowns", async {
        tokio::join!(handle.shutdown(grace), handle.shutdown(grace))
    })
    .await;
    assert_eq!(r1, r2, "concurrent calls report the same");
    assert_eq!(r1.cancelled, 5, "a1 running, a2 a3 b1 b2 pending");
    assert_eq!(r1.completed, 0);

    // The streaming body finishes after the close: its tasks never run.
    drop(tx);
    assert!(body_b.frame().await.is_none());
    drop(body_b);
    let r3 = within("a third shutdown", handle.shutdown(grace)).await;
    assert_eq!((r3.completed, r3.cancelled), (0, 0), "nothing left to do");
    within("idle after shutdown", handle.wait_idle()).await;
    assert_eq!(log.get(), ["a1 started"], "nothing else ever ran");
    let stats = handle.stats();
    assert_eq!((stats.cancelled, stats.completed, stats.total()), (5, 0, 5));
}

fn log_task(log: &Log, event: &'static str) -> impl std::future::Future<Output = ()> + Send {
    log.task(event)
}

#[tokio::test]
async fn shutdown_reports_tasks_completed_during_the_grace_once() {
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let (release_tx, release_rx) = oneshot::channel::<()>();
    let res = one_request(&layer, move |tasks| {
        tasks.add(async move {
            let _ = release_rx.await;
        });
        tasks.add(async {});
    })
    .await;
    drop(res);
    let first = tokio::spawn(handle.shutdown(Duration::from_secs(10)));
    let second = tokio::spawn(handle.shutdown(Duration::from_secs(10)));
    tokio::task::yield_now().await;
    release_tx.send(()).unwrap();
    let r1 = within("shutdown", first).await.unwrap();
    let r2 = within("shutdown", second).await.unwrap();
    assert_eq!((r1.completed, r1.cancelled), (2, 0));
    assert_eq!(r1, r2);
    let r3 = within("a later shutdown", handle.shutdown(Duration::ZERO)).await;
    assert_eq!((r3.completed, r3.cancelled), (0, 0));
    assert_eq!(handle.stats().completed, 2);
}

/// `wait_idle` resolves at the first instant nothing is pending or running:
/// it waits for tasks already added (also those whose body still streams),
/// not for requests that have not arrived yet.
#[tokio::test]
async fn wait_idle_resolves_at_the_first_idle_instant() {
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let (a_tx, a_rx) = oneshot::channel::<()>();
    let (b_tx, b_rx) = oneshot::channel::<()>();
    let res = one_request(&layer, move |tasks| {
        tasks.add(async move {
            let _ = a_rx.await;
        })
    })
    .await;
    drop(res);
    let mut idle = tokio::spawn(handle.wait_idle());
    // Not idle: task A is running.
    assert!(tokio::time::timeout(Duration::from_millis(50), &mut idle)
        .await
        .is_err());
    // Request B arrives while A runs: wait_idle now waits for B too.
    let res = one_request(&layer, move |tasks| {
        tasks.add(async move {
            let _ = b_rx.await;
        })
    })
    .await;
    drop(res);
    a_tx.send(()).unwrap();
    assert!(tokio::time::timeout(Duration::from_millis(50), &mut idle)
        .await
        .is_err());
    b_tx.send(()).unwrap();
    within("wait_idle", idle).await.unwrap();
    assert_eq!(handle.stats().completed, 2);
    // Work that arrives later is not waited for by the future that resolved,
    // and a new wait_idle waits for it.
    let (c_tx, c_rx) = oneshot::channel::<()>();
    let res = one_request(&layer, move |tasks| {
        tasks.add(async move {
            let _ = c_rx.await;
        })
    })
    .await;
    drop(res);
    let mut idle = tokio::spawn(handle.wait_idle());
    assert!(tokio::time::timeout(Duration::from_millis(50), &mut idle)
        .await
        .is_err());
    c_tx.send(()).unwrap();
    within("wait_idle", idle).await.unwrap();
    assert_eq!(handle.stats().completed, 3);
}

/// A bounded stream of requests (with pauses, so there are idle instants)
/// and a `wait_idle` that starts in the middle: it resolves while the stream
/// goes on, and a `wait_idle` after the stream sees every task completed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_idle_while_requests_keep_arriving() {
    const REQUESTS: usize = 200;
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let done = Arc::new(AtomicUsize::new(0));
    let svc = layer.layer(service_fn({
        let done = Arc::clone(&done);
        move |req: Request<()>| {
            let done = Arc::clone(&done);
            req.extensions()
                .get::<BackgroundTasks>()
                .unwrap()
                .add(async move {
                    tokio::time::sleep(Duration::from_micros(200)).await;
                    done.fetch_add(1, Ordering::SeqCst);
                });
            async { Res::Ok(Response::new(Full::<Bytes>::default())) }
        }
    }));
    let producer = tokio::spawn(async move {
        for i in 0..REQUESTS {
            let res = svc.clone().oneshot(Request::new(())).await.unwrap();
            res.into_body().collect().await.unwrap();
            if i % 20 == 19 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(2)).await;
    within("wait_idle during the stream", handle.wait_idle()).await;
    within("the stream of requests", producer).await.unwrap();
    within("wait_idle after the stream", handle.wait_idle()).await;
    assert_eq!(done.load(Ordering::SeqCst), REQUESTS);
    let stats = handle.stats();
    assert_eq!(stats.completed, REQUESTS as u64);
    assert_eq!(stats.total(), REQUESTS as u64);
}

/// A clone of the queue moved to a thread outside any runtime (a sync
/// callback, a thread pool) adds a task after the response finished: a late
/// add still runs (issue 3, points 7 and 9: the tasks run on the runtime
/// that served the request, captured when the request arrived).
#[tokio::test]
async fn a_late_add_from_a_thread_outside_the_runtime_still_runs() {
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let (clone_tx, clone_rx) = oneshot::channel::<BackgroundTasks>();
    let clone_tx = Mutex::new(Some(clone_tx));
    let res = one_request(&layer, move |tasks| {
        let _ = clone_tx.lock().unwrap().take().unwrap().send(tasks.clone());
    })
    .await;
    res.into_body().collect().await.unwrap(); // finished, no task yet
    let tasks = clone_rx.await.unwrap();
    let (ran_tx, ran_rx) = oneshot::channel::<()>();
    std::thread::spawn(move || {
        tasks.add(async move {
            let _ = ran_tx.send(());
        });
    })
    .join()
    .unwrap();
    within("the late task added off the runtime", ran_rx)
        .await
        .expect("the task ran (it was not cancelled)");
    within("idle", handle.wait_idle()).await;
    let stats = handle.stats();
    assert_eq!((stats.completed, stats.cancelled), (1, 0), "{stats:?}");
}

/// The same, with the handler's own tasks added from a thread outside the
/// runtime and the body dropped on such a thread: the tasks still run on
/// the runtime that served the request.
#[tokio::test]
async fn tasks_added_and_finished_off_the_runtime_still_run() {
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let (ran_tx, ran_rx) = oneshot::channel::<()>();
    let ran_tx = Mutex::new(Some(ran_tx));
    let res = one_request(&layer, move |tasks| {
        let tasks = tasks.clone();
        let ran_tx = ran_tx.lock().unwrap().take().unwrap();
        std::thread::spawn(move || {
            tasks.add(async move {
                let _ = ran_tx.send(());
            })
        })
        .join()
        .unwrap();
    })
    .await;
    std::thread::spawn(move || drop(res)).join().unwrap();
    within("the task", ran_rx)
        .await
        .expect("the task ran (it was not cancelled)");
    within("idle", handle.wait_idle()).await;
    assert_eq!(handle.stats().completed, 1);
}

/// The runtime that serves the requests goes away (dropped) while one task
/// runs, two wait behind it, and another request's body is still held:
/// nothing is lost silently. Every task is counted (cancelled), nothing is
/// left pending or running, and dropping the held body afterwards (no
/// runtime anywhere) neither panics nor runs its task.
#[test]
fn the_runtime_going_away_cancels_and_counts_every_task() {
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let ran = Arc::new(AtomicUsize::new(0));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let held = rt.block_on(async {
        let (started_tx, started_rx) = oneshot::channel::<()>();
        let r = Arc::clone(&ran);
        let res = one_request(&layer, move |tasks| {
            tasks.add(async move {
                let _ = started_tx.send(());
                std::future::pending::<()>().await;
            });
            let r2 = Arc::clone(&r);
            tasks.add(async move {
                r2.fetch_add(1, Ordering::SeqCst);
            });
            tasks.add_blocking(move || {
                r.fetch_add(1, Ordering::SeqCst);
            });
        })
        .await;
        drop(res);
        within("the first task", started_rx).await.unwrap();
        let r = Arc::clone(&ran);
        one_request(&layer, move |tasks| {
            tasks.add(async move {
                r.fetch_add(1, Ordering::SeqCst);
            })
        })
        .await
    });
    let stats = handle.stats();
    assert_eq!((stats.running, stats.pending), (1, 3), "{stats:?}");
    drop(rt);
    let stats = handle.stats();
    assert_eq!(
        (stats.running, stats.pending, stats.cancelled),
        (0, 1, 3),
        "{stats:?}"
    );
    // The held body is dropped with no runtime at all.
    drop(held);
    let stats = handle.stats();
    assert_eq!(
        ran.load(Ordering::SeqCst),
        0,
        "no task ran after its runtime went away"
    );
    assert_eq!((stats.pending, stats.running), (0, 0), "{stats:?}");
    assert_eq!((stats.cancelled, stats.total()), (4, 4), "{stats:?}");
}

/// During the grace period, bodies that finish still start their tasks: a
/// shutdown started while a response streams waits for it, and its tasks
/// run and are reported as completed.
#[tokio::test]
async fn shutdown_grace_waits_for_a_body_that_finishes_during_it() {
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let log = Log::default();
    let (tx, body) = ChannelBody::new();
    let body = Mutex::new(Some(body));
    let l = log.clone();
    let svc = layer.layer(service_fn(move |req: Request<()>| {
        let tasks = req.extensions().get::<BackgroundTasks>().unwrap();
        tasks.add(l.task("one"));
        tasks.add(l.task("two"));
        let body = body.lock().unwrap().take().expect("called once");
        async move { Res::Ok(Response::new(body)) }
    }));
    let res = svc.oneshot(Request::new(())).await.unwrap();
    let mut body = res.into_body();
    tx.send(data("first")).unwrap();
    body.frame().await.unwrap().unwrap();
    let shutdown = tokio::spawn(handle.shutdown(Duration::from_secs(10)));
    tokio::task::yield_now().await;
    assert!(!shutdown.is_finished());
    drop(tx);
    assert!(body.frame().await.is_none()); // the body ends during the grace
    drop(body); // and the server lets go of it: its tasks start
    let report = within("the shutdown", shutdown).await.unwrap();
    assert_eq!((report.completed, report.cancelled), (2, 0));
    assert_eq!(log.get(), ["one", "two"]);
}
