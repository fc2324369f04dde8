//! axum integration (feature `axum`): `BackgroundTasks` as an extractor in a
//! `Router`, the exact `MissingBackgroundLayer` rejection without the layer,
//! `Option<BackgroundTasks>`, and `BackgroundLayer` next to tower-http's
//! `TraceLayer`, `TimeoutLayer`, `CompressionLayer` and `CatchPanicLayer`:
//! compressed responses still run their tasks after the body has ended, and a
//! timeout (or a caught panic) outside the layer discards them. Real servers
//! on 127.0.0.1:0 with a real client, or `oneshot` where no server is needed.

use std::future::Future;
use std::io::{Read as _, Write};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tower::{ServiceBuilder, ServiceExt};
use tower_background::{
    BackgroundLayer, BackgroundTasks, Completion, MissingBackgroundLayer, RunPolicy,
};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::compression::CompressionLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

/// The rejection's body, word for word.
const MISSING_TEXT: &str = "Missing request extension: BackgroundTasks. Add \
`.layer(BackgroundLayer::new())` to the router or service stack that serves this handler.";

/// Bounds every wait of a test.
const LIMIT: Duration = Duration::from_secs(10);

/// Awaits `fut`, failing the test after [`LIMIT`].
async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(LIMIT, fut).await {
        Ok(out) => out,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

/// Serves `app` on 127.0.0.1 with `axum::serve`, on a free port.
async fn serve(app: Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

fn request(method: &str, addr: SocketAddr, path: &str, body: &'static str) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header(header::ACCEPT_ENCODING, "gzip")
        .body(Full::from(body))
        .unwrap()
}

/// Decodes a gzip body, failing if it is not gzip.
fn gunzip(bytes: &[u8]) -> String {
    assert!(
        bytes.starts_with(&[0x1f, 0x8b]),
        "the body is not gzip: {bytes:?}"
    );
    let mut text = String::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_string(&mut text)
        .expect("a valid gzip stream");
    text
}

/// A long, compressible text.
fn report(part: &str) -> String {
    format!("{part}: ").repeat(200)
}

/// Calls `app` once without a server.
async fn oneshot(app: Router, method: &str, path: &str) -> (StatusCode, http::HeaderMap, Bytes) {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .body(Body::empty())
        .unwrap();
    let res = within("the response", app.oneshot(req)).await.unwrap();
    let (parts, body) = res.into_parts();
    let body = within("the body", body.collect()).await.unwrap().to_bytes();
    (parts.status, parts.headers, body)
}

#[tokio::test]
async fn the_extractor_runs_the_task_after_the_response_in_a_router() {
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let (sent_tx, mut sent_rx) = mpsc::unbounded_channel::<String>();
    let app = Router::new()
        .route(
            "/register",
            post(move |tasks: BackgroundTasks, email: String| {
                let sent_tx = sent_tx.clone();
                async move {
                    tasks.add(async move {
                        let _ = sent_tx.send(format!("welcome email to {email}"));
                    });
                    (StatusCode::CREATED, "registered")
                }
            }),
        )
        .layer(layer);
    let addr = serve(app).await;

    let res = within(
        "the response",
        client().request(request("POST", addr, "/register", "ada@example.com")),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    let body = within("the body", res.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(body, "registered");

    let sent = within("the task", sent_rx.recv()).await;
    assert_eq!(sent.as_deref(), Some("welcome email to ada@example.com"));
    within("idle", handle.wait_idle()).await;
    let stats = handle.stats();
    assert_eq!((stats.completed, stats.discarded), (1, 0));
}

/// Captures what a `tracing_subscriber::fmt` subscriber writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

#[tokio::test]
async fn without_the_layer_the_extractor_rejects_with_500_and_the_fix_logged_once() {
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::TRACE)
        .finish();
    // The current-thread runtime runs the handler on this thread.
    let _guard = tracing::subscriber::set_default(subscriber);

    let app = Router::new().route("/", get(|_tasks: BackgroundTasks| async { "unreachable" }));
    let (status, headers, body) = oneshot(app, "GET", "/").await;

    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(headers[header::CONTENT_TYPE], "text/plain; charset=utf-8");
    assert_eq!(body, MISSING_TEXT);

    let logs = logs.text();
    let lines: Vec<&str> = logs.lines().filter(|l| l.contains(MISSING_TEXT)).collect();
    assert_eq!(lines.len(), 1, "logged once: {logs}");
    assert!(lines[0].contains("ERROR"), "at error level: {logs}");
}

#[tokio::test]
async fn the_rejection_type_reports_its_status_and_text() {
    use axum::extract::FromRequestParts;

    let (mut parts, ()) = Request::new(()).into_parts();
    let missing: MissingBackgroundLayer = BackgroundTasks::from_request_parts(&mut parts, &())
        .await
        .unwrap_err();
    assert_eq!(missing.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(missing.body_text(), MISSING_TEXT);
    assert_eq!(missing.to_string(), MISSING_TEXT);
    let error: &dyn std::error::Error = &missing;
    assert!(error.source().is_none());
    assert!(format!("{missing:?}").contains("MissingBackgroundLayer"));

    let res = axum::response::IntoResponse::into_response(missing);
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, MISSING_TEXT);

    // With the layer's queue in the extensions, the same call succeeds.
    let layer = BackgroundLayer::new();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service_fn(|req: Request<()>| async move {
            let (mut parts, ()) = req.into_parts();
            let tasks = BackgroundTasks::from_request_parts(&mut parts, &()).await;
            Ok::<_, std::convert::Infallible>(Response::new(Full::<Bytes>::from(
                if tasks.is_ok() { "ok" } else { "rejected" },
            )))
        });
    let res = svc.oneshot(Request::new(())).await.unwrap();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "ok");
}

fn optional_app(ran: Arc<AtomicUsize>) -> Router {
    Router::new().route(
        "/",
        post(move |tasks: Option<BackgroundTasks>| {
            let ran = ran.clone();
            async move {
                match tasks {
                    Some(tasks) => {
                        tasks.add(async move {
                            ran.fetch_add(1, Ordering::SeqCst);
                        });
                        "some"
                    }
                    None => "none",
                }
            }
        }),
    )
}

#[tokio::test]
async fn option_of_background_tasks_is_none_without_the_layer_and_some_with_it() {
    let ran = Arc::new(AtomicUsize::new(0));
    let (status, _, body) = oneshot(optional_app(ran.clone()), "POST", "/").await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"none"[..]));

    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let app = optional_app(ran.clone()).layer(layer);
    let (status, _, body) = oneshot(app, "POST", "/").await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"some"[..]));
    within("idle", handle.wait_idle()).await;
    assert_eq!(ran.load(Ordering::SeqCst), 1);
    assert_eq!(handle.stats().completed, 1);
}

