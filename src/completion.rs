//! How a response ended, as seen by tasks added with
//! [`BackgroundTasks::add_with`](crate::BackgroundTasks::add_with).

use http::StatusCode;

/// How the response body ended.
///
/// | outcome | when | plain tasks run? |
/// |---|---|---|
/// | `Finished` | the body reached its end of stream | yes |
/// | `NoBody` | the body was dropped without ever being polled (HEAD, 204, 304 through most servers) | yes |
/// | `Aborted` | the body was dropped after being polled, before its end (the client went away mid-stream) | unless [`run_on_abort(false)`](crate::BackgroundLayer::run_on_abort) |
/// | `BodyError` | the body yielded an error | unless [`run_on_abort(false)`](crate::BackgroundLayer::run_on_abort) |
///
/// Tasks added with [`add_with`](crate::BackgroundTasks::add_with) always run
/// once a response exists, and receive the outcome in their [`Completion`].
///
/// ```
/// use tower_background::Outcome;
///
/// assert!(Outcome::Finished.is_delivered());
/// assert!(!Outcome::Aborted.is_delivered());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Outcome {
    /// The body reached its end of stream: every byte was handed to the server.
    Finished,
    /// The body was dropped without ever being polled, as servers do for HEAD
    /// requests and for statuses that have no body.
    NoBody,
    /// The body was dropped mid-stream, typically because the client
    /// disconnected.
    Aborted,
    /// The body yielded an error.
    BodyError,
}

impl Outcome {
    /// `true` for [`Finished`](Outcome::Finished) and
    /// [`NoBody`](Outcome::NoBody): the response went out whole.
    #[must_use]
    pub fn is_delivered(self) -> bool {
        matches!(self, Outcome::Finished | Outcome::NoBody)
    }

    pub(crate) fn to_bits(self) -> u32 {
        match self {
            Outcome::Finished => 0,
            Outcome::NoBody => 1,
            Outcome::Aborted => 2,
            Outcome::BodyError => 3,
        }
    }

    pub(crate) fn from_bits(bits: u32) -> Self {
        match bits & 0b11 {
            0 => Outcome::Finished,
            1 => Outcome::NoBody,
            2 => Outcome::Aborted,
            _ => Outcome::BodyError,
        }
    }
}

/// How a request's response ended, handed to tasks added with
/// [`BackgroundTasks::add_with`](crate::BackgroundTasks::add_with).
///
/// ```
/// use http::StatusCode;
/// use tower_background::{BackgroundTasks, Completion, Outcome};
///
/// fn queue_cleanup(tasks: &BackgroundTasks) {
///     tasks.add_with(|done: Completion| async move {
///         if done.status().is_success() && done.outcome() == Outcome::Finished {
///             // the download was delivered: delete the temporary file
///         }
///     });
/// }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    status: StatusCode,
    outcome: Outcome,
}

impl Completion {
    pub(crate) fn new(status: StatusCode, outcome: Outcome) -> Self {
        Self { status, outcome }
    }

    /// The status of the response the inner service returned.
    #[must_use]
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// How the response body ended.
    #[must_use]
    pub fn outcome(&self) -> Outcome {
        self.outcome
    }
}
