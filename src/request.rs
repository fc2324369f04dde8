//! A request's background tasks, from the moment they are added to the
//! bucket they end in: the request's phase word, its list of tasks, the
//! drain protocol, and the [`Runner`] that runs them.
//!
//! ```text
//!  add ──▶ waiting ──(body ended)──▶ runner ──▶ running ──▶ completed | failed
//!   │        │  (late add: joins the     │ (permit: FIFO        │       panicked | timed_out
//!   │        │   waiting list, started   │  of the layer)       │
//!   │        │   at once)                │                      └─(shutdown)──▶ cancelled
//!   │        ├─(no response)──────────────┼──────────────────────────────────▶ discarded
//!   │        ├─(aborted, run_on_abort(false), plain tasks)────────────────────▶ discarded
//!   │        └─(shutdown, runtime gone)──┴───────────────────────────────────▶ cancelled
//!   └─(layer closed)──────────────────────────────────────────────────────────▶ cancelled
//! ```
//!
//! The request's **phase** is one atomic word: `Open` while the response is
//! being produced and sent, then `Started(completion)` once the body ended
//! (its tasks run), or `Discarded` if there is no response (its tasks never
//! run). The word also records whether a task was ever added, so a request
//! that adds none ends with one atomic operation: no lock, no spawn.
//!
//! The **drain token** (`QueueState::drainer`) says who takes the request's
//! next tasks: at most one [`Runner`], or the request's entry in the layer's
//! FIFO of requests waiting for a permit. Whoever ends the body or adds a
//! late task while nobody holds the token takes it and spawns a runner.
//!
//! A **runner** is the spawned future: it polls one task at a time inside
//! its span, under `catch_unwind`, against its timeout and the layer's close,
//! records how it ended, and goes on with the request's next task
//! ([`Execution::Sequential`]), or hands the token to a new runner before it
//! runs its own task ([`Execution::Concurrent`]). A request with one task is
//! one spawned future of a few words next to the task's own allocation.

#[cfg(not(tower_background_loom))]
use std::cell::{Cell, RefCell};
use std::fmt;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock, PoisonError};
use std::task::{Context, Poll, Waker};

use http::{Method, StatusCode, Uri};
use tokio::runtime::Handle;
use tokio::time::{Instant, Sleep};
use tracing::Span;

use crate::config::{Config, Execution};
use crate::ending::{Ending, TaskEnd, TaskOutcome};
use crate::job::{drop_guarded, panic_message, BlockingGuard, Job, Options, Start, TaskList};
use crate::limit::{Acquired, Parked};
use crate::observe;
use crate::registry::{Bucket, Registry};
use crate::sync::{AtomicU32, AtomicUsize, Mutex, MutexGuard};
use crate::{Completion, Outcome};

/// How many tasks a runner starts in one poll before it yields to the
/// scheduler, so that a request with many ready tasks (or a task that keeps
/// adding tasks) cannot hold a worker.
const TASKS_PER_POLL: usize = 16;

/// What a service and each of its requests share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) registry: Arc<Registry>,
    /// The runtime that served the service's first request: where tasks that
    /// were added and finished off any runtime run. Set once, so a request
    /// pays a load, not a reference count, for it.
    pub(crate) runtime: OnceLock<Handle>,
}

impl Shared {
    pub(crate) fn new(config: Config, registry: Arc<Registry>) -> Arc<Self> {
        Arc::new(Self {
            config,
            registry,
            runtime: OnceLock::new(),
        })
    }

    /// Remembers the current runtime the first time a request arrives on one.
    #[inline]
    pub(crate) fn note_runtime(&self) {
        if self.runtime.get().is_none() {
            if let Ok(handle) = Handle::try_current() {
                let _ = self.runtime.set(handle);
            }
        }
    }

    /// Gives a permit back; if a request waits for one, starts it (or, once
    /// the layer is closed, cancels every waiting request).
    fn release_permit(&self) {
        let Some(limit) = &self.config.limit else {
            return;
        };
        while let Some(head) = limit.release() {
            if self.registry.is_closed() {
                // Its permit is released again by the next turn.
                head.cancel();
            } else {
                head.resume();
                return;
            }
        }
    }
}

/// The phase of a request's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The response has not ended: tasks wait.
    Open,
    /// The response ended like this: tasks run.
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

/// The request's method and path, recorded on its tasks' spans and given to
/// the hook, and its route for the hook and the metrics. Boxed, and only when
/// one of them will read it.
struct RequestInfo {
    method: Method,
    uri: Uri,
    /// axum's route template (`/users/{id}`): bounded, unlike the path.
    #[cfg(feature = "axum")]
    route: Option<axum::extract::MatchedPath>,
}

impl RequestInfo {
    fn route(&self) -> Option<&str> {
        #[cfg(feature = "axum")]
        return self.route.as_ref().map(axum::extract::MatchedPath::as_str);
        #[cfg(not(feature = "axum"))]
        None
    }
}

