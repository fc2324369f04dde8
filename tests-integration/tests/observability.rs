//! Observability outside tracing: `Stats` and `ShutdownReport` serialized
//! (feature `serde`), and the `metrics` feature read through a debugging
//! recorder.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use metrics_util::{CompositeKey, MetricKind};
use tower::{service_fn, Layer, ServiceExt};
use tower_background::{BackgroundLayer, BackgroundTasks, Stats};

const LIMIT: Duration = Duration::from_secs(10);

/// One request answered with `status`, whose handler runs `queue`.
async fn request(layer: &BackgroundLayer, status: StatusCode, queue: fn(&BackgroundTasks)) {
    let svc = layer.layer(service_fn(move |req: Request<()>| {
        queue(req.extensions().get::<BackgroundTasks>().unwrap());
        let mut res = Response::new(Full::new(Bytes::from_static(b"ok")));
        *res.status_mut() = status;
        std::future::ready(Ok::<_, Infallible>(res))
    }));
    let res = svc.oneshot(Request::new(())).await.unwrap();
    res.into_body().collect().await.unwrap();
    tokio::time::timeout(LIMIT, layer.handle().wait_idle())
        .await
        .expect("idle");
}

fn failing(tasks: &BackgroundTasks) {
    tasks
        .named("email")
        .add(async { Err::<(), _>("smtp is down") });
    tasks.add(async {});
}

#[tokio::test]
async fn stats_and_the_shutdown_report_serialize_with_every_field() {
    let layer = BackgroundLayer::new();
    request(&layer, StatusCode::OK, failing).await;
    request(&layer, StatusCode::BAD_REQUEST, failing).await;
    let stats: Stats = layer.handle().stats();
    let json = serde_json::to_value(stats).unwrap();
    assert_eq!(json["completed"], 1);
    assert_eq!(json["failed"], 1);
    assert_eq!(json["skipped"], 2);
    for field in [
        "pending",
        "running",
        "completed",
        "failed",
        "panicked",
        "timed_out",
        "discarded",
        "cancelled",
        "skipped",
        "refused",
        "replaced",
    ] {
        assert!(json.get(field).is_some(), "{field} missing from {json}");
    }
    let report = layer.handle().shutdown(Duration::ZERO).await;
    let json = serde_json::to_value(report).unwrap();
    assert_eq!(
        json,
        serde_json::json!({"completed": 0, "cancelled": 0, "cancelled_by_name": []})
    );
}

#[test]
fn the_metrics_feature_counts_every_ending_with_the_task_name() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        // A current-thread runtime: every task ends on this thread, where the
        // local recorder is installed.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let layer = BackgroundLayer::new();
            request(&layer, StatusCode::OK, failing).await;
            request(&layer, StatusCode::INTERNAL_SERVER_ERROR, failing).await;
        });
    });
    let snapshot = snapshotter.snapshot().into_vec();
    let find = |kind: MetricKind, name: &str, labels: &[(&str, &str)]| {
        snapshot
            .iter()
            .find(|(key, _, _, _): &&(CompositeKey, _, _, DebugValue)| {
                let k = key.key();
                key.kind() == kind
                    && k.name() == name
                    && k.labels().count() == labels.len()
                    && labels
                        .iter()
                        .all(|(l, v)| k.labels().any(|x| x.key() == *l && x.value() == *v))
            })
            .map(|(_, _, _, value)| value)
    };
    let counter = |labels: &[(&str, &str)]| match find(
        MetricKind::Counter,
        "background_tasks_ended_total",
        labels,
    ) {
        Some(DebugValue::Counter(n)) => *n,
        other => panic!("no counter {labels:?}: {other:?} in {snapshot:?}"),
    };
    assert_eq!(counter(&[("outcome", "failed"), ("task", "email")]), 1);
    assert_eq!(counter(&[("outcome", "completed")]), 1);
    assert_eq!(counter(&[("outcome", "skipped"), ("task", "email")]), 1);
    assert_eq!(counter(&[("outcome", "skipped")]), 1);
    // The run time of the two tasks that ran; none for the skipped ones.
    match find(MetricKind::Histogram, "background_task_run_seconds", &[]) {
        Some(DebugValue::Histogram(values)) => assert_eq!(values.len(), 1),
        other => panic!("no run-time histogram: {other:?}"),
    }
    match find(
        MetricKind::Histogram,
        "background_task_queued_seconds",
        &[("task", "email")],
    ) {
        Some(DebugValue::Histogram(values)) => assert_eq!(values.len(), 1),
        other => panic!("no queue-time histogram: {other:?}"),
    }
    match find(MetricKind::Gauge, "background_tasks_pending", &[]) {
        Some(DebugValue::Gauge(v)) => assert_eq!(v.0, 0.0),
        other => panic!("no pending gauge: {other:?}"),
    }
}

