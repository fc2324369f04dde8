//! [`BackgroundLayer`] and its settings.

use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use crate::config::{Config, Execution, RunPolicy};
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

    /// When tasks run, given how their response ended (default
    /// [`RunPolicy::OnSuccess`]: after a 1xx, 2xx or 3xx status). A task can
    /// choose its own with [`TaskOptions::run_policy`](crate::TaskOptions::run_policy).
    /// Tasks skipped by their policy are counted in
    /// [`Stats::skipped`](crate::Stats::skipped) and logged at debug level.
    ///
    /// [`run_on_abort(false)`](Self::run_on_abort) still applies on top of
    /// the policy: a task the policy allows is discarded if the body was
    /// aborted and the layer does not run tasks on abort.
    ///
    /// ```
    /// # use tower_background::{BackgroundLayer, RunPolicy};
    /// // Version 0.1's behaviour: every response runs its tasks.
    /// let layer = BackgroundLayer::new().run_policy(RunPolicy::Always);
    /// # let _ = layer;
    /// ```
    pub fn run_policy(mut self, policy: RunPolicy) -> Self {
        self.config.run_policy = policy;
        self
    }

    /// Refuses the tasks a request adds beyond its first `limit` (default:
    /// no cap), so that a handler bug or hostile input cannot allocate
    /// without end. A refused task is dropped at once, counted in
    /// [`Stats::refused`](crate::Stats::refused), and the first refusal of
    /// each request is logged at warn level.
    ///
    /// Every add counts toward the cap, including tasks later replaced by a
    /// task of the same name or taken back with
    /// [`forget`](crate::BackgroundTasks::forget) (which gives no slot back),
    /// and tasks added after the response ended. So with a cap of 3, the
    /// fourth `named("x")` add of a request is refused and the third one
    /// runs: keep the cap well above what a request legitimately adds.
    ///
    /// # Panics
    ///
    /// If `limit` is zero, which would refuse every task: to run none, do
    /// not add the layer.
    ///
    /// ```
    /// # use tower_background::BackgroundLayer;
    /// let layer = BackgroundLayer::new().max_tasks_per_request(100);
    /// # let _ = layer;
    /// ```
    pub fn max_tasks_per_request(mut self, limit: usize) -> Self {
        assert!(
            limit > 0,
            "BackgroundLayer::max_tasks_per_request: the limit must be at least 1 \
             (0 would refuse every task); for no cap, do not call max_tasks_per_request"
        );
        self.config.per_request = Some(limit);
        self
    }

    /// Bounds the layer's pending tasks (added and not started) with tower's
    /// backpressure (default: no bound). While `limit` tasks are pending,
    /// [`BackgroundService::poll_ready`](tower_service::Service::poll_ready)
    /// reports not ready, and it is woken as pending tasks start or end.
    ///
    /// Without anything else, requests then wait for room. With
    /// `tower::load_shed::LoadShedLayer` outside this layer (in axum, behind
    /// a `HandleErrorLayer`), they are refused at once with the error your
    /// handler turns into a 503. Requests already being handled can still
    /// add tasks, so the bound on memory is `limit` plus what the requests in
    /// flight add: cap that with
    /// [`max_tasks_per_request`](Self::max_tasks_per_request).
    ///
    /// Tasks of a response still being sent count as pending until its body
    /// ends, so `limit` slow downloads with a task each fill the bound by
    /// themselves: size it for the responses in flight, and put a timeout on
    /// slow clients (for example hyper's header and idle timeouts).
    ///
    /// The bound belongs to the layer's registry, which every clone of the
    /// layer and every service made from them share: the first service made
    /// from a clone with this setting fixes it for all of them, including
    /// services made earlier from clones without it.
    ///
    /// Waiting services are served in the order they first asked: each task
    /// that leaves the backlog (it starts, or ends without starting) wakes
    /// about one of them, and one that finds room passes the turn on. A
    /// service dropped while it waits gives up its place, and one dropped
    /// after it was woken passes the turn on. A service that got `Pending`
    /// must be polled again or dropped, as tower's contract expects (axum
    /// and hyper-util make a clone per request and drop it): one kept
    /// without being polled again (say, behind a `LoadShed` that keeps its
    /// inner service after a refusal) can hold a turn, and a waiter behind
    /// it waits for the next task to leave the backlog.
    ///
    /// # Panics
    ///
    /// If `limit` is zero, which would never take a request.
    ///
    /// ```
    /// # use tower_background::BackgroundLayer;
    /// let layer = BackgroundLayer::new()
    ///     .max_pending_tasks(10_000)
    ///     .max_tasks_per_request(100);
    /// # let _ = layer;
    /// ```
    pub fn max_pending_tasks(mut self, limit: usize) -> Self {
        assert!(
            limit > 0,
            "BackgroundLayer::max_pending_tasks: the limit must be at least 1 \
             (0 would never take a request); for no bound, do not call max_pending_tasks"
        );
        self.config.max_pending = Some(limit);
        self
    }

    /// Limits how long one request's tasks may take in all, counted from the
    /// start of its first task (default: no limit), like Next.js'
    /// `maxDuration` or the 30 seconds Cloudflare gives `waitUntil`. The task
    /// running when the budget is spent is dropped at its next poll and
    /// counted as [timed out](crate::Stats::timed_out), like with
    /// [`task_timeout`](Self::task_timeout); the request's tasks that have not
    /// started by then never run and are counted as timed out too.
    ///
    /// With [`Execution::Concurrent`], or for a task added after the
    /// request's tasks had all ended, the budget runs from the first task of
    /// the request's current run.
    ///
    /// Once the first task started, the budget keeps running while the
    /// request's next task waits: for a permit of
    /// [`max_concurrent_tasks`](Self::max_concurrent_tasks) (a permit is
    /// taken per task, and goes to the next waiting request between two
    /// tasks of a sequential request), or behind the previous task. A task
    /// can so be counted as timed out without having started.
    ///
    /// # Panics
    ///
    /// If `budget` is zero, which would time out every task.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_background::BackgroundLayer;
    /// let layer = BackgroundLayer::new().request_time_budget(Duration::from_secs(30));
    /// # let _ = layer;
    /// ```
    pub fn request_time_budget(mut self, budget: Duration) -> Self {
        assert!(
            !budget.is_zero(),
            "BackgroundLayer::request_time_budget: the budget must be greater than zero \
             (a zero budget would time out every task); for no budget, do not call \
             request_time_budget"
        );
        self.config.budget = Some(budget);
        self
    }

    /// Calls `hook` once for every task of the layer when it ends, however
    /// it ends (including tasks that never ran), with its name, how it ended
    /// (the error or panic message included), how long it waited and ran,
    /// and its request's method and path: wire Sentry or your own alerting
    /// without parsing logs.
    ///
    /// The hook runs on the thread where the task ended, right after it was
    /// counted: keep it short and never block in it. A panic in the hook is
    /// caught and logged.
    ///
    /// Because the task is counted first, [`wait_idle`](BackgroundHandle::wait_idle)
    /// can return on another thread while the hook of the last task is still
    /// running: a test that reads what the hook recorded right after
    /// `wait_idle` on a multi-thread runtime should wait for it (a channel
    /// the hook sends on), or use a current-thread runtime.
    ///
    /// ```
    /// use std::sync::atomic::{AtomicU64, Ordering};
    /// use std::sync::Arc;
    /// use tower_background::{BackgroundLayer, TaskOutcome};
    ///
    /// let failures = Arc::new(AtomicU64::new(0));
    /// let seen = failures.clone();
    /// let layer = BackgroundLayer::new().on_task_end(move |end| {
    ///     if let TaskOutcome::Failed(error) | TaskOutcome::Panicked(error) = end.outcome {
    ///         seen.fetch_add(1, Ordering::Relaxed);
    ///         eprintln!("task {:?} of {:?} failed: {error}", end.name, end.path);
    ///     }
    /// });
    /// # let _ = layer;
    /// ```
    pub fn on_task_end<F>(mut self, hook: F) -> Self
    where
        F: Fn(&crate::TaskEnd<'_>) + Send + Sync + 'static,
    {
        self.config.on_task_end = Some(crate::ending::Hook(Arc::new(hook)));
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
        if let Some(limit) = self.config.max_pending {
            self.registry.set_backlog(limit);
        }
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
            .field("run_policy", &self.config.run_policy)
            .field("max_tasks_per_request", &self.config.per_request)
            .field("max_pending_tasks", &self.config.max_pending)
            .field("request_time_budget", &self.config.budget)
            .field("on_task_end", &self.config.on_task_end.is_some())
            .field("stats", &self.handle().stats())
            .finish()
    }
}