/// The shared state of one request's tasks.
pub(crate) struct RequestQueue {
    pub(crate) shared: Arc<Shared>,
    request: Option<Box<RequestInfo>>,
    phase: AtomicU32,
    /// Added and not started: what `BackgroundTasks::len` reports.
    not_started: AtomicUsize,
    state: Mutex<QueueState>,
}

#[derive(Debug, Default)]
struct QueueState {
    /// Tasks not taken by a runner yet; newest first.
    waiting: TaskList,
    /// The drain token is held: by a runner that takes the next tasks, or by
    /// the request's entry in the FIFO of the layer's limit.
    drainer: bool,
    /// Tasks accepted so far, for `max_tasks_per_request`.
    added: usize,
    /// A task was refused (warned about once per request).
    refused: bool,
    /// A task has a run policy of its own (else the layer's decides for all).
    own_policies: bool,
    /// A task has a coalescing key.
    has_keys: bool,
    /// While the request waits for a permit: where and how it goes on.
    parked: Option<Box<ParkedRun>>,
}

/// How a request that waits for a permit goes on once it gets one.
#[derive(Debug, Default)]
struct ParkedRun {
    /// The runtime its tasks run on (the one current when it started to
    /// wait), whoever releases the permit.
    #[cfg(not(tower_background_loom))]
    runtime: Option<Handle>,
    /// The end of its time budget, if its first task started.
    budget_end: Option<Instant>,
    /// The tasks its runner handed back when it had to wait, oldest first
    /// and older than every task of `waiting`: kept in this order so that a
    /// request served a few permits at a time gives up its next task without
    /// walking the others.
    ready: TaskList,
}

impl QueueState {
    /// Every task not taken by a runner, oldest first.
    fn take_all(&mut self) -> TaskList {
        let mut all = match &mut self.parked {
            Some(parked) if !parked.ready.is_empty() => parked.ready.take(),
            _ => return self.waiting.take().reversed(),
        };
        if !self.waiting.is_empty() {
            all.concat(self.waiting.take().reversed());
        }
        all
    }

    fn is_empty(&self) -> bool {
        self.waiting.is_empty()
            && self
                .parked
                .as_ref()
                .is_none_or(|parked| parked.ready.is_empty())
    }
}

