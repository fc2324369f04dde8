//! The production controls: run policy, task names, the per-request cap and
//! the bound on pending work (tower backpressure), over `oneshot` and over
//! real sockets.

mod support;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::sync::{oneshot, Notify};
use tower::{service_fn, Layer, Service, ServiceExt};
use tower_background::{BackgroundLayer, BackgroundTasks, Completion, Outcome, RunPolicy};

use support::{call, within, Log};

fn status(code: u16) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::from_static(b"body")));
    *res.status_mut() = StatusCode::from_u16(code).unwrap();
    res
}

/// Runs one request answered with `code`, whose handler queues `queue`, and
/// waits for its tasks.
async fn after(
    layer: &BackgroundLayer,
    code: u16,
    queue: impl FnOnce(&BackgroundTasks) + Send + 'static,
) {
    let handle = layer.handle();
    let res = call(layer, status(code), queue).await;
    res.into_body().collect().await.unwrap();
    within("idle", handle.wait_idle()).await;
}

// ---------------------------------------------------------------------------
// Run policy
// ---------------------------------------------------------------------------

#[tokio::test]
async fn by_default_tasks_run_after_a_success_and_are_skipped_after_4xx_and_5xx() {
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let log = Log::default();
    for code in [101, 200, 204, 302, 400, 404, 422, 500, 503] {
        let task = log.task(format!("{code}"));
        after(&layer, code, move |t| t.add(task)).await;
    }
    assert_eq!(log.get(), ["101", "200", "204", "302"]);
    let s = handle.stats();
    assert_eq!((s.completed, s.skipped, s.total()), (4, 5, 9), "{s:?}");
}

#[tokio::test]
async fn run_policy_always_runs_after_any_status() {
    let layer = BackgroundLayer::new().run_policy(RunPolicy::Always);
    let log = Log::default();
    for code in [200, 422, 500] {
        let task = log.task(format!("{code}"));
        after(&layer, code, move |t| t.add(task)).await;
    }
    assert_eq!(log.get(), ["200", "422", "500"]);
}

#[tokio::test]
async fn a_task_s_own_policy_overrides_the_layer_s() {
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let log = Log::default();
    let (audit, email) = (log.task("audit"), log.task("email"));
    after(&layer, 500, move |t| {
        t.options().run_policy(RunPolicy::Always).add(audit);
        t.add(email);
    })
    .await;
    assert_eq!(log.get(), ["audit"]);
    assert_eq!(handle.stats().skipped, 1);
}

#[tokio::test]
async fn on_delivery_runs_only_when_the_body_went_out_whole() {
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let log = Log::default();
    // Delivered, even with a 500.
    let task = log.task("delivered");
    after(&layer, 500, move |t| {
        t.options().run_policy(RunPolicy::OnDelivery).add(task)
    })
    .await;
    // Aborted: the body is dropped unpolled although it has bytes to send.
    let task = log.task("aborted");
    let res = call(&layer, status(200), move |t| {
        t.options().run_policy(RunPolicy::OnDelivery).add(task)
    })
    .await;
    drop(res);
    within("idle", handle.wait_idle()).await;
    assert_eq!(log.get(), ["delivered"]);
    assert_eq!(handle.stats().skipped, 1);
}

#[tokio::test]
async fn add_with_tasks_run_whatever_the_policy_and_see_the_status() {
    let layer = BackgroundLayer::new();
    let (tx, rx) = oneshot::channel();
    after(&layer, 422, move |t| {
        t.options()
            .run_policy(RunPolicy::OnSuccess)
            .add_with(move |c: Completion| async move {
                let _ = tx.send((c.status(), c.outcome()));
            })
    })
    .await;
    assert_eq!(
        within("add_with", rx).await.unwrap(),
        (StatusCode::UNPROCESSABLE_ENTITY, Outcome::Finished)
    );
}

#[tokio::test]
async fn a_late_add_to_a_failed_response_is_skipped_too() {
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let slot = Arc::new(std::sync::Mutex::new(None));
    let s = slot.clone();
    after(&layer, 500, move |t| *s.lock().unwrap() = Some(t.clone())).await;
    let log = Log::default();
    let tasks = slot.lock().unwrap().take().unwrap();
    tasks.add(log.task("late"));
    within("idle", handle.wait_idle()).await;
    assert!(log.get().is_empty());
    assert_eq!(handle.stats().skipped, 1);
}

