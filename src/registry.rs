//! The layer's registry: it counts every task from the moment it is added
//! until it ends in exactly one bucket of [`Stats`], it knows whether the
//! layer is closed, and it wakes the running tasks when it closes.
//!
//! There is no layer-wide lock on a task's path. The registry is a handful
//! of atomic counters in the manner of tokio-util's `TaskTracker`:
//!
//! - `state`, one word: bit 0 is "closed", the rest counts the tasks in
//!   flight (pending or running). Adding a task is one `fetch_add` that also
//!   tells whether the layer is closed; ending one is one `fetch_sub` that
//!   tells whether the close has already counted it.
//! - monotonic counters: added, started, and one per bucket. A snapshot reads
//!   them in the reverse order of a task's life (buckets, started, added), so
//!   every task is counted exactly once, in a state it occupied during the
//!   call.
//! - the close stores, once, how many tasks were in flight at that instant:
//!   they are all counted as cancelled, whatever they do afterwards, and
//!   their later ends touch no bucket.
//!
//! A task's path: `admit` (add) → `start` (its first poll) → `end` (bucket),
//! or `admit` → `end` without a start (discarded or cancelled while pending).

use std::collections::HashSet;
use std::pin::pin;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Arc, OnceLock, PoisonError};
use std::task::Waker;

use tokio::sync::Notify;

use crate::backlog::{Backlog, RoomTicket};
use crate::sync::{AtomicBool, AtomicU64, AtomicUsize, CachePadded, Mutex};

/// Counts of a layer's tasks, as returned by
/// [`BackgroundHandle::stats`](crate::BackgroundHandle::stats).
///
/// `pending` and `running` are the tasks in flight; the other fields are
/// buckets: every task ends in exactly one of them, once.
///
/// The snapshot is taken without stopping the layer, and it is consistent:
/// every task added before the call is counted exactly once, in a state it
/// was in at some instant during the call, so `total()` is the number of
/// tasks added, and it never decreases from one call to the next. Counts of
/// tasks that change state during the call may be a moment old.
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
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
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
    /// Outlived [`task_timeout`](crate::BackgroundLayer::task_timeout), or
    /// its request's
    /// [`request_time_budget`](crate::BackgroundLayer::request_time_budget)
    /// (also tasks the budget stopped before they started).
    pub timed_out: u64,
    /// Never run because their request produced no response, or because the
    /// response was aborted with [`run_on_abort(false)`](crate::BackgroundLayer::run_on_abort).
    pub discarded: u64,
    /// Stopped or never run because of
    /// [`BackgroundHandle::shutdown`](crate::BackgroundHandle::shutdown) (or
    /// because the tokio runtime they were to run on went away).
    pub cancelled: u64,
    /// Never run because their [`RunPolicy`](crate::RunPolicy) did not allow
    /// it for their response (by default: a 4xx or 5xx status).
    pub skipped: u64,
    /// Never queued because their request had already added
    /// [`max_tasks_per_request`](crate::BackgroundLayer::max_tasks_per_request)
    /// tasks.
    pub refused: u64,
    /// Never run because a newer task of the same
    /// [name](crate::TaskOptions::name) replaced them while they were
    /// pending in their request, because the handler took them back with
    /// [`BackgroundTasks::forget`](crate::BackgroundTasks::forget), or
    /// because they were merged into a pending task with the same
    /// [coalescing key](crate::TaskOptions::coalesce).
    pub replaced: u64,
}

impl Stats {
    /// Every task counted: in flight plus ended, which is every task added.
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
    ///     + stats.timed_out + stats.discarded + stats.cancelled + stats.skipped
    ///     + stats.refused + stats.replaced);
    /// ```
    #[must_use]
    pub fn ended(&self) -> u64 {
        self.completed
            + self.failed
            + self.panicked
            + self.timed_out
            + self.discarded
            + self.cancelled
            + self.skipped
            + self.refused
            + self.replaced
    }

    pub(crate) fn is_idle(&self) -> bool {
        self.pending == 0 && self.running == 0
    }
}

/// The bucket of [`Stats`] a task ends in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Bucket {
    Completed,
    Failed,
    Panicked,
    TimedOut,
    Discarded,
    Cancelled,
    Skipped,
    Refused,
    Replaced,
}

