//! A queued task: one heap allocation holding the user's work, its tracing
//! span and the link to the next task of its request; and [`Ending`], the one
//! enum that says how a task ended.
//!
//! The three kinds of work (`add`, `add_blocking`, `add_with`) are three
//! [`Work`] types behind one object-safe [`Job`] trait, so a request's queue
//! is a plain singly linked list of `Box<dyn Job>` and adding a task costs
//! exactly one allocation.

use std::fmt;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;
use tokio::task::JoinHandle;
use tracing::Span;

use crate::config::RunPolicy;
use crate::ending::Ending;
use crate::Completion;

/// The output of a background task: `()` or `Result<T, E>`.
///
/// A task that returns `Err(e)` is counted as failed and logged at error
/// level with `e`'s `Display` text; `()` and `Ok(_)` count as completed.
/// The trait is sealed: map any other output to one of these, for example
/// with `.map(|_| ())` or `.map_err(|e| format!("{e:?}"))`.
///
/// ```
/// # use tower_background::BackgroundTasks;
/// fn queue(tasks: &BackgroundTasks) {
///     tasks.add(async {});                                    // ()
///     tasks.add(async { Ok::<_, std::io::Error>(42) });       // Result<T, E: Display>
///     tasks.add(async { Err::<(), _>("cache is down") });     // counted as failed
/// }
/// ```
pub trait TaskOutput: sealed::Sealed + Send + 'static {}

impl TaskOutput for () {}
impl<T, E> TaskOutput for Result<T, E>
where
    T: Send + 'static,
    E: fmt::Display + Send + 'static,
{
}

pub(crate) mod sealed {
    /// Turns a task's output into its failure text, if it failed.
    pub trait Sealed {
        fn into_failure(self) -> Option<String>;
    }

    impl Sealed for () {
        fn into_failure(self) -> Option<String> {
            None
        }
    }

    impl<T, E: std::fmt::Display> Sealed for Result<T, E> {
        fn into_failure(self) -> Option<String> {
            self.err().map(|e| e.to_string())
        }
    }
}

/// What a blocking closure takes along to the blocking pool. Dropped when
/// the closure returns: it then gives back the closure's permit of
/// `max_concurrent_tasks`, if it holds one, so that the limit holds until the
/// closure really returns, even after a timeout.
pub(crate) trait BlockingGuard: Send {
    /// Whether the layer was shut down: a closure that waited for a thread of
    /// the pool meanwhile was counted as cancelled, and must not run.
    fn is_closed(&self) -> bool;
}

/// What a task receives when it starts.
pub(crate) struct Start {
    pub(crate) completion: Completion,
    /// For blocking work only (set by the runner just before it starts one).
    pub(crate) blocking: Option<Box<dyn BlockingGuard>>,
}

pub(crate) type Link = Option<Box<dyn Job>>;

/// A queued task, type-erased.
pub(crate) trait Job: Send + 'static {
    /// The next task of the list this one is in.
    fn next_mut(&mut self) -> &mut Link;
    /// The task's `background_task` span.
    fn span(&self) -> &Span;
    /// Added with `add_with`: runs even when the response was aborted.
    fn wants_completion(&self) -> bool;
    /// Added with `add_blocking`: runs on the blocking pool.
    fn is_blocking(&self) -> bool;
    /// Its name, run policy and coalescing key.
    fn options(&self) -> &Options;
    fn options_mut(&mut self) -> &mut Options;
    /// Drives the task; the first call starts it.
    fn poll_run(self: Pin<&mut Self>, cx: &mut Context<'_>, start: &mut Start) -> Poll<Ending>;
}

/// The user's work inside a [`Task`].
pub(crate) trait Work: Send + 'static {
    const WANTS_COMPLETION: bool;
    const IS_BLOCKING: bool = false;
    fn poll_work(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        start: &mut Start,
        span: &Span,
    ) -> Poll<Ending>;
}

