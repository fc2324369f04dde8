//! [`Execution`] and the settings a layer copies into every service it makes.

use std::sync::Arc;
use std::time::Duration;

use crate::limit::Limit;

/// How the tasks of one request run relative to each other.
///
/// ```
/// use tower_background::{BackgroundLayer, Execution};
///
/// let layer = BackgroundLayer::new().execution(Execution::Concurrent);
/// # let _ = layer;
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Execution {
    /// One after another, in the order they were added, each starting when
    /// the previous one has ended (however it ended). FastAPI's behaviour.
    /// All of a request's tasks run on one spawned tokio task.
    #[default]
    Sequential,
    /// All at once: every task of the request starts when the response
    /// finishes, each on its own tokio task.
    Concurrent,
}

/// Whether a task runs, given how its response ended.
///
/// The layer's default is [`OnSuccess`](RunPolicy::OnSuccess); set another
/// with [`BackgroundLayer::run_policy`](crate::BackgroundLayer::run_policy),
/// or per task with [`TaskOptions::run_policy`](crate::TaskOptions::run_policy).
/// Tasks added with [`add_with`](crate::BackgroundTasks::add_with) ignore it:
/// they run whenever a response exists and decide from its
/// [`Completion`](crate::Completion).
///
/// A task its policy skips never runs: it is counted in
/// [`Stats::skipped`](crate::Stats::skipped) and logged at debug level.
///
/// ```
/// use http::StatusCode;
/// use tower_background::{BackgroundLayer, RunPolicy};
///
/// assert!(RunPolicy::OnSuccess.allows(StatusCode::FOUND, tower_background::Outcome::Finished));
/// assert!(!RunPolicy::OnSuccess.allows(StatusCode::UNPROCESSABLE_ENTITY, tower_background::Outcome::Finished));
/// let layer = BackgroundLayer::new().run_policy(RunPolicy::Always);
/// # let _ = layer;
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RunPolicy {
    /// Run when the response status is a success: 1xx, 2xx or 3xx. A 4xx or
    /// 5xx response (a rejected request, a handler error, a `TimeoutLayer`'s
    /// 408, a `CatchPanicLayer`'s 500) skips the task. The default, as in
    /// FastAPI and Laravel.
    #[default]
    OnSuccess,
    /// Run whatever the response's status and however its body ended.
    Always,
    /// Run only when the body was delivered whole: its outcome is
    /// [`Finished`](crate::Outcome::Finished) or
    /// [`NoBody`](crate::Outcome::NoBody), whatever the status.
    OnDelivery,
}

impl RunPolicy {
    /// Whether a task with this policy runs after a response with `status`
    /// whose body ended with `outcome`.
    #[must_use]
    pub fn allows(self, status: http::StatusCode, outcome: crate::Outcome) -> bool {
        match self {
            RunPolicy::OnSuccess => status.as_u16() < 400,
            RunPolicy::Always => true,
            RunPolicy::OnDelivery => outcome.is_delivered(),
        }
    }
}

/// The settings of a layer, copied into every service it makes.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) execution: Execution,
    pub(crate) timeout: Option<Duration>,
    /// The permits of `max_concurrent_tasks`, shared by every clone.
    pub(crate) limit: Option<Arc<Limit>>,
    pub(crate) run_on_abort: bool,
    pub(crate) run_policy: RunPolicy,
    /// `max_tasks_per_request`.
    pub(crate) per_request: Option<usize>,
    /// `max_pending_tasks`.
    pub(crate) max_pending: Option<usize>,
    /// `on_task_end`.
    pub(crate) on_task_end: Option<crate::ending::Hook>,
    /// `request_time_budget`.
    pub(crate) budget: Option<Duration>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            execution: Execution::Sequential,
            timeout: None,
            limit: None,
            run_on_abort: true,
            run_policy: RunPolicy::OnSuccess,
            per_request: None,
            max_pending: None,
            on_task_end: None,
            budget: None,
        }
    }
}
