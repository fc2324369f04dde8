//! The core contract, semantic by semantic, through `oneshot` calls and
//! bodies the tests drive frame by frame. The numbers refer to the
//! semantics listed in the crate documentation and the README.

mod support;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Empty, Full};
use tokio::sync::{oneshot, Notify};
use tower::{service_fn, Layer, ServiceExt};
use tower_background::{BackgroundLayer, BackgroundTasks, Completion, Execution, Outcome};

use support::{call, data, settle, within, ChannelBody, Log};

fn full(s: &'static str) -> Response<Full<Bytes>> {
    Response::new(Full::new(Bytes::from_static(s.as_bytes())))
}

// ---------------------------------------------------------------------------
// 1. When tasks start
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn s1_tasks_wait_for_the_end_of_a_streaming_body() {
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let log = Log::default();
    let (tx, body) = ChannelBody::new();
    let task = log.task("task");
    let mut res = call(&layer, Response::new(body), move |t| t.add(task)).await;

    tx.send(data("one")).unwrap();
    let frame = within("frame", res.body_mut().frame())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(frame.into_data().unwrap(), "one");
    settle().await;
    assert!(
        log.get().is_empty(),
        "a task started while the body was streaming"
    );
    assert_eq!(handle.stats().pending, 1);

    tx.send(data("two")).unwrap();
    drop(tx);
    let rest = within("rest", res.into_body().collect()).await.unwrap();
    assert_eq!(rest.to_bytes(), "two");
    within("idle", handle.wait_idle()).await;
    assert_eq!(log.get(), ["task"]);
    assert_eq!(handle.stats().completed, 1);
}

#[tokio::test(start_paused = true)]
async fn s1_end_of_stream_after_a_frame_starts_tasks_when_the_server_drops_the_body() {
    // hyper stops polling a body that reports `is_end_stream` after its last
    // frame, and drops it right after writing that frame. The tasks start
    // then, not inside the poll that hands the frame over (that poll would
    // race the server's write of the frame).
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let (done_tx, mut done_rx) = oneshot::channel();
    let mut res = call(&layer, full("whole"), move |t| {
        t.add_with(move |c: Completion| async move {
            let _ = done_tx.send(c.outcome());
        })
    })
    .await;
    let frame = res.body_mut().frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), "whole");
    assert!(http_body::Body::is_end_stream(res.body()));
    settle().await;
    assert!(
        done_rx.try_recv().is_err(),
        "a task started inside the poll that yielded the last frame"
    );
    assert_eq!(handle.stats().pending, 1);
    drop(res);
    assert_eq!(within("task", done_rx).await.unwrap(), Outcome::Finished);
    within("idle", handle.wait_idle()).await;
    assert_eq!(handle.stats().completed, 1);
    assert_eq!(handle.stats().total(), 1);
}

#[tokio::test]
async fn s1_a_body_polled_again_after_its_end_starts_its_tasks() {
    // A consumer that keeps polling (rather than dropping) lets go too.
    let layer = BackgroundLayer::new();
    let (done_tx, done_rx) = oneshot::channel();
    let mut res = call(&layer, full("whole"), move |t| {
        t.add_with(move |c: Completion| async move {
            let _ = done_tx.send(c.outcome());
        })
    })
    .await;
    res.body_mut().frame().await.unwrap().unwrap();
    assert!(res.body_mut().frame().await.is_none());
    assert_eq!(within("task", done_rx).await.unwrap(), Outcome::Finished);
}

#[tokio::test]
async fn s1_a_body_with_bytes_to_send_dropped_unpolled_is_aborted() {
    // The server never sent it: a client that reset its stream right after
    // the headers (HTTP/2), or a timeout outside the layer.
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let log = Log::default();
    let (tx, rx) = oneshot::channel();
    let task = log.task("plain");
    let res = call(&layer, full("never read"), move |t| {
        t.add(task);
        t.add_with(move |c: Completion| async move {
            let _ = tx.send(c);
        });
    })
    .await;
    drop(res);
    let completion = within("completion", rx).await.unwrap();
    assert_eq!(completion.outcome(), Outcome::Aborted);
    assert_eq!(completion.status(), StatusCode::OK);
    within("idle", handle.wait_idle()).await;
    assert_eq!(log.get(), ["plain"], "run_on_abort is true by default");
    assert_eq!(handle.stats().completed, 2);
}

