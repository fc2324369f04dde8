//! Every task's end outside tracing: the hook of
//! [`BackgroundLayer::on_task_end`](crate::BackgroundLayer::on_task_end), and
//! with the `metrics` feature, counters, gauges and histograms through the
//! `metrics` facade.
//!
//! Nothing here costs anything unless a hook is set or the feature is on:
//! then each task also reads the clock when it is added and when it starts.

use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::config::Config;
use crate::ending::TaskEnd;
use crate::job::{drop_guarded, panic_message};
use crate::registry::Registry;

/// Whether task ends are observed at all: timestamps are taken only then.
#[inline]
pub(crate) fn enabled(config: &Config) -> bool {
    cfg!(feature = "metrics") || config.on_task_end.is_some()
}

/// Hands a task's end to the hook and to the `metrics` recorder. Neither
/// can unwind into the caller: a panic is logged, and the task's end is
/// counted all the same.
pub(crate) fn emit(config: &Config, registry: &Registry, end: &TaskEnd<'_>) {
    #[cfg(feature = "metrics")]
    guarded(|| record(registry, end));
    #[cfg(not(feature = "metrics"))]
    let _ = registry;
    if let Some(hook) = &config.on_task_end {
        if let Err(payload) = catch_unwind(AssertUnwindSafe(|| (hook.0)(end))) {
            tracing::error!(
                panic = %panic_message(&*payload),
                "the on_task_end hook panicked"
            );
            drop_guarded(payload);
        }
    }
}

/// Updates the gauges after a task was added.
#[inline]
pub(crate) fn added(registry: &Registry) {
    #[cfg(feature = "metrics")]
    guarded(|| gauges(registry));
    #[cfg(not(feature = "metrics"))]
    let _ = registry;
}

/// Runs a call into the `metrics` recorder, which may panic (an exporter's
/// bug): it must not unwind into a handler, or out of a drop during an
/// unwind (an abort). Logged once per process.
#[cfg(feature = "metrics")]
fn guarded(f: impl FnOnce()) {
    use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
    static LOGGED: AtomicBool = AtomicBool::new(false);
    if let Err(payload) = catch_unwind(AssertUnwindSafe(f)) {
        if !LOGGED.swap(true, Relaxed) {
            tracing::error!(
                panic = %panic_message(&*payload),
                "the metrics recorder panicked (logged once; later panics are ignored)"
            );
        }
        drop_guarded(payload);
    }
}

#[cfg(feature = "metrics")]
fn record(registry: &Registry, end: &TaskEnd<'_>) {
    use metrics::Label;
    // `task` and `route` only where they are set: both are bounded (a static
    // name, a route template), never the raw path.
    let mut labels = Vec::with_capacity(3);
    if let Some(task) = end.name {
        labels.push(Label::new("task", task));
    }
    if let Some(route) = end.route {
        labels.push(Label::new("route", route.to_owned()));
    }
    if let Some(queued) = end.queued {
        metrics::histogram!("background_task_queued_seconds", labels.clone())
            .record(queued.as_secs_f64());
    }
    if let Some(ran) = end.ran {
        metrics::histogram!("background_task_run_seconds", labels.clone())
            .record(ran.as_secs_f64());
    }
    labels.insert(0, Label::new("outcome", end.outcome.as_str()));
    metrics::counter!("background_tasks_ended_total", labels).increment(1);
    gauges(registry);
}

#[cfg(feature = "metrics")]
fn gauges(registry: &Registry) {
    let stats = registry.stats();
    metrics::gauge!("background_tasks_pending").set(stats.pending as f64);
    metrics::gauge!("background_tasks_running").set(stats.running as f64);
}
