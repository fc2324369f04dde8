//! tonic integration: `tonic::transport::Server::builder().layer(BackgroundLayer::new())`
//! with a real gRPC server on 127.0.0.1 and a real tonic client over HTTP/2.
//! A handler reaches the queue through `request.extensions()`; the unary reply
//! and its `grpc-status` trailer arrive, and only then do its tasks run. A
//! handler that answers with an error `Status` (an HTTP 200 response whose
//! status travels in the headers) still runs its tasks; graceful shutdown
//! drains them. The service is hand-written (`src/greeter.rs`), so no `protoc`
//! is needed.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;
use tonic::{Code, Request, Response, Status};
use tower::util::MapResponseLayer;
use tower_background::{BackgroundHandle, BackgroundLayer, BackgroundTasks, Completion, Outcome};

use tonic_server::greeter::{Greeter, GreeterClient, GreeterServer, HelloReply, HelloRequest};

/// The failure guard around every wait.
const LIMIT: Duration = Duration::from_secs(10);

async fn within<F: std::future::Future>(what: &str, fut: F) -> F::Output {
    tokio::time::timeout(LIMIT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// An ordered record of what happened, on the server and in the tasks.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    fn push(&self, event: impl Into<String>) {
        self.0.lock().unwrap().push(event.into());
    }

    fn events(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    fn position(&self, event: &str) -> usize {
        let events = self.events();
        events
            .iter()
            .position(|e| e == event)
            .unwrap_or_else(|| panic!("no event {event:?} in {events:?}"))
    }
}

pin_project! {
    /// Records the frames the server pulls from the gRPC response body. It
    /// sits inside `BackgroundLayer`, so it sees each frame just before
    /// `BackgroundBody` does.
    struct RecordBody<B> {
        #[pin]
        inner: B,
        log: Log,
    }
}

impl<B: Body> Body for RecordBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        match &frame {
            Some(Ok(f)) if f.is_data() => this.log.push("server: data frame"),
            Some(Ok(f)) if f.is_trailers() => {
                let status = f.trailers_ref().and_then(|t| t.get("grpc-status")).cloned();
                this.log
                    .push(format!("server: trailers frame, grpc-status {status:?}"));
            }
            Some(Ok(_)) => this.log.push("server: other frame"),
            Some(Err(_)) => this.log.push("server: body error"),
            None => this.log.push("server: end of body"),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

struct TestServer {
    addr: SocketAddr,
    handle: BackgroundHandle,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl TestServer {
    /// Serves `greeter` on 127.0.0.1:0 behind `BackgroundLayer` (outer) and the
    /// frame recorder (inner).
    async fn start(greeter: impl Greeter, log: &Log) -> Self {
        let layer = BackgroundLayer::new();
        let handle = layer.handle();
        let record = {
            let log = log.clone();
            MapResponseLayer::new(move |res: http::Response<tonic::body::Body>| {
                let log = log.clone();
                res.map(|inner| RecordBody { inner, log })
            })
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(
            Server::builder()
                .layer(layer)
                .layer(record)
                .add_service(GreeterServer::new(greeter))
                .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
                    let _ = stopped.await;
                }),
        );
        Self {
            addr,
            handle,
            stop: Some(stop),
            server,
        }
    }

    /// Graceful shutdown of the server (not of the tasks).
    async fn stop(mut self) -> BackgroundHandle {
        let _ = self.stop.take().unwrap().send(());
        within("the server to shut down", self.server)
            .await
            .unwrap()
            .unwrap();
        self.handle
    }
}

/// The handler's queue, or the error a handler returns without the layer.
fn tasks_of<T>(request: &Request<T>) -> Result<BackgroundTasks, Status> {
    request
        .extensions()
        .get::<BackgroundTasks>()
        .cloned()
        .ok_or_else(|| Status::failed_precondition("no BackgroundTasks in the extensions"))
}

/// A oneshot receiver that a `Fn` handler can take once.
fn take_once<T>(slot: &Mutex<Option<T>>) -> T {
    slot.lock().unwrap().take().expect("the handler runs once")
}

#[tokio::test]
async fn unary_reply_and_grpc_status_trailer_arrive_then_the_task_runs() {
    let log = Log::default();
    // The task waits for the client to have its reply, so a layer that ran
    // tasks before (or while holding back) the response would deadlock here.
    let (client_has_reply_tx, client_has_reply_rx) = oneshot::channel::<()>();
    let (completion_tx, completion_rx) = oneshot::channel::<Completion>();
    let (done_tx, done_rx) = oneshot::channel::<String>();
    let slots = Arc::new(Mutex::new(Some((
        client_has_reply_rx,
        completion_tx,
        done_tx,
    ))));

    let handler_log = log.clone();
    let greeter = move |request: Request<HelloRequest>| {
        let log = handler_log.clone();
        let slots = Arc::clone(&slots);
        async move {
            let tasks = tasks_of(&request)?;
            assert_eq!(tasks.len(), 0, "a fresh queue per request");
            let name = request.into_inner().name;
            let (client_has_reply, completion_tx, done_tx) = take_once(&slots);
            let task_log = log.clone();
            let to = name.clone();
            tasks.add(async move {
                task_log.push("task: started");
                within("the client's reply", client_has_reply)
                    .await
                    .unwrap();
                task_log.push("task: finished");
                let _ = done_tx.send(format!("welcome email sent to {to}"));
            });
            tasks.add_with(move |completion: Completion| async move {
                let _ = completion_tx.send(completion);
            });
            assert_eq!(tasks.len(), 2, "both tasks wait for the response");
            log.push("handler: queued 2 tasks");
            Ok(Response::new(HelloReply {
                message: format!("Hello {name}!"),
            }))
        }
    };
    let server = TestServer::start(greeter, &log).await;

    let mut client = within("connect", GreeterClient::connect(server.addr))
        .await
        .unwrap();
    let reply = within(
        "the reply",
        client.say_hello(HelloRequest {
            name: "Ferris".into(),
        }),
    )
    .await
    .expect("the call returns Ok: reply message and grpc-status 0");
    // The trailers were merged into the reply's metadata by the client.
    assert_eq!(
        reply
            .metadata()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap()),
        Some("0"),
        "the grpc-status trailer arrived: {:?}",
        reply.metadata()
    );
    assert_eq!(reply.into_inner().message, "Hello Ferris!");
    client_has_reply_tx.send(()).unwrap();

    assert_eq!(
        within("the task", done_rx).await.unwrap(),
        "welcome email sent to Ferris"
    );
    let completion = within("the add_with task", completion_rx).await.unwrap();
    assert_eq!(completion.status(), http::StatusCode::OK);
    assert_eq!(completion.outcome(), Outcome::Finished);
    within("wait_idle", server.handle.wait_idle()).await;
    let stats = server.handle.stats();
    assert_eq!((stats.completed, stats.total()), (2, 2), "{stats:?}");

    // Order: handler, then the reply's data frame, then its trailers frame
    // (grpc-status 0), and only then the task.
    let handler = log.position("handler: queued 2 tasks");
    let data = log.position("server: data frame");
    let trailers = log.position(r#"server: trailers frame, grpc-status Some("0")"#);
    let started = log.position("task: started");
    assert!(
        handler < data && data < trailers && trailers < started,
        "{:?}",
        log.events()
    );
    server.stop().await;
}

#[tokio::test]
async fn a_handler_that_returns_an_error_status_still_runs_its_tasks() {
    let log = Log::default();
    let (completion_tx, completion_rx) = oneshot::channel::<Completion>();
    let (done_tx, done_rx) = oneshot::channel::<()>();
    let slots = Arc::new(Mutex::new(Some((completion_tx, done_tx))));
    let greeter = move |request: Request<HelloRequest>| {
        let slots = Arc::clone(&slots);
        async move {
            let tasks = tasks_of(&request)?;
            let (completion_tx, done_tx) = take_once(&slots);
            tasks.add(async move {
                let _ = done_tx.send(());
            });
            tasks.add_with(move |completion: Completion| async move {
                let _ = completion_tx.send(completion);
            });
            Err::<Response<HelloReply>, _>(Status::not_found("no such user"))
        }
    };
    let server = TestServer::start(greeter, &log).await;

    let mut client = within("connect", GreeterClient::connect(server.addr))
        .await
        .unwrap();
    let status = within(
        "the reply",
        client.say_hello(HelloRequest {
            name: "nobody".into(),
        }),
    )
    .await
    .expect_err("the handler answered with an error status");
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(status.message(), "no such user");

    within("the add task", done_rx).await.unwrap();
    let completion = within("the add_with task", completion_rx).await.unwrap();
    // A gRPC error is an HTTP 200 response; tonic sends it "trailers-only"
    // (grpc-status in the headers, empty body with end of stream), so the
    // server never polls the body: the contract's `NoBody`, a delivered outcome.
    assert_eq!(completion.status(), http::StatusCode::OK);
    assert_eq!(completion.outcome(), Outcome::NoBody);
    assert!(completion.outcome().is_delivered());
    within("wait_idle", server.handle.wait_idle()).await;
    let stats = server.handle.stats();
    assert_eq!((stats.completed, stats.discarded), (2, 0), "{stats:?}");
    assert!(
        !log.events().iter().any(|e| e.starts_with("server: data")),
        "no message was sent: {:?}",
        log.events()
    );
    server.stop().await;
}

#[tokio::test]
async fn concurrent_calls_on_one_http2_connection_each_run_their_own_tasks() {
    const CALLS: usize = 8;
    let log = Log::default();
    let (sent_tx, mut sent_rx) = mpsc::unbounded_channel::<String>();
    let greeter = move |request: Request<HelloRequest>| {
        let sent_tx = sent_tx.clone();
        async move {
            let tasks = tasks_of(&request)?;
            assert!(tasks.is_empty(), "a fresh queue per request");
            let name = request.into_inner().name;
            let to = name.clone();
            tasks.add(async move {
                let _ = sent_tx.send(to);
            });
            Ok(Response::new(HelloReply { message: name }))
        }
    };
    let server = TestServer::start(greeter, &log).await;

    // One channel: the calls are multiplexed as HTTP/2 streams on one connection.
    let client = within("connect", GreeterClient::connect(server.addr))
        .await
        .unwrap();
    let calls: Vec<_> = (0..CALLS)
        .map(|i| {
            let mut client = client.clone();
            tokio::spawn(async move {
                client
                    .say_hello(HelloRequest {
                        name: format!("user-{i}"),
                    })
                    .await
            })
        })
        .collect();
    for (i, call) in calls.into_iter().enumerate() {
        let reply = within("a reply", call).await.unwrap().unwrap();
        assert_eq!(reply.into_inner().message, format!("user-{i}"));
    }

    let mut sent = Vec::new();
    for _ in 0..CALLS {
        sent.push(within("a task", sent_rx.recv()).await.unwrap());
    }
    sent.sort();
    let mut expected: Vec<_> = (0..CALLS).map(|i| format!("user-{i}")).collect();
    expected.sort();
    assert_eq!(sent, expected, "each request ran exactly its own task");
    within("wait_idle", server.handle.wait_idle()).await;
    assert_eq!(server.handle.stats().completed, CALLS as u64);
    server.stop().await;
}

#[tokio::test]
async fn graceful_shutdown_then_handle_shutdown_drains_the_tasks() {
    let log = Log::default();
    let (release_tx, release_rx) = oneshot::channel::<()>();
    let (running_tx, running_rx) = oneshot::channel::<()>();
    let slots = Arc::new(Mutex::new(Some((release_rx, running_tx))));
    let greeter = move |request: Request<HelloRequest>| {
        let slots = Arc::clone(&slots);
        async move {
            let tasks = tasks_of(&request)?;
            let (release, running) = take_once(&slots);
            tasks.add(async move {
                let _ = running.send(());
                within("the release", release).await.unwrap();
            });
            Ok(Response::new(HelloReply::default()))
        }
    };
    let server = TestServer::start(greeter, &log).await;
    let mut client = within("connect", GreeterClient::connect(server.addr))
        .await
        .unwrap();
    within("the reply", client.say_hello(HelloRequest::default()))
        .await
        .unwrap();
    within("the task to start", running_rx).await.unwrap();
    drop(client);

    // The example's order: the server stops first, then the tasks get a grace period.
    let handle = server.stop().await;
    assert_eq!(handle.stats().running, 1, "the task outlives the server");
    let shutdown = tokio::spawn(handle.shutdown(LIMIT));
    release_tx.send(()).unwrap();
    let report = within("handle.shutdown", shutdown).await.unwrap();
    assert_eq!((report.completed, report.cancelled), (1, 0), "{report:?}");
}

#[tokio::test]
async fn without_the_layer_a_handler_finds_no_queue() {
    let greeter = |request: Request<HelloRequest>| async move {
        tasks_of(&request)?;
        Ok(Response::new(HelloReply::default()))
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(
        Server::builder()
            .add_service(GreeterServer::new(greeter))
            .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
                let _ = stopped.await;
            }),
    );
    let mut client = within("connect", GreeterClient::connect(addr))
        .await
        .unwrap();
    let status = within("the reply", client.say_hello(HelloRequest::default()))
        .await
        .expect_err("no queue without the layer");
    assert_eq!(status.code(), Code::FailedPrecondition);
    stop.send(()).unwrap();
    within("the server to shut down", server)
        .await
        .unwrap()
        .unwrap();
}
