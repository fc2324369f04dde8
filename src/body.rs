//! [`BackgroundBody`]: forwards the response body and starts the request's
//! tasks when it ends.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Buf as _;
use http::{header::CONTENT_LENGTH, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::tasks::RequestQueue;
use crate::{Completion, Outcome};

pin_project! {
    /// Response body for [`BackgroundService`](crate::BackgroundService).
    ///
    /// It forwards every frame, [`size_hint`](Body::size_hint) and
    /// [`is_end_stream`](Body::is_end_stream) of the inner body unchanged and
    /// adds no allocation per frame. The request's tasks start when it
    /// reaches its end: `poll_frame` returns `None` or a trailers frame (the
    /// last frame of any body), or the inner body reports
    /// [`is_end_stream`](Body::is_end_stream) after a frame. If it is dropped
    /// first, the tasks start all the same, with [`Outcome::NoBody`] if it
    /// was never polled and [`Outcome::Aborted`] otherwise.
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
        guard: FinishOnDrop,
    }
}

impl<B: Body> BackgroundBody<B> {
    pub(crate) fn wrap(res: Response<B>, queue: Option<Arc<RequestQueue>>) -> Response<Self> {
        let status = res.status();
        // A body that stops at its exact length may be dropped by the server
        // without a last poll: knowing the length tells that drop apart from
        // an abort.
        let length = match &queue {
            Some(_) => res.body().size_hint().exact().or_else(|| {
                res.headers()
                    .get(CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok()?.parse().ok())
            }),
            None => None,
        };
        res.map(|inner| BackgroundBody {
            inner,
            guard: FinishOnDrop {
                queue,
                status,
                polled: false,
                remaining: length,
            },
        })
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
        let polled = this.inner.as_mut().poll_frame(cx);
        let guard = this.guard;
        if guard.queue.is_some() {
            guard.polled = true;
            match &polled {
                Poll::Pending => {}
                Poll::Ready(None) => guard.finish(Outcome::Finished),
                Poll::Ready(Some(Err(_))) => guard.finish(Outcome::BodyError),
                Poll::Ready(Some(Ok(frame))) => {
                    if let (Some(remaining), Some(data)) = (&mut guard.remaining, frame.data_ref())
                    {
                        *remaining = remaining.saturating_sub(data.remaining() as u64);
                    }
                    // Trailers are always the last frame; servers do not
                    // poll for the `None` after them (hyper's HTTP/2 does not).
                    if frame.is_trailers() || this.inner.is_end_stream() {
                        guard.finish(Outcome::Finished);
                    }
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
            guard: FinishOnDrop {
                queue: None,
                status: StatusCode::OK,
                polled: false,
                remaining: None,
            },
        }
    }
}

impl<B> std::fmt::Debug for BackgroundBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackgroundBody")
            .field("finished", &self.guard.queue.is_none())
            .finish_non_exhaustive()
    }
}

/// Starts the request's tasks when the body ends, or when it is dropped.
struct FinishOnDrop {
    /// `None` once finished.
    queue: Option<Arc<RequestQueue>>,
    status: StatusCode,
    polled: bool,
    /// Bytes still expected, when the length is known.
    remaining: Option<u64>,
}

impl FinishOnDrop {
    fn finish(&mut self, outcome: Outcome) {
        if let Some(queue) = self.queue.take() {
            queue.finish(Completion::new(self.status, outcome));
        }
    }
}

impl Drop for FinishOnDrop {
    fn drop(&mut self) {
        let outcome = if !self.polled {
            Outcome::NoBody
        } else if self.remaining == Some(0) {
            Outcome::Finished
        } else {
            Outcome::Aborted
        };
        self.finish(outcome);
    }
}