const CLOSED: u64 = 1;
const ONE_TASK: u64 = 2;
/// `closed_in_flight` before the close.
const OPEN: u64 = u64::MAX;

/// The shared counts of one layer (and all its clones).
#[derive(Debug)]
pub(crate) struct Registry {
    /// Bit 0: closed. Bits 1..: tasks in flight, times two.
    state: AtomicU64,
    added: AtomicU64,
    started: AtomicU64,
    /// Ended after they started.
    completed: AtomicU64,
    failed: AtomicU64,
    panicked: AtomicU64,
    timed_out: AtomicU64,
    cancelled_running: AtomicU64,
    /// Ended without starting.
    discarded: AtomicU64,
    cancelled_pending: AtomicU64,
    skipped: AtomicU64,
    refused: AtomicU64,
    replaced: AtomicU64,
    /// Over the request's time budget before they started.
    timed_out_pending: AtomicU64,
    /// `max_pending_tasks`: set once, by the first service made with it.
    backlog: OnceLock<Arc<Backlog>>,
    /// How many tasks were in flight when the layer closed; [`OPEN`] before.
    closed_in_flight: AtomicU64,
    /// Read on every poll of a running task: a line of its own.
    closed: CachePadded<AtomicBool>,
    /// Read on every end: a line of its own.
    idle_waiters: CachePadded<AtomicUsize>,
    /// Woken when the layer becomes idle while somebody waits for it.
    idle: Notify,
    /// The runners whose task is waiting on something, to wake on close.
    wakers: Mutex<Wakers>,
    /// The coalescing keys of the pending tasks that hold one.
    keys: Mutex<HashSet<Arc<str>>>,
    /// Named tasks cancelled so far, per name (only named tasks that are
    /// cancelled touch it: the shutdown report lists them).
    cancelled_names: Mutex<Vec<(&'static str, u64)>>,
    /// A key was ever claimed: only then do ends look for keys to release.
    keyed: AtomicBool,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            state: AtomicU64::new(0),
            added: AtomicU64::new(0),
            started: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            panicked: AtomicU64::new(0),
            timed_out: AtomicU64::new(0),
            cancelled_running: AtomicU64::new(0),
            discarded: AtomicU64::new(0),
            cancelled_pending: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            replaced: AtomicU64::new(0),
            timed_out_pending: AtomicU64::new(0),
            backlog: OnceLock::new(),
            closed_in_flight: AtomicU64::new(OPEN),
            closed: CachePadded(AtomicBool::new(false)),
            idle_waiters: CachePadded(AtomicUsize::new(0)),
            idle: Notify::new(),
            wakers: Mutex::new(Wakers::default()),
            keys: Mutex::new(HashSet::new()),
            cancelled_names: Mutex::new(Vec::new()),
            keyed: AtomicBool::new(false),
        }
    }
}

impl Registry {
    /// Counts a new task. Returns `false` if the layer is closed: the task is
    /// then counted as cancelled at once and must not run.
    pub(crate) fn admit(&self) -> bool {
        let old = self.state.fetch_add(ONE_TASK, SeqCst);
        self.added.fetch_add(1, SeqCst);
        if old & CLOSED == 0 {
            if let Some(backlog) = self.backlog.get() {
                backlog.enter();
            }
            return true;
        }
        self.cancelled_pending.fetch_add(1, SeqCst);
        self.state.fetch_sub(ONE_TASK, SeqCst);
        self.settle();
        false
    }

    /// Moves a pending task to running. Returns `false` if the layer is
    /// closed: the close counted the task, which must be dropped unstarted
    /// and [`leave`](Self::leave) the registry.
    pub(crate) fn start(&self) -> bool {
        if self.state.load(SeqCst) & CLOSED != 0 {
            return false;
        }
        self.started.fetch_add(1, SeqCst);
        self.unpend(1);
        true
    }

    /// Counts `n` tasks out of the backlog of `max_pending_tasks`.
    fn unpend(&self, n: u64) {
        if let Some(backlog) = self.backlog.get() {
            backlog.leave(n as usize);
        }
    }

