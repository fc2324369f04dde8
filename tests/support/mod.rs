//! Helpers shared by the test files: bounded waits, a body the test drives
//! frame by frame, a one-shot call through the layer, an ordered event log
//! and a loopback hyper server with graceful shutdown.
#![allow(dead_code, unreachable_pub)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tower::{service_fn, Layer, ServiceExt};
use tower_background::{BackgroundBody, BackgroundLayer, BackgroundTasks};

/// Bounds every wait of a test.
pub const LIMIT: Duration = Duration::from_secs(10);

/// Awaits `fut`, failing the test after [`LIMIT`].
pub async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(LIMIT, fut).await {
        Ok(out) => out,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

/// A response body whose frames the test sends through a channel.
pub struct ChannelBody {
    rx: mpsc::UnboundedReceiver<Result<Frame<Bytes>, std::io::Error>>,
}

pub type FrameResult = Result<Frame<Bytes>, std::io::Error>;
pub type FrameSender = mpsc::UnboundedSender<FrameResult>;

impl ChannelBody {
    pub fn new() -> (FrameSender, Self) {
        let (tx, rx) = mpsc::unbounded_channel();
        (tx, Self { rx })
    }
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.rx.poll_recv(cx)
    }
}

pub fn data(s: &'static str) -> Result<Frame<Bytes>, std::io::Error> {
    Ok(Frame::data(Bytes::from_static(s.as_bytes())))
}

/// Calls a service behind `layer` once: the handler runs `queue` with the
/// request's tasks and answers `res`.
pub async fn call<B>(
    layer: &BackgroundLayer,
    res: Response<B>,
    queue: impl FnOnce(&BackgroundTasks) + Send + 'static,
) -> Response<BackgroundBody<B>>
where
    B: Body + Send + 'static,
{
    let slot = Mutex::new(Some((res, queue)));
    let svc = layer.layer(service_fn(move |req: Request<()>| {
        let (res, queue) = slot.lock().unwrap().take().expect("called once");
        let tasks = req
            .extensions()
            .get::<BackgroundTasks>()
            .expect("the layer puts BackgroundTasks into the extensions")
            .clone();
        queue(&tasks);
        std::future::ready(Ok::<_, Infallible>(res))
    }));
    svc.oneshot(Request::new(())).await.unwrap()
}

/// An ordered record of what happened, shared with tasks.
#[derive(Clone, Default)]
pub struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    pub fn push(&self, event: impl Into<String>) {
        self.0.lock().unwrap().push(event.into());
    }

    pub fn get(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    pub fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    /// A task that records `event` when it runs.
    pub fn task(&self, event: impl Into<String>) -> impl Future<Output = ()> + Send + 'static {
        let log = self.clone();
        let event = event.into();
        async move { log.push(event) }
    }
}

/// Lets the current-thread runtime run everything that is runnable: with
/// paused time, a sleep only completes once no task can make progress.
pub async fn settle() {
    tokio::time::sleep(Duration::from_secs(3600)).await;
}

/// A hyper server (HTTP/1 and HTTP/2, auto-detected) on 127.0.0.1:0 serving
/// a tower service, with graceful shutdown.
pub struct Server {
    pub addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Server {
    pub async fn start<S, B>(svc: S) -> Server
    where
        S: tower::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            let graceful = GracefulShutdown::new();
            let builder = auto::Builder::new(TokioExecutor::new());
            loop {
                tokio::select! {
                    conn = listener.accept() => {
                        let Ok((stream, _)) = conn else { continue };
                        let conn = builder
                            .serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc.clone()))
                            .into_owned();
                        let conn = graceful.watch(conn);
                        tokio::spawn(async move {
                            let _ = conn.await;
                        });
                    }
                    _ = stopped.changed() => break,
                }
            }
            drop(listener);
            graceful.shutdown().await;
        });
        Server { addr, stop, task }
    }

    /// Stops accepting, lets the connections finish their responses, and
    /// returns once they have all closed (hyper-util's graceful shutdown).
    pub async fn graceful_shutdown(self) {
        let _ = self.stop.send(true);
        within("the server's graceful shutdown", self.task)
            .await
            .unwrap();
    }

    /// Starts the graceful shutdown without waiting for it.
    pub fn begin_shutdown(self) -> JoinHandle<()> {
        let _ = self.stop.send(true);
        self.task
    }
}

/// A handler result type for `service_fn`.
pub type Res<B> = Result<Response<B>, Infallible>;