#[tokio::test]
async fn a_service_builder_stack_with_trace_timeout_compression_and_catch_panic() {
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<&'static str>();
    let stack = ServiceBuilder::new()
        .layer(TraceLayer::new_for_http())
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_secs(30),
        ))
        .layer(CompressionLayer::new())
        .layer(CatchPanicLayer::new())
        .layer(layer);
    let app = Router::new()
        .route(
            "/report",
            get(move |tasks: BackgroundTasks| {
                let done_tx = done_tx.clone();
                async move {
                    tasks.add(async move {
                        let _ = done_tx.send("report archived");
                    });
                    report("monthly")
                }
            }),
        )
        .layer(stack);
    let addr = serve(app).await;

    let res = within(
        "the response",
        client().request(request("GET", addr, "/report", "")),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()[header::CONTENT_ENCODING], "gzip");
    let body = within("the body", res.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(gunzip(&body), report("monthly"));

    assert_eq!(
        within("the task", done_rx.recv()).await,
        Some("report archived")
    );
    within("idle", handle.wait_idle()).await;
    assert_eq!(handle.stats().completed, 1);
}

/// What the compression tests record, in order.
type Events = mpsc::UnboundedSender<&'static str>;

/// A response body whose chunks the test sends; it reports every chunk it
/// yields (`"chunk"`) and its end (`"end"`).
struct Streamed {
    chunks: mpsc::UnboundedReceiver<Bytes>,
    events: Events,
    ended: bool,
}

impl http_body::Body for Streamed {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.chunks.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(chunk)) => {
                let _ = self.events.send("chunk");
                Poll::Ready(Some(Ok(Frame::data(chunk))))
            }
            Poll::Ready(None) => {
                if !self.ended {
                    self.ended = true;
                    let _ = self.events.send("end");
                }
                Poll::Ready(None)
            }
        }
    }
}

/// The outermost response body: reports `"sent"` when the body that goes
/// to the wire (here: the compressed one) has ended.
struct Outermost<B> {
    inner: Pin<Box<B>>,
    events: Events,
    ended: bool,
}