// ---------------------------------------------------------------------------
// Names
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_named_task_replaces_the_pending_one_of_the_same_name() {
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let log = Log::default();
    let (a, b, c, other) = (
        log.task("refresh 1"),
        log.task("refresh 2"),
        log.task("refresh 3"),
        log.task("other"),
    );
    after(&layer, 200, move |t| {
        t.named("refresh").add(a);
        t.add(other);
        t.named("refresh").add(b);
        t.named("refresh").add_blocking(move || {
            futures_lite_block_on(c);
        });
    })
    .await;
    assert_eq!(
        log.get(),
        ["other", "refresh 3"],
        "the last one wins, in its own place"
    );
    let s = handle.stats();
    assert_eq!((s.completed, s.replaced, s.total()), (2, 2, 4), "{s:?}");
}

/// Runs a ready future to its end on the calling thread (the log tasks never
/// wait).
fn futures_lite_block_on(fut: impl std::future::Future<Output = ()>) {
    let mut fut = std::pin::pin!(fut);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    assert!(fut.as_mut().poll(&mut cx).is_ready());
}

#[tokio::test]
async fn forget_takes_back_a_pending_named_task() {
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let log = Log::default();
    let (email, audit) = (log.task("email"), log.task("audit"));
    let forgotten = Arc::new(AtomicUsize::new(99));
    let f = forgotten.clone();
    after(&layer, 200, move |t| {
        t.named("welcome-email").add(email);
        t.add(audit);
        f.store(t.forget("welcome-email"), Ordering::SeqCst);
        assert_eq!(t.forget("no-such-task"), 0);
    })
    .await;
    assert_eq!(forgotten.load(Ordering::SeqCst), 1);
    assert_eq!(log.get(), ["audit"]);
    assert_eq!(handle.stats().replaced, 1);
}

#[tokio::test]
#[should_panic(expected = "TaskOptions::name: the name must not be empty")]
async fn an_empty_name_is_refused_with_the_fix() {
    let layer = BackgroundLayer::new();
    let res = call(&layer, status(200), |t| t.named("").add(async {})).await;
    drop(res);
}

#[test]
#[should_panic(expected = "max_tasks_per_request: the limit must be at least 1")]
fn a_zero_cap_is_refused_with_the_fix() {
    let _ = BackgroundLayer::new().max_tasks_per_request(0);
}

#[test]
#[should_panic(expected = "max_pending_tasks: the limit must be at least 1")]
fn a_zero_bound_is_refused_with_the_fix() {
    let _ = BackgroundLayer::new().max_pending_tasks(0);
}

// ---------------------------------------------------------------------------
// The per-request cap
// ---------------------------------------------------------------------------

#[tokio::test]
async fn tasks_over_the_per_request_cap_are_refused_and_counted() {
    let layer = BackgroundLayer::new().max_tasks_per_request(3);
    let handle = layer.handle();
    let ran = Arc::new(AtomicUsize::new(0));
    let r = ran.clone();
    after(&layer, 200, move |t| {
        for _ in 0..1_000 {
            let r = r.clone();
            t.add(async move {
                r.fetch_add(1, Ordering::SeqCst);
            });
        }
        assert_eq!(t.len(), 3);
    })
    .await;
    assert_eq!(ran.load(Ordering::SeqCst), 3);
    let s = handle.stats();
    assert_eq!(
        (s.completed, s.refused, s.total()),
        (3, 997, 1_000),
        "{s:?}"
    );
}

// ---------------------------------------------------------------------------
// The bound on pending work
// ---------------------------------------------------------------------------

