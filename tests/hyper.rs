//! hyper integration: a plain `tower::Service` behind `BackgroundLayer`,
//! served through `hyper_util::service::TowerToHyperService` on 127.0.0.1
//! over HTTP/1.1 and HTTP/2, the handler taking the queue from
//! `req.extensions()`. The task waits for the last chunk of a streamed
//! response, and over HTTP/2 trailers pass through untouched and the task
//! starts only after the trailers frame was polled (also over HTTP/1.1,
//! where the client asks for trailers with `TE: trailers`).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Version};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tower::{Service, ServiceBuilder};
use tower_background::{BackgroundLayer, BackgroundTasks, Completion, Outcome};

/// Bounds every wait of a test.
const LIMIT: Duration = Duration::from_secs(10);

/// Awaits `fut`, failing the test after [`LIMIT`].
async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(LIMIT, fut).await {
        Ok(out) => out,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

/// Serves `svc` on 127.0.0.1 (a free port) with hyper-util's auto builder,
/// which speaks HTTP/1.1 and HTTP/2 (prior knowledge). Accepts a bounded
/// number of connections.
async fn serve<S, B>(svc: S) -> SocketAddr
where
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        for _ in 0..8 {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let svc = TowerToHyperService::new(svc.clone());
            tokio::spawn(async move {
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Protocol {
    Http1,
    Http2,
}

fn client(
    protocol: Protocol,
) -> Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>> {
    let mut builder = Client::builder(TokioExecutor::new());
    if protocol == Protocol::Http2 {
        builder.http2_only(true);
    }
    builder.build_http()
}

fn version(protocol: Protocol) -> Version {
    match protocol {
        Protocol::Http1 => Version::HTTP_11,
        Protocol::Http2 => Version::HTTP_2,
    }
}

fn get(addr: SocketAddr) -> Request<Empty<Bytes>> {
    Request::get(format!("http://{addr}/"))
        .body(Empty::new())
        .unwrap()
}

/// An ordered record of what happened on the server, shared with tasks.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<&'static str>>>);

impl Log {
    fn push(&self, event: &'static str) {
        self.0.lock().unwrap().push(event);
    }

    fn get(&self) -> Vec<&'static str> {
        self.0.lock().unwrap().clone()
    }
}

/// A response body whose frames the test sends. It logs every frame it
/// yields (`"data"`, `"trailers"`) and its end (`"end"`). With
/// `ends_at_trailers` it reports [`Body::is_end_stream`] after the trailers
/// frame, as a body that knows trailers are last does; without, it behaves
/// like `http_body_util::StreamBody`, which never reports the end early.
struct ChannelBody {
    frames: mpsc::UnboundedReceiver<Frame<Bytes>>,
    log: Log,
    ends_at_trailers: bool,
    trailers_sent: bool,
}

impl ChannelBody {
    fn new(log: Log, ends_at_trailers: bool) -> (mpsc::UnboundedSender<Frame<Bytes>>, Self) {
        let (tx, frames) = mpsc::unbounded_channel();
        let body = Self {
            frames,
            log,
            ends_at_trailers,
            trailers_sent: false,
        };
        (tx, body)
    }
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.frames.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(frame)) => {
                if frame.is_trailers() {
                    self.trailers_sent = true;
                    self.log.push("trailers");
                } else {
                    self.log.push("data");
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                self.log.push("end");
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ends_at_trailers && self.trailers_sent
    }
}

/// Hands one prepared body to the one request the test makes.
type Slot = Arc<Mutex<Option<ChannelBody>>>;

/// A plain tower service behind `layer`: it takes the queue from the
/// request's extensions, queues a task that logs `"task"`, records the
/// response's [`Completion`] and wakes the test, and answers with the body
/// in `slot`.
fn service(
    layer: BackgroundLayer,
    slot: Slot,
    log: Log,
    done: mpsc::UnboundedSender<Completion>,
) -> impl Service<
    Request<Incoming>,
    Response = Response<tower_background::BackgroundBody<ChannelBody>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
       + Send
       + Sync
       + 'static {
    ServiceBuilder::new()
        .layer(layer)
        .service_fn(move |req: Request<Incoming>| {
            let tasks = req
                .extensions()
                .get::<BackgroundTasks>()
                .expect("BackgroundLayer puts the queue into the extensions")
                .clone();
            let body = slot.lock().unwrap().take().expect("one request");
            let (log, done) = (log.clone(), done.clone());
            async move {
                tasks.add_with(move |completion: Completion| async move {
                    log.push("task");
                    let _ = done.send(completion);
                });
                // HTTP/1.1 sends only the trailers the head announces.
                let res = Response::builder()
                    .header(http::header::TRAILER, "grpc-status, x-checksum, x-tag")
                    .body(body)
                    .unwrap();
                Ok::<_, Infallible>(res)
            }
        })
}

/// Reads data frames until `expected` has arrived (bounded), failing on
/// anything else.
async fn read_data(body: &mut Incoming, expected: &str) {
    let mut got = Vec::new();
    for _ in 0..16 {
        if got.len() >= expected.len() {
            break;
        }
        let frame = within("a data frame", body.frame())
            .await
            .expect("more frames")
            .unwrap();
        got.extend_from_slice(frame.data_ref().expect("a data frame"));
    }
    assert_eq!(String::from_utf8(got).unwrap(), expected);
}

/// A streamed response over `protocol`: the task waits for its last chunk,
/// then runs once the client has the whole body.
async fn streamed_response(protocol: Protocol) {
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let log = Log::default();
    let (frames, body) = ChannelBody::new(log.clone(), false);
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let svc = service(
        layer,
        Arc::new(Mutex::new(Some(body))),
        log.clone(),
        done_tx,
    );
    let addr = serve(svc).await;

    let res = within("the response head", client(protocol).request(get(addr)))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.version(), version(protocol));
    let mut body = res.into_body();

    frames.send(Frame::data(Bytes::from("hello "))).unwrap();
    read_data(&mut body, "hello ").await;
    // The client has the first chunk and the body is still open.
    assert!(
        done_rx.try_recv().is_err(),
        "the task ran before the body ended"
    );
    assert_eq!(handle.stats().pending, 1);

    frames.send(Frame::data(Bytes::from("world"))).unwrap();
    drop(frames);
    read_data(&mut body, "world").await;
    let rest = within("the end of the body", body.collect()).await.unwrap();
    assert!(rest.to_bytes().is_empty());
    log.push("client has the body");

    let completion = within("the task", done_rx.recv()).await.unwrap();
    assert_eq!(completion.status(), StatusCode::OK);
    assert_eq!(completion.outcome(), Outcome::Finished);
    within("idle", handle.wait_idle()).await;
    assert_eq!(handle.stats().completed, 1);
    let events = log.get();
    assert_eq!(&events[..3], ["data", "data", "end"], "{events:?}");
    assert!(events.contains(&"task"), "{events:?}");
}

#[tokio::test]
async fn http1_the_task_runs_after_the_whole_streamed_body() {
    streamed_response(Protocol::Http1).await;
}

#[tokio::test]
async fn http2_the_task_runs_after_the_whole_streamed_body() {
    streamed_response(Protocol::Http2).await;
}

fn trailers() -> HeaderMap {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    trailers.insert("x-checksum", HeaderValue::from_static("sha256=abc123"));
    trailers.append("x-tag", HeaderValue::from_static("one"));
    trailers.append("x-tag", HeaderValue::from_static("two"));
    trailers
}

/// Streams two data frames then trailers over `protocol` from a body that
/// reports its end after the trailers (`ends_at_trailers`) or not; returns
/// the server's events and the task's [`Completion`].
async fn trailers_case(
    protocol: Protocol,
    layer: BackgroundLayer,
    ends_at_trailers: bool,
) -> (Vec<&'static str>, Completion) {
    let handle = layer.handle();
    let log = Log::default();
    let (frames, body) = ChannelBody::new(log.clone(), ends_at_trailers);
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let svc = service(
        layer,
        Arc::new(Mutex::new(Some(body))),
        log.clone(),
        done_tx,
    );
    let addr = serve(svc).await;

    let mut req = get(addr);
    // HTTP/1.1 sends trailers only to a client that asks for them.
    req.headers_mut()
        .insert(http::header::TE, HeaderValue::from_static("trailers"));
    let res = within("the response head", client(protocol).request(req))
        .await
        .unwrap();
    assert_eq!(res.version(), version(protocol));
    let mut body = res.into_body();
    frames.send(Frame::data(Bytes::from("hello "))).unwrap();
    frames.send(Frame::data(Bytes::from("world"))).unwrap();
    read_data(&mut body, "hello world").await;
    // Every data frame is out, the trailers are not: the body is open.
    assert!(
        done_rx.try_recv().is_err(),
        "the task ran before the trailers"
    );

    frames.send(Frame::trailers(trailers())).unwrap();
    let frame = within("the trailers", body.frame())
        .await
        .expect("a trailers frame")
        .unwrap();
    assert_eq!(frame.trailers_ref(), Some(&trailers()), "trailers changed");
    assert!(within("the end", body.frame()).await.is_none());

    let completion = within("the task", done_rx.recv()).await.unwrap();
    within("idle", handle.wait_idle()).await;
    drop(frames);
    (log.get(), completion)
}

async fn trailers_pass_through(protocol: Protocol) {
    let (events, completion) = trailers_case(protocol, BackgroundLayer::new(), true).await;
    assert_eq!(events, ["data", "data", "trailers", "task"], "{protocol:?}");
    assert_eq!(completion.outcome(), Outcome::Finished, "{protocol:?}");
    assert_eq!(completion.status(), StatusCode::OK);
}

#[tokio::test]
async fn http2_trailers_pass_through_untouched_and_the_task_starts_after_them() {
    trailers_pass_through(Protocol::Http2).await;
}

#[tokio::test]
async fn http1_trailers_pass_through_untouched_and_the_task_starts_after_them() {
    trailers_pass_through(Protocol::Http1).await;
}

/// Regression test: hyper's servers (HTTP/2 and HTTP/1.1 alike) stop polling a body once it
/// has yielded trailers and drop it, so a body that does not report
/// `is_end_stream` after its trailers (`http_body_util::StreamBody`, any
/// channel or stream body) is never polled to `None`. Trailers are the last
/// frame of a message, so the response was delivered in full: its tasks
/// should see `Finished`, and run even with `run_on_abort(false)`.
async fn a_body_that_ends_with_trailers_counts_as_finished(protocol: Protocol) {
    let layer = BackgroundLayer::new().run_on_abort(false);
    let handle = layer.handle();
    let (events, completion) = trailers_case(protocol, layer, false).await;
    assert_eq!(&events[..3], ["data", "data", "trailers"], "{events:?}");
    assert_eq!(
        completion.outcome(),
        Outcome::Finished,
        "{protocol:?}: {events:?}"
    );
    assert_eq!(handle.stats().discarded, 0);
}

#[tokio::test]
async fn http2_a_body_that_ends_with_trailers_counts_as_finished() {
    a_body_that_ends_with_trailers_counts_as_finished(Protocol::Http2).await;
}

#[tokio::test]
async fn http1_a_body_that_ends_with_trailers_counts_as_finished() {
    a_body_that_ends_with_trailers_counts_as_finished(Protocol::Http1).await;
}