#[tokio::test]
async fn s1_a_body_with_bytes_to_send_dropped_unpolled_is_discarded_without_run_on_abort() {
    let layer = BackgroundLayer::new().run_on_abort(false);
    let handle = layer.handle();
    let log = Log::default();
    let task = log.task("plain");
    let res = call(&layer, full("never read"), move |t| t.add(task)).await;
    drop(res);
    within("idle", handle.wait_idle()).await;
    assert!(log.get().is_empty());
    assert_eq!(handle.stats().discarded, 1);
}

/// The responses that have nothing to send, which servers drop unpolled.
async fn outcome_of_unpolled(method: http::Method, res: Response<Full<Bytes>>) -> Outcome {
    let layer = BackgroundLayer::new().run_on_abort(false);
    let (tx, rx) = oneshot::channel();
    let slot = Mutex::new(Some((res, tx)));
    let svc = layer.layer(service_fn(move |req: Request<()>| {
        let (res, tx) = slot.lock().unwrap().take().expect("called once");
        req.extensions().get::<BackgroundTasks>().unwrap().add_with(
            move |c: Completion| async move {
                let _ = tx.send(c.outcome());
            },
        );
        std::future::ready(Ok::<_, Infallible>(res))
    }));
    let mut req = Request::new(());
    *req.method_mut() = method;
    drop(svc.oneshot(req).await.unwrap());
    within("task", rx).await.unwrap()
}

#[tokio::test]
async fn s1_a_response_with_nothing_to_send_dropped_unpolled_has_no_body() {
    use http::Method;
    let status = |code: u16| {
        let mut res = full("ignored by the server");
        *res.status_mut() = StatusCode::from_u16(code).unwrap();
        res
    };
    assert_eq!(
        outcome_of_unpolled(Method::HEAD, full("length only")).await,
        Outcome::NoBody
    );
    for code in [204, 304, 101] {
        assert_eq!(
            outcome_of_unpolled(Method::GET, status(code)).await,
            Outcome::NoBody,
            "{code}"
        );
    }
    assert_eq!(
        outcome_of_unpolled(Method::GET, Response::new(Full::default())).await,
        Outcome::NoBody,
        "size exactly 0"
    );
    assert_eq!(
        outcome_of_unpolled(Method::GET, full("bytes")).await,
        Outcome::Aborted
    );
}

#[tokio::test]
async fn s1_empty_body_polled_to_none_is_finished() {
    let layer = BackgroundLayer::new();
    let (tx, rx) = oneshot::channel();
    let res = call(&layer, Response::new(Empty::<Bytes>::new()), move |t| {
        t.add_with(move |c: Completion| async move {
            let _ = tx.send(c.outcome());
        })
    })
    .await;
    assert!(res
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .is_empty());
    assert_eq!(within("task", rx).await.unwrap(), Outcome::Finished);
}

#[tokio::test]
async fn s1_a_trailers_frame_ends_the_body() {
    // Trailers are the last frame: HTTP/2 servers do not poll for `None`
    // after them, and this body would never yield it.
    let layer = BackgroundLayer::new();
    let (tx, body) = ChannelBody::new();
    let (done_tx, done_rx) = oneshot::channel();
    let mut res = call(&layer, Response::new(body), move |t| {
        t.add_with(move |c: Completion| async move {
            let _ = done_tx.send(c.outcome());
        })
    })
    .await;
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    tx.send(data("payload")).unwrap();
    tx.send(Ok(Frame::trailers(trailers))).unwrap();
    res.body_mut().frame().await.unwrap().unwrap();
    let frame = res.body_mut().frame().await.unwrap().unwrap();
    assert!(frame.is_trailers());
    drop(res); // what the server does after the last frame
    assert_eq!(within("task", done_rx).await.unwrap(), Outcome::Finished);
    drop(tx);
}

// ---------------------------------------------------------------------------
// 2. The response never waits
// ---------------------------------------------------------------------------

