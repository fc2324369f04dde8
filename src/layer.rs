//! [`BackgroundLayer`] and its settings.

use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use crate::config::{Config, Execution};
use crate::limit::Limit;
use crate::registry::Registry;
use crate::request::Shared;
use crate::{BackgroundHandle, BackgroundService};

/// The largest limit `max_concurrent_tasks` takes as a limit; from there on
/// it means unlimited.
const UNLIMITED: usize = usize::MAX >> 3;

/// Layer that applies the [`BackgroundService`] middleware.
///
/// It is cheap to clone, and its clones (and every service they make) share
/// one registry of tasks, reached through [`handle`](Self::handle). Settings
/// apply to the services made after they were set.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use tower_background::{BackgroundLayer, Execution};
///
/// let layer = BackgroundLayer::new()
///     .execution(Execution::Sequential)
///     .task_timeout(Duration::from_secs(30))
///     .max_concurrent_tasks(64)
///     .run_on_abort(true);
/// let handle = layer.handle(); // keep it for stats and shutdown
/// # let _ = handle;
/// ```
#[derive(Clone, Default)]
#[must_use]
pub struct BackgroundLayer {
    config: Config,
    registry: Arc<Registry>,
}

impl BackgroundLayer {
    /// A layer with the defaults: sequential tasks, no timeout, no
    /// concurrency limit, tasks run even if the response is aborted.
    ///
    /// ```
    /// let layer = tower_background::BackgroundLayer::new();
    /// # let _ = layer;
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// How a request's tasks run relative to each other (default
    /// [`Execution::Sequential`]).
    ///
    /// ```
    /// # use tower_background::{BackgroundLayer, Execution};
    /// let layer = BackgroundLayer::new().execution(Execution::Concurrent);
    /// # let _ = layer;
    /// ```
    pub fn execution(mut self, execution: Execution) -> Self {
        self.config.execution = execution;
        self
    }

    /// Drops a task that runs for longer than `timeout` (default: no limit),
    /// logs it at warn level and counts it in
    /// [`Stats::timed_out`](crate::Stats::timed_out); the request's next task
    /// then starts. The clock starts when the task starts, not when it was
    /// added. An [`add_blocking`](crate::BackgroundTasks::add_blocking)
    /// closure cannot be stopped: it is counted as timed out at the deadline
    /// and left to finish on the blocking pool.
    ///
    /// Needs a runtime with the time driver enabled (`#[tokio::main]` has it).
    ///
    /// # Panics
    ///
    /// If `timeout` is zero, which would time out every task: to run tasks
    /// without a deadline, do not call `task_timeout`.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_background::BackgroundLayer;
    /// let layer = BackgroundLayer::new().task_timeout(Duration::from_secs(10));
    /// # let _ = layer;
    /// ```
    pub fn task_timeout(mut self, timeout: Duration) -> Self {
        assert!(
            !timeout.is_zero(),
            "BackgroundLayer::task_timeout: the timeout must be greater than zero \
             (a zero timeout would cancel every task); to run tasks without a deadline, \
             do not call task_timeout"
        );
        self.config.timeout = Some(timeout);
        self
    }

    /// Runs at most `limit` tasks of this layer at once, across all its
    /// requests (default: unlimited). The others wait, in the order they
    /// became ready, and count as [`pending`](crate::Stats::pending). Waiting
    /// costs memory only for the tasks actually waiting.
    ///
    /// A limit of `usize::MAX >> 3` or more means unlimited.
    ///
    /// # Panics
    ///
    /// If `limit` is zero, which would never run a task: to run none, do not
    /// add the layer.
    ///
    /// ```
    /// # use tower_background::BackgroundLayer;
    /// let layer = BackgroundLayer::new().max_concurrent_tasks(16);
    /// # let _ = layer;
    /// ```
    pub fn max_concurrent_tasks(mut self, limit: usize) -> Self {
        assert!(
            limit > 0,
            "BackgroundLayer::max_concurrent_tasks: the limit must be at least 1 \
             (0 would never run a task); for no limit, do not call max_concurrent_tasks"
        );
        self.config.limit = (limit < UNLIMITED).then(|| Arc::new(Limit::new(limit)));
        self
    }

    /// Whether `add` and `add_blocking` tasks run when the response body is
    /// aborted (dropped mid-stream, typically because the client went away)
    /// or ends in an error (default `true`: work the handler committed to is
    /// not lost because a client disconnected).
    ///
    /// With `false` they are discarded, logged at warn level and counted in
    /// [`Stats::discarded`](crate::Stats::discarded). Tasks added with
    /// [`add_with`](crate::BackgroundTasks::add_with) run either way and see
    /// the [`Outcome`](crate::Outcome).
    ///
    /// ```
    /// # use tower_background::BackgroundLayer;
    /// let layer = BackgroundLayer::new().run_on_abort(false);
    /// # let _ = layer;
    /// ```
    pub fn run_on_abort(mut self, run: bool) -> Self {
        self.config.run_on_abort = run;
        self
    }

    /// A handle on this layer's tasks: [`stats`](BackgroundHandle::stats),
    /// [`wait_idle`](BackgroundHandle::wait_idle) and
    /// [`shutdown`](BackgroundHandle::shutdown).
    ///
    /// ```
    /// # use tower_background::BackgroundLayer;
    /// let layer = BackgroundLayer::new();
    /// let handle = layer.handle();
    /// assert_eq!(handle.stats().pending, 0);
    /// ```
    #[must_use]
    pub fn handle(&self) -> BackgroundHandle {
        BackgroundHandle::new(Arc::clone(&self.registry))
    }
}

impl<S> Layer<S> for BackgroundLayer {
    type Service = BackgroundService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        let shared = Shared::new(self.config.clone(), Arc::clone(&self.registry));
        BackgroundService::from_shared(inner, shared)
    }
}

impl<S> BackgroundService<S> {
    /// A [`BackgroundLayer`] with the default settings.
    ///
    /// ```
    /// let layer = tower_background::BackgroundService::<()>::layer();
    /// # let _ = layer;
    /// ```
    pub fn layer() -> BackgroundLayer {
        BackgroundLayer::new()
    }
}

impl std::fmt::Debug for BackgroundLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackgroundLayer")
            .field("execution", &self.config.execution)
            .field("task_timeout", &self.config.timeout)
            .field(
                "max_concurrent_tasks",
                &self.config.limit.as_ref().map(|limit| limit.max()),
            )
            .field("run_on_abort", &self.config.run_on_abort)
            .field("stats", &self.handle().stats())
            .finish()
    }
}