impl RequestQueue {
    pub(crate) fn new<B>(shared: Arc<Shared>, req: &http::Request<B>) -> Self {
        // The hook sees the method, path and route; the metrics label the
        // route only, never the raw path (unbounded).
        let observed =
            tracing::level_enabled!(tracing::Level::INFO) || shared.config.on_task_end.is_some();
        // Looked up only where something will read it.
        #[cfg(feature = "axum")]
        let route = (observed || cfg!(feature = "metrics"))
            .then(|| req.extensions().get::<axum::extract::MatchedPath>())
            .flatten();
        #[cfg(feature = "axum")]
        let wanted = observed || route.is_some();
        #[cfg(not(feature = "axum"))]
        let wanted = observed;
        let request = wanted.then(|| {
            Box::new(RequestInfo {
                method: req.method().clone(),
                uri: req.uri().clone(),
                #[cfg(feature = "axum")]
                route: route.cloned(),
            })
        });
        Self {
            shared,
            request,
            phase: AtomicU32::new(OPEN),
            not_started: AtomicUsize::new(0),
            state: Mutex::new(QueueState::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The tasks added and not started.
    pub(crate) fn len(&self) -> usize {
        self.not_started.load(Ordering::Acquire)
    }

    /// A description of the phase, for `Debug`.
    pub(crate) fn phase_name(&self) -> &'static str {
        match decode(self.phase.load(Ordering::Acquire)) {
            Phase::Open => "open",
            Phase::Started(_) => "started",
            Phase::Discarded => "discarded",
        }
    }

    /// The span of a new task: a root that follows from the current span.
    pub(crate) fn span(&self, name: Option<&'static str>) -> Span {
        let span = match &self.request {
            Some(r) => tracing::info_span!(
                parent: None,
                "background_task",
                method = %r.method,
                path = r.uri.path(),
                task = name,
            ),
            None => tracing::info_span!(
                parent: None,
                "background_task",
                method = tracing::field::Empty,
                path = tracing::field::Empty,
                task = name,
            ),
        };
        if !span.is_disabled() {
            span.follows_from(Span::current());
        }
        span
    }

    /// Adds a task: it waits for the response, or starts now if the response
    /// has already ended (a late add).
    pub(crate) fn add(self: &Arc<Self>, job: Box<dyn Job>) {
        let registry = &self.shared.registry;
        let mut state = self.lock();
        // The linearization point against `finish` and `discard`: whoever
        // comes second sees the other's bit.
        let phase = decode(self.phase.fetch_or(HAS_TASKS, Ordering::AcqRel));
        if phase == Phase::Discarded {
            drop(state);
            let counted = registry.admit() && registry.end_unstarted(1, Bucket::Discarded);
            job.span().in_scope(|| {
                tracing::warn!(
                    "background task added after its request was discarded; discarding it"
                )
            });
            let ending = if counted {
                Ending::Discarded
            } else {
                Ending::Cancelled
            };
            self.observe(&*job, &ending, None);
            drop_guarded(job);
            return;
        }
        if let Some(cap) = self.shared.config.per_request {
            if state.added >= cap {
                let first = !std::mem::replace(&mut state.refused, true);
                drop(state);
                let counted = registry.admit() && registry.end_unstarted(1, Bucket::Refused);
                let ending = if counted {
                    Ending::Refused
                } else {
                    Ending::Cancelled
                };
                self.observe(&*job, &ending, None);
                if first {
                    job.span().in_scope(|| {
                        tracing::warn!(
                            max_tasks_per_request = cap,
                            "background task refused: the request reached max_tasks_per_request \
                             (further refusals of this request are counted, not logged)"
                        )
                    });
                }
                drop_guarded(job);
                return;
            }
        }
        if !registry.admit() {
            drop(state);
            job.span()
                .in_scope(|| tracing::warn!("background task added after shutdown; cancelling it"));
            self.note_cancelled(&*job);
            self.observe(&*job, &Ending::Cancelled, None);
            drop_guarded(job);
            return;
        }
        observe::added(registry);
        state.added += 1;
        let options = job.options();
        state.own_policies |= options.run_policy().is_some();
        state.has_keys |= options.key().is_some();
        let replaced = match options.name() {
            Some(name) => state
                .waiting
                .remove_where(|old| old.options().name() == Some(name)),
            None => TaskList::default(),
        };
        self.not_started.fetch_add(1, Ordering::AcqRel);
        state.waiting.push(job);
        match phase {
            Phase::Started(completion) => self.dispatch(state, completion),
            _ => drop(state),
        }
        if !replaced.is_empty() {
            self.forget(replaced, Ending::Replaced);
            tracing::debug!("background task replaced by a newer task of the same name");
        }
    }

    /// Takes back the pending tasks named `name`. Returns how many.
    pub(crate) fn forget_named(&self, name: &'static str) -> usize {
        let removed = self
            .lock()
            .waiting
            .remove_where(|job| job.options().name() == Some(name));
        self.forget(removed, Ending::Replaced)
    }

    /// The response body ended (or was dropped) as `completion` says.
    pub(crate) fn finish(self: &Arc<Self>, completion: Completion) {
        let word = self
            .phase
            .fetch_or(encode_started(completion), Ordering::AcqRel);
        debug_assert_eq!(word & PHASE, OPEN, "a request finishes once");
        if word & HAS_TASKS != 0 {
            self.dispatch(self.lock(), completion);
        }
    }

    /// There will be no response: discard every task.
    pub(crate) fn discard(&self, why: NoResponse) {
        let word = self.phase.fetch_or(DISCARDED, Ordering::AcqRel);
        debug_assert_eq!(word & PHASE, OPEN, "a request finishes once");
        if word & HAS_TASKS == 0 {
            return;
        }
        let waiting = self.lock().take_all();
        let n = self.forget(waiting, Ending::Discarded);
        if n > 0 {
            tracing::warn!(
                tasks = n,
                reason = why.reason(),
                "discarding background tasks: the request produced no response"
            );
        }
    }

    /// Claims the coalescing keys of the tasks about to be handed to a
    /// runner; returns those whose key a pending task of the layer holds.
    fn claim_keys(&self, waiting: &mut TaskList) -> TaskList {
        let registry = &self.shared.registry;
        let mut kept = TaskList::default();
        let mut merged = TaskList::default();
        // Oldest first: of two tasks with one key, the first added keeps it.
        let mut oldest_first = waiting.take().reversed();
        while let Some(mut job) = oldest_first.pop() {
            let options = job.options_mut();
            match options.key().cloned() {
                Some(key) if !options.key_held() => {
                    if registry.claim_key(&key) {
                        options.set_key_held(true);
                        kept.push(job);
                    } else {
                        merged.push(job);
                    }
                }
                _ => kept.push(job),
            }
        }
        *waiting = kept; // newest first again
        merged
    }

    /// Gives back the key a task holds, if it holds one.
    fn release_key(&self, job: &mut dyn Job) {
        let options = job.options_mut();
        if options.key_held() {
            options.set_key_held(false);
            if let Some(key) = options.key() {
                self.shared.registry.release_key(key);
            }
        }
    }

    /// Counts tasks that will never start as `ending` and drops them.
    fn forget(&self, mut tasks: TaskList, ending: Ending) -> usize {
        let n = tasks.len();
        if n > 0 && self.shared.registry.keyed() {
            let mut all = TaskList::default();
            while let Some(mut job) = tasks.pop() {
                self.release_key(&mut *job);
                all.push(job);
            }
            tasks = all;
        }
        if n > 0 {
            self.not_started.fetch_sub(n, Ordering::AcqRel);
            let counted = self
                .shared
                .registry
                .end_unstarted(n as u64, ending.bucket());
            let ending = if counted { ending } else { Ending::Cancelled };
            let cancelled = matches!(ending, Ending::Cancelled);
            if cancelled || observe::enabled(&self.shared.config) {
                while let Some(job) = tasks.pop() {
                    if cancelled {
                        self.note_cancelled(&*job);
                    }
                    self.observe(&*job, &ending, None);
                    drop_guarded(job);
                }
            }
            drop(tasks); // each drop guarded
        }
        n
    }

    /// A new task's options, stamped with the time when task ends are
    /// observed.
    pub(crate) fn stamp(&self, mut options: Options) -> Options {
        if observe::enabled(&self.shared.config) {
            options.set_added_at(std::time::Instant::now());
        }
        options
    }

    /// Notes a cancelled task's name for the shutdown report.
    fn note_cancelled(&self, job: &dyn Job) {
        if let Some(name) = job.options().name() {
            self.shared.registry.note_cancelled(name);
        }
    }

    /// Hands a task's end to the `on_task_end` hook and the metrics.
    fn observe(&self, job: &dyn Job, ending: &Ending, started_at: Option<std::time::Instant>) {
        let config = &self.shared.config;
        if !observe::enabled(config) {
            return;
        }
        let ran = started_at.map(|started| started.elapsed());
        let queued = started_at
            .zip(job.options().added_at())
            .map(|(started, added)| started.saturating_duration_since(added));
        let end = TaskEnd {
            name: job.options().name(),
            outcome: TaskOutcome::of(ending),
            queued,
            ran,
            method: self.request.as_ref().map(|r| &r.method),
            path: self.request.as_ref().map(|r| r.uri.path()),
            route: self.request.as_ref().and_then(|r| r.route()),
        };
        observe::emit(config, &self.shared.registry, &end);
    }

    /// With the response ended, decides what runs now, and starts it once
    /// the request's lock is released.
    fn dispatch(self: &Arc<Self>, mut state: MutexGuard<'_, QueueState>, completion: Completion) {
        let config = &self.shared.config;
        let registry = &self.shared.registry;
        if registry.is_closed() {
            let waiting = state.take_all();
            drop(state);
            self.forget(waiting, Ending::Cancelled);
            return;
        }
        // Tasks added with `add_with` always run: they see the completion.
        let default = config.run_policy;
        let (status, outcome) = (completion.status(), completion.outcome());
        // One pass over the tasks only if some may be skipped.
        let skipped = if state.own_policies || !default.allows(status, outcome) {
            state.waiting.remove_where(|job| {
                !job.wants_completion()
                    && !job
                        .options()
                        .run_policy()
                        .unwrap_or(default)
                        .allows(status, outcome)
            })
        } else {
            TaskList::default()
        };
        let dropped = if !config.run_on_abort && !outcome.is_delivered() {
            state.waiting.remove_where(|job| !job.wants_completion())
        } else {
            TaskList::default()
        };
        let merged = if state.has_keys {
            self.claim_keys(&mut state.waiting)
        } else {
            TaskList::default()
        };
        let mut batch = None;
        if !state.is_empty() && !state.drainer {
            state.drainer = true;
            batch = Some(state.take_all());
        }
        // Tasks are dropped (their `Drop` may add to this request) and
        // observed only once the request's lock is released.
        drop(state);
        if !skipped.is_empty() {
            let n = self.forget(skipped, Ending::Skipped);
            tracing::debug!(
                tasks = n,
                status = status.as_u16(),
                "background tasks skipped: their run policy does not run them after this response"
            );
        }
        if !merged.is_empty() {
            let n = self.forget(merged, Ending::Replaced);
            tracing::debug!(
                tasks = n,
                "background tasks merged into pending tasks with the same coalescing key"
            );
        }
        if !dropped.is_empty() {
            self.discard_on_abort(dropped);
        }
        if let Some(batch) = batch {
            let mut runner = Runner::new(self.clone(), completion, batch, 0);
            // Permits are taken now, in the order requests end, not when the
            // runner is first polled.
            if runner.reserve() {
                spawn(&self.shared, runner);
            }
        }
    }

    fn discard_on_abort(&self, dropped: TaskList) {
        let n = self.forget(dropped, Ending::Discarded);
        if n > 0 {
            tracing::warn!(
                tasks = n,
                "discarding background tasks: the response was aborted and run_on_abort is false"
            );
        }
    }

    fn completion(&self) -> Completion {
        match decode(self.phase.load(Ordering::Acquire)) {
            Phase::Started(completion) => completion,
            // Only started requests wait for a permit.
            _ => Completion::new(StatusCode::INTERNAL_SERVER_ERROR, Outcome::Aborted),
        }
    }
}

impl Parked for RequestQueue {
    fn resume(self: Arc<Self>) {
        let mut state = self.lock();
        let batch = state.take_all();
        let parked = state.parked.take().unwrap_or_default();
        let budget_end = parked.budget_end;
        #[cfg(not(tower_background_loom))]
        let runtime = parked.runtime;
        #[cfg(tower_background_loom)]
        let runtime = None;
        drop(state);
        let completion = self.completion();
        let shared = Arc::clone(&self.shared);
        let mut runner = Runner::new(self, completion, batch, 1);
        runner.set_budget_end(budget_end);
        if runner.reserve() {
            spawn_on(&shared, runtime, runner);
        }
    }

    fn cancel(self: Arc<Self>) {
        let mut state = self.lock();
        let waiting = state.take_all();
        state.parked = None;
        state.drainer = false;
        drop(state);
        self.forget(waiting, Ending::Cancelled);
    }
}

impl Drop for RequestQueue {
    fn drop(&mut self) {
        // Only reachable with tasks left if a runtime dropped a runner before
        // it took them: count them, never lose them silently.
        let state = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        if state.is_empty() {
            return; // the common case
        }
        let waiting = state.take_all();
        self.forget(waiting, Ending::Cancelled);
    }
}

impl fmt::Debug for RequestQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestQueue")
            .field("phase", &self.phase_name())
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

/// The spawned future that runs a request's tasks.
///
/// If it is dropped before it is done (the runtime shut down, or there was
/// no runtime to spawn it on), its `Drop` counts what it still held as
/// cancelled and gives back its permit: no task vanishes uncounted.
pub(crate) struct Runner {
    queue: Arc<RequestQueue>,
    /// What a task receives when it starts.
    start: Start,
    /// Taken from the request and not started, oldest first.
    batch: TaskList,
    /// The task being run.
    current: Option<Pin<Box<dyn Job>>>,
    /// Holds the request's drain token: takes its next tasks.
    drains: bool,
    /// Permits of the layer's limit it holds: one for the task it runs, and,
    /// with concurrent execution, one for each task of its batch.
    permits: usize,
    /// Registered to be woken by the close: the key and the waker.
    wakeup: Option<(usize, Waker)>,
    /// What only some runners need, allocated at the first task that needs
    /// it: with a `task_timeout`, a `request_time_budget`, or task ends
    /// observed.
    timing: Option<Pin<Box<Timing>>>,
}

pin_project_lite::pin_project! {
    /// The side box of a [`Runner`] that measures or limits time.
    struct Timing {
        // The current task's deadline, reset for each task.
        #[pin]
        deadline: Option<Sleep>,
        // When the current task started, if task ends are observed.
        started_at: Option<std::time::Instant>,
        // The end of the request's time budget, once its first task started.
        budget_end: Option<Instant>,
    }
}

impl Runner {
    fn new(
        queue: Arc<RequestQueue>,
        completion: Completion,
        batch: TaskList,
        permits: usize,
    ) -> Self {
        Self {
            queue,
            start: Start {
                completion,
                blocking: None,
            },
            batch,
            current: None,
            drains: true,
            permits,
            wakeup: None,
            timing: None,
        }
    }

    fn timing(&mut self) -> Pin<&mut Timing> {
        self.timing
            .get_or_insert_with(|| {
                Box::pin(Timing {
                    deadline: None,
                    started_at: None,
                    budget_end: None,
                })
            })
            .as_mut()
    }

    fn budget_end(&self) -> Option<Instant> {
        self.timing.as_ref().and_then(|timing| timing.budget_end)
    }

    fn set_budget_end(&mut self, end: Option<Instant>) {
        if end.is_some() {
            *self.timing().project().budget_end = end;
        }
    }

    fn take_started_at(&mut self) -> Option<std::time::Instant> {
        self.timing
            .as_mut()
            .and_then(|timing| timing.as_mut().project().started_at.take())
    }

    /// Starts the next task, if there is one and the runner gets a permit
    /// for it. `false`: the runner is done.
    fn start_next(&mut self) -> bool {
        if self.batch.is_empty() {
            if !self.drains {
                return false;
            }
            let mut state = self.queue.lock();
            if state.is_empty() {
                // Retire: a later add spawns a new runner.
                state.drainer = false;
                self.drains = false;
                return false;
            }
            self.batch = state.take_all();
        }
        if self.queue.shared.registry.is_closed() {
            return false; // `Drop` counts what is left
        }
        if !self.reserve() {
            return false;
        }
        let Some(job) = self.batch.pop() else {
            return false;
        };
        if self.over_budget() {
            self.batch.push_front(job);
            return false; // `Drop` counts what is left
        }
        self.queue.not_started.fetch_sub(1, Ordering::AcqRel);
        if !self.queue.shared.registry.start() {
            // Closed since the check above: the close counted it.
            self.queue.shared.registry.leave(1);
            self.queue.note_cancelled(&*job);
            self.queue.observe(&*job, &Ending::Cancelled, None);
            drop_guarded(job);
            return false;
        }
        let mut job = job;
        self.queue.release_key(&mut *job);
        if observe::enabled(&self.queue.shared.config) {
            *self.timing().project().started_at = Some(std::time::Instant::now());
        }
        if self.queue.shared.config.execution == Execution::Concurrent {
            self.hand_over_drain();
        }
        let shared = &*self.queue.shared;
        if job.is_blocking() {
            // The closure keeps its permit until it really returns.
            let permit = self.permits > 0;
            self.permits -= usize::from(permit);
            self.start.blocking = Some(Box::new(BlockingStart {
                shared: Arc::clone(&self.queue.shared),
                permit,
            }));
        }
        let (timeout, budget) = (shared.config.timeout, shared.config.budget);
        if timeout.is_some() || budget.is_some() {
            let now = Instant::now();
            let mut timing = self.timing().project();
            if let (Some(budget), None) = (budget, *timing.budget_end) {
                *timing.budget_end = Some(later(now, budget));
            }
            let at = match (timeout, *timing.budget_end) {
                (Some(timeout), Some(end)) => later(now, timeout).min(end),
                (Some(timeout), None) => later(now, timeout),
                (None, Some(end)) => end,
                (None, None) => unreachable!("checked above"),
            };
            match timing.deadline.as_mut().as_pin_mut() {
                Some(deadline) => deadline.reset(at),
                None => timing.deadline.set(Some(tokio::time::sleep_until(at))),
            }
        }
        self.current = Some(Box::into_pin(job));
        true
    }

    /// Takes the permits the batch needs: one for the next task, or with
    /// concurrent execution one for each task. The tasks that get none go
    /// back to the request, which waits in the layer's FIFO holding the drain
    /// token. Returns `false` if not even the next task got a permit.
    fn reserve(&mut self) -> bool {
        let Some(limit) = &self.queue.shared.config.limit else {
            return true;
        };
        let concurrent = self.queue.shared.config.execution == Execution::Concurrent;
        loop {
            let wanted = if concurrent { self.batch.len() } else { 1 };
            if self.permits >= wanted {
                return true;
            }
            if limit.try_acquire() {
                self.permits += 1;
                continue;
            }
            // The tasks without a permit, older than anything the request
            // holds (we hold its drain token, so nobody else took from it).
            // Under the request's lock until they are parked with it, so
            // that a resume of the request finds them.
            let mut state = self.queue.lock();
            debug_assert!(state.parked.is_none(), "a request parks once at a time");
            let rest = self.batch.split_off(self.permits);
            // Served in part: the rest keeps the request's place at the head.
            let front = self.permits > 0;
            match limit.acquire_or_park(|| self.queue.clone(), front) {
                Acquired::Permit => {
                    self.permits += 1;
                    self.batch.concat(rest);
                    self.batch.concat(state.take_all());
                }
                Acquired::Parked => {
                    state.parked = Some(Box::new(ParkedRun {
                        #[cfg(not(tower_background_loom))]
                        runtime: Handle::try_current()
                            .ok()
                            .or_else(|| self.queue.shared.runtime.get().cloned()),
                        budget_end: self.budget_end(),
                        ready: rest,
                    }));
                    self.drains = false;
                    return self.permits > 0;
                }
            }
        }
    }

    /// Whether the request's time budget is spent: its tasks that have not
    /// started are then counted as timed out and never run.
    fn over_budget(&self) -> bool {
        self.budget_end().is_some_and(|end| Instant::now() >= end)
    }

    /// Concurrent execution: a new runner takes the request's other tasks
    /// (and its late adds) while this one runs its own.
    fn hand_over_drain(&mut self) {
        let rest = if !self.batch.is_empty() {
            self.batch.take()
        } else if self.drains {
            let mut state = self.queue.lock();
            if state.is_empty() {
                state.drainer = false;
                self.drains = false;
                return;
            }
            state.take_all()
        } else {
            return;
        };
        // It takes the permits reserved for its tasks (all but ours) and the
        // drain token, if we hold it.
        let permits = self.permits.saturating_sub(1);
        self.permits -= permits;
        let completion = self.start.completion;
        let mut successor = Runner::new(Arc::clone(&self.queue), completion, rest, permits);
        successor.drains = std::mem::take(&mut self.drains);
        successor.set_budget_end(self.budget_end());
        if successor.reserve() {
            spawn(&self.queue.shared, successor);
        }
    }

    /// Polls the current task once, and says how it ended if it did.
    fn poll_current(&mut self, cx: &mut Context<'_>) -> Poll<Ending> {
        let Some(job) = &mut self.current else {
            return Poll::Pending;
        };
        let registry = &self.queue.shared.registry;
        // A task is dropped at its next poll after the close, also one that
        // started (was counted as running) but was not polled yet.
        if registry.is_closed() {
            return Poll::Ready(Ending::Cancelled);
        }
        let start = &mut self.start;
        match catch_unwind(AssertUnwindSafe(|| job.as_mut().poll_run(cx, start))) {
            Ok(Poll::Ready(ending)) => return Poll::Ready(ending),
            Ok(Poll::Pending) => {}
            Err(payload) => {
                let message = panic_message(&*payload);
                // A payload can panic in its own `Drop`.
                drop_guarded(payload);
                return Poll::Ready(Ending::Panicked(message));
            }
        }
        if let Some(timing) = &mut self.timing {
            if let Some(deadline) = timing.as_mut().project().deadline.as_pin_mut() {
                if deadline.poll(cx).is_ready() {
                    return Poll::Ready(Ending::TimedOut);
                }
            }
        }
        // Register once per runner (again only if the task moved to another
        // waker), then check: a close after the registration wakes us.
        match &mut self.wakeup {
            None => self.wakeup = Some((registry.register(cx.waker()), cx.waker().clone())),
            Some((key, waker)) if !waker.will_wake(cx.waker()) => {
                registry.reregister(*key, cx.waker());
                *waker = cx.waker().clone();
            }
            Some(_) => {}
        }
        if registry.is_closed() {
            return Poll::Ready(Ending::Cancelled);
        }
        Poll::Pending
    }

    /// Counts and logs how the current task ended, drops it, and gives up
    /// the permit if another request waits for one.
    fn end_current(&mut self, ending: Ending) {
        let Some(job) = self.current.take() else {
            return;
        };
        let started_at = self.take_started_at();
        let shared = &*self.queue.shared;
        let counted = shared.registry.end(ending.bucket());
        if !counted || matches!(ending, Ending::Cancelled) {
            self.queue.note_cancelled(&*job);
        }
        if observe::enabled(&shared.config) {
            let seen = if counted { &ending } else { &Ending::Cancelled };
            self.queue.observe(&*job, seen, started_at);
        }
        log(&*job, ending, counted, shared.config.timeout);
        drop_guarded(job);
        let waiters = shared
            .config
            .limit
            .as_ref()
            .is_some_and(|l| l.has_waiters());
        if self.permits > 0 && waiters {
            // Another request waits: let it go first.
            self.permits -= 1;
            shared.release_permit();
        }
    }
}

impl Future for Runner {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        let mut started = 0;
        loop {
            if this.current.is_some() {
                let ending = std::task::ready!(this.poll_current(cx));
                this.end_current(ending);
            }
            if started == TASKS_PER_POLL {
                // Let the worker serve others; we are polled again soon.
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            if !this.start_next() {
                return Poll::Ready(());
            }
            started += 1;
        }
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        if self.current.is_none()
            && self.batch.is_empty()
            && !self.drains
            && self.permits == 0
            && self.wakeup.is_none()
        {
            return; // done, and never waited: the common case
        }
        let started_at = self.take_started_at();
        let shared = &*self.queue.shared;
        if let Some((key, _)) = self.wakeup.take() {
            shared.registry.deregister(key);
        }
        if let Some(job) = self.current.take() {
            // The runtime went away with the task in hand (or the layer closed).
            let counted = shared.registry.end(Bucket::Cancelled);
            if counted {
                job.span().in_scope(|| {
                    tracing::warn!("background task cancelled: the tokio runtime went away")
                });
            }
            self.queue.note_cancelled(&*job);
            self.queue.observe(&*job, &Ending::Cancelled, started_at);
            drop_guarded(job);
        }
        let mut left = self.batch.take();
        if self.drains {
            let mut state = self.queue.lock();
            state.drainer = false;
            left.concat(state.take_all());
        }
        let (over_budget, closed) = (self.over_budget(), shared.registry.is_closed());
        let ending = if over_budget && !closed {
            Ending::TimedOut
        } else {
            Ending::Cancelled
        };
        let n = if left.is_empty() {
            0
        } else {
            self.queue.forget(left, ending)
        };
        if n > 0 && !closed {
            if over_budget {
                tracing::warn!(
                    tasks = n,
                    "background tasks timed out: the request's time budget was spent before they started"
                );
            } else {
                tracing::warn!(
                    tasks = n,
                    "background tasks cancelled: the tokio runtime went away before they ran"
                );
            }
        }
        for _ in 0..self.permits {
            shared.release_permit();
        }
    }
}

/// `now + duration`, or about 30 years from now if that overflows (as
/// tokio's timers do for `Duration::MAX`): a limit that large never fires.
fn later(now: Instant, duration: std::time::Duration) -> Instant {
    now.checked_add(duration)
        .unwrap_or_else(|| now + std::time::Duration::from_secs(86_400 * 365 * 30))
}

/// What a blocking closure takes along: the close to check before it runs,
/// and its permit, if it holds one.
struct BlockingStart {
    shared: Arc<Shared>,
    permit: bool,
}

impl BlockingGuard for BlockingStart {
    fn is_closed(&self) -> bool {
        self.shared.registry.is_closed()
    }
}

impl Drop for BlockingStart {
    fn drop(&mut self) {
        if self.permit {
            self.shared.release_permit();
        }
    }
}

/// Logs how a task ended, inside its span. `counted` is false when the
/// layer's close had already counted it as cancelled.
fn log(job: &dyn Job, ending: Ending, counted: bool, timeout: Option<std::time::Duration>) {
    // The common case logs at DEBUG: skip entering the span when that is off.
    if (matches!(ending, Ending::Completed) || !counted)
        && !tracing::level_enabled!(tracing::Level::DEBUG)
    {
        return;
    }
    job.span().in_scope(|| match ending {
        _ if !counted => tracing::debug!("background task ended after the shutdown cancelled it"),
        Ending::Completed => tracing::debug!("background task completed"),
        Ending::Failed(error) => tracing::error!(error = %error, "background task failed"),
        Ending::Panicked(panic) => tracing::error!(panic = %panic, "background task panicked"),
        Ending::TimedOut => {
            let timeout_ms = timeout.map_or(0, |t| t.as_millis() as u64);
            tracing::warn!(timeout_ms, "background task timed out and was abandoned")
        }
        Ending::Cancelled => {
            tracing::warn!("background task cancelled: the runtime is shutting down")
        }
        Ending::Discarded => tracing::warn!("background task discarded"),
        Ending::Skipped | Ending::Refused | Ending::Replaced => {
            tracing::debug!("background task did not run")
        }
    });
}

/// A spawn deferred to the outer loop of [`spawn_on`].
#[cfg(not(tower_background_loom))]
type Deferred = (Arc<Shared>, Option<Handle>, Runner);

#[cfg(not(tower_background_loom))]
std::thread_local! {
    /// Set while this thread spawns a runner: a runner dropped inside that
    /// spawn (the runtime is shutting down) may release a permit and start
    /// the next waiting request; that spawn is deferred to the outer loop
    /// instead of recursing once per waiting request.
    static SPAWNING: Cell<bool> = const { Cell::new(false) };
    static DEFERRED: RefCell<Vec<Deferred>> = const { RefCell::new(Vec::new()) };
}

/// Spawns a runner on the current runtime: the one serving the request,
/// where its body ends and its handler adds tasks. Off any runtime, on the
/// runtime that served the service's first request.
fn spawn(shared: &Arc<Shared>, runner: Runner) {
    spawn_on(shared, None, runner);
}

/// Spawns a runner on `runtime`, or as [`spawn`] does.
#[cfg(tower_background_loom)]
fn spawn_on(shared: &Arc<Shared>, runtime: Option<()>, runner: Runner) {
    {
        let _ = (shared, runtime);
        drop(loom::thread::spawn(move || loom::future::block_on(runner)));
    }
}

/// Spawns a runner on `runtime`, or as [`spawn`] does.
#[cfg(not(tower_background_loom))]
fn spawn_on(shared: &Arc<Shared>, runtime: Option<Handle>, runner: Runner) {
    if SPAWNING.get() {
        DEFERRED.with_borrow_mut(|deferred| deferred.push((Arc::clone(shared), runtime, runner)));
        return;
    }
    SPAWNING.set(true);
    spawn_now(shared, runtime, runner);
    while let Some((shared, runtime, runner)) = DEFERRED.with_borrow_mut(Vec::pop) {
        spawn_now(&shared, runtime, runner);
    }
    SPAWNING.set(false);
}

#[cfg(not(tower_background_loom))]
fn spawn_now(shared: &Shared, runtime: Option<Handle>, runner: Runner) {
    if let Some(runtime) = runtime {
        drop(runtime.spawn(runner));
        return;
    }
    // Inside a tokio task the runtime context is current: `tokio::spawn`
    // uses it without touching the runtime handle's shared count.
    if tokio::task::try_id().is_some() {
        drop(tokio::spawn(runner));
        return;
    }
    match Handle::try_current()
        .ok()
        .or_else(|| shared.runtime.get().cloned())
    {
        Some(runtime) => drop(runtime.spawn(runner)),
        None => {
            tracing::error!(
                "no tokio runtime to run background tasks on: serve the request from \
                 within a tokio runtime; cancelling them"
            );
            // Dropping a runner counts its tasks as cancelled.
            drop(runner);
        }
    }
}

#[cfg(all(test, not(tower_background_loom)))]
mod tests {
    use super::*;

    /// A request with one task is one spawned future of a few words next to
    /// the task's own allocation: what only some runners need is boxed apart.
    #[test]
    fn a_runner_and_a_plain_task_stay_small() {
        let runner = std::mem::size_of::<Runner>();
        let task =
            std::mem::size_of::<crate::job::Task<crate::job::FutureWork<std::future::Ready<()>>>>();
        let queue = std::mem::size_of::<RequestQueue>();
        println!("runner {runner} B, task {task} B, request queue {queue} B");
        assert!(
            runner <= 120,
            "the runner grew to {runner} bytes (over 120, tokio moves its stage with memcpy calls)"
        );
        assert!(task <= 80, "a plain task grew to {task} bytes");
        assert!(queue <= 88, "a request's queue grew to {queue} bytes");
    }
}
