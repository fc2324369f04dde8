//! A queued task: one heap allocation holding the user's work, its tracing
//! span and the link to the next task of its request.
//!
//! The three kinds of work (`add`, `add_blocking`, `add_with`) are three
//! [`Work`] types behind one object-safe [`Job`] trait, so a request's queue
//! is a plain singly linked list of `Box<dyn Job>` and adding a task costs
//! exactly one allocation.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;
use tokio::sync::OwnedSemaphorePermit;
use tokio::task::JoinHandle;
use tracing::Span;

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

/// How a task's own work ended (timeouts and cancellation are the runner's).
#[derive(Debug)]
pub(crate) enum Finish {
    Completed,
    Failed(String),
    Panicked(String),
    /// An `add_blocking` closure whose join handle was cancelled: the
    /// runtime is shutting down.
    Lost,
}

/// What a task receives when it starts.
#[derive(Debug)]
pub(crate) struct Start {
    pub(crate) completion: Completion,
    /// The concurrency permit, if the layer has a limit. Blocking work takes
    /// it along to the blocking pool so that the limit holds until the
    /// closure really returns, even after a timeout.
    pub(crate) permit: Option<OwnedSemaphorePermit>,
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
    /// Drives the task; the first call starts it.
    fn poll_run(self: Pin<&mut Self>, cx: &mut Context<'_>, start: &mut Start) -> Poll<Finish>;
}

/// The user's work inside a [`Task`].
pub(crate) trait Work: Send + 'static {
    const WANTS_COMPLETION: bool;
    fn poll_work(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        start: &mut Start,
        span: &Span,
    ) -> Poll<Finish>;
}

pin_project! {
    /// One queued task: the allocation behind a `Box<dyn Job>`.
    pub(crate) struct Task<W> {
        next: Link,
        span: Span,
        #[pin]
        work: W,
    }
}

impl<W: Work> Task<W> {
    pub(crate) fn boxed(span: Span, work: W) -> Box<dyn Job> {
        Box::new(Task {
            next: None,
            span,
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

    fn poll_run(self: Pin<&mut Self>, cx: &mut Context<'_>, start: &mut Start) -> Poll<Finish> {
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
    ) -> Poll<Finish> {
        let output = ready!(self.project().future.poll(cx));
        Poll::Ready(finish(output))
    }
}

/// Work added with `add_blocking`: a closure for tokio's blocking pool.
pub(crate) enum BlockingWork<F> {
    Waiting(Option<F>),
    Running(JoinHandle<Option<String>>),
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

    fn poll_work(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        start: &mut Start,
        span: &Span,
    ) -> Poll<Finish> {
        let this = self.get_mut();
        if let BlockingWork::Waiting(f) = this {
            let Some(f) = f.take() else {
                // Unreachable: `Waiting(None)` only exists for the instant
                // between `take` and the assignment below.
                return Poll::Ready(Finish::Lost);
            };
            let permit = start.permit.take();
            let span = span.clone();
            *this = BlockingWork::Running(tokio::task::spawn_blocking(move || {
                let _permit = permit;
                span.in_scope(|| f().into_failure())
            }));
        }
        let BlockingWork::Running(handle) = this else {
            unreachable!("blocking work is running once started")
        };
        Poll::Ready(match ready!(Pin::new(handle).poll(cx)) {
            Ok(None) => Finish::Completed,
            Ok(Some(error)) => Finish::Failed(error),
            Err(e) if e.is_panic() => Finish::Panicked(panic_message(&*e.into_panic())),
            Err(_) => Finish::Lost,
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
    ) -> Poll<Finish> {
        if let WithCompletionProj::Waiting { f } = self.as_mut().project() {
            let Some(f) = f.take() else {
                return Poll::Ready(Finish::Lost);
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

fn finish(output: impl TaskOutput) -> Finish {
    match output.into_failure() {
        None => Finish::Completed,
        Some(error) => Finish::Failed(error),
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

    /// The same tasks in the opposite order.
    pub(crate) fn reversed(mut self) -> TaskList {
        let mut out = TaskList::default();
        while let Some(job) = self.pop() {
            out.push(job);
        }
        out
    }

    /// Removes the tasks that do not want a completion (`add` and
    /// `add_blocking`), keeping the order of the others. Returns the removed.
    pub(crate) fn split_off_plain(&mut self) -> TaskList {
        let mut kept = TaskList::default();
        let mut plain = TaskList::default();
        while let Some(job) = self.pop() {
            if job.wants_completion() {
                kept.push(job);
            } else {
                plain.push(job);
            }
        }
        *self = kept.reversed();
        plain
    }
}

impl Drop for TaskList {
    fn drop(&mut self) {
        while self.pop().is_some() {}
    }
}

impl fmt::Debug for TaskList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskList").field("len", &self.len).finish()
    }
}