    /// Sets the bound of `max_pending_tasks` (the first setting wins).
    pub(crate) fn set_backlog(&self, limit: usize) {
        if self.backlog.get().is_some() {
            return;
        }
        // The tasks already pending count toward the bound (a task added
        // meanwhile may be missed: the count saturates at zero).
        let pending = self.stats().pending as usize;
        let _ = self.backlog.set(Arc::new(Backlog::new(limit, pending)));
    }

    /// Whether a service may take a request: `Pending` while
    /// `max_pending_tasks` tasks are pending (see [`Backlog::poll_room`]).
    #[inline]
    pub(crate) fn poll_room(
        &self,
        cx: &mut std::task::Context<'_>,
        ticket: &mut RoomTicket,
    ) -> std::task::Poll<()> {
        match self.backlog.get() {
            None => std::task::Poll::Ready(()),
            Some(backlog) => backlog.poll_room(cx, ticket, || self.is_closed()),
        }
    }

    /// Ends a task that started, in `bucket`. Returns `false` if the close
    /// had already counted it as cancelled.
    pub(crate) fn end(&self, bucket: Bucket) -> bool {
        let counter = match bucket {
            Bucket::Completed => &self.completed,
            Bucket::Failed => &self.failed,
            Bucket::Panicked => &self.panicked,
            Bucket::TimedOut => &self.timed_out,
            Bucket::Cancelled => &self.cancelled_running,
            // A started task ends in none of these.
            Bucket::Discarded | Bucket::Skipped | Bucket::Refused | Bucket::Replaced => {
                &self.discarded
            }
        };
        self.leave_into(1, counter)
    }

    /// Ends `n` tasks that never started, in `bucket` (`Discarded` or
    /// `Cancelled`). Returns `false` if the close had already counted them.
    pub(crate) fn end_unstarted(&self, n: u64, bucket: Bucket) -> bool {
        if n == 0 {
            return false;
        }
        let counter = match bucket {
            Bucket::Discarded => &self.discarded,
            Bucket::Skipped => &self.skipped,
            Bucket::Refused => &self.refused,
            Bucket::Replaced => &self.replaced,
            Bucket::TimedOut => &self.timed_out_pending,
            _ => &self.cancelled_pending,
        };
        self.unpend(n);
        self.leave_into(n, counter)
    }

    /// Removes `n` tasks that the close already counted.
    pub(crate) fn leave(&self, n: u64) {
        if n > 0 {
            self.unpend(n);
            self.state.fetch_sub(n * ONE_TASK, SeqCst);
            self.settle();
        }
    }

    fn leave_into(&self, n: u64, counter: &AtomicU64) -> bool {
        // Whoever comes first, this end or the close, decides where the
        // tasks are counted.
        let old = self.state.fetch_sub(n * ONE_TASK, SeqCst);
        let counted = old & CLOSED == 0;
        if counted {
            counter.fetch_add(n, SeqCst);
        }
        self.settle();
        counted
    }

    /// Wakes the `wait_idle` futures if the layer just became idle.
    ///
    /// An end writes its counter, then reads `idle_waiters`; a waiter writes
    /// `idle_waiters`, then reads the counters. Both read the counters with
    /// read-modify-writes, which see the latest value of each: of two such
    /// sides, the later one sees the other's write, so a waiter either sees
    /// the layer idle or is woken. (Plain `SeqCst` loads would do in Rust's
    /// memory model; loom models them as acquire loads, and this is the path
    /// it checks.)
    fn settle(&self) {
        if self.idle_waiters.load(SeqCst) == 0 {
            return;
        }
        // While other tasks are in flight, the last of them to end settles:
        // its end comes after this one's counter in the order of the
        // read-modify-writes above, so it sees it.
        let word = self.state.load(SeqCst);
        if word & CLOSED == 0 && word >= ONE_TASK {
            return;
        }
        if self.snapshot(true).is_idle() {
            self.idle.notify_waiters();
        }
    }

