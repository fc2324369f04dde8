//! [`BackgroundBody`]: forwards the response body, tells how it ended, and
//! starts the request's tasks once the server is done with it.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Buf as _;
use http::{header::CONTENT_LENGTH, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::request::RequestQueue;
use crate::{Completion, Outcome};

pin_project! {
    /// Response body for [`BackgroundService`](crate::BackgroundService).
    ///
    /// It forwards every frame, [`size_hint`](Body::size_hint) and
    /// [`is_end_stream`](Body::is_end_stream) of the inner body unchanged and
    /// adds no allocation per frame.
    ///
    /// The body *ends* when `poll_frame` returns `None`, an error or a
    /// trailers frame (always the last), or a data frame after which the
    /// inner body reports [`is_end_stream`](Body::is_end_stream). The
    /// request's tasks start once the server lets go of the ended body: when
    /// it drops it (hyper does right after taking the last frame) or polls it
    /// again. They never start inside the poll that ends the body, so they
    /// cannot get in the way of the server's write of its end. A consumer
    /// that keeps a body after its end delays the tasks until it drops it.
    ///
    /// Dropped before its end, the body was [`Aborted`](Outcome::Aborted),
    /// unless it was never polled and had nothing to send (a `HEAD` request,
    /// a 1xx, 204 or 304 status, or a body whose size is exactly 0): then it
    /// is [`NoBody`](Outcome::NoBody). A body dropped after yielding exactly
    /// its `Content-Length` is [`Finished`](Outcome::Finished).
    ///
    /// ```
    /// use http_body_util::{BodyExt, Full};
    /// use tower_background::BackgroundBody;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// // `Default` is available when the inner body has it (no tasks attached).
    /// let body: BackgroundBody<Full<bytes::Bytes>> = BackgroundBody::default();
    /// assert!(body.collect().await.unwrap().to_bytes().is_empty());
    /// # }
    /// ```
    pub struct BackgroundBody<B> {
        #[pin]
        inner: B,
        guard: StartOnDrop,
    }
}

impl<B: Body> BackgroundBody<B> {
    #[inline]
    pub(crate) fn wrap(
        res: Response<B>,
        queue: Option<Arc<RequestQueue>>,
        head: bool,
    ) -> Response<Self> {
        let status = res.status();
        let mut guard = StartOnDrop {
            queue: None,
            status,
            ended: None,
            polled: false,
            nothing_to_send: false,
            remaining: None,
        };
        if let Some(queue) = queue {
            let size = res.body().size_hint();
            guard.nothing_to_send = head
                || status.is_informational()
                || status == StatusCode::NO_CONTENT
                || status == StatusCode::NOT_MODIFIED
                || size.exact() == Some(0)
                || res.body().is_end_stream();
            // A body that stops at its exact length may be dropped by the
            // server without a last poll: knowing the length tells that drop
            // apart from an abort.
            guard.remaining = size.exact().or_else(|| {
                res.headers()
                    .get(CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok()?.parse().ok())
            });
            guard.queue = Some(queue);
        }
        res.map(|inner| BackgroundBody { inner, guard })
    }
}

impl<B: Body> Body for BackgroundBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        let guard = this.guard;
        if guard.queue.is_none() {
            return this.inner.poll_frame(cx);
        }
        if guard.ended.is_some() {
            // Polled again after its end: the last frame is out of our hands.
            guard.start();
            return this.inner.poll_frame(cx);
        }
        let polled = this.inner.as_mut().poll_frame(cx);
        guard.polled = true;
        match &polled {
            Poll::Pending => {}
            // Not started here either: hyper's HTTP/2 writes the end of the
            // stream after this poll, and a task started inside it delays
            // that write.
            Poll::Ready(None) => guard.ended = Some(Outcome::Finished),
            Poll::Ready(Some(Err(_))) => guard.ended = Some(Outcome::BodyError),
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(remaining), Some(data)) = (&mut guard.remaining, frame.data_ref()) {
                    *remaining = remaining.saturating_sub(data.remaining() as u64);
                }
                // Trailers are always the last frame; servers do not poll for
                // the `None` after them (hyper's HTTP/2 does not).
                if frame.is_trailers() || this.inner.is_end_stream() {
                    guard.ended = Some(Outcome::Finished);
                }
            }
        }
        polled
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B: Default> Default for BackgroundBody<B> {
    fn default() -> Self {
        Self {
            inner: B::default(),
            guard: StartOnDrop {
                queue: None,
                status: StatusCode::OK,
                ended: None,
                polled: false,
                nothing_to_send: false,
                remaining: None,
            },
        }
    }
}

impl<B> std::fmt::Debug for BackgroundBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackgroundBody")
            .field("ended", &self.guard.ended)
            .field("tasks_started", &self.guard.queue.is_none())
            .finish_non_exhaustive()
    }
}

/// Starts the request's tasks when the server lets go of the body.
struct StartOnDrop {
    /// `None` once the tasks were started.
    queue: Option<Arc<RequestQueue>>,
    status: StatusCode,
    /// How the body ended, once it has.
    ended: Option<Outcome>,
    polled: bool,
    /// Never polling this body sends the whole response.
    nothing_to_send: bool,
    /// Bytes still expected, when the length is known.
    remaining: Option<u64>,
}

impl StartOnDrop {
    fn start(&mut self) {
        if let Some(queue) = self.queue.take() {
            let outcome = match self.ended {
                Some(outcome) => outcome,
                None if !self.polled && self.nothing_to_send => Outcome::NoBody,
                None if self.polled && self.remaining == Some(0) => Outcome::Finished,
                None => Outcome::Aborted,
            };
            queue.finish(Completion::new(self.status, outcome));
        }
    }
}

impl Drop for StartOnDrop {
    fn drop(&mut self) {
        self.start();
    }
}
