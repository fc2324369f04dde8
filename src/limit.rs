//! [`Limit`]: the permits of
//! [`max_concurrent_tasks`](crate::BackgroundLayer::max_concurrent_tasks),
//! with a FIFO of the requests waiting for one.
//!
//! A request that waits for a permit is not a spawned task parked on a
//! semaphore: it is an entry in this queue (a pointer to the request's
//! queue), and whoever releases a permit hands it to the head, which is then
//! started. While permits are free, taking and releasing one is a single
//! atomic operation; the queue's lock is taken only when somebody waits.

use std::collections::VecDeque;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Arc, PoisonError};

use crate::sync::{AtomicIsize, Mutex};

/// A request waiting for a permit.
pub(crate) trait Parked: Send + Sync {
    /// A permit was handed over: start the request's next task with it.
    fn resume(self: Arc<Self>);
    /// The layer closed while the request waited: drop its tasks.
    fn cancel(self: Arc<Self>);
}

/// The permits of one layer and the requests waiting for them.
pub(crate) struct Limit {
    /// Free permits minus waiters: negative when requests wait (or are
    /// about to enqueue themselves).
    count: AtomicIsize,
    max: usize,
    queue: Mutex<Waiting>,
}

#[derive(Default)]
struct Waiting {
    fifo: VecDeque<Arc<dyn Parked>>,
    /// Permits released for a waiter that had not enqueued itself yet.
    handed_over: usize,
}

/// Whether [`Limit::acquire_or_park`] got a permit.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Acquired {
    Permit,
    /// The request is in the queue: a later release resumes it.
    Parked,
}

impl Limit {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            count: AtomicIsize::new(max as isize),
            max,
            queue: Mutex::new(Waiting::default()),
        }
    }

    pub(crate) fn max(&self) -> usize {
        self.max
    }

    /// Takes a free permit if there is one and nobody waits.
    pub(crate) fn try_acquire(&self) -> bool {
        self.count
            .fetch_update(SeqCst, SeqCst, |count| (count > 0).then(|| count - 1))
            .is_ok()
    }

    /// Takes a permit, or enqueues `waiter`: at the back of the queue, or at
    /// its front for a request that was served part of its tasks and keeps
    /// its place for the rest.
    pub(crate) fn acquire_or_park(
        &self,
        waiter: impl FnOnce() -> Arc<dyn Parked>,
        front: bool,
    ) -> Acquired {
        if self.count.fetch_sub(1, SeqCst) > 0 {
            return Acquired::Permit;
        }
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        if queue.handed_over > 0 {
            queue.handed_over -= 1;
            return Acquired::Permit;
        }
        if front {
            queue.fifo.push_front(waiter());
        } else {
            queue.fifo.push_back(waiter());
        }
        Acquired::Parked
    }

    /// Releases a permit. If a request waits, the permit is handed to the
    /// head of the queue, which is returned for the caller to resume.
    #[must_use]
    pub(crate) fn release(&self) -> Option<Arc<dyn Parked>> {
        if self.count.fetch_add(1, SeqCst) >= 0 {
            return None;
        }
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        match queue.fifo.pop_front() {
            Some(head) => Some(head),
            None => {
                // The waiter that counted itself has not enqueued yet: it
                // takes this permit when it does.
                queue.handed_over += 1;
                None
            }
        }
    }

    /// Whether a request waits for a permit (a task that holds one gives it
    /// up between two tasks only then).
    pub(crate) fn has_waiters(&self) -> bool {
        self.count.load(SeqCst) < 0
    }
}

impl std::fmt::Debug for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limit")
            .field("max", &self.max)
            .field("count", &self.count.load(SeqCst))
            .finish()
    }
}

#[cfg(all(test, not(tower_background_loom)))]
mod tests {
    use super::*;
    use std::sync::Mutex as StdMutex;

    struct Waiter(&'static str, Arc<StdMutex<Vec<&'static str>>>);

    impl Parked for Waiter {
        fn resume(self: Arc<Self>) {
            self.1.lock().unwrap().push(self.0);
        }
        fn cancel(self: Arc<Self>) {}
    }

    #[test]
    fn waiters_are_resumed_in_fifo_order() {
        let log = Arc::new(StdMutex::new(Vec::new()));
        let limit = Limit::new(1);
        let waiter = |name| {
            let log = log.clone();
            move || Arc::new(Waiter(name, log)) as Arc<dyn Parked>
        };
        assert_eq!(
            limit.acquire_or_park(waiter("first"), false),
            Acquired::Permit
        );
        assert_eq!(limit.acquire_or_park(waiter("a"), false), Acquired::Parked);
        assert_eq!(limit.acquire_or_park(waiter("b"), false), Acquired::Parked);
        assert!(limit.has_waiters());
        limit.release().unwrap().resume();
        limit.release().unwrap().resume();
        assert!(!limit.has_waiters());
        assert!(limit.release().is_none());
        assert_eq!(*log.lock().unwrap(), ["a", "b"]);
        // All permits are back.
        assert_eq!(limit.acquire_or_park(waiter("c"), false), Acquired::Permit);
        assert_eq!(limit.acquire_or_park(waiter("d"), false), Acquired::Parked);
    }
}
