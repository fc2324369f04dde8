//! Helpers shared by the core test files: a body the test drives frame by
//! frame, a one-shot call through the layer, an event log and a tracing
//! capture.
#![allow(dead_code, unreachable_pub)]

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame};
use tokio::sync::mpsc;
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

pub type FrameSender = mpsc::UnboundedSender<Result<Frame<Bytes>, std::io::Error>>;

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

    /// A task that records `event` when it runs.
    pub fn task(&self, event: &'static str) -> impl Future<Output = ()> + Send + 'static {
        let log = self.clone();
        async move { log.push(event) }
    }
}

/// Lets the current-thread runtime run everything that is runnable: with
/// paused time, a sleep only completes once no task can make progress.
pub async fn settle() {
    tokio::time::sleep(Duration::from_secs(3600)).await;
}
