//! [`BackgroundTasks`] as an axum extractor, and its rejection
//! [`MissingBackgroundLayer`] (feature `axum`).

use std::convert::Infallible;
use std::fmt;

use axum_core::extract::{FromRequestParts, OptionalFromRequestParts};
use axum_core::response::{IntoResponse, Response};
use http::request::Parts;
use http::StatusCode;

use crate::BackgroundTasks;

/// The rejection's text: the missing type and the fix.
const MISSING: &str = "Missing request extension: BackgroundTasks. Add \
    `.layer(BackgroundLayer::new())` to the router or service stack that \
    serves this handler.";

/// Takes the request's queue, which [`BackgroundLayer`](crate::BackgroundLayer)
/// put into its extensions.
///
/// Without the layer the extraction fails with [`MissingBackgroundLayer`]
/// (a `500 Internal Server Error` naming the fix), logged once at error
/// level. Take `Option<BackgroundTasks>` in a handler that also runs
/// without the layer.
///
/// # Example
///
/// ```
/// use axum::{routing::post, Router};
/// use tower::ServiceExt;
/// use tower_background::{BackgroundLayer, BackgroundTasks};
///
/// async fn register(tasks: BackgroundTasks) -> &'static str {
///     tasks.add(async { /* send the welcome email */ });
///     "registered"
/// }
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let layer = BackgroundLayer::new();
/// let handle = layer.handle();
/// let app = Router::new().route("/register", post(register)).layer(layer);
///
/// let req = http::Request::post("/register").body(axum::body::Body::empty()).unwrap();
/// let res = app.oneshot(req).await.unwrap();
/// assert_eq!(res.status(), 200);
/// drop(res); // sent (here: dropped unread), so the task runs
/// handle.wait_idle().await;
/// assert_eq!(handle.stats().completed, 1);
/// # }
/// ```
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
impl<S: Send + Sync> FromRequestParts<S> for BackgroundTasks {
    type Rejection = MissingBackgroundLayer;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        match parts.extensions.get::<BackgroundTasks>() {
            Some(tasks) => Ok(tasks.clone()),
            None => {
                tracing::error!("{MISSING}");
                Err(MissingBackgroundLayer { _private: () })
            }
        }
    }
}

/// `Option<BackgroundTasks>`: `None` when no
/// [`BackgroundLayer`](crate::BackgroundLayer) serves the handler. It never
/// rejects, and logs nothing.
///
/// # Example
///
/// ```
/// use axum::{routing::post, Router};
/// use tower::ServiceExt;
/// use tower_background::BackgroundTasks;
///
/// async fn register(tasks: Option<BackgroundTasks>) -> &'static str {
///     match tasks {
///         Some(tasks) => {
///             tasks.add(async { /* send the welcome email */ });
///             "registered, email on its way"
///         }
///         None => "registered, no email",
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let app = Router::new().route("/register", post(register)); // no layer
/// let req = http::Request::post("/register").body(axum::body::Body::empty()).unwrap();
/// let res = app.oneshot(req).await.unwrap();
/// assert_eq!(res.status(), 200);
/// # }
/// ```
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
impl<S: Send + Sync> OptionalFromRequestParts<S> for BackgroundTasks {
    type Rejection = Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        _state: &S,
    ) -> Result<Option<Self>, Self::Rejection> {
        Ok(parts.extensions.get::<BackgroundTasks>().cloned())
    }
}

/// Rejection used for [`BackgroundTasks`] when the request has no queue:
/// no [`BackgroundLayer`](crate::BackgroundLayer) serves the handler.
///
/// It renders as `500 Internal Server Error` with a `text/plain` body that
/// names the missing type and the fix (see [`body_text`](Self::body_text));
/// the extractor logs the same text at error level. A missing layer is a bug
/// in how the server is assembled, not in the request.
///
/// # Example
///
/// ```
/// use axum::{routing::post, Router};
/// use http_body_util::BodyExt;
/// use tower::ServiceExt;
/// use tower_background::{BackgroundTasks, MissingBackgroundLayer};
///
/// async fn register(tasks: Result<BackgroundTasks, MissingBackgroundLayer>) -> String {
///     match tasks {
///         Ok(_) => "registered".to_owned(),
///         Err(missing) => format!("{}: {missing}", missing.status()),
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// // Forgot `.layer(BackgroundLayer::new())`:
/// let app = Router::new().route("/register", post(register));
/// let req = http::Request::post("/register").body(axum::body::Body::empty()).unwrap();
/// let res = app.oneshot(req).await.unwrap();
/// let body = res.into_body().collect().await.unwrap().to_bytes();
/// assert!(body.starts_with(b"500 Internal Server Error: Missing request extension: BackgroundTasks."));
/// # }
/// ```
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
#[derive(Debug)]
#[non_exhaustive]
pub struct MissingBackgroundLayer {
    _private: (),
}

impl MissingBackgroundLayer {
    /// The status of the response: `500 Internal Server Error`.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use axum::extract::FromRequestParts;
    /// use tower_background::BackgroundTasks;
    ///
    /// let (mut parts, ()) = http::Request::new(()).into_parts(); // no layer
    /// let missing = BackgroundTasks::from_request_parts(&mut parts, &()).await.unwrap_err();
    /// assert_eq!(missing.status(), http::StatusCode::INTERNAL_SERVER_ERROR);
    /// # }
    /// ```
    #[must_use]
    pub fn status(&self) -> StatusCode {
        StatusCode::INTERNAL_SERVER_ERROR
    }

    /// The text of the response body, also its [`Display`](fmt::Display):
    ///
    /// ```text
    /// Missing request extension: BackgroundTasks. Add `.layer(BackgroundLayer::new())` to the router or service stack that serves this handler.
    /// ```
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use axum::extract::FromRequestParts;
    /// use tower_background::BackgroundTasks;
    ///
    /// let (mut parts, ()) = http::Request::new(()).into_parts(); // no layer
    /// let missing = BackgroundTasks::from_request_parts(&mut parts, &()).await.unwrap_err();
    /// assert!(missing.body_text().contains("BackgroundLayer::new()"));
    /// assert_eq!(missing.body_text(), missing.to_string());
    /// # }
    /// ```
    #[must_use]
    pub fn body_text(&self) -> String {
        MISSING.to_owned()
    }
}

impl fmt::Display for MissingBackgroundLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(MISSING)
    }
}

impl std::error::Error for MissingBackgroundLayer {}

impl IntoResponse for MissingBackgroundLayer {
    fn into_response(self) -> Response {
        // `&'static str` sets `content-type: text/plain; charset=utf-8`.
        (self.status(), MISSING).into_response()
    }
}
