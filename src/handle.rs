//! The layer's registry of tasks, and [`BackgroundHandle`], its public face.
//!
//! Every task of a layer is counted here from the moment it is added until it
//! ends in exactly one bucket. All transitions go through one lock so that
//! [`BackgroundHandle::stats`] is a consistent snapshot. Requests that add no
//! task never touch the registry.

use std::future::Future;
use std::pin::pin;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use tokio::sync::futures::Notified;
use tokio::sync::Notify;

use crate::sync::{Mutex, MutexGuard};

/// Counts of a layer's tasks, as returned by [`BackgroundHandle::stats`].
///
/// `pending` and `running` are the tasks in flight; the other six fields are
/// buckets: every task added ends in exactly one of them. The snapshot is
/// consistent: a task is never counted twice or missed, so at any moment
/// tasks added = `pending + running + completed + failed + panicked +
/// timed_out + discarded + cancelled`.
///
/// # Example
///
/// ```
/// use tower_background::BackgroundLayer;
///
/// let layer = BackgroundLayer::new();
/// let stats = layer.handle().stats();
/// assert_eq!(stats.pending + stats.running, 0);
/// assert_eq!(stats.total(), 0);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Added and not started yet: waiting for their response body to finish,
    /// for the previous task of their request, or for a permit of
    /// [`max_concurrent_tasks`](crate::BackgroundLayer::max_concurrent_tasks).
    pub pending: u64,
    /// Executing now.
    pub running: u64,
    /// Ran to the end and returned `()` or `Ok`.
    pub completed: u64,
    /// Ran to the end and returned `Err`.
    pub failed: u64,
    /// Panicked.
    pub panicked: u64,
    /// Outlived [`task_timeout`](crate::BackgroundLayer::task_timeout).
    pub timed_out: u64,
    /// Never run because their request produced no response, or because the
    /// response was aborted with [`run_on_abort(false)`](crate::BackgroundLayer::run_on_abort).
    pub discarded: u64,
    /// Stopped or never run because of [`BackgroundHandle::shutdown`] (or
    /// because the tokio runtime they were to run on went away).
    pub cancelled: u64,
}

impl Stats {
    /// Every task counted: in flight plus ended.
    ///
    /// ```
    /// # use tower_background::BackgroundLayer;
    /// let stats = BackgroundLayer::new().handle().stats();
    /// assert_eq!(stats.total(), stats.pending + stats.running + stats.ended());
    /// ```
    #[must_use]
    pub fn total(&self) -> u64 {
        self.pending + self.running + self.ended()
    }

    /// Tasks that have ended, in whatever bucket.
    ///
    /// ```
    /// # use tower_background::BackgroundLayer;
    /// let stats = BackgroundLayer::new().handle().stats();
    /// assert_eq!(stats.ended(), stats.completed + stats.failed + stats.panicked
    ///     + stats.timed_out + stats.discarded + stats.cancelled);
    /// ```
    #[must_use]
    pub fn ended(&self) -> u64 {
        self.completed
            + self.failed
            + self.panicked
            + self.timed_out
            + self.discarded
            + self.cancelled
    }

    fn is_idle(&self) -> bool {
        self.pending == 0 && self.running == 0
    }
}

/// What [`BackgroundHandle::shutdown`] did.
///
/// Both fields count over the call, from its start to its return, so two
/// concurrent calls report the same `cancelled` and a later call reports
/// `0` for work it found already settled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Tasks that completed successfully while `shutdown` waited.
    pub completed: u64,
    /// Tasks that were cancelled: still running or pending when the grace
    /// period ended, or added or triggered after the layer was closed.
    pub cancelled: u64,
}

/// How a started task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    Completed,
    Failed,
    Panicked,
    TimedOut,
    Cancelled,
}

/// A bucket for tasks that never started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unstarted {
    Discarded,
    Cancelled,
}

/// The shared counts of one layer (and all its clones).
#[derive(Debug, Default)]
pub(crate) struct Registry {
    state: Mutex<State>,
    /// Woken when the layer becomes idle and somebody waits for it.
    idle: Notify,
    /// Woken once, when the layer is closed by `shutdown`.
    closed: Notify,
}