/// What a handler said about a task besides its work, boxed apart so that a
/// plain task's allocation grows by one pointer only.
#[derive(Debug, Clone, Default)]
pub(crate) struct Options {
    set: Option<Box<TaskSettings>>,
}

#[derive(Debug, Clone, Default)]
struct TaskSettings {
    name: Option<&'static str>,
    /// `None`: the layer's default.
    run_policy: Option<RunPolicy>,
    /// When it was added, if task ends are observed.
    added_at: Option<std::time::Instant>,
    /// The layer-wide coalescing key.
    key: Option<std::sync::Arc<str>>,
    /// This task holds its key in the layer's set of pending keys.
    key_held: bool,
}

impl Options {
    fn set_mut(&mut self) -> &mut TaskSettings {
        self.set.get_or_insert_with(Box::default)
    }

    pub(crate) fn name(&self) -> Option<&'static str> {
        self.set.as_ref().and_then(|set| set.name)
    }

    pub(crate) fn set_name(&mut self, name: &'static str) {
        self.set_mut().name = Some(name);
    }

    pub(crate) fn run_policy(&self) -> Option<RunPolicy> {
        self.set.as_ref().and_then(|set| set.run_policy)
    }

    pub(crate) fn set_run_policy(&mut self, policy: RunPolicy) {
        self.set_mut().run_policy = Some(policy);
    }

    pub(crate) fn added_at(&self) -> Option<std::time::Instant> {
        self.set.as_ref().and_then(|set| set.added_at)
    }

    pub(crate) fn set_added_at(&mut self, at: std::time::Instant) {
        self.set_mut().added_at = Some(at);
    }

    pub(crate) fn key(&self) -> Option<&std::sync::Arc<str>> {
        self.set.as_ref().and_then(|set| set.key.as_ref())
    }

    pub(crate) fn set_key(&mut self, key: std::sync::Arc<str>) {
        self.set_mut().key = Some(key);
    }

    pub(crate) fn key_held(&self) -> bool {
        self.set.as_ref().is_some_and(|set| set.key_held)
    }

    pub(crate) fn set_key_held(&mut self, held: bool) {
        if held || self.set.is_some() {
            self.set_mut().key_held = held;
        }
    }
}

pin_project! {
    /// One queued task: the allocation behind a `Box<dyn Job>`.
    pub(crate) struct Task<W> {
        next: Link,
        span: Span,
        options: Options,
        #[pin]
        work: W,
    }
}

impl<W: Work> Task<W> {
    pub(crate) fn boxed(span: Span, options: Options, work: W) -> Box<dyn Job> {
        Box::new(Task {
            next: None,
            span,
            options,
            work,
        })
    }
}

impl<W: Work> Job for Task<W> {
    fn next_mut(&mut self) -> &mut Link {
        &mut self.next
    }

    fn span(&self) -> &Span {
        &self.span
    }

    fn wants_completion(&self) -> bool {
        W::WANTS_COMPLETION
    }

    fn options(&self) -> &Options {
        &self.options
    }

    fn options_mut(&mut self) -> &mut Options {
        &mut self.options
    }

    fn is_blocking(&self) -> bool {
        W::IS_BLOCKING
    }

    fn poll_run(self: Pin<&mut Self>, cx: &mut Context<'_>, start: &mut Start) -> Poll<Ending> {
        let this = self.project();
        let _entered = this.span.enter();
        this.work.poll_work(cx, start, this.span)
    }
}

pin_project! {
    /// Work added with `add`: a future.
    pub(crate) struct FutureWork<F> {
        #[pin]
        future: F,
    }
}

impl<F> FutureWork<F> {
    pub(crate) fn new(future: F) -> Self {
        Self { future }
    }
}

