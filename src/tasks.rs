//! [`BackgroundTasks`], the handle on a request's queue that handlers use.
//! What happens to the tasks it adds is in `request.rs`.

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use crate::config::RunPolicy;
use crate::job::{BlockingWork, FutureWork, Options, Task, TaskOutput, WithCompletion};
use crate::request::RequestQueue;
use crate::Completion;

/// The queue of background tasks of one request.
///
/// [`BackgroundService`](crate::BackgroundService) puts one into every
/// request's extensions before it calls the inner service. Tasks added to it
/// start on the tokio runtime once the response body has been sent (see the
/// [crate docs](crate#when-tasks-run)). It is cheap to clone; clones add to
/// the same queue, so one can be moved into a spawned future and used after
/// the handler returned (a *late add*: the task still runs).
///
/// Reach it with `req.extensions().get::<BackgroundTasks>()` in any tower
/// service, hyper handler or tonic method, or take it as an extractor in
/// axum (feature `axum`).
///
/// # Example
///
/// ```
/// use http::{Request, Response};
/// use tower_background::BackgroundTasks;
///
/// async fn handler(req: Request<String>) -> Result<Response<String>, std::convert::Infallible> {
///     let tasks = req
///         .extensions()
///         .get::<BackgroundTasks>()
///         .expect("BackgroundLayer is installed");
///     tasks.add(async { /* send the welcome email */ });
///     Ok(Response::new("registered".to_owned()))
/// }
/// ```
#[derive(Clone)]
pub struct BackgroundTasks {
    queue: Arc<RequestQueue>,
}

impl BackgroundTasks {
    pub(crate) fn new(queue: Arc<RequestQueue>) -> Self {
        Self { queue }
    }

    /// Queues a future to run after the response.
    ///
    /// Its output is `()` or a `Result` (see [`TaskOutput`]). It runs on the
    /// tokio runtime inside a `background_task` span, in the order of
    /// [`Execution`](crate::Execution), if the layer's
    /// [`RunPolicy`] allows it for the response (by default: a 1xx, 2xx or
    /// 3xx status; [`options`](Self::options) sets another per task). If the
    /// response is aborted it still runs, unless
    /// [`run_on_abort(false)`](crate::BackgroundLayer::run_on_abort).
    ///
    /// ```
    /// # use tower_background::BackgroundTasks;
    /// # fn f(tasks: &BackgroundTasks) {
    /// let email = String::from("ada@example.com");
    /// tasks.add(async move {
    ///     println!("sending the welcome email to {email}");
    ///     Ok::<(), std::io::Error>(())
    /// });
    /// # }
    /// ```
    pub fn add<F>(&self, task: F)
    where
        F: Future + Send + 'static,
        F::Output: TaskOutput,
    {
        self.options().add(task);
    }

    /// Queues a synchronous closure to run on tokio's blocking pool after the
    /// response, so it never stalls the async workers.
    ///
    /// Once running, a blocking closure cannot be stopped: if it outlives
    /// [`task_timeout`](crate::BackgroundLayer::task_timeout) it is counted as
    /// timed out and the request's next task starts, while the closure is
    /// left to finish (it keeps its permit of
    /// [`max_concurrent_tasks`](crate::BackgroundLayer::max_concurrent_tasks)
    /// until then).
    ///
    /// ```
    /// # use tower_background::BackgroundTasks;
    /// # fn f(tasks: &BackgroundTasks) {
    /// tasks.add_blocking(|| std::fs::write("/tmp/notification.log", "sent\n"));
    /// # }
    /// ```
    pub fn add_blocking<F, R>(&self, task: F)
    where
        F: FnOnce() -> R + Send + 'static,
        R: TaskOutput,
    {
        self.options().add_blocking(task);
    }

    /// Queues a task that learns how the response ended.
    ///
    /// The closure is called when the task starts, with the response's
    /// [`Completion`]: its status and whether the body [`Finished`], had
    /// [`NoBody`], was [`Aborted`] or ended in a [`BodyError`]. Such a task
    /// runs whenever a response exists, whatever
    /// [`run_on_abort`](crate::BackgroundLayer::run_on_abort) says; it is
    /// discarded only when there is no response at all.
    ///
    /// [`Finished`]: crate::Outcome::Finished
    /// [`NoBody`]: crate::Outcome::NoBody
    /// [`Aborted`]: crate::Outcome::Aborted
    /// [`BodyError`]: crate::Outcome::BodyError
    ///
    /// ```
    /// # use tower_background::{BackgroundTasks, Completion, Outcome};
    /// # fn f(tasks: &BackgroundTasks) {
    /// tasks.add_with(|done: Completion| async move {
    ///     if done.status().is_server_error() {
    ///         return; // the handler failed: no welcome email
    ///     }
    ///     // send it
    /// });
    /// # }
    /// ```
    pub fn add_with<F, Fut>(&self, task: F)
    where
        F: FnOnce(Completion) -> Fut + Send + 'static,
        Fut: Future + Send + 'static,
        Fut::Output: TaskOutput,
    {
        self.options().add_with(task);
    }

