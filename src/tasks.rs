//! [`BackgroundTasks`], the per-request queue, and its state machine.
//!
//! A request's queue goes through three phases, kept in one atomic word:
//!
//! ```text
//!            body finished / dropped            (late adds are dispatched
//!   Open ──────────────────────────────▶ Started  as they come)
//!     │
//!     │ inner service failed / response future dropped
//!     └────────────────────────────────▶ Discarded (late adds are discarded)
//! ```
//!
//! The word also records whether any task was ever added, so a request that
//! adds none ends with one atomic operation: no lock, no spawn. Everything
//! else (the list of tasks, whether a runner is draining it) sits behind the
//! request's mutex, which only task-adding requests ever take.

use std::fmt;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};

use http::{Method, StatusCode, Uri};
use tokio::runtime::Handle;
use tracing::Span;

use crate::handle::Unstarted;
use crate::job::{BlockingWork, FutureWork, Job, Task, TaskList, TaskOutput, WithCompletion};
use crate::layer::{Execution, Shared};
use crate::runner::Runner;
use crate::sync::{AtomicU32, AtomicUsize, Mutex, MutexGuard};
use crate::{Completion, Outcome};

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
    /// [`Execution`]. If the response is aborted it still runs, unless
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
        self.queue
            .enqueue(Task::boxed(self.queue.span(), FutureWork::new(task)));
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
        self.queue
            .enqueue(Task::boxed(self.queue.span(), BlockingWork::new(task)));
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
    /// [`Finished`]: Outcome::Finished
    /// [`NoBody`]: Outcome::NoBody
    /// [`Aborted`]: Outcome::Aborted
    /// [`BodyError`]: Outcome::BodyError
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
        self.queue
            .enqueue(Task::boxed(self.queue.span(), WithCompletion::new(task)));
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
        self.queue.not_started.load(Ordering::Acquire)
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
            .field("phase", &self.queue.phase())
            .finish()
    }
}

/// The phase of a request's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The response has not finished: tasks wait.
    Open,
    /// The response finished like this: tasks run.
    Started(Completion),
    /// There is no response: tasks are discarded.
    Discarded,
}

// The phase word: bits 0-1 the phase, bit 2 "a task was added", bits 8-9
// the outcome and bits 16-31 the status once started.
const OPEN: u32 = 0;
const STARTED: u32 = 1;
const DISCARDED: u32 = 2;
const PHASE: u32 = 0b11;
const HAS_TASKS: u32 = 0b100;

fn encode_started(completion: Completion) -> u32 {
    STARTED | completion.outcome().to_bits() << 8 | u32::from(completion.status().as_u16()) << 16
}

fn decode(word: u32) -> Phase {
    match word & PHASE {
        OPEN => Phase::Open,
        DISCARDED => Phase::Discarded,
        _ => {
            let status = StatusCode::from_u16((word >> 16) as u16)
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            Phase::Started(Completion::new(status, Outcome::from_bits(word >> 8)))
        }
    }
}

/// Why a request's tasks were discarded.
#[derive(Debug, Clone, Copy)]
pub(crate) enum NoResponse {
    ServiceError,
    FutureDropped,
}

impl NoResponse {
    fn reason(self) -> &'static str {
        match self {
            NoResponse::ServiceError => "the inner service returned an error",
            NoResponse::FutureDropped => {
                "the response future was dropped before it produced a response"
            }
        }
    }
}

/// The request's method and path, recorded on its tasks' spans.
struct RequestInfo {
    method: Method,
    uri: Uri,
}

/// The shared state of one request's queue.
pub(crate) struct RequestQueue {
    pub(crate) shared: Arc<Shared>,
    /// `None` when INFO spans were disabled as the request arrived.
    request: Option<RequestInfo>,
    phase: AtomicU32,
    /// Added and not started: what [`BackgroundTasks::len`] reports.
    pub(crate) not_started: AtomicUsize,
    state: Mutex<QueueState>,
}

#[derive(Debug, Default)]
pub(crate) struct QueueState {
    /// Tasks waiting for the response, or for the sequence runner to take
    /// them; newest first.
    pub(crate) waiting: TaskList,
    /// A sequence runner is draining `waiting` (sequential execution only).
    pub(crate) draining: bool,
}

/// What to do once the request's lock is released.
enum Dispatch {
    Nothing,
    /// Spawn a runner for these tasks (oldest first) that then drains
    /// `waiting` in order.
    Sequence(TaskList),
    /// Spawn one runner per task (oldest first).
    Each(TaskList),
}