    /// Whether the layer is closed, for a running task's every poll (a read
    /// of a line nobody writes until the close).
    #[inline]
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(SeqCst)
    }

    /// Closes the layer: every task in flight is counted as cancelled, tasks
    /// waiting on something are woken to be dropped, and no task starts from
    /// now on. Idempotent.
    pub(crate) fn close(&self) {
        // The lock orders the close against waker registrations (a runner
        // that registers after this sees `closed`) and against a second close.
        let wakers = self.wakers.lock().unwrap_or_else(PoisonError::into_inner);
        let old = self.state.fetch_or(CLOSED, SeqCst);
        if old & CLOSED != 0 {
            return;
        }
        self.closed_in_flight.store(old / ONE_TASK, SeqCst);
        // After the bit: a task that stops because it sees the flag has
        // already been counted by the close.
        self.closed.store(true, SeqCst);
        for waker in wakers.slots.iter().flatten() {
            waker.wake_by_ref();
        }
        drop(wakers);
        if let Some(backlog) = self.backlog.get() {
            backlog.wake_all();
        }
        self.settle();
    }

    /// Claims `key` for a task ready to run. `false`: a pending task of the
    /// layer already holds it, and the new one merges into it.
    pub(crate) fn claim_key(&self, key: &Arc<str>) -> bool {
        self.keyed.store(true, SeqCst);
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        keys.insert(Arc::clone(key))
    }

    /// Gives `key` back: its task started or ended without starting.
    pub(crate) fn release_key(&self, key: &str) {
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        keys.remove(key);
    }

    /// Notes that a task named `name` was cancelled.
    pub(crate) fn note_cancelled(&self, name: &'static str) {
        let mut names = self
            .cancelled_names
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match names.iter_mut().find(|(n, _)| *n == name) {
            Some((_, count)) => *count += 1,
            None => names.push((name, 1)),
        }
    }

    /// The named tasks cancelled so far, per name.
    pub(crate) fn cancelled_names(&self) -> Vec<(&'static str, u64)> {
        self.cancelled_names
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Resolves once every task counted by the close has been dropped (its
    /// runner polled it, its response body let go).
    pub(crate) async fn wait_dropped(&self) {
        let _waiter = IdleWaiter::new(self);
        loop {
            let mut notified = pin!(self.idle.notified());
            notified.as_mut().enable();
            if self.state.fetch_add(0, SeqCst) < ONE_TASK {
                return;
            }
            notified.await;
        }
    }

    /// Whether any task ever claimed a key.
    pub(crate) fn keyed(&self) -> bool {
        self.keyed.load(SeqCst)
    }

    /// Registers the waker of a runner whose task waits, so that the close
    /// can wake it. Returns its key.
    pub(crate) fn register(&self, waker: &Waker) -> usize {
        let mut wakers = self.wakers.lock().unwrap_or_else(PoisonError::into_inner);
        match wakers.free.pop() {
            Some(key) => {
                wakers.slots[key] = Some(waker.clone());
                key
            }
            None => {
                wakers.slots.push(Some(waker.clone()));
                wakers.slots.len() - 1
            }
        }
    }

    /// Replaces a registered waker (the task moved to another waker).
    pub(crate) fn reregister(&self, key: usize, waker: &Waker) {
        let mut wakers = self.wakers.lock().unwrap_or_else(PoisonError::into_inner);
        wakers.slots[key] = Some(waker.clone());
    }

    pub(crate) fn deregister(&self, key: usize) {
        let mut wakers = self.wakers.lock().unwrap_or_else(PoisonError::into_inner);
        wakers.slots[key] = None;
        wakers.free.push(key);
    }

    pub(crate) fn stats(&self) -> Stats {
        self.snapshot(false)
    }

    /// The counts; with `rmw`, read with read-modify-writes (see `settle`).
    fn snapshot(&self, rmw: bool) -> Stats {
        let read = |counter: &AtomicU64| {
            if rmw {
                counter.fetch_add(0, SeqCst)
            } else {
                counter.load(SeqCst)
            }
        };
        // Reverse order of a task's life: a task whose later step is seen
        // was seen at its earlier steps too.
        let closed_in_flight = read(&self.closed_in_flight);
        let completed = read(&self.completed);
        let failed = read(&self.failed);
        let panicked = read(&self.panicked);
        let timed_out = read(&self.timed_out);
        let cancelled_running = read(&self.cancelled_running);
        let discarded = read(&self.discarded);
        let cancelled_pending = read(&self.cancelled_pending);
        let skipped = read(&self.skipped);
        let refused = read(&self.refused);
        let replaced = read(&self.replaced);
        let timed_out_pending = read(&self.timed_out_pending);
        let started = read(&self.started);
        let added = read(&self.added);

        let ran = completed + failed + panicked + timed_out + cancelled_running;
        let mut stats = Stats {
            pending: 0,
            running: 0,
            completed,
            failed,
            panicked,
            timed_out: timed_out + timed_out_pending,
            discarded,
            cancelled: cancelled_running + cancelled_pending,
            skipped,
            refused,
            replaced,
        };
        if closed_in_flight == OPEN {
            let never_started =
                discarded + cancelled_pending + skipped + refused + replaced + timed_out_pending;
            stats.running = started.saturating_sub(ran);
            stats.pending = added.saturating_sub(started + never_started);
        } else {
            // Everything in flight at the close is cancelled; what remains is
            // a task between its end and its bucket.
            stats.cancelled += closed_in_flight;
            stats.running = added.saturating_sub(stats.ended());
        }
        stats
    }

    /// Resolves at the first instant nothing is pending or running.
    pub(crate) async fn wait_idle(&self) {
        let _waiter = IdleWaiter::new(self);
        loop {
            let mut notified = pin!(self.idle.notified());
            // Registered before the check: an idle transition after the check
            // wakes us.
            notified.as_mut().enable();
            if self.snapshot(true).is_idle() {
                return;
            }
            notified.await;
        }
    }

    /// How many tasks are waiting for a wakeup on close (for tests).
    #[cfg(test)]
    fn registered(&self) -> usize {
        let wakers = self.wakers.lock().unwrap();
        wakers.slots.iter().flatten().count()
    }
}

/// Counts a `wait_idle` future while it exists, so that ends only look for
/// idleness when somebody waits for it.
struct IdleWaiter<'a>(&'a Registry);

