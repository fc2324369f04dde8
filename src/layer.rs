//! [`BackgroundLayer`], its configuration, and [`Execution`].

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::Semaphore;
use tower_layer::Layer;

use crate::handle::Registry;
use crate::{BackgroundHandle, BackgroundService};

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

/// The settings of a layer, copied into every service it makes.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) execution: Execution,
    pub(crate) timeout: Option<Duration>,
    /// The permits of `max_concurrent_tasks`, shared by every clone.
    pub(crate) limit: Option<Arc<Semaphore>>,
    /// The number `max_concurrent_tasks` was given, for `Debug`.
    max_concurrent_tasks: Option<usize>,
    pub(crate) run_on_abort: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            execution: Execution::Sequential,
            timeout: None,
            limit: None,
            max_concurrent_tasks: None,
            run_on_abort: true,
        }
    }
}

/// What a service and each of its requests' queues share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) registry: Arc<Registry>,
    /// The runtime that served the first request: where tasks that were
    /// added and finished off any runtime run. Set once, so a request pays a
    /// load, not a reference count, for it.
    pub(crate) runtime: OnceLock<Handle>,
}

impl Shared {
    /// Remembers the current runtime the first time a request arrives on one.
    #[inline]
    pub(crate) fn note_runtime(&self) {
        if self.runtime.get().is_none() {
            if let Ok(handle) = Handle::try_current() {
                let _ = self.runtime.set(handle);
            }
        }
    }
}

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
    /// A limit of [`Semaphore::MAX_PERMITS`] or more means unlimited.
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
        self.config.limit =
            (limit < Semaphore::MAX_PERMITS).then(|| Arc::new(Semaphore::new(limit)));
        self.config.max_concurrent_tasks = Some(limit);
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

    pub(crate) fn shared(&self) -> Arc<Shared> {
        Arc::new(Shared {
            config: self.config.clone(),
            registry: Arc::clone(&self.registry),
            runtime: OnceLock::new(),
        })
    }
}

impl<S> Layer<S> for BackgroundLayer {
    type Service = BackgroundService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BackgroundService::from_shared(inner, self.shared())
    }
}

impl std::fmt::Debug for BackgroundLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackgroundLayer")
            .field("execution", &self.config.execution)
            .field("task_timeout", &self.config.timeout)
            .field("max_concurrent_tasks", &self.config.max_concurrent_tasks)
            .field("run_on_abort", &self.config.run_on_abort)
            .field("stats", &self.handle().stats())
            .finish()
    }
}