#[tokio::test]
async fn poll_ready_is_pending_while_the_backlog_is_full_and_woken_when_it_drains() {
    // One task may run at a time and it waits on a gate: the others pend.
    let layer = BackgroundLayer::new()
        .max_concurrent_tasks(1)
        .max_pending_tasks(2);
    let handle = layer.handle();
    let gate = Arc::new(Notify::new());
    let g = gate.clone();
    let mut svc = layer.layer(service_fn(move |req: Request<()>| {
        let g = g.clone();
        req.extensions()
            .get::<BackgroundTasks>()
            .unwrap()
            .add(async move { g.notified().await });
        std::future::ready(Ok::<_, Infallible>(Response::new(Full::<Bytes>::default())))
    }));
    // The first task runs; two more pend.
    for _ in 0..3 {
        let res = within("ready", svc.ready())
            .await
            .unwrap()
            .call(Request::new(()))
            .await;
        drop(res.unwrap());
    }
    tokio::task::yield_now().await;
    let s = handle.stats();
    assert_eq!((s.running, s.pending), (1, 2), "{s:?}");
    // Full: not ready, and woken when a pending task starts.
    let mut ready = tokio_test_poll(&mut svc);
    assert!(ready.is_pending());
    gate.notify_one(); // the running task ends; the next one starts
    within("room", svc.ready()).await.unwrap();
    ready = tokio_test_poll(&mut svc);
    assert!(ready.is_ready());
    for _ in 0..3 {
        gate.notify_one();
        tokio::task::yield_now().await;
    }
    gate.notify_waiters();
    within("idle", async {
        loop {
            gate.notify_waiters();
            if handle.stats().pending + handle.stats().running == 0 {
                break;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert_eq!(handle.stats().completed, 3);
}

fn tokio_test_poll<S: Service<Request<()>>>(svc: &mut S) -> Poll<Result<(), S::Error>> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    svc.poll_ready(&mut cx)
}

/// axum with `LoadShedLayer` behind `HandleErrorLayer`: a flood over real
/// sockets gets 503s once the backlog is full, and every accepted task is
/// counted and runs.
#[tokio::test]
async fn an_axum_flood_is_shed_with_503_within_the_bound_and_every_task_counted() {
    use axum::error_handling::HandleErrorLayer;
    use axum::routing::post;
    use axum::{Extension, Router};
    use tower::ServiceBuilder;

    let layer = BackgroundLayer::new()
        .max_concurrent_tasks(1)
        .max_pending_tasks(8)
        .max_tasks_per_request(1);
    let handle = layer.handle();
    let gate = Arc::new(Notify::new());
    let g = gate.clone();
    let app = Router::new()
        .route(
            "/work",
            post(move |Extension(tasks): Extension<BackgroundTasks>| {
                let g = g.clone();
                async move {
                    tasks.add(async move { g.notified().await });
                    tasks.add(async {}); // over the cap: refused
                    StatusCode::ACCEPTED
                }
            }),
        )
        .layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(|_: tower::BoxError| async {
                    StatusCode::SERVICE_UNAVAILABLE
                }))
                .layer(tower::load_shed::LoadShedLayer::new())
                .layer(layer),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    // One request at a time, so the bound is exact: 1 running + 8 pending.
    let (mut accepted, mut shed) = (0u64, 0u64);
    for _ in 0..40 {
        let response = support_post(addr).await;
        match response.as_str() {
            s if s.starts_with("HTTP/1.1 202") => accepted += 1,
            s if s.starts_with("HTTP/1.1 503") => shed += 1,
            other => panic!("unexpected response: {other}"),
        }
    }
    let s = handle.stats();
    assert_eq!((accepted, shed), (9, 31), "{s:?}");
    assert_eq!((s.running, s.pending), (1, 8), "{s:?}");
    assert_eq!(s.refused, 9, "one refusal per accepted request: {s:?}");
    // Drain: every accepted task runs.
    within("drain", async {
        while handle.stats().completed < accepted {
            gate.notify_waiters();
            tokio::task::yield_now().await;
        }
    })
    .await;
    let s = handle.stats();
    assert_eq!((s.completed, s.refused, s.total()), (9, 9, 18), "{s:?}");
    server.abort();
}

/// Sends one `POST /work` on a new connection and reads the whole answer.
async fn support_post(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            b"POST /work HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
    let mut buf = Vec::new();
    within("response", stream.read_to_end(&mut buf))
        .await
        .unwrap();
    String::from_utf8(buf).unwrap()
}

// ---------------------------------------------------------------------------
// The observer hook
// ---------------------------------------------------------------------------

#[tokio::test]
async fn on_task_end_sees_every_task_once_with_how_it_ended() {
    type Seen = (Option<&'static str>, String, bool, bool, Option<String>);
    let seen: Arc<std::sync::Mutex<Vec<Seen>>> = Arc::default();
    let s = seen.clone();
    let layer = BackgroundLayer::new()
        .max_tasks_per_request(4)
        .on_task_end(move |end| {
            let outcome = match end.outcome {
                tower_background::TaskOutcome::Failed(e) => format!("failed: {e}"),
                tower_background::TaskOutcome::Panicked(p) => format!("panicked: {p}"),
                other => other.as_str().to_owned(),
            };
            s.lock().unwrap().push((
                end.name,
                outcome,
                end.queued.is_some(),
                end.ran.is_some(),
                end.path.map(str::to_owned),
            ));
        });
    let handle = layer.handle();
    let svc = layer.layer(service_fn(|req: Request<()>| {
        let t = req.extensions().get::<BackgroundTasks>().unwrap().clone();
        t.named("ok").add(async {});
        t.named("err").add(async { Err::<(), _>("smtp is down") });
        t.named("boom").add(async { bad_template() });
        t.named("err")
            .add(async { Err::<(), _>("replaced, never runs") }); // replaces the first "err"
        t.named("refused").add(async {}); // the fifth add: over the cap
        std::future::ready(Ok::<_, Infallible>(Response::new(Full::<Bytes>::default())))
    }));
    let res = svc
        .oneshot(Request::get("/signup?secret=1").body(()).unwrap())
        .await
        .unwrap();
    drop(res);
    within("idle", handle.wait_idle()).await;
    let mut seen = seen.lock().unwrap().clone();
    seen.sort();
    let path = Some("/signup".to_owned());
    assert_eq!(
        seen,
        [
            (
                Some("boom"),
                "panicked: bad template".into(),
                true,
                true,
                path.clone()
            ),
            (
                Some("err"),
                "failed: replaced, never runs".into(),
                true,
                true,
                path.clone()
            ),
            (Some("err"), "replaced".into(), false, false, path.clone()),
            (Some("ok"), "completed".into(), true, true, path.clone()),
            (
                Some("refused"),
                "refused".into(),
                false,
                false,
                path.clone()
            ),
        ]
    );
    let s = handle.stats();
    assert_eq!(
        (
            s.completed,
            s.failed,
            s.panicked,
            s.replaced,
            s.refused,
            s.total()
        ),
        (1, 1, 1, 1, 1, 5),
        "{s:?}"
    );
}

#[tokio::test]
async fn a_panicking_hook_is_caught_and_the_tasks_still_count() {
    fn broken(_: &tower_background::TaskEnd<'_>) {
        panic!("the hook is broken")
    }
    let layer = BackgroundLayer::new().on_task_end(broken);
    let handle = layer.handle();
    let log = Log::default();
    let (a, b) = (log.task("a"), log.task("b"));
    after(&layer, 200, move |t| {
        t.add(a);
        t.add(b);
    })
    .await;
    assert_eq!(log.get(), ["a", "b"]);
    assert_eq!(handle.stats().completed, 2);
}

// ---------------------------------------------------------------------------
// The time budget of a request
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_request_over_its_time_budget_times_out_the_rest_of_its_tasks() {
    use std::time::Duration;
    // Virtual time: well inside the tests' 10 s bound on every wait.
    let layer = BackgroundLayer::new().request_time_budget(Duration::from_millis(1500));
    let handle = layer.handle();
    let log = Log::default();
    let l = log.clone();
    after_paused(&layer, move |t| {
        for i in 0..3 {
            let l = l.clone();
            t.add(async move {
                l.push(format!("{i} started"));
                tokio::time::sleep(Duration::from_secs(1)).await;
                l.push(format!("{i} done"));
            });
        }
    })
    .await;
    within("idle", handle.wait_idle()).await;
    // 0 ends at 1 s; 1 is timed out at 1.5 s; 2 never starts.
    assert_eq!(log.get(), ["0 started", "0 done", "1 started"]);
    let s = handle.stats();
    assert_eq!((s.completed, s.timed_out, s.total()), (1, 2, 3), "{s:?}");
}

#[tokio::test(start_paused = true)]
async fn the_budget_and_the_task_timeout_apply_together() {
    use std::time::Duration;
    let layer = BackgroundLayer::new()
        .task_timeout(Duration::from_secs(4))
        .request_time_budget(Duration::from_secs(60));
    let handle = layer.handle();
    after_paused(&layer, |t| {
        t.add(tokio::time::sleep(Duration::from_secs(5))); // over its timeout
        t.add(tokio::time::sleep(Duration::from_secs(3)));
    })
    .await;
    within("idle", handle.wait_idle()).await;
    let s = handle.stats();
    assert_eq!((s.completed, s.timed_out), (1, 1), "{s:?}");
}

#[test]
#[should_panic(expected = "request_time_budget: the budget must be greater than zero")]
fn a_zero_budget_is_refused_with_the_fix() {
    let _ = BackgroundLayer::new().request_time_budget(std::time::Duration::ZERO);
}

/// Like `after`, without waiting (the caller waits, under paused time).
async fn after_paused(
    layer: &BackgroundLayer,
    queue: impl FnOnce(&BackgroundTasks) + Send + 'static,
) {
    let res = call(layer, status(200), queue).await;
    res.into_body().collect().await.unwrap();
}

fn bad_template() {
    panic!("bad template")
}

// ---------------------------------------------------------------------------
// Coalescing across the layer
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_refresh_queued_by_100_requests_runs_once() {
    let layer = BackgroundLayer::new().max_concurrent_tasks(1);
    let handle = layer.handle();
    let gate = Arc::new(Notify::new());
    let runs = Arc::new(AtomicUsize::new(0));
    // The only permit is held by a task that waits on the gate.
    let g = gate.clone();
    let (started_tx, started_rx) = oneshot::channel();
    after_paused(&layer, move |t| {
        t.add(async move {
            let _ = started_tx.send(());
            g.notified().await
        })
    })
    .await;
    within("the blocker", started_rx).await.unwrap();
    for _ in 0..100 {
        let r = runs.clone();
        after_paused(&layer, move |t| {
            t.options().coalesce("refresh-cache").add(async move {
                r.fetch_add(1, Ordering::SeqCst);
            })
        })
        .await;
    }
    let s = handle.stats();
    assert_eq!((s.pending, s.replaced), (1, 99), "{s:?}");
    gate.notify_one();
    within("idle", handle.wait_idle()).await;
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let s = handle.stats();
    assert_eq!((s.completed, s.replaced, s.total()), (2, 99, 101), "{s:?}");
}

#[tokio::test]
async fn a_key_is_free_again_once_its_task_started() {
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let (started_tx, started_rx) = oneshot::channel();
    let gate = Arc::new(Notify::new());
    let g = gate.clone();
    after_paused(&layer, move |t| {
        t.options().coalesce("k").add(async move {
            let _ = started_tx.send(());
            g.notified().await;
        })
    })
    .await;
    within("started", started_rx).await.unwrap();
    let (second_tx, second_rx) = oneshot::channel();
    after_paused(&layer, move |t| {
        t.options().coalesce("k").add(async move {
            let _ = second_tx.send(());
        })
    })
    .await;
    within("not merged into a task that already runs", second_rx)
        .await
        .unwrap();
    gate.notify_one();
    within("idle", handle.wait_idle()).await;
    let s = handle.stats();
    assert_eq!((s.completed, s.replaced), (2, 0), "{s:?}");
}

#[tokio::test]
async fn within_a_request_the_first_task_of_a_key_keeps_it_and_skipped_tasks_never_claim() {
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let log = Log::default();
    // A 500 skips its keyed task: it never claims the key.
    let skipped = log.task("skipped");
    after(&layer, 500, move |t| t.options().coalesce("k").add(skipped)).await;
    let (first, second) = (log.task("first"), log.task("second"));
    after(&layer, 200, move |t| {
        t.options().coalesce("k").add(first);
        t.options().coalesce("k").add(second);
    })
    .await;
    assert_eq!(log.get(), ["first"]);
    let s = handle.stats();
    assert_eq!((s.skipped, s.replaced, s.completed), (1, 1, 1), "{s:?}");
}

#[tokio::test]
#[should_panic(expected = "TaskOptions::coalesce: a task added with add_with")]
async fn add_with_cannot_be_coalesced() {
    let layer = BackgroundLayer::new();
    let res = call(&layer, status(200), |t| {
        t.options().coalesce("k").add_with(|_| async {})
    })
    .await;
    drop(res);
}

#[tokio::test]
#[should_panic(expected = "TaskOptions::coalesce: the key must not be empty")]
async fn an_empty_key_is_refused() {
    let layer = BackgroundLayer::new();
    let res = call(&layer, status(200), |t| {
        t.options().coalesce("").add(async {})
    })
    .await;
    drop(res);
}

/// Names, coalescing keys, the time budget and the hook over real sockets:
/// an axum server, HTTP/1.1 requests on their own connections.
#[tokio::test]
async fn names_keys_budget_and_hook_over_real_sockets() {
    use axum::routing::post;
    use axum::{Extension, Router};
    use std::time::Duration;

    type Ends = Vec<(Option<&'static str>, &'static str)>;
    let ends: Arc<std::sync::Mutex<Ends>> = Arc::default();
    let e = ends.clone();
    let layer = BackgroundLayer::new()
        .max_concurrent_tasks(1)
        .request_time_budget(Duration::from_secs(1))
        .on_task_end(move |end| e.lock().unwrap().push((end.name, end.outcome.as_str())));
    let handle = layer.handle();
    let gate = Arc::new(Notify::new());
    let g = gate.clone();
    let app = Router::new()
        .route(
            "/block",
            post(move |Extension(tasks): Extension<BackgroundTasks>| {
                let g = g.clone();
                async move {
                    tasks
                        .named("blocker")
                        .add(async move { g.notified().await });
                    StatusCode::ACCEPTED
                }
            }),
        )
        .route(
            "/work",
            post(|Extension(tasks): Extension<BackgroundTasks>| async move {
                // Replaced by the next add of the same name.
                tasks.named("email").add(async {});
                tasks.named("email").add(async {});
                // One pending refresh for the whole layer.
                tasks.options().coalesce("refresh").add(async {});
                // Over the request's budget: timed out.
                tasks
                    .named("slow")
                    .add(tokio::time::sleep(Duration::from_secs(30)));
                StatusCode::ACCEPTED
            }),
        )
        .layer(layer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    assert!(post_to(addr, "/block").await.starts_with("HTTP/1.1 202"));
    within("the blocker", async {
        while handle.stats().running == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    // Both wait for the permit; the second request's refresh merges into
    // the first's.
    assert!(post_to(addr, "/work").await.starts_with("HTTP/1.1 202"));
    assert!(post_to(addr, "/work").await.starts_with("HTTP/1.1 202"));
    gate.notify_one();
    within("idle", handle.wait_idle()).await;
    let s = handle.stats();
    // The blocker and 2 x (email, email, refresh, slow): 2 emails replaced,
    // 1 refresh merged, both slow tasks timed out.
    assert_eq!(
        (s.completed, s.timed_out, s.replaced, s.total()),
        (4, 2, 3, 9),
        "{s:?}"
    );
    let ends = ends.lock().unwrap().clone();
    assert_eq!(ends.len(), 9, "the hook saw every task once: {ends:?}");
    let count = |name: Option<&str>, outcome: &str| {
        ends.iter()
            .filter(|(n, o)| *n == name && *o == outcome)
            .count()
    };
    assert_eq!(count(Some("email"), "replaced"), 2);
    assert_eq!(count(Some("email"), "completed"), 2);
    assert_eq!(count(None, "replaced"), 1, "the merged refresh");
    assert_eq!(count(Some("slow"), "timed_out"), 2);
    server.abort();
}

async fn post_to(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    within("response", stream.read_to_end(&mut buf))
        .await
        .unwrap();
    String::from_utf8(buf).unwrap()
}

// ---------------------------------------------------------------------------
// The shutdown report by name
// ---------------------------------------------------------------------------

#[tokio::test]
async fn the_shutdown_report_names_the_cancelled_tasks() {
    use std::time::Duration;
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let (started_tx, started_rx) = oneshot::channel();
    after_paused(&layer, move |t| {
        t.named("send-invoice").add(async move {
            let _ = started_tx.send(());
            std::future::pending::<()>().await
        });
        t.named("audit").add(async {}); // pending behind it
        t.add(async {}); // unnamed
    })
    .await;
    within("the first task", started_rx).await.unwrap();
    let report = within("shutdown", handle.shutdown(Duration::from_millis(50))).await;
    assert_eq!(report.cancelled, 3, "{report:?}");
    let mut by_name = report.cancelled_by_name.clone();
    by_name.sort();
    assert_eq!(by_name, [("audit", 1), ("send-invoice", 1)], "{report:?}");
    // A later call reports nothing new.
    let again = within("again", handle.shutdown(Duration::from_millis(50))).await;
    assert!(again.cancelled_by_name.is_empty(), "{again:?}");
}