impl<B: http_body::Body> http_body::Body for Outermost<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let polled = self.inner.as_mut().poll_frame(cx);
        let ended = matches!(polled, Poll::Ready(None))
            || matches!(polled, Poll::Ready(Some(_))) && self.inner.is_end_stream();
        if ended && !self.ended {
            self.ended = true;
            let _ = self.events.send("sent");
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[derive(Clone, Copy, Debug)]
enum Compression {
    /// `CompressionLayer` wraps `BackgroundLayer`: the tasks see the
    /// uncompressed body.
    Outside,
    /// `BackgroundLayer` wraps `CompressionLayer`: the tasks see the
    /// compressed body.
    Inside,
}

/// Streams a two-chunk body through a gzip `CompressionLayer` placed as
/// `position` says, over a real connection, and returns the events.
async fn compressed_stream(position: Compression) -> Vec<&'static str> {
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let (events, mut events_rx) = mpsc::unbounded_channel::<&'static str>();
    let (chunks_tx, chunks_rx) = mpsc::unbounded_channel::<Bytes>();
    let body = Arc::new(Mutex::new(Some(Streamed {
        chunks: chunks_rx,
        events: events.clone(),
        ended: false,
    })));
    let task_events = events.clone();
    let routes = Router::new().route(
        "/report",
        get(move |tasks: BackgroundTasks| {
            let body = body.lock().unwrap().take().expect("one request");
            let task_events = task_events.clone();
            async move {
                tasks.add(async move {
                    let _ = task_events.send("task");
                });
                Response::new(Body::new(body))
            }
        }),
    );
    let routes = match position {
        Compression::Outside => routes.layer(layer).layer(CompressionLayer::new()),
        Compression::Inside => routes.layer(CompressionLayer::new()).layer(layer),
    };
    let outermost_events = events.clone();
    let app = routes.layer(
        ServiceBuilder::new().map_response(move |res: Response<Body>| {
            let events = outermost_events.clone();
            res.map(|inner| {
                Body::new(Outermost {
                    inner: Box::pin(inner),
                    events,
                    ended: false,
                })
            })
        }),
    );
    let addr = serve(app).await;

    let res = within(
        "the response head",
        client().request(request("GET", addr, "/report", "")),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()[header::CONTENT_ENCODING], "gzip");
    let reading = tokio::spawn(res.into_body().collect());

    // The body is still open after each chunk: no task may have started.
    let mut seen = Vec::new();
    for part in ["first", "second"] {
        chunks_tx.send(Bytes::from(report(part))).unwrap();
        let event = within("a chunk", events_rx.recv()).await.unwrap();
        assert_eq!(event, "chunk", "{position:?}: {seen:?} then {event}");
        seen.push(event);
    }
    drop(chunks_tx); // the end of the body

    let body = within("the whole body", reading)
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    assert_eq!(gunzip(&body), report("first") + &report("second"));
    within("idle", handle.wait_idle()).await;
    let stats = handle.stats();
    assert_eq!((stats.completed, stats.discarded), (1, 0), "{position:?}");

    // Three more events: "end", "sent" and "task" (the router keeps
    // senders alive, so count rather than wait for the channel to close).
    for _ in 0..3 {
        seen.push(within("the events", events_rx.recv()).await.unwrap());
    }
    assert!(events_rx.try_recv().is_err(), "{seen:?} and more");
    seen
}

#[tokio::test]
async fn compression_outside_the_layer_runs_the_task_after_the_body_ended() {
    let events = compressed_stream(Compression::Outside).await;
    // The tasks see the uncompressed body: they start once it has ended. The
    // gzip trailer is written right after, so "task" and "sent" may come in
    // either order.
    let task = events
        .iter()
        .position(|e| *e == "task")
        .expect("the task ran");
    let end = events
        .iter()
        .position(|e| *e == "end")
        .expect("the body ended");
    assert!(end < task, "{events:?}");
    assert_eq!(events.len(), 5, "{events:?}");
    assert!(events.contains(&"sent"), "{events:?}");
}

#[tokio::test]
async fn compression_inside_the_layer_runs_the_task_after_the_compressed_body_ended() {
    let events = compressed_stream(Compression::Inside).await;
    // The tasks see the compressed body: they start only once its gzip
    // trailer has been produced and it has ended.
    assert_eq!(events, ["chunk", "chunk", "end", "sent", "task"]);
}

/// A router whose handler queues `n` tasks, each counting in `ran`, then
/// never answers.
fn stuck_handler(n: usize, ran: Arc<AtomicUsize>) -> Router {
    Router::new().route(
        "/slow",
        post(move |tasks: BackgroundTasks| {
            let ran = ran.clone();
            async move {
                for _ in 0..n {
                    let ran = ran.clone();
                    tasks.add(async move {
                        ran.fetch_add(1, Ordering::SeqCst);
                    });
                }
                std::future::pending::<()>().await;
                "never"
            }
        }),
    )
}

