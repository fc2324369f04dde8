//! Running a request's tasks: one spawned runner drains a request's queue in
//! order (sequential execution), or runs a single task (concurrent
//! execution). Around every task it waits for a concurrency permit, enforces
//! the timeout, catches panics, logs the outcome and watches for shutdown.

use std::future::{poll_fn, Future};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::{pin, Pin};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use crate::handle::{Ended, Unstarted};
use crate::job::{panic_message, Finish, Job, Start, TaskList};
use crate::tasks::RequestQueue;
use crate::Completion;

/// A spawned unit of work: the tasks it has taken and not started yet.
///
/// If it is dropped before it is done (the runtime shut down, or there was
/// no runtime to spawn it on), its `Drop` counts what it still held as
/// cancelled: no task vanishes uncounted.
pub(crate) struct Runner {
    queue: Arc<RequestQueue>,
    completion: Completion,
    /// Taken and not started, oldest first.
    batch: TaskList,
    /// Refills `batch` from the request's waiting list until it is empty
    /// (sequential execution). Cleared when the runner retires.
    draining: bool,
    /// One of this runner's tasks is counted as running.
    running: bool,
}

impl Runner {
    /// A runner that runs `batch` (oldest first), then drains the request's
    /// waiting list until it is empty.
    pub(crate) fn sequence(
        queue: Arc<RequestQueue>,
        completion: Completion,
        batch: TaskList,
    ) -> Self {
        Self {
            queue,
            completion,
            batch,
            draining: true,
            running: false,
        }
    }

    /// A runner for one task.
    pub(crate) fn single(
        queue: Arc<RequestQueue>,
        completion: Completion,
        job: Box<dyn Job>,
    ) -> Self {
        let mut batch = TaskList::default();
        batch.push(job);
        Self {
            queue,
            completion,
            batch,
            draining: false,
            running: false,
        }
    }

    /// The next task to start, if any. An associated function over the
    /// fields it needs, so that `run` can keep borrowing the queue's shared
    /// state meanwhile.
    fn next(
        queue: &RequestQueue,
        batch: &mut TaskList,
        draining: &mut bool,
    ) -> Option<Box<dyn Job>> {
        if batch.is_empty() && *draining {
            let mut state = queue.lock();
            let waiting = state.waiting.take();
            if waiting.is_empty() {
                // Retire: a later add spawns a new runner.
                state.draining = false;
                *draining = false;
            }
            drop(state);
            *batch = waiting.reversed();
        }
        let job = batch.pop()?;
        queue.not_started.fetch_sub(1, Ordering::AcqRel);
        Some(job)
    }

