//! [`BackgroundHandle`], the public face of a layer's registry: counts,
//! waiting and shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::registry::{self, Registry};
use crate::Stats;

/// What [`BackgroundHandle::shutdown`] did.
///
/// The counts say what changed between the call's start and its return: a
/// later call reports `0` for work it found already settled. Concurrent
/// calls each report their own interval; when they overlap the close they
/// report the same figures, unless a task ended between their starts.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use std::time::Duration;
/// # let handle = tower_background::BackgroundLayer::new().handle();
/// let report = handle.shutdown(Duration::from_secs(10)).await;
/// for (name, n) in &report.cancelled_by_name {
///     eprintln!("shutdown cancelled {n} x {name}"); // e.g. "2 x send-invoice"
/// }
/// # }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Tasks that completed successfully while `shutdown` waited.
    pub completed: u64,
    /// Tasks that were cancelled: still running or pending when the grace
    /// period ended, or added or triggered after the layer was closed.
    pub cancelled: u64,
    /// Of those, the [named](crate::TaskOptions::name) ones, per name, in the
    /// order their names were first cancelled. It lists the tasks dropped by
    /// the time `shutdown` returned: after the close it waits up to 100 ms
    /// (within a non-zero grace) for the cancelled tasks to be dropped; a
    /// task still held then (a response body that is still streaming) is
    /// counted in `cancelled` but not listed here.
    pub cancelled_by_name: Vec<(&'static str, u64)>,
}

/// A handle on a layer's tasks: counts, waiting, shutdown.
///
/// Obtained from [`BackgroundLayer::handle`](crate::BackgroundLayer::handle)
/// (or [`BackgroundService::handle`](crate::BackgroundService::handle)).
/// It is cheap to clone, and every clone of the layer and of the handle
/// speaks of the same tasks.
///
/// # Example: graceful shutdown
///
/// ```no_run
/// use std::time::Duration;
/// use tower_background::BackgroundLayer;
///
/// # async fn serve(_layer: BackgroundLayer) {}
/// # #[tokio::main] async fn main() {
/// let layer = BackgroundLayer::new();
/// let handle = layer.handle();
///
/// // Run the server until it has shut down gracefully: it stops accepting
/// // connections and finishes the responses in flight.
/// serve(layer).await;
///
/// // Then give the background tasks up to 30 seconds to finish.
/// let report = handle.shutdown(Duration::from_secs(30)).await;
/// println!("{} tasks completed, {} cancelled", report.completed, report.cancelled);
/// # }
/// ```
#[derive(Clone)]
pub struct BackgroundHandle {
    registry: Arc<Registry>,
}

impl BackgroundHandle {
    pub(crate) fn new(registry: Arc<Registry>) -> Self {
        Self { registry }
    }

    /// A consistent snapshot of the layer's task counts.
    ///
    /// ```
    /// # use tower_background::BackgroundLayer;
    /// let handle = BackgroundLayer::new().handle();
    /// assert_eq!(handle.stats().completed, 0);
    /// ```
    #[must_use]
    pub fn stats(&self) -> Stats {
        self.registry.stats()
    }