impl<F> Work for FutureWork<F>
where
    F: Future + Send + 'static,
    F::Output: TaskOutput,
{
    const WANTS_COMPLETION: bool = false;

    fn poll_work(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        _start: &mut Start,
        _span: &Span,
    ) -> Poll<Ending> {
        let output = ready!(self.project().future.poll(cx));
        Poll::Ready(finish(output))
    }
}

/// Work added with `add_blocking`: a closure for tokio's blocking pool.
pub(crate) enum BlockingWork<F> {
    Waiting(Option<F>),
    /// `None` from the closure's thread: the layer closed before it got to
    /// run, so it did not.
    Running(JoinHandle<Option<Option<String>>>),
}

impl<F> BlockingWork<F> {
    pub(crate) fn new(f: F) -> Self {
        BlockingWork::Waiting(Some(f))
    }
}

// The closure is moved out before it runs and never pinned.
impl<F> Unpin for BlockingWork<F> {}

impl<F, R> Work for BlockingWork<F>
where
    F: FnOnce() -> R + Send + 'static,
    R: TaskOutput,
{
    const WANTS_COMPLETION: bool = false;
    const IS_BLOCKING: bool = true;

    fn poll_work(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        start: &mut Start,
        span: &Span,
    ) -> Poll<Ending> {
        let this = self.get_mut();
        if let BlockingWork::Waiting(f) = this {
            let Some(f) = f.take() else {
                // Unreachable: `Waiting(None)` only exists for the instant
                // between `take` and the assignment below.
                return Poll::Ready(Ending::Cancelled);
            };
            let guard = start.blocking.take();
            let span = span.clone();
            *this = BlockingWork::Running(tokio::task::spawn_blocking(move || {
                // It may wait for a thread of the pool: a shutdown meanwhile
                // counted it as cancelled, so it must not run.
                if guard.as_ref().is_some_and(|guard| guard.is_closed()) {
                    return None;
                }
                let failure = span.in_scope(|| f().into_failure());
                drop(guard); // its permit, if it holds one
                Some(failure)
            }));
        }
        let BlockingWork::Running(handle) = this else {
            unreachable!("blocking work is running once started")
        };
        Poll::Ready(match ready!(Pin::new(handle).poll(cx)) {
            Ok(None) => Ending::Cancelled,
            Ok(Some(None)) => Ending::Completed,
            Ok(Some(Some(error))) => Ending::Failed(error),
            Err(e) if e.is_panic() => {
                let payload = e.into_panic();
                let message = panic_message(&*payload);
                // A payload can panic in its own `Drop`.
                drop_guarded(payload);
                Ending::Panicked(message)
            }
            Err(_) => Ending::Cancelled,
        })
    }
}

pin_project! {
    /// Work added with `add_with`: a closure that receives the completion
    /// and returns a future.
    #[project = WithCompletionProj]
    pub(crate) enum WithCompletion<F, Fut> {
        Waiting { f: Option<F> },
        Running { #[pin] future: Fut },
    }
}

impl<F, Fut> WithCompletion<F, Fut> {
    pub(crate) fn new(f: F) -> Self {
        WithCompletion::Waiting { f: Some(f) }
    }
}

impl<F, Fut> Work for WithCompletion<F, Fut>
where
    F: FnOnce(Completion) -> Fut + Send + 'static,
    Fut: Future + Send + 'static,
    Fut::Output: TaskOutput,
{
    const WANTS_COMPLETION: bool = true;

    fn poll_work(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        start: &mut Start,
        _span: &Span,
    ) -> Poll<Ending> {
        if let WithCompletionProj::Waiting { f } = self.as_mut().project() {
            let Some(f) = f.take() else {
                return Poll::Ready(Ending::Cancelled);
            };
            let future = f(start.completion);
            self.set(WithCompletion::Running { future });
        }
        match self.project() {
            WithCompletionProj::Running { future } => Poll::Ready(finish(ready!(future.poll(cx)))),
            WithCompletionProj::Waiting { .. } => unreachable!("set to running above"),
        }
    }
}

fn finish(output: impl TaskOutput) -> Ending {
    match output.into_failure() {
        None => Ending::Completed,
        Some(error) => Ending::Failed(error),
    }
}

/// Drops a task's value so that a panicking `Drop` is logged and goes no
/// further: it must not abort the process (a second panic while unwinding)
/// nor take the request's other tasks down with it.
pub(crate) fn drop_guarded<T>(value: T) {
    if let Err(payload) = catch_unwind(AssertUnwindSafe(move || drop(value))) {
        tracing::error!(
            panic = %panic_message(&*payload),
            "a background task's value panicked while being dropped"
        );
    }
}

/// The text of a panic payload.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&'static str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "Box<dyn Any>".to_owned()
    }
}