impl RequestQueue {
    pub(crate) fn new<B>(shared: Arc<Shared>, req: &http::Request<B>) -> Self {
        let request = tracing::level_enabled!(tracing::Level::INFO).then(|| RequestInfo {
            method: req.method().clone(),
            uri: req.uri().clone(),
        });
        Self {
            shared,
            request,
            phase: AtomicU32::new(OPEN),
            not_started: AtomicUsize::new(0),
            state: Mutex::new(QueueState::default()),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn phase(&self) -> Phase {
        decode(self.phase.load(Ordering::Acquire))
    }

    /// The span of a new task: a root that follows from the current span.
    fn span(&self) -> Span {
        let span = match &self.request {
            Some(r) => tracing::info_span!(
                parent: None,
                "background_task",
                method = %r.method,
                path = r.uri.path(),
            ),
            None => tracing::info_span!(
                parent: None,
                "background_task",
                method = tracing::field::Empty,
                path = tracing::field::Empty,
            ),
        };
        if !span.is_disabled() {
            span.follows_from(Span::current());
        }
        span
    }

    fn enqueue(self: &Arc<Self>, job: Box<dyn Job>) {
        let registry = &self.shared.registry;
        let mut state = self.lock();
        // The linearization point against `finish`/`discard`: whoever comes
        // second sees the other's bit.
        let word = self.phase.fetch_or(HAS_TASKS, Ordering::AcqRel);
        let phase = decode(word);
        if phase == Phase::Discarded {
            drop(state);
            registry.admit(1);
            registry.forget(1, Unstarted::Discarded);
            job.span().in_scope(|| {
                tracing::warn!(
                    "background task added after its request was discarded; discarding it"
                )
            });
            return;
        }
        if !registry.admit(1) {
            drop(state);
            job.span()
                .in_scope(|| tracing::warn!("background task added after shutdown; cancelling it"));
            return;
        }
        self.not_started.fetch_add(1, Ordering::AcqRel);
        state.waiting.push(job);
        let Phase::Started(completion) = phase else {
            return; // open: the task waits for the response
        };
        // A late add: the response already finished.
        let (dispatch, dropped) = self.dispatch(&mut state, completion);
        drop(state);
        self.discard_plain(dropped);
        self.spawn(dispatch, completion);
    }

    /// The response body finished (or was dropped) like `completion` says.
    pub(crate) fn finish(self: &Arc<Self>, completion: Completion) {
        let word = self
            .phase
            .fetch_or(encode_started(completion), Ordering::AcqRel);
        debug_assert_eq!(word & PHASE, OPEN, "a request finishes once");
        if word & HAS_TASKS == 0 {
            return;
        }
        let mut state = self.lock();
        let (dispatch, dropped) = self.dispatch(&mut state, completion);
        drop(state);
        self.discard_plain(dropped);
        self.spawn(dispatch, completion);
    }

    /// There will be no response: discard every task.
    pub(crate) fn discard(&self, why: NoResponse) {
        let word = self.phase.fetch_or(DISCARDED, Ordering::AcqRel);
        debug_assert_eq!(word & PHASE, OPEN, "a request finishes once");
        if word & HAS_TASKS == 0 {
            return;
        }
        let waiting = self.lock().waiting.take();
        let n = waiting.len();
        self.not_started.fetch_sub(n, Ordering::AcqRel);
        self.shared.registry.forget(n as u64, Unstarted::Discarded);
        drop(waiting);
        if n > 0 {
            tracing::warn!(
                tasks = n,
                reason = why.reason(),
                "discarding background tasks: the request produced no response"
            );
        }
    }

    /// Decides, under the request's lock, what runs now. Returns the plain
    /// tasks to discard when the response was aborted and the layer does not
    /// run tasks on abort.
    fn dispatch(&self, state: &mut QueueState, completion: Completion) -> (Dispatch, TaskList) {
        let config = &self.shared.config;
        let dropped = if !config.run_on_abort && !completion.outcome().is_delivered() {
            state.waiting.split_off_plain()
        } else {
            TaskList::default()
        };
        let dispatch = if state.waiting.is_empty() {
            Dispatch::Nothing
        } else {
            match config.execution {
                Execution::Sequential if state.draining => Dispatch::Nothing,
                Execution::Sequential => {
                    state.draining = true;
                    Dispatch::Sequence(state.waiting.take().reversed())
                }
                Execution::Concurrent => Dispatch::Each(state.waiting.take().reversed()),
            }
        };
        (dispatch, dropped)
    }

    fn discard_plain(&self, dropped: TaskList) {
        let n = dropped.len();
        if n == 0 {
            return;
        }
        self.not_started.fetch_sub(n, Ordering::AcqRel);
        self.shared.registry.forget(n as u64, Unstarted::Discarded);
        drop(dropped);
        tracing::warn!(
            tasks = n,
            "discarding background tasks: the response was aborted and run_on_abort is false"
        );
    }

    /// Spawns the runners on the current runtime: the one serving the
    /// request, where its body ends and its handler adds tasks. Off any
    /// runtime, on the runtime that served the layer's first request.
    fn spawn(self: &Arc<Self>, dispatch: Dispatch, completion: Completion) {
        if let Dispatch::Nothing = dispatch {
            return;
        }
        // Inside a tokio task the runtime context is current: `tokio::spawn`
        // uses it without touching the runtime handle's shared count.
        let in_task = tokio::task::try_id().is_some();
        let fallback = if in_task {
            None
        } else {
            Handle::try_current()
                .ok()
                .or_else(|| self.shared.runtime.get().cloned())
        };
        if !in_task && fallback.is_none() && cfg!(not(tower_background_loom)) {
            tracing::error!(
                "no tokio runtime to run background tasks on: serve the request from \
                 within a tokio runtime; cancelling them"
            );
        }
        let spawn = |runner: Runner| {
            // Model checking: every runner is a loom thread.
            #[cfg(tower_background_loom)]
            drop(loom::thread::spawn(move || {
                loom::future::block_on(runner.run())
            }));
            #[cfg(not(tower_background_loom))]
            match &fallback {
                _ if in_task => drop(tokio::spawn(runner.run())),
                Some(runtime) => drop(runtime.spawn(runner.run())),
                // Dropping a runner counts its tasks as cancelled.
                None => drop(runner),
            }
        };
        match dispatch {
            Dispatch::Nothing => {}
            Dispatch::Sequence(batch) => {
                spawn(Runner::sequence(Arc::clone(self), completion, batch))
            }
            Dispatch::Each(mut list) => {
                while let Some(job) = list.pop() {
                    spawn(Runner::single(Arc::clone(self), completion, job));
                }
            }
        }
    }
}

impl Drop for RequestQueue {
    fn drop(&mut self) {
        // Only reachable with tasks left if the runtime dropped a runner
        // before it took them: count them, never lose them silently.
        let state = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        let n = state.waiting.len();
        if n > 0 {
            self.shared.registry.forget(n as u64, Unstarted::Cancelled);
        }
    }
}
