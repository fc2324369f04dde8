//! [`BackgroundService`] and its [`ResponseFuture`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tower_service::Service;

use crate::backlog::RoomTicket;
use crate::body::BackgroundBody;
use crate::config::Config;
use crate::request::{NoResponse, RequestQueue, Shared};
use crate::{BackgroundHandle, BackgroundTasks};

/// Middleware that gives every request a [`BackgroundTasks`] queue and runs
/// the queued tasks once the response body has finished.
///
/// See the [crate docs](crate) for the semantics.
///
/// # Example
///
/// ```
/// use std::convert::Infallible;
/// use http::{Request, Response};
/// use tower::{service_fn, ServiceExt};
/// use tower_background::{BackgroundService, BackgroundTasks};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let svc = BackgroundService::new(service_fn(|req: Request<String>| async move {
///     req.extensions().get::<BackgroundTasks>().unwrap().add(async {});
///     Ok::<_, Infallible>(Response::new(String::from("ok")))
/// }));
/// let handle = svc.handle();
/// let res = svc.oneshot(Request::new(String::new())).await.unwrap();
/// drop(res); // the body is dropped without being polled: tasks run
/// handle.wait_idle().await;
/// assert_eq!(handle.stats().completed, 1);
/// # }
/// ```
#[derive(Clone)]
pub struct BackgroundService<S> {
    inner: S,
    shared: Arc<Shared>,
    /// Its place in the line while it waits for room of `max_pending_tasks`.
    ticket: RoomTicket,
}

impl<S> BackgroundService<S> {
    /// Wraps `inner` with the default settings and a registry of its own.
    ///
    /// ```
    /// # use tower_background::BackgroundService;
    /// let svc = BackgroundService::new(tower::service_fn(|_: http::Request<String>| async {
    ///     Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
    /// }));
    /// # let _ = svc;
    /// ```
    pub fn new(inner: S) -> Self {
        Self::from_shared(inner, Shared::new(Config::default(), Arc::default()))
    }

    pub(crate) fn from_shared(inner: S, shared: Arc<Shared>) -> Self {
        Self {
            inner,
            shared,
            ticket: RoomTicket::default(),
        }
    }

    /// A handle on this service's tasks (shared with the layer that made it).
    ///
    /// ```
    /// # let svc = tower_background::BackgroundService::new(());
    /// assert_eq!(svc.handle().stats().running, 0);
    /// ```
    #[must_use]
    pub fn handle(&self) -> BackgroundHandle {
        BackgroundHandle::new(Arc::clone(&self.shared.registry))
    }

    /// The inner service.
    ///
    /// ```
    /// # let svc = tower_background::BackgroundService::new(7);
    /// assert_eq!(*svc.get_ref(), 7);
    /// ```
    #[must_use]
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    ///
    /// ```
    /// # let mut svc = tower_background::BackgroundService::new(7);
    /// *svc.get_mut() += 1;
    /// assert_eq!(*svc.get_ref(), 8);
    /// ```
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    ///
    /// ```
    /// # let svc = tower_background::BackgroundService::new(7);
    /// assert_eq!(svc.into_inner(), 7);
    /// ```
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for BackgroundService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: http_body::Body,
{
    type Response = Response<BackgroundBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Backpressure of `max_pending_tasks` (a load of a `OnceLock` without it).
        ready!(self.shared.registry.poll_room(cx, &mut self.ticket));
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        self.shared.note_runtime();
        let queue = Arc::new(RequestQueue::new(Arc::clone(&self.shared), &req));
        let head = req.method() == http::Method::HEAD;
        req.extensions_mut()
            .insert(BackgroundTasks::new(Arc::clone(&queue)));
        ResponseFuture {
            inner: self.inner.call(req),
            guard: DiscardOnDrop(Some(queue)),
            head,
        }
    }
}

impl<S: std::fmt::Debug> std::fmt::Debug for BackgroundService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackgroundService")
            .field("inner", &self.inner)
            .field("stats", &self.handle().stats())
            .finish()
    }
}

pin_project! {
    /// Response future for [`BackgroundService`].
    ///
    /// If it is dropped before the inner service produced a response, or the
    /// inner service returns an error, the request's tasks are discarded.
    #[must_use = "futures do nothing unless polled"]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        guard: DiscardOnDrop,
        head: bool,
    }
}

impl<F, ResBody, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
    ResBody: http_body::Body,
{
    type Output = Result<Response<BackgroundBody<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let queue = this.guard.0.take();
        Poll::Ready(match result {
            Ok(res) => Ok(BackgroundBody::wrap(res, queue, *this.head)),
            Err(e) => {
                if let Some(queue) = queue {
                    queue.discard(NoResponse::ServiceError);
                }
                Err(e)
            }
        })
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

/// Discards the request's tasks if the response future goes away without a
/// response.
struct DiscardOnDrop(Option<Arc<RequestQueue>>);

impl Drop for DiscardOnDrop {
    fn drop(&mut self) {
        if let Some(queue) = self.0.take() {
            queue.discard(NoResponse::FutureDropped);
        }
    }
}
