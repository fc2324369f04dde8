//! Every task's end outside tracing: the hook of
//! [`BackgroundLayer::on_task_end`](crate::BackgroundLayer::on_task_end), and
//! with the `metrics` feature, counters, gauges and histograms through the
//! `metrics` facade.
//!
//! Nothing here costs anything unless a hook is set or the feature is on:
//! then each task also reads the clock when it is added and when it starts.

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Duration;

use http::Method;

use crate::config::Config;
use crate::job::{panic_message, Ending};
use crate::registry::Registry;

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
    /// Never ran: replaced by a task of the same name, or forgotten.
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
}

/// The hook of `on_task_end`.
#[derive(Clone)]
pub(crate) struct Hook(pub(crate) Arc<dyn Fn(&TaskEnd<'_>) + Send + Sync>);

impl fmt::Debug for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Fn(&TaskEnd)")
    }
}

/// Whether task ends are observed at all: timestamps are taken only then.
#[inline]
pub(crate) fn enabled(config: &Config) -> bool {
    cfg!(feature = "metrics") || config.on_task_end.is_some()
}

/// Hands a task's end to the hook and to the `metrics` recorder.
pub(crate) fn emit(config: &Config, registry: &Registry, end: &TaskEnd<'_>) {
    #[cfg(feature = "metrics")]
    record(registry, end);
    #[cfg(not(feature = "metrics"))]
    let _ = registry;
    if let Some(hook) = &config.on_task_end {
        if let Err(payload) = catch_unwind(AssertUnwindSafe(|| (hook.0)(end))) {
            tracing::error!(
                panic = %panic_message(&*payload),
                "the on_task_end hook panicked"
            );
        }
    }
}

/// Updates the gauges after a task was added.
#[inline]
pub(crate) fn added(registry: &Registry) {
    #[cfg(feature = "metrics")]
    gauges(registry);
    #[cfg(not(feature = "metrics"))]
    let _ = registry;
}

#[cfg(feature = "metrics")]
fn record(registry: &Registry, end: &TaskEnd<'_>) {
    let outcome = end.outcome.as_str();
    match end.name {
        Some(task) => {
            metrics::counter!("background_tasks_ended_total", "outcome" => outcome, "task" => task)
                .increment(1);
            if let Some(queued) = end.queued {
                metrics::histogram!("background_task_queued_seconds", "task" => task)
                    .record(queued.as_secs_f64());
            }
            if let Some(ran) = end.ran {
                metrics::histogram!("background_task_run_seconds", "task" => task)
                    .record(ran.as_secs_f64());
            }
        }
        None => {
            metrics::counter!("background_tasks_ended_total", "outcome" => outcome).increment(1);
            if let Some(queued) = end.queued {
                metrics::histogram!("background_task_queued_seconds").record(queued.as_secs_f64());
            }
            if let Some(ran) = end.ran {
                metrics::histogram!("background_task_run_seconds").record(ran.as_secs_f64());
            }
        }
    }
    gauges(registry);
}

#[cfg(feature = "metrics")]
fn gauges(registry: &Registry) {
    let stats = registry.stats();
    metrics::gauge!("background_tasks_pending").set(stats.pending as f64);
    metrics::gauge!("background_tasks_running").set(stats.running as f64);
}