#[tokio::test]
async fn s2_a_task_that_never_ends_does_not_hold_the_response() {
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let started = Arc::new(Notify::new());
    let s = started.clone();
    let res = call(&layer, full("at once"), move |t| {
        t.add(async move {
            s.notify_one();
            std::future::pending::<()>().await
        })
    })
    .await;
    let body = within("body", res.into_body().collect()).await.unwrap();
    assert_eq!(body.to_bytes(), "at once");
    within("task start", started.notified()).await;
    assert_eq!(handle.stats().running, 1);
}

#[tokio::test(flavor = "current_thread")]
async fn s2_add_blocking_runs_off_the_async_workers() {
    // One async worker: if the blocking closure ran on it, the second
    // request below could not complete until the closure was released.
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let (entered_tx, entered_rx) = oneshot::channel();
    let res = call(&layer, full("first"), move |t| {
        t.add_blocking(move || {
            let _ = entered_tx.send(());
            release_rx.recv().unwrap();
        })
    })
    .await;
    within("first body", res.into_body().collect())
        .await
        .unwrap();
    within("blocking closure entered", entered_rx)
        .await
        .unwrap();

    let second = call(&layer, full("second"), |_| {}).await;
    let body = within("second body", second.into_body().collect())
        .await
        .unwrap();
    assert_eq!(body.to_bytes(), "second");
    assert_eq!(handle.stats().running, 1);

    release_tx.send(()).unwrap();
    within("idle", handle.wait_idle()).await;
    assert_eq!(handle.stats().completed, 1);
}

// ---------------------------------------------------------------------------
// 3. Order
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn s3_sequential_tasks_run_one_after_another_in_order() {
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let log = Log::default();
    let gate = Arc::new(Notify::new());
    let (l, g) = (log.clone(), gate.clone());
    let res = call(&layer, full(""), move |t| {
        let l1 = l.clone();
        t.add(async move {
            l1.push("a start");
            g.notified().await;
            l1.push("a end");
        });
        t.add(l.task("b"));
        let l3 = l.clone();
        t.add_blocking(move || l3.push("c"));
        t.add_with(move |_| l.task("d"));
    })
    .await;
    res.into_body().collect().await.unwrap();
    settle().await;
    assert_eq!(log.get(), ["a start"], "b started before a ended");
    gate.notify_one();
    within("idle", handle.wait_idle()).await;
    assert_eq!(log.get(), ["a start", "a end", "b", "c", "d"]);
}

#[tokio::test(start_paused = true)]
async fn s3_concurrent_tasks_all_start_together() {
    let layer = BackgroundLayer::new().execution(Execution::Concurrent);
    let handle = layer.handle();
    let log = Log::default();
    let gate = Arc::new(Notify::new());
    let (l, g) = (log.clone(), gate.clone());
    let res = call(&layer, full(""), move |t| {
        for name in ["a", "b", "c"] {
            let (l, g) = (l.clone(), g.clone());
            t.add(async move {
                l.push(format!("{name} start"));
                g.notified().await;
                l.push(format!("{name} end"));
            });
        }
    })
    .await;
    res.into_body().collect().await.unwrap();
    settle().await;
    assert_eq!(log.get(), ["a start", "b start", "c start"]);
    assert_eq!(handle.stats().running, 3);
    gate.notify_waiters();
    within("idle", handle.wait_idle()).await;
    assert_eq!(handle.stats().completed, 3);
}

// ---------------------------------------------------------------------------
// 4. Abort
// ---------------------------------------------------------------------------

async fn abort_mid_stream(layer: &BackgroundLayer, log: &Log) -> Completion {
    let (tx, body) = ChannelBody::new();
    let (done_tx, done_rx) = oneshot::channel();
    let (plain, blocking_log) = (log.task("plain"), log.clone());
    let mut res = call(layer, Response::new(body), move |t| {
        t.add(plain);
        t.add_blocking(move || blocking_log.push("blocking"));
        t.add_with(move |c: Completion| async move {
            let _ = done_tx.send(c);
        });
    })
    .await;
    tx.send(data("partial")).unwrap();
    res.body_mut().frame().await.unwrap().unwrap();
    drop(res); // the client went away
    within("add_with task", done_rx).await.unwrap()
}