/// A singly linked list of tasks, newest first.
///
/// Pushing is O(1) with no allocation beyond the task itself; runners turn
/// it into oldest-first order with [`reversed`](TaskList::reversed) once per
/// batch. Dropping it is iterative, so a list of a million tasks does not
/// overflow the stack.
#[derive(Default)]
pub(crate) struct TaskList {
    head: Link,
    len: usize,
}

impl TaskList {
    pub(crate) fn push(&mut self, mut job: Box<dyn Job>) {
        *job.next_mut() = self.head.take();
        self.head = Some(job);
        self.len += 1;
    }

    pub(crate) fn pop(&mut self) -> Option<Box<dyn Job>> {
        let mut job = self.head.take()?;
        self.head = job.next_mut().take();
        self.len -= 1;
        Some(job)
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.head.is_none()
    }

    pub(crate) fn take(&mut self) -> TaskList {
        std::mem::take(self)
    }

    /// Puts `other`'s tasks behind every task of `self`. It walks `self`,
    /// which callers keep short.
    pub(crate) fn concat(&mut self, mut other: TaskList) {
        let mut items = Vec::with_capacity(self.len);
        while let Some(job) = self.pop() {
            items.push(job);
        }
        while let Some(job) = items.pop() {
            other.push(job);
        }
        *self = other;
    }

    /// Puts a task back at the head.
    pub(crate) fn push_front(&mut self, job: Box<dyn Job>) {
        self.push(job);
    }

    /// Keeps the first `at` tasks and returns the others, in order.
    pub(crate) fn split_off(&mut self, at: usize) -> TaskList {
        let mut first = Vec::with_capacity(at.min(self.len));
        while first.len() < at {
            match self.pop() {
                Some(job) => first.push(job),
                None => break,
            }
        }
        let rest = self.take();
        while let Some(job) = first.pop() {
            self.push(job);
        }
        rest
    }

    /// The same tasks in the opposite order.
    pub(crate) fn reversed(mut self) -> TaskList {
        let mut out = TaskList::default();
        while let Some(job) = self.pop() {
            out.push(job);
        }
        out
    }

    /// Removes the tasks for which `keep` says no, keeping the order of the
    /// others. Returns the removed, in their order.
    pub(crate) fn remove_where(&mut self, mut remove: impl FnMut(&dyn Job) -> bool) -> TaskList {
        let mut kept = TaskList::default();
        let mut removed = TaskList::default();
        while let Some(job) = self.pop() {
            if remove(&*job) {
                removed.push(job);
            } else {
                kept.push(job);
            }
        }
        *self = kept.reversed();
        removed.reversed()
    }
}

impl Drop for TaskList {
    #[inline]
    fn drop(&mut self) {
        // Most lists are empty when dropped (taken, or handed on).
        if self.head.is_some() {
            self.drop_tasks();
        }
    }
}

impl TaskList {
    /// One task at a time (no recursion through the links), each drop
    /// guarded.
    #[inline(never)]
    fn drop_tasks(&mut self) {
        while let Some(job) = self.pop() {
            drop_guarded(job);
        }
    }
}

impl fmt::Debug for TaskList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskList").field("len", &self.len).finish()
    }
}