impl<'a> IdleWaiter<'a> {
    fn new(registry: &'a Registry) -> Self {
        registry.idle_waiters.fetch_add(1, SeqCst);
        Self(registry)
    }
}

impl Drop for IdleWaiter<'_> {
    fn drop(&mut self) {
        self.0.idle_waiters.fetch_sub(1, SeqCst);
    }
}

/// A slab of wakers: registering is a push or a reuse, never a search.
#[derive(Debug, Default)]
struct Wakers {
    slots: Vec<Option<Waker>>,
    free: Vec<usize>,
}

/// The future behind [`BackgroundHandle::wait_idle`](crate::BackgroundHandle::wait_idle).
pub(crate) async fn wait_idle(registry: Arc<Registry>) {
    registry.wait_idle().await
}

#[cfg(all(test, not(tower_background_loom)))]
mod tests {
    use super::*;

    #[test]
    fn a_task_is_counted_once_through_its_life() {
        let r = Registry::default();
        assert!(r.admit());
        assert_eq!((r.stats().pending, r.stats().total()), (1, 1));
        assert!(r.start());
        assert_eq!((r.stats().pending, r.stats().running), (0, 1));
        assert!(r.end(Bucket::Failed));
        let s = r.stats();
        assert_eq!((s.running, s.failed, s.total()), (0, 1, 1));
    }

    #[test]
    fn the_close_counts_what_is_in_flight_once() {
        let r = Registry::default();
        for _ in 0..3 {
            assert!(r.admit());
        }
        assert!(r.start());
        r.close();
        let s = r.stats();
        assert_eq!((s.cancelled, s.pending, s.running, s.total()), (3, 0, 0, 3));
        // Their later ends change nothing; a new task is cancelled at once.
        assert!(!r.end(Bucket::Completed));
        assert!(!r.end_unstarted(2, Bucket::Discarded));
        assert!(!r.admit());
        assert!(!r.start());
        let s = r.stats();
        assert_eq!(
            (s.cancelled, s.completed, s.discarded, s.total()),
            (4, 0, 0, 4)
        );
        r.close();
        assert_eq!(r.stats(), s);
    }

    #[test]
    fn wakers_are_reused() {
        let r = Registry::default();
        let waker = Waker::noop();
        let a = r.register(waker);
        let b = r.register(waker);
        r.deregister(a);
        assert_eq!(r.register(waker), a);
        assert_eq!(r.registered(), 2);
        r.deregister(a);
        r.deregister(b);
        assert_eq!(r.registered(), 0);
    }
}