    /// Options for the next task: a [name](TaskOptions::name), a
    /// [run policy](TaskOptions::run_policy).
    ///
    /// ```
    /// # use tower_background::{BackgroundTasks, RunPolicy};
    /// # fn f(tasks: &BackgroundTasks) {
    /// tasks
    ///     .options()
    ///     .name("audit-log")
    ///     .run_policy(RunPolicy::Always) // also after a 4xx or 5xx response
    ///     .add(async { /* write the audit record */ });
    /// # }
    /// ```
    pub fn options(&self) -> TaskOptions<'_> {
        TaskOptions {
            tasks: self,
            options: Options::default(),
        }
    }

    /// Options for the next task, starting with its name: the same as
    /// `options().name(name)`.
    ///
    /// A task added with a name replaces the request's task of the same
    /// name that is still waiting in the request (the last one wins), and
    /// [`forget`](Self::forget) takes such a task back. A task already handed
    /// to the request's runner (its response has ended and the runner took
    /// it) is neither replaced nor taken back: it runs. The runner takes a
    /// request's tasks when its response ends, even if they then wait for a
    /// permit of [`max_concurrent_tasks`](crate::BackgroundLayer::max_concurrent_tasks);
    /// only tasks added later (from a running task, say) can still be
    /// replaced or taken back.
    ///
    /// ```
    /// # use tower_background::BackgroundTasks;
    /// # fn f(tasks: &BackgroundTasks) {
    /// tasks.named("refresh-cache").add(async { /* the first refresh */ });
    /// tasks.named("refresh-cache").add(async { /* replaces it: runs once */ });
    /// # }
    /// ```
    pub fn named(&self, name: &'static str) -> TaskOptions<'_> {
        self.options().name(name)
    }

    /// Takes back this request's pending tasks named `name`: they never run,
    /// and are counted in [`Stats::replaced`](crate::Stats::replaced).
    /// Returns how many were taken back. A task that has already started, or
    /// was already handed to the request's runner, is not affected.
    ///
    /// ```
    /// # use tower_background::BackgroundTasks;
    /// # fn f(tasks: &BackgroundTasks) {
    /// tasks.named("welcome-email").add(async { /* ... */ });
    /// // the signup turned out to be a duplicate:
    /// assert_eq!(tasks.forget("welcome-email"), 1);
    /// # }
    /// ```
    pub fn forget(&self, name: &'static str) -> usize {
        self.queue.forget_named(name)
    }

    /// The number of tasks added to this request and not started yet.
    ///
    /// ```
    /// # use tower_background::BackgroundTasks;
    /// # fn f(tasks: &BackgroundTasks) {
    /// let before = tasks.len();
    /// tasks.add(async {});
    /// assert_eq!(tasks.len(), before + 1); // the response has not finished yet
    /// # }
    /// ```
    #[must_use]
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// `true` if no task of this request is waiting to start.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Debug for BackgroundTasks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackgroundTasks")
            .field("len", &self.len())
            .field("phase", &self.queue.phase_name())
            .finish()
    }
}

/// Options for one task, from [`BackgroundTasks::options`] or
/// [`BackgroundTasks::named`]; it is added by [`add`](Self::add),
/// [`add_blocking`](Self::add_blocking) or [`add_with`](Self::add_with).
///
/// ```
/// # use tower_background::{BackgroundTasks, RunPolicy};
/// # fn f(tasks: &BackgroundTasks) {
/// tasks.named("send-email").run_policy(RunPolicy::OnDelivery).add(async {});
/// # }
/// ```
#[must_use = "a task is added only by `add`, `add_blocking` or `add_with`"]
pub struct TaskOptions<'a> {
    tasks: &'a BackgroundTasks,
    options: Options,
}

