//! Tracing (semantic 10 and the logs of semantics 5 and 6). A test binary of
//! its own: each test installs a capturing subscriber before any task span
//! exists, so no test without a subscriber can register the span's callsite
//! as disabled while another test listens (a race of `tracing`'s callsite
//! cache between parallel tests).

mod support;

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tokio::sync::Notify;
use tower::{service_fn, Layer, ServiceExt};
use tower_background::{BackgroundLayer, BackgroundTasks};

use support::{call, within, Log};

fn full(s: &'static str) -> Response<Full<Bytes>> {
    Response::new(Full::new(Bytes::from_static(s.as_bytes())))
}

#[tokio::test]
async fn s5_an_inner_error_discards_every_task_and_warns_once() {
    let (capture, _guard) = capture::install();
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let log = Log::default();
    let l = log.clone();
    let svc = layer.layer(service_fn(move |req: Request<()>| {
        let t = req.extensions().get::<BackgroundTasks>().unwrap().clone();
        t.add(l.task("plain"));
        let (l2, l3) = (l.clone(), l.clone());
        t.add_blocking(move || l2.push("blocking"));
        t.add_with(move |_| l3.task("with"));
        async move { Err::<Response<Full<Bytes>>, _>("database down") }
    }));
    assert_eq!(
        svc.oneshot(Request::new(())).await.unwrap_err(),
        "database down"
    );
    within("idle", handle.wait_idle()).await;
    assert!(log.get().is_empty());
    assert_eq!(handle.stats().discarded, 3);
    let warns = capture.events_at(tracing::Level::WARN);
    assert_eq!(warns.len(), 1, "{warns:?}");
    assert!(warns[0].contains("tasks=3"), "{}", warns[0]);
    assert!(
        warns[0].contains("inner service returned an error"),
        "{}",
        warns[0]
    );
}

#[tokio::test]
async fn s6_failing_and_panicking_tasks_are_logged_counted_and_do_not_stop_the_rest() {
    let (capture, _guard) = capture::install();
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let log = Log::default();
    let l = log.clone();
    let res = call(&layer, full(""), move |t| {
        t.add(async { Err::<(), _>("smtp refused") });
        t.add(l.task("after failure"));
        t.add(async {
            if true {
                panic!("cache exploded");
            }
        });
        t.add(l.task("after panic"));
        t.add_blocking(|| -> Result<(), String> { panic!("blocking exploded") });
        t.add_blocking(|| Err::<(), _>(String::from("disk full")));
        t.add(l.task("last"));
    })
    .await;
    res.into_body().collect().await.unwrap();
    within("idle", handle.wait_idle()).await;
    assert_eq!(log.get(), ["after failure", "after panic", "last"]);
    let s = handle.stats();
    assert_eq!((s.completed, s.failed, s.panicked), (3, 2, 2), "{s:?}");
    let errors = capture.events_at(tracing::Level::ERROR).join("\n");
    for text in [
        "smtp refused",
        "cache exploded",
        "blocking exploded",
        "disk full",
    ] {
        assert!(errors.contains(text), "{text:?} not logged in:\n{errors}");
    }
}