    pub(crate) async fn run(mut self) {
        // Borrowed, not cloned: the shared state is the same for every
        // request of the service, and its reference count is a cache line
        // every worker would write.
        let shared = &*self.queue.shared;
        let registry = &shared.registry;
        // Created before the first `start` (which checks the closed flag) and
        // registered only when something has to wait: a close in between is
        // still seen by its first poll, and a task that completes on its
        // first poll costs no registration.
        let mut closed = pin!(registry.closed());
        // Allocated only with a `task_timeout`, once per runner, and reset
        // for each task.
        let mut deadline: Option<Pin<Box<Sleep>>> = None;

        while let Some(job) = Self::next(&self.queue, &mut self.batch, &mut self.draining) {
            let permit = match &shared.config.limit {
                None => None,
                Some(limit) => {
                    let mut acquire = pin!(Arc::clone(limit).acquire_owned());
                    let acquired = poll_fn(|cx| {
                        if closed.as_mut().poll(cx).is_ready() {
                            return Poll::Ready(None);
                        }
                        acquire.as_mut().poll(cx).map(Result::ok)
                    })
                    .await;
                    match acquired {
                        Some(permit) => Some(permit),
                        // Closed: `shutdown` counted everything left.
                        None => return,
                    }
                }
            };
            if !registry.start() {
                return;
            }
            self.running = true;
            if let Some(timeout) = shared.config.timeout {
                let at = Instant::now() + timeout;
                match &mut deadline {
                    Some(deadline) => deadline.as_mut().reset(at),
                    None => deadline = Some(Box::pin(tokio::time::sleep_until(at))),
                }
            }
            let mut job = Box::into_pin(job);
            let mut start = Start {
                completion: self.completion,
                permit,
            };
            let fate = poll_fn(|cx| {
                match catch_unwind(AssertUnwindSafe(|| job.as_mut().poll_run(cx, &mut start))) {
                    Ok(Poll::Ready(finish)) => return Poll::Ready(Fate::Finished(finish)),
                    Ok(Poll::Pending) => {}
                    Err(payload) => {
                        return Poll::Ready(Fate::Finished(Finish::Panicked(panic_message(
                            &*payload,
                        ))))
                    }
                }
                if let Some(deadline) = &mut deadline {
                    if deadline.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Fate::TimedOut);
                    }
                }
                if closed.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Fate::Closed);
                }
                Poll::Pending
            })
            .await;
            drop(start); // releases the permit
            self.running = false;
            let ended = log(&*job, fate, shared.config.timeout);
            // A destructor that panics must not take the rest of the sequence down.
            let _ = catch_unwind(AssertUnwindSafe(move || drop(job)));
            match ended {
                Some(ended) => {
                    registry.end(ended);
                }
                None => return,
            }
        }
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        if self.batch.is_empty() && !self.draining && !self.running {
            return; // done: the common case
        }
        let batch = self.batch.take();
        let waiting = if self.draining {
            let mut state = self.queue.lock();
            state.draining = false;
            state.waiting.take()
        } else {
            TaskList::default()
        };
        let unstarted = batch.len() + waiting.len();
        if unstarted == 0 && !self.running {
            return;
        }
        self.queue
            .not_started
            .fetch_sub(unstarted, Ordering::AcqRel);
        let registry = &self.queue.shared.registry;
        let mut counted = registry.forget(unstarted as u64, Unstarted::Cancelled);
        if self.running {
            counted |= registry.end(Ended::Cancelled);
        }
        if counted {
            tracing::warn!(
                tasks = unstarted + usize::from(self.running),
                "background tasks cancelled: the tokio runtime went away before they ran"
            );
        }
    }
}

/// How one task ended, from the runner's point of view.
enum Fate {
    Finished(Finish),
    TimedOut,
    Closed,
}

/// Logs how a task ended, inside its span, and says in which bucket it
/// ends. `None` means the layer was closed: the task was already counted as
/// cancelled.
fn log(job: &dyn Job, fate: Fate, timeout: Option<Duration>) -> Option<Ended> {
    let ended = match &fate {
        Fate::Finished(Finish::Completed) => Some(Ended::Completed),
        Fate::Finished(Finish::Failed(_)) => Some(Ended::Failed),
        Fate::Finished(Finish::Panicked(_)) => Some(Ended::Panicked),
        Fate::Finished(Finish::Lost) => Some(Ended::Cancelled),
        Fate::TimedOut => Some(Ended::TimedOut),
        Fate::Closed => None,
    };
    // The common case logs at DEBUG: skip entering the span when that is off.
    if matches!(fate, Fate::Finished(Finish::Completed) | Fate::Closed)
        && !tracing::level_enabled!(tracing::Level::DEBUG)
    {
        return ended;
    }
    job.span().in_scope(|| match fate {
        Fate::Finished(Finish::Completed) => tracing::debug!("background task completed"),
        Fate::Finished(Finish::Failed(error)) => {
            tracing::error!(error = %error, "background task failed")
        }
        Fate::Finished(Finish::Panicked(panic)) => {
            tracing::error!(panic = %panic, "background task panicked")
        }
        Fate::Finished(Finish::Lost) => {
            tracing::warn!("background task lost: the runtime is shutting down")
        }
        Fate::TimedOut => {
            let timeout_ms = timeout.map_or(0, |t| t.as_millis() as u64);
            tracing::warn!(timeout_ms, "background task timed out and was abandoned")
        }
        Fate::Closed => tracing::debug!("background task cancelled by shutdown"),
    });
    ended
}