impl TaskOptions<'_> {
    /// Names the task. The name is a field (`task`) of its `background_task`
    /// span, so it appears in its failure, timeout and cancellation logs, and
    /// a named task replaces the request's task of the same name that is
    /// still waiting in the request (see [`BackgroundTasks::named`]).
    ///
    /// # Panics
    ///
    /// If `name` is empty: leave the task unnamed instead.
    pub fn name(mut self, name: &'static str) -> Self {
        assert!(
            !name.is_empty(),
            "TaskOptions::name: the name must not be empty; to add an unnamed task, \
             do not call name"
        );
        self.options.set_name(name);
        self
    }

    /// When the task runs, instead of the layer's
    /// [`run_policy`](crate::BackgroundLayer::run_policy). Ignored by
    /// [`add_with`](Self::add_with), whose task always runs once a response
    /// exists.
    pub fn run_policy(mut self, policy: RunPolicy) -> Self {
        self.options.set_run_policy(policy);
        self
    }

    /// Coalesces the task across the layer: while a task with the same `key`
    /// is pending anywhere in the layer (its response has ended and it has
    /// not started yet), this one is merged into it. A cache refresh queued
    /// by 100 requests in the same second then runs once.
    ///
    /// Exactly: a keyed task claims its key when its response has ended and
    /// its run policy let it through. The first to claim it keeps it until
    /// it starts (or ends without starting, then the key is free again); a
    /// task that finds its key claimed never runs and is counted in
    /// [`Stats::replaced`](crate::Stats::replaced). So the task of the
    /// request whose response ended first runs, and a task whose key is
    /// claimed by one already running is not merged: it runs after it.
    ///
    /// A merged task is counted as replaced at once. If the task that holds
    /// the key then ends without running (its request's time budget, a
    /// shutdown, its runtime gone), the merged work is not done until a
    /// later request adds it again: coalesce only work that is repeated
    /// anyway, like a cache refresh.
    /// Tasks whose request produced no response, or that their run policy
    /// skips, never claim their key. Within one request, the first task
    /// added with a key keeps it.
    ///
    /// # Panics
    ///
    /// If `key` is empty, and at [`add_with`](Self::add_with): a task that
    /// depends on its own response cannot stand for another's.
    ///
    /// ```
    /// # use tower_background::BackgroundTasks;
    /// # fn f(tasks: &BackgroundTasks, user_id: u64) {
    /// tasks
    ///     .options()
    ///     .coalesce(format!("refresh-profile-{user_id}"))
    ///     .add(async { /* rebuild the cached profile */ });
    /// # }
    /// ```
    pub fn coalesce(mut self, key: impl Into<String>) -> Self {
        let key: String = key.into();
        assert!(
            !key.is_empty(),
            "TaskOptions::coalesce: the key must not be empty; to add a task that is \
             never merged, do not call coalesce"
        );
        self.options.set_key(key.into());
        self
    }

    /// Queues a future, like [`BackgroundTasks::add`].
    pub fn add<F>(self, task: F)
    where
        F: Future + Send + 'static,
        F::Output: TaskOutput,
    {
        let queue = &self.tasks.queue;
        let span = queue.span(self.options.name());
        let options = queue.stamp(self.options);
        queue.add(Task::boxed(span, options, FutureWork::new(task)));
    }

    /// Queues a closure for the blocking pool, like
    /// [`BackgroundTasks::add_blocking`].
    pub fn add_blocking<F, R>(self, task: F)
    where
        F: FnOnce() -> R + Send + 'static,
        R: TaskOutput,
    {
        let queue = &self.tasks.queue;
        let span = queue.span(self.options.name());
        let options = queue.stamp(self.options);
        queue.add(Task::boxed(span, options, BlockingWork::new(task)));
    }

    /// Queues a task that learns how the response ended, like
    /// [`BackgroundTasks::add_with`].
    pub fn add_with<F, Fut>(self, task: F)
    where
        F: FnOnce(Completion) -> Fut + Send + 'static,
        Fut: Future + Send + 'static,
        Fut::Output: TaskOutput,
    {
        assert!(
            self.options.key().is_none(),
            "TaskOptions::coalesce: a task added with add_with sees its own response and \
             cannot be merged with another request's; use add or add_blocking, or do not \
             call coalesce"
        );
        let queue = &self.tasks.queue;
        let span = queue.span(self.options.name());
        let options = queue.stamp(self.options);
        queue.add(Task::boxed(span, options, WithCompletion::new(task)));
    }
}

impl fmt::Debug for TaskOptions<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskOptions")
            .field("name", &self.options.name())
            .field("run_policy", &self.options.run_policy())
            .field("coalesce", &self.options.key())
            .finish()
    }
}
