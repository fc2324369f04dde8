//! The core semantics over real sockets: a hyper server on 127.0.0.1 with
//! the layer in front of a plain tower service, and a real client.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, Notify};
use tower::{service_fn, Layer};
use tower_background::{BackgroundLayer, BackgroundTasks, Completion, Outcome};

use support::{data, within, ChannelBody, FrameSender};

type Body = BoxBody<Bytes, std::io::Error>;
type Handler =
    Arc<dyn Fn(&Request<hyper::body::Incoming>, &BackgroundTasks) -> Response<Body> + Send + Sync>;

/// Serves `handler` behind `layer` on 127.0.0.1:0 until the test ends.
async fn serve(layer: &BackgroundLayer, handler: Handler) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = layer.layer(service_fn(move |req: Request<hyper::body::Incoming>| {
        let tasks = req.extensions().get::<BackgroundTasks>().unwrap().clone();
        let res = handler(&req, &tasks);
        async move { Ok::<_, Infallible>(res) }
    }));
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
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

fn full(s: &'static str) -> Body {
    Full::new(Bytes::from_static(s.as_bytes()))
        .map_err(|never| match never {})
        .boxed()
}

/// A streaming response body fed by the test.
fn streaming() -> (FrameSender, Body) {
    let (tx, body) = ChannelBody::new();
    (tx, body.boxed())
}