#[tokio::test(start_paused = true)]
async fn a_timeout_outside_the_layer_that_fires_first_discards_the_tasks() {
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let ran = Arc::new(AtomicUsize::new(0));
    let app = stuck_handler(3, ran.clone())
        .layer(layer)
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_secs(1),
        ));

    let (status, _, body) = oneshot(app, "POST", "/slow").await;
    assert_eq!(status, StatusCode::REQUEST_TIMEOUT);
    assert!(body.is_empty());

    within("idle", handle.wait_idle()).await;
    let stats = handle.stats();
    assert_eq!(stats.discarded, 3, "{stats:?}");
    assert_eq!((stats.completed, stats.pending, stats.running), (0, 0, 0));
    tokio::task::yield_now().await;
    assert_eq!(ran.load(Ordering::SeqCst), 0, "a discarded task ran");
}

/// A `TimeoutLayer` inside the layer answers 408: a response, so the
/// `add_with` task runs and sees the 408, while the plain tasks are skipped
/// by the default run policy (a 4xx is not a success).
#[tokio::test(start_paused = true)]
async fn a_timeout_inside_the_layer_is_a_response_that_skips_plain_tasks_and_add_with_sees() {
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let ran = Arc::new(AtomicUsize::new(0));
    let (status_tx, mut status_rx) = mpsc::unbounded_channel::<StatusCode>();
    let app = stuck_handler(2, ran.clone())
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_secs(1),
        ))
        .layer(axum::middleware::map_request(move |req: Request<Body>| {
            let status_tx = status_tx.clone();
            async move {
                // Queued before the handler's tasks, by the layer's queue.
                let tasks = req.extensions().get::<BackgroundTasks>().unwrap();
                tasks.add_with(move |done: Completion| async move {
                    let _ = status_tx.send(done.status());
                });
                req
            }
        }))
        .layer(layer);

    let (status, _, _) = oneshot(app, "POST", "/slow").await;
    assert_eq!(status, StatusCode::REQUEST_TIMEOUT);
    assert_eq!(
        within("the add_with task", status_rx.recv()).await,
        Some(StatusCode::REQUEST_TIMEOUT)
    );
    within("idle", handle.wait_idle()).await;
    assert_eq!(ran.load(Ordering::SeqCst), 0);
    let stats = handle.stats();
    assert_eq!(
        (stats.completed, stats.skipped, stats.discarded),
        (1, 2, 0),
        "{stats:?}"
    );
}

/// Panics: stands for a handler bug after it queued its tasks.
fn handler_bug() -> &'static str {
    panic!("handler bug (expected by the test)")
}

fn panicking_handler(ran: Arc<AtomicUsize>) -> Router {
    Router::new().route(
        "/buggy",
        post(move |tasks: BackgroundTasks| {
            let ran = ran.clone();
            async move {
                tasks.add(async move {
                    ran.fetch_add(1, Ordering::SeqCst);
                });
                handler_bug()
            }
        }),
    )
}

/// `CatchPanicLayer` inside the layer makes a 500 response: by default its
/// plain task is skipped; with `RunPolicy::Always` it runs.
#[tokio::test]
async fn a_panic_caught_inside_the_layer_is_a_500_response_whose_tasks_follow_the_run_policy() {
    for (policy, ran_expected) in [(RunPolicy::OnSuccess, 0), (RunPolicy::Always, 1)] {
        let layer = BackgroundLayer::new().run_policy(policy);
        let handle = layer.handle();
        let ran = Arc::new(AtomicUsize::new(0));
        let app = panicking_handler(ran.clone())
            .layer(CatchPanicLayer::new())
            .layer(layer);

        let (status, _, _) = oneshot(app, "POST", "/buggy").await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        within("idle", handle.wait_idle()).await;
        assert_eq!(ran.load(Ordering::SeqCst), ran_expected, "{policy:?}");
        let stats = handle.stats();
        assert_eq!(
            (stats.completed, stats.skipped),
            (ran_expected as u64, 1 - ran_expected as u64),
            "{policy:?}: {stats:?}"
        );
    }
}

#[tokio::test]
async fn a_panic_caught_outside_the_layer_discards_the_tasks() {
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let ran = Arc::new(AtomicUsize::new(0));
    let app = panicking_handler(ran.clone())
        .layer(layer)
        .layer(CatchPanicLayer::new());

    let (status, _, _) = oneshot(app, "POST", "/buggy").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    within("idle", handle.wait_idle()).await;
    let stats = handle.stats();
    assert_eq!((stats.discarded, stats.completed), (1, 0), "{stats:?}");
    tokio::task::yield_now().await;
    assert_eq!(ran.load(Ordering::SeqCst), 0, "a discarded task ran");
}