#[tokio::test]
async fn s4_tasks_run_when_the_client_disconnects_mid_stream() {
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let log = Log::default();
    let completion = abort_mid_stream(&layer, &log).await;
    assert_eq!(completion.outcome(), Outcome::Aborted);
    within("idle", handle.wait_idle()).await;
    assert_eq!(log.get(), ["plain", "blocking"]);
    assert_eq!(handle.stats().completed, 3);
}

#[tokio::test]
async fn s4_run_on_abort_false_discards_plain_tasks_but_runs_add_with() {
    let layer = BackgroundLayer::new().run_on_abort(false);
    let handle = layer.handle();
    let log = Log::default();
    let completion = abort_mid_stream(&layer, &log).await;
    assert_eq!(completion.outcome(), Outcome::Aborted);
    assert_eq!(completion.status(), StatusCode::OK);
    within("idle", handle.wait_idle()).await;
    assert!(log.get().is_empty(), "plain tasks ran: {:?}", log.get());
    let stats = handle.stats();
    assert_eq!((stats.discarded, stats.completed), (2, 1), "{stats:?}");
}

#[tokio::test]
async fn s4_a_body_error_is_reported_and_handled_like_an_abort() {
    for run_on_abort in [true, false] {
        let layer = BackgroundLayer::new().run_on_abort(run_on_abort);
        let handle = layer.handle();
        let log = Log::default();
        let (tx, body) = ChannelBody::new();
        let (done_tx, done_rx) = oneshot::channel();
        let plain = log.task("plain");
        let res = call(&layer, Response::new(body), move |t| {
            t.add(plain);
            t.add_with(move |c: Completion| async move {
                let _ = done_tx.send(c.outcome());
            });
        })
        .await;
        tx.send(data("a")).unwrap();
        tx.send(Err(std::io::Error::other("disk failed"))).unwrap();
        assert!(res.into_body().collect().await.is_err());
        assert_eq!(
            within("add_with", done_rx).await.unwrap(),
            Outcome::BodyError
        );
        within("idle", handle.wait_idle()).await;
        let expected: &[&str] = if run_on_abort { &["plain"] } else { &[] };
        assert_eq!(log.get(), expected);
        assert_eq!(handle.stats().discarded, u64::from(!run_on_abort));
    }
}