#[derive(Debug, Default)]
struct State {
    stats: Stats,
    /// Set once by `shutdown`: from then on every task is cancelled.
    closed: bool,
    /// How many `wait_idle` futures wait; the idle transition only notifies
    /// when there is somebody to notify.
    idle_waiters: usize,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The counts stay meaningful even if a thread panicked while holding
        // the lock: every update is a handful of additions.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn settle(&self, state: &State) {
        if state.idle_waiters > 0 && state.stats.is_idle() {
            self.idle.notify_waiters();
        }
    }

    /// Counts `n` new tasks. Returns `false` if the layer is closed: then
    /// they are counted as cancelled and must not run.
    pub(crate) fn admit(&self, n: u64) -> bool {
        let mut state = self.lock();
        if state.closed {
            state.stats.cancelled += n;
            false
        } else {
            state.stats.pending += n;
            true
        }
    }

    /// Moves one pending task to running. Returns `false` if the layer is
    /// closed: the task was counted as cancelled by `close` and must not run.
    pub(crate) fn start(&self) -> bool {
        let mut state = self.lock();
        if state.closed {
            return false;
        }
        state.stats.pending -= 1;
        state.stats.running += 1;
        true
    }

    /// Moves one running task to the bucket it ended in. Returns `false`
    /// if the layer is closed: `close` already counted it as cancelled.
    pub(crate) fn end(&self, ended: Ended) -> bool {
        let mut state = self.lock();
        if state.closed {
            return false;
        }
        let stats = &mut state.stats;
        stats.running -= 1;
        *match ended {
            Ended::Completed => &mut stats.completed,
            Ended::Failed => &mut stats.failed,
            Ended::Panicked => &mut stats.panicked,
            Ended::TimedOut => &mut stats.timed_out,
            Ended::Cancelled => &mut stats.cancelled,
        } += 1;
        self.settle(&state);
        true
    }

    /// Moves `n` pending tasks that will never start to `bucket`. Returns
    /// `false` if the layer is closed: `close` already counted them.
    pub(crate) fn forget(&self, n: u64, bucket: Unstarted) -> bool {
        if n == 0 {
            return false;
        }
        let mut state = self.lock();
        if state.closed {
            return false;
        }
        state.stats.pending -= n;
        match bucket {
            Unstarted::Discarded => state.stats.discarded += n,
            Unstarted::Cancelled => state.stats.cancelled += n,
        }
        self.settle(&state);
        true
    }

    /// Closes the layer: every task pending or running is counted as
    /// cancelled, and runners are told to stop. Idempotent.
    fn close(&self) {
        let mut state = self.lock();
        if state.closed {
            return;
        }
        state.closed = true;
        let stats = &mut state.stats;
        stats.cancelled += stats.pending + stats.running;
        stats.pending = 0;
        stats.running = 0;
        self.settle(&state);
        drop(state);
        self.closed.notify_waiters();
    }

    /// A future that resolves when the layer is closed. Runners enable it
    /// before their first task and poll it next to every task.
    pub(crate) fn closed(&self) -> Notified<'_> {
        self.closed.notified()
    }

    pub(crate) fn stats(&self) -> Stats {
        self.lock().stats
    }

    async fn wait_idle(&self) {
        loop {
            let mut notified = pin!(self.idle.notified());
            {
                let mut state = self.lock();
                if state.stats.is_idle() {
                    return;
                }
                // Registered before the lock is released: an idle transition
                // after this point wakes us.
                notified.as_mut().enable();
                state.idle_waiters += 1;
            }
            let _waiter = IdleWaiter(self);
            notified.await;
        }
    }
}

/// Unregisters an idle waiter, also when its future is dropped early.
struct IdleWaiter<'a>(&'a Registry);

impl Drop for IdleWaiter<'_> {
    fn drop(&mut self) {
        self.0.lock().idle_waiters -= 1;
    }
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
    /// Tasks count as pending from the moment they are added, also while
    /// their response body is still streaming, so after a client has read a
    /// whole response, `wait_idle` waits for that request's tasks. This is the
    /// counterpart of FastAPI's `TestClient`, which runs the tasks before it
    /// returns: use it in tests instead of sleeping.
    ///
    /// It resolves at the first instant the layer is idle: while requests
    /// keep adding tasks it may wait indefinitely, so bound it with
    /// [`tokio::time::timeout`] where that matters. It is resolved at once on
    /// a layer that has been shut down. Dropping the future is harmless.
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
        let registry = Arc::clone(&self.registry);
        async move { registry.wait_idle().await }
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
            registry.close();
            let after = registry.stats();
            let report = ShutdownReport {
                completed: after.completed - before.completed,
                cancelled: after.cancelled - before.cancelled,
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