    /// Resolves as soon as no task of the layer is pending or running.
    ///
    /// It cannot resolve while a response body that has tasks is still held:
    /// the tasks start when the body is dropped (or polled again after its
    /// end), so read the body to its end and drop it, or just drop it, before
    /// you await `wait_idle` in a test.
    ///
    /// Tasks count as pending from the moment they are added, also while
    /// their response body is still streaming, so after a client has read a
    /// whole response, `wait_idle` waits for that request's tasks. This is the
    /// counterpart of FastAPI's `TestClient`, which runs the tasks before it
    /// returns: use it in tests instead of sleeping.
    ///
    /// It resolves at the first instant the layer is idle: while requests
    /// keep adding tasks it may wait indefinitely, so bound it with
    /// [`tokio::time::timeout`] where that matters. After a
    /// [`shutdown`](Self::shutdown) it resolves at once (everything in flight
    /// was counted as cancelled). Dropping the future is harmless.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use std::time::Duration;
    /// # use tower_background::BackgroundLayer;
    /// let handle = BackgroundLayer::new().handle();
    /// tokio::time::timeout(Duration::from_secs(5), handle.wait_idle())
    ///     .await
    ///     .expect("background tasks did not finish in time");
    /// # }
    /// ```
    pub fn wait_idle(&self) -> impl Future<Output = ()> + Send + 'static {
        registry::wait_idle(Arc::clone(&self.registry))
    }

    /// Waits up to `grace` for every outstanding task, then cancels what is
    /// still pending or running, closes the layer and reports.
    ///
    /// Call it after the server's own graceful shutdown has returned, so that
    /// no new request arrives. During the grace period tasks keep being
    /// started as their response bodies finish. Once the grace period is over
    /// (or earlier, when no task is left) the layer is closed for good:
    /// running tasks are dropped at their next `.await`, pending ones are
    /// dropped without running, and any task added or triggered later (by a
    /// response still streaming, or a late [`add`](crate::BackgroundTasks::add))
    /// is cancelled and counted, never run. An
    /// [`add_blocking`](crate::BackgroundTasks::add_blocking) closure that is
    /// already running cannot be stopped: it is counted as cancelled and left
    /// to finish on tokio's blocking pool.
    ///
    /// Calling it twice or concurrently is allowed: every call waits for the
    /// same close, and its [`ShutdownReport`] counts what happened between the
    /// call and its return.
    ///
    /// A zero `grace` cancels at once without waiting (and needs no timer).
    ///
    /// Cancel safety: dropping the future before it completes (for example
    /// in a `select!` with a second Ctrl-C) leaves the layer open and its
    /// tasks running; nothing is cancelled until a `shutdown` call reaches
    /// the end of its grace period.
    ///
    /// # Panics
    ///
    /// Like [`tokio::time::timeout`], with a non-zero `grace` it panics if the
    /// runtime was built without the time driver (`Builder::enable_time`).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use std::time::Duration;
    /// # use tower_background::BackgroundLayer;
    /// let handle = BackgroundLayer::new().handle();
    /// let report = handle.shutdown(Duration::from_secs(1)).await;
    /// assert_eq!(report.cancelled, 0);
    /// # }
    /// ```
    pub fn shutdown(
        &self,
        grace: Duration,
    ) -> impl Future<Output = ShutdownReport> + Send + 'static {
        let registry = Arc::clone(&self.registry);
        async move {
            let before = registry.stats();
            let drained = if grace.is_zero() {
                before.pending + before.running == 0
            } else {
                tokio::time::timeout(grace, registry.wait_idle())
                    .await
                    .is_ok()
            };
            let names_before = registry.cancelled_names();
            registry.close();
            if !grace.is_zero() {
                // Running tasks are dropped at their next poll: give them a
                // moment, so that the report can name them.
                let _ = tokio::time::timeout(
                    grace.min(Duration::from_millis(100)),
                    registry.wait_dropped(),
                )
                .await;
            }
            let after = registry.stats();
            let cancelled_by_name = registry
                .cancelled_names()
                .into_iter()
                .filter_map(|(name, n)| {
                    let before = names_before
                        .iter()
                        .find(|(b, _)| *b == name)
                        .map_or(0, |(_, b)| *b);
                    (n > before).then_some((name, n - before))
                })
                .collect();
            let report = ShutdownReport {
                completed: after.completed - before.completed,
                cancelled: after.cancelled - before.cancelled,
                cancelled_by_name,
            };
            if report.cancelled > 0 {
                tracing::warn!(
                    completed = report.completed,
                    cancelled = report.cancelled,
                    grace_ms = grace.as_millis() as u64,
                    "background tasks shut down; some were cancelled"
                );
            } else {
                tracing::info!(
                    completed = report.completed,
                    drained,
                    "background tasks shut down"
                );
            }
            report
        }
    }
}

impl std::fmt::Debug for BackgroundHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackgroundHandle")
            .field("stats", &self.stats())
            .finish()
    }
}