async fn http1(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

fn get(path: &str) -> Request<Empty<Bytes>> {
    Request::get(path)
        .header(header::HOST, "localhost")
        .body(Empty::new())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_request_on_a_keep_alive_connection_does_not_wait_for_tasks() {
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let gate = Arc::new(Notify::new());
    let g = gate.clone();
    let addr = serve(
        &layer,
        Arc::new(move |req, tasks| {
            if req.uri().path() == "/slow-task" {
                let g = g.clone();
                tasks.add(async move { g.notified().await });
            }
            Response::new(full("ok"))
        }),
    )
    .await;

    let mut conn = http1(addr).await;
    let first = within("first", conn.send_request(get("/slow-task")))
        .await
        .unwrap();
    within("first body", first.into_body().collect())
        .await
        .unwrap();
    // Same connection, while the first request's task is still running.
    conn.ready().await.unwrap();
    let second = within("second", conn.send_request(get("/"))).await.unwrap();
    let body = within("second body", second.into_body().collect())
        .await
        .unwrap();
    assert_eq!(body.to_bytes(), "ok");
    assert_eq!(
        handle.stats().running,
        1,
        "the first task should still be running"
    );
    gate.notify_one();
    within("idle", handle.wait_idle()).await;
    assert_eq!(handle.stats().completed, 1);
}

#[tokio::test]
async fn a_client_that_disconnects_mid_stream_does_not_cancel_committed_work() {
    for run_on_abort in [true, false] {
        let layer = BackgroundLayer::new().run_on_abort(run_on_abort);
        let handle = layer.handle();
        let (ran_tx, mut ran_rx) = mpsc::unbounded_channel::<&'static str>();
        let (outcome_tx, mut outcome_rx) = mpsc::unbounded_channel::<Completion>();
        let senders: Arc<Mutex<Vec<FrameSender>>> = Arc::default();
        let s = senders.clone();
        let addr = serve(
            &layer,
            Arc::new(move |_, tasks| {
                let ran = ran_tx.clone();
                tasks.add(async move {
                    let _ = ran.send("committed work");
                });
                let out = outcome_tx.clone();
                tasks.add_with(move |c| async move {
                    let _ = out.send(c);
                });
                let (tx, body) = streaming();
                tx.send(data("first chunk\n")).unwrap();
                s.lock().unwrap().push(tx);
                Response::new(body)
            }),
        )
        .await;

        let mut conn = TcpStream::connect(addr).await.unwrap();
        conn.write_all(b"GET /download HTTP/1.1\r\nhost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0; 1024];
        let mut got = String::new();
        while !got.contains("first chunk") {
            let n = within("first chunk", conn.read(&mut buf)).await.unwrap();
            assert!(n > 0, "connection closed early");
            got.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        drop(conn); // the client goes away mid-stream

        let completion = within("add_with", outcome_rx.recv()).await.unwrap();
        assert_eq!(completion.outcome(), Outcome::Aborted);
        assert_eq!(completion.status(), StatusCode::OK);
        within("idle", handle.wait_idle()).await;
        let ran = ran_rx.try_recv().ok();
        if run_on_abort {
            assert_eq!(ran, Some("committed work"));
        } else {
            assert_eq!(ran, None);
            assert_eq!(handle.stats().discarded, 1);
        }
        // The server still holds the sender: the body was dropped by hyper,
        // not ended by the test.
        assert_eq!(senders.lock().unwrap().len(), 1);
    }
}

#[tokio::test]
async fn head_and_no_content_responses_run_tasks_with_no_body() {
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let (tx, mut rx) = mpsc::unbounded_channel::<(Method, Completion)>();
    let addr = serve(
        &layer,
        Arc::new(move |req, tasks| {
            let (tx, method) = (tx.clone(), req.method().clone());
            tasks.add_with(move |c| async move {
                let _ = tx.send((method, c));
            });
            let mut res = Response::new(full("a body nobody reads"));
            if req.uri().path() == "/204" {
                *res.status_mut() = StatusCode::NO_CONTENT;
                *res.body_mut() = full("");
            }
            res
        }),
    )
    .await;
    let mut conn = http1(addr).await;
    let head = Request::head("/")
        .header(header::HOST, "localhost")
        .body(Empty::new())
        .unwrap();
    let res = within("HEAD", conn.send_request(head)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    within("HEAD body", res.into_body().collect())
        .await
        .unwrap();
    let (method, c) = within("HEAD task", rx.recv()).await.unwrap();
    assert_eq!(method, Method::HEAD);
    assert!(c.outcome().is_delivered(), "{c:?}");

    conn.ready().await.unwrap();
    let res = within("204", conn.send_request(get("/204"))).await.unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    within("204 body", res.into_body().collect()).await.unwrap();
    let (_, c) = within("204 task", rx.recv()).await.unwrap();
    assert_eq!(c.status(), StatusCode::NO_CONTENT);
    assert!(c.outcome().is_delivered(), "{c:?}");
    within("idle", handle.wait_idle()).await;
    assert_eq!(handle.stats().completed, 2);
}

#[tokio::test]
async fn a_streaming_body_with_content_length_is_finished_when_its_last_byte_is_sent() {
    // hyper may stop at the declared length and drop the body without a
    // final poll: that is a delivered response, not an abort.
    let layer = BackgroundLayer::new().run_on_abort(false);
    let handle = layer.handle();
    let (outcome_tx, outcome_rx) = oneshot::channel::<Outcome>();
    let outcome_tx = Mutex::new(Some(outcome_tx));
    let (ran_tx, mut ran_rx) = mpsc::unbounded_channel::<()>();
    let keep: Arc<Mutex<Vec<FrameSender>>> = Arc::default();
    let k = keep.clone();
    let addr = serve(
        &layer,
        Arc::new(move |_, tasks| {
            let out = outcome_tx.lock().unwrap().take();
            tasks.add_with(move |c| async move {
                if let Some(out) = out {
                    let _ = out.send(c.outcome());
                }
            });
            let ran = ran_tx.clone();
            tasks.add(async move {
                let _ = ran.send(());
            });
            let (tx, body) = streaming();
            tx.send(data("hello ")).unwrap();
            tx.send(data("world")).unwrap();
            k.lock().unwrap().push(tx); // never closed: no end of stream
            Response::builder()
                .header(header::CONTENT_LENGTH, "11")
                .body(body)
                .unwrap()
        }),
    )
    .await;
    let mut conn = http1(addr).await;
    let res = within("response", conn.send_request(get("/")))
        .await
        .unwrap();
    let body = within("body", res.into_body().collect()).await.unwrap();
    assert_eq!(body.to_bytes(), "hello world");
    // Either hyper polled once more (and the body is still open: it waits)
    // or it dropped the body at the exact length: ask for another request to
    // make sure the server is done with the first one.
    conn.ready().await.unwrap();
    let second = within("second", conn.send_request(get("/"))).await;
    drop(second);
    let outcome = within("add_with", outcome_rx).await.unwrap();
    assert_eq!(outcome, Outcome::Finished);
    within("plain task", ran_rx.recv()).await.unwrap();
    assert_eq!(handle.stats().discarded, 0, "{:?}", handle.stats());
}