#[tokio::test]
async fn s10_tasks_run_in_a_root_span_that_follows_from_the_request() {
    use tracing::Instrument;
    let (capture, _guard) = capture::install();
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let gate = Arc::new(Notify::new());
    let g = gate.clone();
    let svc = layer.layer(service_fn(move |req: Request<()>| {
        let t = req.extensions().get::<BackgroundTasks>().unwrap().clone();
        let g = g.clone();
        async move {
            t.add(async move {
                tracing::info!("inside the task");
                g.notified().await;
            });
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
        }
    }));
    let request_span = tracing::info_span!("request");
    let request_id = request_span.id().unwrap();
    let req = Request::post("/users/7?x=1").body(()).unwrap();
    let res = svc.oneshot(req).instrument(request_span).await.unwrap();
    res.into_body().collect().await.unwrap();
    within("task", async {
        while handle.stats().running == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await;

    let spans = capture.spans();
    let task_span = spans
        .iter()
        .find(|s| s.name == "background_task")
        .expect("a background_task span");
    assert!(task_span.is_root, "the task span must have no parent");
    assert_eq!(
        task_span.fields.get("method").map(String::as_str),
        Some("POST")
    );
    assert_eq!(
        task_span.fields.get("path").map(String::as_str),
        Some("/users/7")
    );
    assert_eq!(task_span.follows_from, vec![request_id.clone()]);
    assert!(
        capture.closed(&request_id),
        "the request span is held open by a running background task"
    );
    let inside = capture.events_in_span("inside the task");
    assert_eq!(inside, Some(task_span.id.clone()));
    gate.notify_one();
    within("idle", handle.wait_idle()).await;
}

mod capture {
    use std::collections::HashMap;
    use std::fmt;
    use std::sync::Arc;

    use tracing::field::{Field, Visit};
    use tracing::span::{Attributes, Id, Record};
    use tracing::{Event, Level, Subscriber};
    use tracing_subscriber::layer::{Context, SubscriberExt};
    use tracing_subscriber::registry::LookupSpan;
    use tracing_subscriber::Layer;

    #[derive(Debug, Clone)]
    pub struct SpanInfo {
        pub id: Id,
        pub name: &'static str,
        pub is_root: bool,
        pub fields: HashMap<String, String>,
        pub follows_from: Vec<Id>,
    }

    #[derive(Default)]
    struct Inner {
        spans: Vec<SpanInfo>,
        closed: Vec<Id>,
        events: Vec<(Level, String, Option<Id>)>,
    }

    #[derive(Clone, Default)]
    pub struct Capture(Arc<std::sync::Mutex<Inner>>);

    impl Capture {
        pub fn spans(&self) -> Vec<SpanInfo> {
            self.0.lock().unwrap().spans.clone()
        }
        pub fn closed(&self, id: &Id) -> bool {
            self.0.lock().unwrap().closed.contains(id)
        }
        pub fn events_at(&self, level: Level) -> Vec<String> {
            let inner = self.0.lock().unwrap();
            inner
                .events
                .iter()
                .filter(|e| e.0 == level)
                .map(|e| e.1.clone())
                .collect()
        }
        /// The span the first event containing `text` was emitted in.
        pub fn events_in_span(&self, text: &str) -> Option<Id> {
            let inner = self.0.lock().unwrap();
            inner
                .events
                .iter()
                .find(|e| e.1.contains(text))
                .and_then(|e| e.2.clone())
        }
    }

    struct Fields<'a>(&'a mut HashMap<String, String>);

    impl Visit for Fields<'_> {
        fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
            self.0.insert(field.name().to_owned(), format!("{value:?}"));
        }
        fn record_str(&mut self, field: &Field, value: &str) {
            self.0.insert(field.name().to_owned(), value.to_owned());
        }
    }

    impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Capture {
        fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
            let mut fields = HashMap::new();
            attrs.record(&mut Fields(&mut fields));
            let is_root =
                attrs.is_root() || (attrs.is_contextual() && ctx.current_span().id().is_none());
            self.0.lock().unwrap().spans.push(SpanInfo {
                id: id.clone(),
                name: attrs.metadata().name(),
                is_root,
                fields,
                follows_from: Vec::new(),
            });
        }
        fn on_record(&self, id: &Id, values: &Record<'_>, _: Context<'_, S>) {
            let mut inner = self.0.lock().unwrap();
            if let Some(span) = inner.spans.iter_mut().find(|s| &s.id == id) {
                values.record(&mut Fields(&mut span.fields));
            }
        }
        fn on_follows_from(&self, id: &Id, follows: &Id, _: Context<'_, S>) {
            let mut inner = self.0.lock().unwrap();
            if let Some(span) = inner.spans.iter_mut().find(|s| &s.id == id) {
                span.follows_from.push(follows.clone());
            }
        }
        fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
            let mut fields = HashMap::new();
            event.record(&mut Fields(&mut fields));
            let mut text: Vec<String> = fields.iter().map(|(k, v)| format!("{k}={v}")).collect();
            text.sort();
            let span = ctx.event_span(event).map(|s| s.id());
            self.0
                .lock()
                .unwrap()
                .events
                .push((*event.metadata().level(), text.join(" "), span));
        }
        fn on_close(&self, id: Id, _: Context<'_, S>) {
            self.0.lock().unwrap().closed.push(id);
        }
    }

    /// Installs a capture as this thread's default subscriber.
    pub fn install() -> (Capture, tracing::subscriber::DefaultGuard) {
        let capture = Capture::default();
        let subscriber = tracing_subscriber::registry().with(capture.clone());
        let guard = tracing::subscriber::set_default(subscriber);
        (capture, guard)
    }
}
