//! Faults over real sockets: a hyper server (hyper-util, 127.0.0.1:0) and a
//! raw `TcpStream` client. Clients that disconnect before the response,
//! after the headers, mid-stream and after the last byte; handlers that
//! panic, with and without `tower_http::catch_panic`; a panicking task at
//! every position of a sequence; tasks that block past the timeout; the
//! server's graceful shutdown followed by `BackgroundHandle::shutdown` while
//! a response is still streaming. Each test says which tasks must have run.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Notify};
use tower::{service_fn, Layer, ServiceBuilder};
use tower_background::{BackgroundLayer, BackgroundTasks, Completion, Outcome};
use tower_http::catch_panic::CatchPanicLayer;

use support::{data, within, ChannelBody, FrameSender, Log, Server};

// ------------------------------------------------------------ raw client

async fn send_get(addr: SocketAddr, path: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    stream
}

/// Reads until `needle` has been seen; returns everything read.
async fn read_until(stream: &mut TcpStream, needle: &str) -> String {
    let mut buf = Vec::new();
    within(&format!("{needle:?} from the server"), async {
        let mut chunk = [0u8; 4096];
        while !String::from_utf8_lossy(&buf).contains(needle) {
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "connection closed before {needle:?}: {buf:?}");
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await;
    String::from_utf8(buf).unwrap()
}

/// Reads to the end of the connection.
async fn read_to_end(mut stream: TcpStream) -> String {
    let mut buf = Vec::new();
    within("the end of the response", stream.read_to_end(&mut buf))
        .await
        .unwrap();
    String::from_utf8(buf).unwrap()
}

/// Hands each request of a test the body the test prepared for it.
type Bodies = Arc<Mutex<mpsc::UnboundedReceiver<ChannelBody>>>;

fn bodies() -> (mpsc::UnboundedSender<ChannelBody>, Bodies) {
    let (tx, rx) = mpsc::unbounded_channel();
    (tx, Arc::new(Mutex::new(rx)))
}

/// A streaming-response server: each request adds `add` (records "plain"),
/// `add_blocking` (records "blocking") and `add_with` (sends its completion
/// on `done`), and answers with the next prepared body.
async fn streaming_server(
    layer: BackgroundLayer,
    log: Log,
    done: mpsc::UnboundedSender<Completion>,
) -> (Server, mpsc::UnboundedSender<ChannelBody>) {
    let (body_tx, bodies) = bodies();
    let svc = layer.layer(service_fn(move |req: Request<Incoming>| {
        let tasks = req.extensions().get::<BackgroundTasks>().unwrap();
        tasks.add(log.task("plain"));
        let l = log.clone();
        tasks.add_blocking(move || l.push("blocking"));
        let done = done.clone();
        tasks.add_with(move |c: Completion| async move {
            let _ = done.send(c);
        });
        let body = bodies.lock().unwrap().try_recv().expect("a prepared body");
        async move { Ok::<_, Infallible>(Response::new(body)) }
    }));
    (Server::start(svc).await, body_tx)
}

/// Keeps feeding a body whose client has gone until the server drops it
/// (the write fails) and the `add_with` task reports the completion.
async fn feed_until_done(
    frames: &FrameSender,
    done: &mut mpsc::UnboundedReceiver<Completion>,
) -> Completion {
    for _ in 0..1000 {
        let _ = frames.send(data("more data nobody reads\n"));
        if let Ok(Some(c)) = tokio::time::timeout(Duration::from_millis(10), done.recv()).await {
            return c;
        }
    }
    panic!("the server never dropped the body of a disconnected client");
}

// ------------------------------------------------------------ disconnects

/// The client goes away while the handler is still working: there is no
/// response, so no task runs (all three are discarded).
#[tokio::test]
async fn disconnect_before_the_response_discards_the_tasks() {
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let log = Log::default();
    let entered = Arc::new(Notify::new());
    let never = Arc::new(Notify::new());
    let (l, e, n) = (log.clone(), Arc::clone(&entered), Arc::clone(&never));
    let svc = layer.layer(service_fn(move |req: Request<Incoming>| {
        let tasks = req.extensions().get::<BackgroundTasks>().unwrap().clone();
        let (l, e, n) = (l.clone(), Arc::clone(&e), Arc::clone(&n));
        async move {
            tasks.add(l.task("plain"));
            let l2 = l.clone();
            tasks.add_blocking(move || l2.push("blocking"));
            tasks.add_with(move |_| l.task("with"));
            e.notify_one();
            n.notified().await; // the handler is still working
            Ok::<_, Infallible>(Response::new(Full::<Bytes>::from("too late")))
        }
    }));
    let server = Server::start(svc).await;
    let client = send_get(server.addr, "/").await;
    within("the handler", entered.notified()).await;
    assert_eq!(handle.stats().pending, 3);
    drop(client);
    within("the tasks to be discarded", handle.wait_idle()).await;
    never.notify_waiters();
    let stats = handle.stats();
    assert_eq!(stats.discarded, 3, "{stats:?}");
    assert_eq!(stats.total(), 3);
    assert!(log.get().is_empty(), "no task ran: {:?}", log.get());
    server.graceful_shutdown().await;
}

/// The client reads the headers of a streaming response and goes away: all
/// three tasks still run (default `run_on_abort(true)`); `add_with` sees
/// `Aborted`.
#[tokio::test]
async fn disconnect_after_the_headers_still_runs_the_tasks() {
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let log = Log::default();
    let (done_tx, mut done) = mpsc::unbounded_channel();
    let (server, body_tx) = streaming_server(layer, log.clone(), done_tx).await;
    let (frames, body) = ChannelBody::new();
    body_tx.send(body).unwrap();
    let mut client = send_get(server.addr, "/").await;
    read_until(&mut client, "\r\n\r\n").await;
    drop(client);
    let completion = within("the completion", feed_until_done(&frames, &mut done)).await;
    assert_eq!(completion.outcome(), Outcome::Aborted);
    assert_eq!(completion.status(), StatusCode::OK);
    within("the tasks", handle.wait_idle()).await;
    assert_eq!(log.get(), ["plain", "blocking"]);
    assert_eq!(handle.stats().completed, 3);
    server.graceful_shutdown().await;
}

/// Same, mid-stream (the client read one chunk), with `run_on_abort(false)`:
/// `add` and `add_blocking` are discarded, `add_with` runs and sees `Aborted`.
#[tokio::test]
async fn disconnect_mid_stream_without_run_on_abort_runs_only_add_with() {
    let layer = BackgroundLayer::new().run_on_abort(false);
    let handle = layer.handle();
    let log = Log::default();
    let (done_tx, mut done) = mpsc::unbounded_channel();
    let (server, body_tx) = streaming_server(layer, log.clone(), done_tx).await;
    let (frames, body) = ChannelBody::new();
    body_tx.send(body).unwrap();
    let mut client = send_get(server.addr, "/").await;
    frames.send(data("first chunk")).unwrap();
    read_until(&mut client, "first chunk").await;
    drop(client);
    let completion = within("the completion", feed_until_done(&frames, &mut done)).await;
    assert_eq!(completion.outcome(), Outcome::Aborted);
    within("the tasks", handle.wait_idle()).await;
    assert!(
        log.get().is_empty(),
        "plain tasks were discarded: {:?}",
        log.get()
    );
    let stats = handle.stats();
    assert_eq!((stats.completed, stats.discarded), (1, 2), "{stats:?}");
    server.graceful_shutdown().await;
}

/// Mid-stream with the default settings: every task runs.
#[tokio::test]
async fn disconnect_mid_stream_runs_every_task() {
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let log = Log::default();
    let (done_tx, mut done) = mpsc::unbounded_channel();
    let (server, body_tx) = streaming_server(layer, log.clone(), done_tx).await;
    let (frames, body) = ChannelBody::new();
    body_tx.send(body).unwrap();
    let mut client = send_get(server.addr, "/").await;
    frames.send(data("first chunk")).unwrap();
    read_until(&mut client, "first chunk").await;
    drop(client);
    let completion = within("the completion", feed_until_done(&frames, &mut done)).await;
    assert_eq!(completion.outcome(), Outcome::Aborted);
    within("the tasks", handle.wait_idle()).await;
    assert_eq!(log.get(), ["plain", "blocking"]);
    assert_eq!(handle.stats().completed, 3);
    server.graceful_shutdown().await;
}

/// The client reads the whole (chunked) response, then goes away: every
/// task runs and `add_with` sees `Finished`. None ran before the last byte.
#[tokio::test]
async fn disconnect_after_the_last_byte_runs_every_task() {
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let log = Log::default();
    let (done_tx, mut done) = mpsc::unbounded_channel();
    let (server, body_tx) = streaming_server(layer, log.clone(), done_tx).await;
    let (frames, body) = ChannelBody::new();
    body_tx.send(body).unwrap();
    let mut client = send_get(server.addr, "/").await;
    frames.send(data("one ")).unwrap();
    read_until(&mut client, "one ").await;
    assert!(log.get().is_empty(), "no task before the end of the body");
    assert_eq!(handle.stats().pending, 3);
    frames.send(data("two")).unwrap();
    drop(frames); // end of the body
    let response = read_until(&mut client, "0\r\n\r\n").await;
    assert!(response.contains("two"));
    drop(client);
    let completion = within("the completion", done.recv()).await.unwrap();
    assert_eq!(completion.outcome(), Outcome::Finished);
    within("the tasks", handle.wait_idle()).await;
    assert_eq!(log.get(), ["plain", "blocking"]);
    assert_eq!(handle.stats().completed, 3);
    server.graceful_shutdown().await;
}

// ------------------------------------------------------------ panicking handlers

/// A handler that adds a task and then panics (on `/panic`), or answers.
fn panicky(
    log: Log,
) -> impl tower::Service<
    Request<Incoming>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
       + Send {
    service_fn(move |req: Request<Incoming>| {
        let tasks = req.extensions().get::<BackgroundTasks>().unwrap().clone();
        let log = log.clone();
        async move {
            let path = req.uri().path().to_owned();
            tasks.add(log.task(format!("plain {path}")));
            let l = log.clone();
            tasks.add_with(move |c: Completion| {
                l.task(format!("with {path} {}", c.status().as_u16()))
            });
            if req.uri().path() == "/panic" {
                panic!("deliberate handler panic");
            }
            Ok(Response::new(Full::from("fine")))
        }
    })
}

/// Without `CatchPanic`, a handler panic unwinds through the response
/// future: there is no response (hyper closes the connection), so the tasks
/// of that request are discarded; the server goes on, and the next request's
/// tasks run.
#[tokio::test]
async fn a_panicking_handler_discards_its_tasks_and_the_server_goes_on() {
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let log = Log::default();
    let server = Server::start(layer.layer(panicky(log.clone()))).await;
    let response = read_to_end(send_get(server.addr, "/panic").await).await;
    assert!(response.is_empty(), "no response: {response:?}");
    within("the discard", handle.wait_idle()).await;
    assert_eq!(handle.stats().discarded, 2);
    let response = read_to_end(send_get(server.addr, "/ok").await).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    within("the tasks", handle.wait_idle()).await;
    assert_eq!(log.get(), ["plain /ok", "with /ok 200"]);
    assert_eq!(handle.stats().completed, 2);
    server.graceful_shutdown().await;
}

/// `CatchPanicLayer` inside `BackgroundLayer` turns the panic into a 500
/// response: by the default run policy the plain task is skipped (a 5xx is
/// not a success), while the `add_with` task runs and sees the 500.
#[tokio::test]
async fn catch_panic_inside_the_layer_turns_the_panic_into_a_500_that_skips_plain_tasks() {
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let log = Log::default();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .layer(CatchPanicLayer::new())
        .service(panicky(log.clone()));
    let server = Server::start(svc).await;
    let response = read_to_end(send_get(server.addr, "/panic").await).await;
    assert!(response.starts_with("HTTP/1.1 500"), "{response}");
    within("the tasks", handle.wait_idle()).await;
    assert_eq!(log.get(), ["with /panic 500"]);
    let stats = handle.stats();
    assert_eq!((stats.completed, stats.skipped), (1, 1), "{stats:?}");
    server.graceful_shutdown().await;
}

/// The same with `RunPolicy::Always`: every response runs its tasks.
#[tokio::test]
async fn catch_panic_inside_the_layer_runs_every_task_with_run_policy_always() {
    let layer = BackgroundLayer::new().run_policy(tower_background::RunPolicy::Always);
    let handle = layer.handle();
    let log = Log::default();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .layer(CatchPanicLayer::new())
        .service(panicky(log.clone()));
    let server = Server::start(svc).await;
    let response = read_to_end(send_get(server.addr, "/panic").await).await;
    assert!(response.starts_with("HTTP/1.1 500"), "{response}");
    within("the tasks", handle.wait_idle()).await;
    assert_eq!(log.get(), ["plain /panic", "with /panic 500"]);
    assert_eq!(handle.stats().completed, 2);
    server.graceful_shutdown().await;
}

/// `CatchPanicLayer` outside `BackgroundLayer`: the client gets a 500, but
/// the panic unwound through our response future first, so the request had
/// no response from the layer's point of view: its tasks are discarded.
#[tokio::test]
async fn catch_panic_outside_the_layer_answers_500_and_discards_the_tasks() {
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let log = Log::default();
    let svc = ServiceBuilder::new()
        .layer(CatchPanicLayer::new())
        .layer(layer)
        .service(panicky(log.clone()));
    let server = Server::start(svc).await;
    let response = read_to_end(send_get(server.addr, "/panic").await).await;
    assert!(response.starts_with("HTTP/1.1 500"), "{response}");
    within("the discard", handle.wait_idle()).await;
    assert!(log.get().is_empty(), "{:?}", log.get());
    assert_eq!(handle.stats().discarded, 2);
    server.graceful_shutdown().await;
}

// ------------------------------------------------------------ failing tasks

/// Four tasks, the one at `position` panics: the three others still run,
/// in order, on every position; the connection serves the next request.
#[tokio::test]
async fn a_task_panicking_at_every_position_of_four() {
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let log = Log::default();
    let l = log.clone();
    let svc = layer.layer(service_fn(move |req: Request<Incoming>| {
        let tasks = req.extensions().get::<BackgroundTasks>().unwrap();
        let position: usize = req.uri().path()[1..].parse().unwrap();
        for i in 0..4 {
            let l = l.clone();
            tasks.add(async move {
                if i == position {
                    panic!("deliberate task panic at {i}");
                }
                l.push(format!("{position}:{i}"));
            });
        }
        async { Ok::<_, Infallible>(Response::new(Full::<Bytes>::from("ok"))) }
    }));
    let server = Server::start(svc).await;
    for position in 0..4 {
        let response = read_to_end(send_get(server.addr, &format!("/{position}")).await).await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        within("the tasks", handle.wait_idle()).await;
    }
    let expected: Vec<String> = (0..4)
        .flat_map(|p| {
            (0..4)
                .filter(move |&i| i != p)
                .map(move |i| format!("{p}:{i}"))
        })
        .collect();
    assert_eq!(log.get(), expected);
    let stats = handle.stats();
    assert_eq!((stats.completed, stats.panicked), (12, 4), "{stats:?}");
    server.graceful_shutdown().await;
}

/// An async task that never ends and a blocking closure that outlives the
/// timeout are both counted as timed out, and the task after each of them
/// runs (after the blocking one while it is still running: the sequence
/// does not wait for it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_blocking_past_the_timeout_do_not_hold_the_sequence() {
    let layer = BackgroundLayer::new().task_timeout(Duration::from_millis(100));
    let handle = layer.handle();
    let log = Log::default();
    let blocking_done = Arc::new(AtomicBool::new(false));
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let release_rx = Arc::new(Mutex::new(Some(release_rx)));
    let (l, b) = (log.clone(), Arc::clone(&blocking_done));
    let svc = layer.layer(service_fn(move |req: Request<Incoming>| {
        let tasks = req.extensions().get::<BackgroundTasks>().unwrap();
        let (l, b) = (l.clone(), Arc::clone(&b));
        tasks.add(async { std::future::pending::<()>().await });
        tasks.add(l.task("after the async one"));
        let (l2, b2) = (l.clone(), Arc::clone(&b));
        let rx = release_rx.lock().unwrap().take().unwrap();
        tasks.add_blocking(move || {
            l2.push("blocking started");
            // Held until the test releases it (bounded).
            let _ = rx.recv_timeout(Duration::from_secs(10));
            b2.store(true, Ordering::SeqCst);
        });
        tasks.add(async move {
            l.push(format!(
                "after the blocking one (it had finished: {})",
                b.load(Ordering::SeqCst)
            ));
        });
        async { Ok::<_, Infallible>(Response::new(Full::<Bytes>::from("ok"))) }
    }));
    let server = Server::start(svc).await;
    read_to_end(send_get(server.addr, "/").await).await;
    within("the tasks", handle.wait_idle()).await;
    assert_eq!(
        log.get(),
        [
            "after the async one",
            "blocking started",
            "after the blocking one (it had finished: false)"
        ]
    );
    let stats = handle.stats();
    assert_eq!((stats.timed_out, stats.completed), (2, 2), "{stats:?}");
    release_tx.send(()).unwrap();
    server.graceful_shutdown().await;
}

// ------------------------------------------------------------ shutdown

/// The production sequence: the server's graceful shutdown (bounded: one
/// response is still streaming), then `BackgroundHandle::shutdown(grace)`.
///
/// - `/quick`: finished before; its task completed before the shutdown.
/// - `/gated`: finished; its task completes during the grace period.
/// - `/forever`: finished; its task is still running when the grace ends:
///   cancelled.
/// - `/stream`: still streaming; its two tasks are pending when the grace
///   ends: cancelled. Its body finishes after the close, and its handler
///   adds one more task after the close: cancelled too. None of them runs.
#[tokio::test]
async fn graceful_server_shutdown_then_background_shutdown_while_streaming() {
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let log = Log::default();
    let (gate_tx, gate_rx) = oneshot::channel::<()>();
    let gate_rx = Arc::new(Mutex::new(Some(gate_rx)));
    let (late_tx, late_rx) = oneshot::channel::<BackgroundTasks>();
    let late_tx = Arc::new(Mutex::new(Some(late_tx)));
    let (frames, stream_body) = ChannelBody::new();
    let stream_body = Arc::new(Mutex::new(Some(stream_body)));
    let forever_started = Arc::new(Notify::new());
    let fs = Arc::clone(&forever_started);
    let l = log.clone();
    let svc = layer.layer(service_fn(move |req: Request<Incoming>| {
        let tasks = req.extensions().get::<BackgroundTasks>().unwrap().clone();
        let path = req.uri().path().to_owned();
        let l = l.clone();
        let body = match path.as_str() {
            "/quick" => {
                tasks.add(l.task("quick"));
                None
            }
            "/gated" => {
                let rx = gate_rx.lock().unwrap().take().unwrap();
                tasks.add(async move {
                    let _ = rx.await;
                    l.push("gated");
                });
                None
            }
            "/forever" => {
                let fs = Arc::clone(&fs);
                tasks.add(async move {
                    l.push("forever started");
                    fs.notify_one();
                    std::future::pending::<()>().await;
                });
                None
            }
            _ => {
                tasks.add(l.task("stream 1"));
                let l2 = l.clone();
                tasks.add_with(move |_| l2.task("stream 2"));
                let _ = late_tx.lock().unwrap().take().unwrap().send(tasks.clone());
                stream_body.lock().unwrap().take()
            }
        };
        async move {
            let body = match body {
                Some(body) => http_body_util::Either::Left(body),
                None => http_body_util::Either::Right(Full::<Bytes>::from("done")),
            };
            Ok::<_, Infallible>(Response::new(body))
        }
    }));
    let server = Server::start(svc).await;

    read_to_end(send_get(server.addr, "/quick").await).await;
    within("the quick task", handle.wait_idle()).await;
    read_to_end(send_get(server.addr, "/gated").await).await;
    read_to_end(send_get(server.addr, "/forever").await).await;
    within("the forever task", forever_started.notified()).await;
    let mut streaming = send_get(server.addr, "/stream").await;
    frames.send(data("first chunk")).unwrap();
    read_until(&mut streaming, "first chunk").await;
    let late = within("the streaming handler", late_rx).await.unwrap();
    let stats = handle.stats();
    assert_eq!(
        (stats.completed, stats.running, stats.pending),
        (1, 2, 2),
        "{stats:?}"
    );

    // The server's graceful shutdown cannot finish while /stream streams:
    // the application gives it 100 ms, then shuts the background tasks down.
    let mut server_done = server.begin_shutdown();
    assert!(
        tokio::time::timeout(Duration::from_millis(100), &mut server_done)
            .await
            .is_err(),
        "the server waits for the streaming response"
    );
    let shutdown = tokio::spawn(handle.shutdown(Duration::from_millis(300)));
    tokio::task::yield_now().await; // the shutdown has started
    gate_tx.send(()).unwrap(); // /gated completes during the grace period
    let report = within("the background shutdown", shutdown).await.unwrap();
    assert_eq!(report.completed, 1, "{report:?}");
    assert_eq!(
        report.cancelled, 3,
        "forever (running), stream 1 and 2 (pending)"
    );

    // After the close: a late add and the end of the streaming body.
    late.add(log.task("late add after close"));
    frames.send(data("last chunk")).unwrap();
    drop(frames);
    let rest = read_to_end(streaming).await;
    assert!(rest.contains("last chunk"));
    within("the server's graceful shutdown", server_done)
        .await
        .unwrap();
    within("idle", handle.wait_idle()).await;

    assert_eq!(log.get(), ["quick", "forever started", "gated"]);
    let stats = handle.stats();
    assert_eq!((stats.completed, stats.cancelled), (2, 4), "{stats:?}");
    assert_eq!(stats.total(), 6);
    let again = within("a second shutdown", handle.shutdown(Duration::ZERO)).await;
    assert_eq!((again.completed, again.cancelled), (0, 0));
}

/// HTTP/2: the client resets the stream mid-response (drops the response
/// body) while the connection stays open: the server drops that body, so
/// every task runs (`run_on_abort(true)`), `add_with` sees `Aborted`, and the
/// same connection serves the next request, whose tasks see `Finished`.
#[tokio::test]
async fn http2_stream_reset_mid_stream_runs_the_tasks() {
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let log = Log::default();
    let (done_tx, mut done) = mpsc::unbounded_channel();
    let (server, body_tx) = streaming_server(layer, log.clone(), done_tx).await;

    let stream = TcpStream::connect(server.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let request = || {
        Request::builder()
            .uri(format!("http://{}/", server.addr))
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap()
    };

    let (frames, body) = ChannelBody::new();
    body_tx.send(body).unwrap();
    let res = within("the response headers", sender.send_request(request()))
        .await
        .unwrap();
    frames.send(data("first chunk")).unwrap();
    let mut res_body = res.into_body();
    let first = within(
        "the first chunk",
        http_body_util::BodyExt::frame(&mut res_body),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(first.into_data().unwrap(), "first chunk");
    drop(res_body); // RST_STREAM(CANCEL)
    let completion = within("the completion", feed_until_done(&frames, &mut done)).await;
    assert_eq!(completion.outcome(), Outcome::Aborted);
    within("the tasks", handle.wait_idle()).await;
    assert_eq!(log.get(), ["plain", "blocking"]);

    // The connection is still usable.
    let (frames, body) = ChannelBody::new();
    body_tx.send(body).unwrap();
    frames.send(data("whole")).unwrap();
    drop(frames);
    let res = within("the second response", sender.send_request(request()))
        .await
        .unwrap();
    let body = within(
        "the second body",
        http_body_util::BodyExt::collect(res.into_body()),
    )
    .await
    .unwrap()
    .to_bytes();
    assert_eq!(body, "whole");
    let completion = within("the second completion", done.recv()).await.unwrap();
    assert_eq!(completion.outcome(), Outcome::Finished);
    within("the tasks", handle.wait_idle()).await;
    assert_eq!(log.get(), ["plain", "blocking", "plain", "blocking"]);
    assert_eq!(handle.stats().completed, 6);
    drop(sender);
    let _ = within("the client connection", conn).await;
    server.graceful_shutdown().await;
}

/// HEAD requests and 204/304 responses: hyper never polls the body, it drops
/// it. That counts as a delivered response: the tasks run (also with
/// `run_on_abort(false)`), `add_with` sees `NoBody`.
#[tokio::test]
async fn bodies_the_server_never_sends_run_the_tasks_with_no_body() {
    let layer = BackgroundLayer::new().run_on_abort(false);
    let handle = layer.handle();
    let log = Log::default();
    let l = log.clone();
    let svc = layer.layer(service_fn(move |req: Request<Incoming>| {
        let tasks = req.extensions().get::<BackgroundTasks>().unwrap();
        let label = format!("{} {}", req.method(), req.uri().path());
        tasks.add(l.task(format!("plain {label}")));
        let l = l.clone();
        tasks.add_with(move |c: Completion| {
            l.task(format!(
                "with {label} {} {:?}",
                c.status().as_u16(),
                c.outcome()
            ))
        });
        let status = match req.uri().path() {
            "/204" => StatusCode::NO_CONTENT,
            "/304" => StatusCode::NOT_MODIFIED,
            _ => StatusCode::OK,
        };
        let mut res = Response::new(Full::<Bytes>::from("a body nobody reads"));
        *res.status_mut() = status;
        async move { Ok::<_, Infallible>(res) }
    }));
    let server = Server::start(svc).await;
    for (method, path) in [("HEAD", "/"), ("GET", "/204"), ("GET", "/304")] {
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        let req =
            format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        stream.write_all(req.as_bytes()).await.unwrap();
        let response = read_to_end(stream).await;
        assert!(!response.contains("nobody reads"), "{response}");
        within("the tasks", handle.wait_idle()).await;
    }
    assert_eq!(
        log.get(),
        [
            "plain HEAD /",
            "with HEAD / 200 NoBody",
            "plain GET /204",
            "with GET /204 204 NoBody",
            "plain GET /304",
            "with GET /304 304 NoBody",
        ]
    );
    assert_eq!(handle.stats().completed, 6);
    server.graceful_shutdown().await;
}