#[tokio::test]
async fn s4_add_with_sees_the_status_of_an_error_response() {
    let layer = BackgroundLayer::new();
    let (tx, rx) = oneshot::channel();
    let mut res = full("oops");
    *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    let res = call(&layer, res, move |t| {
        t.add_with(move |c: Completion| async move {
            let _ = tx.send(c);
        })
    })
    .await;
    res.into_body().collect().await.unwrap();
    let c = within("completion", rx).await.unwrap();
    assert_eq!(c.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(c.outcome(), Outcome::Finished);
}

// ---------------------------------------------------------------------------
// 5. No response
// ---------------------------------------------------------------------------

#[tokio::test]
async fn s5_a_response_future_dropped_before_the_response_discards_tasks() {
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let log = Log::default();
    let (added_tx, added_rx) = oneshot::channel();
    let added_tx = Mutex::new(Some(added_tx));
    let l = log.clone();
    let svc = layer.layer(service_fn(move |req: Request<()>| {
        let t = req.extensions().get::<BackgroundTasks>().unwrap().clone();
        let (l, tx) = (l.clone(), added_tx.lock().unwrap().take());
        async move {
            t.add(l.task("plain"));
            t.add_with(move |_| l.task("with"));
            let _ = tx.unwrap().send(());
            std::future::pending::<Result<Response<Full<Bytes>>, Infallible>>().await
        }
    }));
    let call = tokio::spawn(svc.oneshot(Request::new(())));
    within("handler", added_rx).await.unwrap();
    call.abort(); // a timeout layer or a closed connection drops the future
    assert!(call.await.unwrap_err().is_cancelled());
    within("idle", handle.wait_idle()).await;
    assert!(log.get().is_empty());
    assert_eq!(handle.stats().discarded, 2);
}

// ---------------------------------------------------------------------------
// 6. Isolation
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn s6_a_task_past_its_timeout_is_dropped_and_the_next_runs() {
    let layer = BackgroundLayer::new().task_timeout(Duration::from_millis(100));
    let handle = layer.handle();
    let log = Log::default();
    let dropped = Arc::new(AtomicUsize::new(0));
    let (l, d) = (log.clone(), dropped.clone());
    let res = call(&layer, full(""), move |t| {
        let guard = DropFlag(d);
        t.add(async move {
            let _guard = guard;
            std::future::pending::<()>().await
        });
        t.add(l.task("next"));
    })
    .await;
    res.into_body().collect().await.unwrap();
    within("idle", handle.wait_idle()).await;
    assert_eq!(
        dropped.load(Ordering::SeqCst),
        1,
        "the timed-out future was not dropped"
    );
    assert_eq!(log.get(), ["next"]);
    let s = handle.stats();
    assert_eq!((s.timed_out, s.completed), (1, 1), "{s:?}");
}

#[tokio::test]
async fn s6_a_blocking_task_past_its_timeout_is_counted_and_left_to_finish() {
    let layer = BackgroundLayer::new().task_timeout(Duration::from_millis(50));
    let handle = layer.handle();
    let log = Log::default();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let (finished_tx, finished_rx) = oneshot::channel();
    let l = log.clone();
    let res = call(&layer, full(""), move |t| {
        t.add_blocking(move || {
            release_rx.recv().unwrap();
            let _ = finished_tx.send(());
        });
        t.add(l.task("next"));
    })
    .await;
    res.into_body().collect().await.unwrap();
    within("idle", handle.wait_idle()).await;
    assert_eq!(log.get(), ["next"], "the sequence did not move on");
    let s = handle.stats();
    assert_eq!((s.timed_out, s.completed, s.running), (1, 1, 0), "{s:?}");
    release_tx.send(()).unwrap();
    within("blocking closure", finished_rx).await.unwrap();
}

struct DropFlag(Arc<AtomicUsize>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------------------
// 7. Late add
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn s7_a_late_add_joins_the_running_sequence_or_starts_on_its_own() {
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let log = Log::default();
    let gate = Arc::new(Notify::new());
    let tasks = Arc::new(Mutex::new(None));
    let (l, g, slot) = (log.clone(), gate.clone(), tasks.clone());
    let res = call(&layer, full(""), move |t| {
        *slot.lock().unwrap() = Some(t.clone());
        t.add(async move {
            l.push("first start");
            g.notified().await;
            l.push("first end");
        });
    })
    .await;
    res.into_body().collect().await.unwrap();
    settle().await;
    let tasks: BackgroundTasks = tasks.lock().unwrap().take().unwrap();
    tasks.add(log.task("late while running"));
    settle().await;
    assert_eq!(log.get(), ["first start"]);
    gate.notify_one();
    within("idle", handle.wait_idle()).await;
    assert_eq!(
        log.get(),
        ["first start", "first end", "late while running"]
    );

    // The sequence has ended: a later add starts on its own.
    tasks.add(log.task("late after the end"));
    within("idle", handle.wait_idle()).await;
    assert_eq!(log.get().last().unwrap(), "late after the end");
    assert_eq!(handle.stats().completed, 3);
}

#[tokio::test]
async fn s7_a_late_add_to_a_discarded_request_is_discarded_and_counted() {
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let slot = Arc::new(Mutex::new(None));
    let s = slot.clone();
    let svc = layer.layer(service_fn(move |req: Request<()>| {
        *s.lock().unwrap() = req.extensions().get::<BackgroundTasks>().cloned();
        async { Err::<Response<Full<Bytes>>, _>("failed") }
    }));
    svc.oneshot(Request::new(())).await.unwrap_err();
    let tasks = slot.lock().unwrap().take().unwrap();
    let ran = Arc::new(AtomicUsize::new(0));
    let r = ran.clone();
    tasks.add(async move {
        r.fetch_add(1, Ordering::SeqCst);
    });
    within("idle", handle.wait_idle()).await;
    assert_eq!(ran.load(Ordering::SeqCst), 0);
    assert_eq!(handle.stats().discarded, 1);
}

// ---------------------------------------------------------------------------
// 8. Limits
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn s8_max_concurrent_tasks_caps_running_tasks_across_requests_in_fifo_order() {
    let layer = BackgroundLayer::new()
        .execution(Execution::Concurrent)
        .max_concurrent_tasks(2);
    let handle = layer.handle();
    let log = Log::default();
    let gate = Arc::new(Notify::new());
    let peak = Arc::new(AtomicUsize::new(0));
    let now = Arc::new(AtomicUsize::new(0));
    for request in 0..3 {
        let (l, g, p, n) = (log.clone(), gate.clone(), peak.clone(), now.clone());
        let res = call(&layer, full(""), move |t| {
            for i in 0..2 {
                let (l, g, p, n) = (l.clone(), g.clone(), p.clone(), n.clone());
                t.add(async move {
                    let running = n.fetch_add(1, Ordering::SeqCst) + 1;
                    p.fetch_max(running, Ordering::SeqCst);
                    l.push(format!("r{request}t{i}"));
                    g.notified().await;
                    n.fetch_sub(1, Ordering::SeqCst);
                });
            }
        })
        .await;
        res.into_body().collect().await.unwrap();
    }
    settle().await;
    let s = handle.stats();
    assert_eq!((s.running, s.pending), (2, 4), "{s:?}");
    for _ in 0..3 {
        gate.notify_waiters();
        settle().await;
    }
    within("idle", handle.wait_idle()).await;
    assert_eq!(peak.load(Ordering::SeqCst), 2);
    assert_eq!(log.get(), ["r0t0", "r0t1", "r1t0", "r1t1", "r2t0", "r2t1"]);
    assert_eq!(handle.stats().completed, 6);
}

// ---------------------------------------------------------------------------
// 9. Runtime
// ---------------------------------------------------------------------------

#[tokio::test]
async fn s9_a_body_dropped_outside_any_runtime_still_runs_its_tasks() {
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let (tx, rx) = oneshot::channel();
    let res = call(&layer, full("x"), move |t| {
        t.add(async move {
            let _ = tx.send(tokio::runtime::Handle::current().id());
        })
    })
    .await;
    let runtime = tokio::runtime::Handle::current().id();
    std::thread::spawn(move || {
        assert!(tokio::runtime::Handle::try_current().is_err());
        drop(res);
    })
    .join()
    .expect("dropping the body outside a runtime must not panic");
    assert_eq!(within("task", rx).await.unwrap(), runtime);
    within("idle", handle.wait_idle()).await;
    assert_eq!(handle.stats().completed, 1);
}

// ---------------------------------------------------------------------------
// 10. Tracing
// ---------------------------------------------------------------------------

// ---------------------------------------------------------------------------
// 11. Handle: stats, wait_idle, shutdown
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn s11_stats_count_pending_while_streaming_and_every_task_once() {
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let (tx, body) = ChannelBody::new();
    let gate = Arc::new(Notify::new());
    let g = gate.clone();
    let res = call(&layer, Response::new(body), move |t| {
        t.add(async move { g.notified().await });
        t.add(async {});
        t.add(async { Err::<(), _>("no") });
    })
    .await;
    let s = handle.stats();
    assert_eq!((s.pending, s.running, s.total()), (3, 0, 3), "{s:?}");
    tx.send(data("x")).unwrap();
    drop(tx);
    res.into_body().collect().await.unwrap();
    settle().await;
    let s = handle.stats();
    assert_eq!((s.pending, s.running), (2, 1), "{s:?}");
    gate.notify_one();
    within("idle", handle.wait_idle()).await;
    let s = handle.stats();
    assert_eq!(
        (s.pending, s.running, s.completed, s.failed),
        (0, 0, 2, 1),
        "{s:?}"
    );
    assert_eq!(s.total(), 3);
}

#[tokio::test]
async fn s11_shutdown_drains_tasks_that_finish_within_the_grace_period() {
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let (tx, body) = ChannelBody::new();
    let log = Log::default();
    let task = log.task("drained");
    let res = call(&layer, Response::new(body), move |t| t.add(task)).await;
    // The body is still streaming when shutdown starts; it finishes during
    // the grace period, and its task is started and awaited.
    let shutdown = tokio::spawn(handle.shutdown(Duration::from_secs(30)));
    tx.send(data("x")).unwrap();
    drop(tx);
    res.into_body().collect().await.unwrap();
    let report = within("shutdown", shutdown).await.unwrap();
    assert_eq!((report.completed, report.cancelled), (1, 0));
    assert_eq!(log.get(), ["drained"]);
}

#[tokio::test(start_paused = true)]
async fn s11_shutdown_cancels_what_outlives_the_grace_period_and_closes_the_layer() {
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let log = Log::default();
    let dropped = Arc::new(AtomicUsize::new(0));

    // A running task that never ends, with a pending one behind it.
    let d = dropped.clone();
    let (l, late_slot) = (log.clone(), Arc::new(Mutex::new(None)));
    let slot = late_slot.clone();
    let res = call(&layer, full(""), move |t| {
        *slot.lock().unwrap() = Some(t.clone());
        let guard = DropFlag(d);
        t.add(async move {
            let _guard = guard;
            std::future::pending::<()>().await
        });
        t.add(l.task("behind the stuck task"));
    })
    .await;
    res.into_body().collect().await.unwrap();

    // A request whose body is still streaming.
    let (tx, body) = ChannelBody::new();
    let task = log.task("streaming request's task");
    let streaming = call(&layer, Response::new(body), move |t| t.add(task)).await;

    settle().await;
    let report = within("shutdown", handle.shutdown(Duration::from_secs(1))).await;
    assert_eq!((report.completed, report.cancelled), (0, 3), "{report:?}");
    settle().await;
    assert_eq!(
        dropped.load(Ordering::SeqCst),
        1,
        "the running task was not dropped"
    );

    // After the close, a finishing body and a late add run nothing.
    tx.send(data("x")).unwrap();
    drop(tx);
    streaming.into_body().collect().await.unwrap();
    let late = late_slot.lock().unwrap().take().unwrap();
    late.add(log.task("late add after shutdown"));
    settle().await;
    assert!(log.get().is_empty(), "ran after shutdown: {:?}", log.get());
    let s = handle.stats();
    assert_eq!(
        (s.cancelled, s.pending, s.running, s.total()),
        (4, 0, 0, 4),
        "{s:?}"
    );

    // A second call is consistent: nothing more to do.
    let again = handle.shutdown(Duration::from_secs(1)).await;
    assert_eq!((again.completed, again.cancelled), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn s11_concurrent_shutdowns_report_the_same_close() {
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let res = call(&layer, full(""), |t| t.add(std::future::pending::<()>())).await;
    res.into_body().collect().await.unwrap();
    settle().await;
    let a = tokio::spawn(handle.shutdown(Duration::from_secs(1)));
    let b = tokio::spawn(handle.shutdown(Duration::from_secs(2)));
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    assert_eq!(a, b);
    assert_eq!(a.cancelled, 1);
    assert_eq!(handle.stats().cancelled, 1);
}

#[tokio::test]
async fn s11_a_running_blocking_closure_is_counted_cancelled_and_left_to_finish() {
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let (entered_tx, entered_rx) = oneshot::channel();
    let (finished_tx, finished_rx) = oneshot::channel();
    let res = call(&layer, full(""), move |t| {
        t.add_blocking(move || {
            let _ = entered_tx.send(());
            release_rx.recv().unwrap();
            let _ = finished_tx.send(());
        })
    })
    .await;
    res.into_body().collect().await.unwrap();
    within("entered", entered_rx).await.unwrap();
    let report = within("shutdown", handle.shutdown(Duration::from_millis(20))).await;
    assert_eq!(report.cancelled, 1);
    release_tx.send(()).unwrap();
    within("closure finished", finished_rx).await.unwrap();
    let s = handle.stats();
    assert_eq!((s.cancelled, s.completed, s.total()), (1, 0, 1), "{s:?}");
}

#[tokio::test]
async fn s11_wait_idle_resolves_at_once_when_nothing_is_pending() {
    let handle = BackgroundLayer::new().handle();
    within("idle", handle.wait_idle()).await;
    // A dropped waiter leaves nothing behind.
    let waiter = handle.wait_idle();
    drop(waiter);
    within("idle again", handle.wait_idle()).await;
}

// ---------------------------------------------------------------------------
// 12. Exactly once, under a multi-threaded runtime
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s12_every_task_runs_exactly_once_or_is_counted() {
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    const REQUESTS: usize = 300;
    const TASKS: usize = 4;
    let runs: Arc<Vec<AtomicUsize>> =
        Arc::new((0..REQUESTS * TASKS).map(|_| AtomicUsize::new(0)).collect());
    let mut calls = Vec::new();
    for r in 0..REQUESTS {
        let runs = runs.clone();
        let layer = layer.clone();
        calls.push(tokio::spawn(async move {
            let (tx, body) = ChannelBody::new();
            let late = Arc::new(Mutex::new(None));
            let slot = late.clone();
            let runs2 = runs.clone();
            let res = call(&layer, Response::new(body), move |t| {
                *slot.lock().unwrap() = Some(t.clone());
                for i in 0..TASKS - 1 {
                    let runs = runs2.clone();
                    t.add(async move {
                        runs[r * TASKS + i].fetch_add(1, Ordering::SeqCst);
                    });
                }
            })
            .await;
            // Race a late add from another task against the end of the body.
            let t = late.lock().unwrap().take().unwrap();
            let adder = tokio::spawn(async move {
                t.add(async move {
                    runs[r * TASKS + TASKS - 1].fetch_add(1, Ordering::SeqCst);
                });
            });
            tx.send(data("x")).unwrap();
            match r % 3 {
                0 => drop(tx),
                1 => {} // dropped mid-stream below
                _ => tx.send(Err(std::io::Error::other("e"))).unwrap(),
            }
            let mut body = res.into_body();
            let _ = body.frame().await;
            if r % 3 != 1 {
                let _ = body.collect().await;
            }
            adder.await.unwrap();
        }));
    }
    for c in calls {
        within("request", c).await.unwrap();
    }
    within("idle", handle.wait_idle()).await;
    for (i, n) in runs.iter().enumerate() {
        assert_eq!(
            n.load(Ordering::SeqCst),
            1,
            "task {i} ran a wrong number of times"
        );
    }
    let s = handle.stats();
    assert_eq!(s.completed, (REQUESTS * TASKS) as u64, "{s:?}");
    assert_eq!(s.total(), (REQUESTS * TASKS) as u64, "{s:?}");
}

// ---------------------------------------------------------------------------
// 13. Cheap when unused
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "current_thread")]
async fn s13_no_task_spawns_nothing_and_a_sequence_spawns_one_runner() {
    let metrics = tokio::runtime::Handle::current().metrics();
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let res = call(&layer, full("x"), |_| {}).await;
    res.into_body().collect().await.unwrap();
    assert_eq!(
        metrics.num_alive_tasks(),
        0,
        "a request without tasks spawned something"
    );

    let gate = Arc::new(Notify::new());
    let g = gate.clone();
    let res = call(&layer, full("x"), move |t| {
        t.add(async move { g.notified().await });
        t.add(async {});
        t.add(async {});
    })
    .await;
    res.into_body().collect().await.unwrap();
    assert_eq!(
        metrics.num_alive_tasks(),
        1,
        "three sequential tasks, one runner"
    );
    gate.notify_one();
    within("idle", handle.wait_idle()).await;
    assert_eq!(handle.stats().completed, 3);
}

// ---------------------------------------------------------------------------
// A tracing capture for the tests above.
// ---------------------------------------------------------------------------

#[test]
fn public_types_are_send_sync_clone() {
    fn send_sync<T: Send + Sync + 'static>() {}
    fn clone<T: Clone>() {}
    send_sync::<BackgroundTasks>();
    send_sync::<BackgroundLayer>();
    send_sync::<tower_background::BackgroundHandle>();
    send_sync::<tower_background::Stats>();
    send_sync::<Completion>();
    clone::<BackgroundTasks>();
    clone::<BackgroundLayer>();
    clone::<tower_background::BackgroundHandle>();
    fn send_body<B: Send>() {}
    send_body::<tower_background::BackgroundBody<Full<Bytes>>>();
    let _: Frame<Bytes> = Frame::data(Bytes::new());
}
