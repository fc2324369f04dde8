//! How a task ended: [`Ending`], the one enum the crate records for every
//! task, and its public faces [`TaskOutcome`] and [`TaskEnd`], which the
//! `on_task_end` hook receives.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::Method;

use crate::registry::Bucket;

/// How a task ended: exactly one per task, and each lands in one bucket of
/// [`Stats`](crate::Stats).
#[derive(Debug)]
pub(crate) enum Ending {
    /// Ran to the end and returned `()` or `Ok`.
    Completed,
    /// Returned `Err`, with its `Display` text.
    Failed(String),
    /// Panicked, with the panic message.
    Panicked(String),
    /// Outlived the layer's `task_timeout`.
    TimedOut,
    /// Never ran: its request produced no response, or its response was
    /// aborted and the layer does not run tasks on abort.
    Discarded,
    /// Stopped or never run: the layer was shut down, or the runtime went
    /// away (an `add_blocking` closure whose join handle was cancelled).
    Cancelled,
    /// Never ran: its run policy did not allow it for this response.
    Skipped,
    /// Never queued: the request had reached `max_tasks_per_request`.
    Refused,
    /// Never ran: a newer task of the same name replaced it in its request.
    Replaced,
}

impl Ending {
    pub(crate) fn bucket(&self) -> Bucket {
        match self {
            Ending::Completed => Bucket::Completed,
            Ending::Failed(_) => Bucket::Failed,
            Ending::Panicked(_) => Bucket::Panicked,
            Ending::TimedOut => Bucket::TimedOut,
            Ending::Discarded => Bucket::Discarded,
            Ending::Cancelled => Bucket::Cancelled,
            Ending::Skipped => Bucket::Skipped,
            Ending::Refused => Bucket::Refused,
            Ending::Replaced => Bucket::Replaced,
        }
    }
}

/// How a task ended, as [`TaskEnd::outcome`] tells it. Each variant is one
/// bucket of [`Stats`](crate::Stats).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TaskOutcome<'a> {
    /// Ran to the end and returned `()` or `Ok`.
    Completed,
    /// Returned `Err`, with its `Display` text.
    Failed(&'a str),
    /// Panicked, with the panic message.
    Panicked(&'a str),
    /// Outlived `task_timeout` or the request's `request_time_budget`.
    TimedOut,
    /// Never ran: no response, or an aborted one with `run_on_abort(false)`.
    Discarded,
    /// Stopped or never run because of the shutdown (or the runtime went away).
    Cancelled,
    /// Never ran: its run policy skipped it.
    Skipped,
    /// Never queued: over `max_tasks_per_request`.
    Refused,
    /// Never ran: replaced by a task of the same name, forgotten, or merged
    /// into a pending task with the same coalescing key.
    Replaced,
}

impl TaskOutcome<'_> {
    /// The name of its [`Stats`](crate::Stats) field: `"completed"`,
    /// `"failed"`, ... (the `outcome` label of the `metrics` feature).
    ///
    /// ```
    /// assert_eq!(tower_background::TaskOutcome::TimedOut.as_str(), "timed_out");
    /// ```
    #[must_use]
    pub fn as_str(&self) -> &'static str {
        match self {
            TaskOutcome::Completed => "completed",
            TaskOutcome::Failed(_) => "failed",
            TaskOutcome::Panicked(_) => "panicked",
            TaskOutcome::TimedOut => "timed_out",
            TaskOutcome::Discarded => "discarded",
            TaskOutcome::Cancelled => "cancelled",
            TaskOutcome::Skipped => "skipped",
            TaskOutcome::Refused => "refused",
            TaskOutcome::Replaced => "replaced",
        }
    }

    pub(crate) fn of(ending: &Ending) -> TaskOutcome<'_> {
        match ending {
            Ending::Completed => TaskOutcome::Completed,
            Ending::Failed(error) => TaskOutcome::Failed(error),
            Ending::Panicked(panic) => TaskOutcome::Panicked(panic),
            Ending::TimedOut => TaskOutcome::TimedOut,
            Ending::Discarded => TaskOutcome::Discarded,
            Ending::Cancelled => TaskOutcome::Cancelled,
            Ending::Skipped => TaskOutcome::Skipped,
            Ending::Refused => TaskOutcome::Refused,
            Ending::Replaced => TaskOutcome::Replaced,
        }
    }
}

/// One task's end, given to the hook of
/// [`BackgroundLayer::on_task_end`](crate::BackgroundLayer::on_task_end).
#[derive(Debug)]
#[non_exhaustive]
pub struct TaskEnd<'a> {
    /// The task's [name](crate::TaskOptions::name), if it has one.
    pub name: Option<&'static str>,
    /// How it ended.
    pub outcome: TaskOutcome<'a>,
    /// From when it was added to when it started; `None` if it never started.
    pub queued: Option<Duration>,
    /// From when it started to when it ended; `None` if it never started.
    pub ran: Option<Duration>,
    /// The method of its request.
    pub method: Option<&'a Method>,
    /// The path of its request (never the query).
    pub path: Option<&'a str>,
    /// The route its request matched, as axum's
    /// [`MatchedPath`](https://docs.rs/axum/0.8/axum/extract/struct.MatchedPath.html)
    /// gives it (`/users/{id}`): with the `axum` feature, where the layer is
    /// added with `Router::layer` or `route_layer` (a layer around the whole
    /// router sees the request before it is routed). `None` otherwise.
    pub route: Option<&'a str>,
}

/// The hook of `on_task_end`.
#[derive(Clone)]
pub(crate) struct Hook(pub(crate) Arc<dyn Fn(&TaskEnd<'_>) + Send + Sync>);

impl fmt::Debug for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Fn(&TaskEnd)")
    }
}