/// With the `axum` feature, a task's end carries the route its request
/// matched: the template, never the path, as the `route` of the hook's
/// `TaskEnd` and as the `route` label of the metrics. A layer around the
/// whole router sees the request before routing, so it has no route.
#[test]
fn the_route_label_is_the_matched_template_never_the_raw_path() {
    use axum::routing::post;
    use axum::Router;
    use std::sync::{Arc, Mutex};

    async fn register(tasks: BackgroundTasks) -> StatusCode {
        tasks.named("email").add(async {});
        tasks.add(async {});
        StatusCode::ACCEPTED
    }

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let routes = Arc::new(Mutex::new(Vec::new()));
    metrics::with_local_recorder(&recorder, || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let seen = Arc::clone(&routes);
            let inside = BackgroundLayer::new().on_task_end(move |end| {
                seen.lock()
                    .unwrap()
                    .push((end.route.map(str::to_owned), end.path.map(str::to_owned)));
            });
            let outside = BackgroundLayer::new();
            let app = Router::new()
                .route("/users/{id}", post(register))
                .layer(inside.clone());
            // The same router, wrapped from outside: its request is not routed yet.
            let wrapped = outside.layer(Router::new().route("/users/{id}", post(register)));
            for id in ["7", "8"] {
                let req = || {
                    Request::post(format!("/users/{id}"))
                        .body(axum::body::Body::empty())
                        .unwrap()
                };
                let res = app.clone().oneshot(req()).await.unwrap();
                assert_eq!(res.status(), StatusCode::ACCEPTED);
                res.into_body().collect().await.unwrap();
                let res = wrapped.clone().oneshot(req()).await.unwrap();
                assert_eq!(res.status(), StatusCode::ACCEPTED);
                res.into_body().collect().await.unwrap();
            }
            for layer in [&inside, &outside] {
                tokio::time::timeout(LIMIT, layer.handle().wait_idle())
                    .await
                    .expect("idle");
            }
        });
    });
    let seen = routes.lock().unwrap().clone();
    assert_eq!(seen.len(), 4, "{seen:?}");
    for (route, path) in &seen {
        assert_eq!(route.as_deref(), Some("/users/{id}"));
        assert!(matches!(path.as_deref(), Some("/users/7" | "/users/8")));
    }

    let snapshot = snapshotter.snapshot().into_vec();
    let counter = |labels: &[(&str, &str)]| {
        snapshot
            .iter()
            .filter(|(key, _, _, _)| {
                let k = key.key();
                key.kind() == MetricKind::Counter
                    && k.name() == "background_tasks_ended_total"
                    && k.labels().count() == labels.len()
                    && labels
                        .iter()
                        .all(|(l, v)| k.labels().any(|x| x.key() == *l && x.value() == *v))
            })
            .map(|(_, _, _, value)| match value {
                DebugValue::Counter(n) => *n,
                other => panic!("not a counter: {other:?}"),
            })
            .sum::<u64>()
    };
    let route = ("route", "/users/{id}");
    assert_eq!(
        counter(&[("outcome", "completed"), ("task", "email"), route]),
        2
    );
    assert_eq!(counter(&[("outcome", "completed"), route]), 2);
    // The layer outside the router: the same tasks, no route label.
    assert_eq!(counter(&[("outcome", "completed"), ("task", "email")]), 2);
    assert_eq!(counter(&[("outcome", "completed")]), 2);
    assert!(
        snapshot
            .iter()
            .all(|(key, _, _, _)| key.key().labels().all(|l| !l.value().contains("/users/7"))),
        "a raw path became a label: {snapshot:?}"
    );
    let histogram = snapshot.iter().find(|(key, _, _, _)| {
        let k = key.key();
        k.name() == "background_task_run_seconds"
            && k.labels().count() == 1
            && k.labels()
                .all(|l| l.key() == "route" && l.value() == "/users/{id}")
    });
    match histogram {
        Some((_, _, _, DebugValue::Histogram(values))) => assert_eq!(values.len(), 2),
        other => panic!("no run-time histogram by route: {other:?}"),
    }
}

/// `route_layer` sees the matched route too, as the docs of `TaskEnd::route`
/// say.
#[tokio::test]
async fn route_layer_sees_the_matched_route() {
    use axum::routing::get;
    use axum::Router;
    use std::sync::{Arc, Mutex};

    let routes = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&routes);
    let layer = BackgroundLayer::new().on_task_end(move |end| {
        seen.lock().unwrap().push(end.route.map(str::to_owned));
    });
    let app = Router::new()
        .route(
            "/orders/{id}",
            get(|tasks: BackgroundTasks| async move {
                tasks.add(async {});
                "ok"
            }),
        )
        .route_layer(layer.clone());
    let res = app
        .oneshot(
            Request::get("/orders/42")
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    res.into_body().collect().await.unwrap();
    tokio::time::timeout(LIMIT, layer.handle().wait_idle())
        .await
        .expect("idle");
    // The hook runs right after the count: on this current-thread runtime it
    // has run by the time wait_idle returns.
    assert_eq!(*routes.lock().unwrap(), [Some("/orders/{id}".to_owned())]);
}
