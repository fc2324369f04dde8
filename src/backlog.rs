//! The bound of [`max_pending_tasks`](crate::BackgroundLayer::max_pending_tasks):
//! the count of tasks added and not started, and the line of services
//! waiting for room.
//!
//! A service whose `poll_ready` finds the bound reached takes a numbered
//! place at the end of the line and returns `Pending`. Each task that leaves
//! the backlog wakes about one service from the head of the line (plus two
//! spares); a woken service that finds room passes the turn on to the next,
//! and one that finds none goes back to its place. The line holds weak
//! references: a service dropped while it waits is skipped without a
//! search, and one dropped after it was woken passes its turn on.

use std::collections::VecDeque;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Arc, PoisonError, Weak};
use std::task::{Context, Poll, Waker};

use crate::sync::{AtomicUsize, Mutex};

/// The bound of `max_pending_tasks` and the services waiting for room.
#[derive(Debug)]
pub(crate) struct Backlog {
    limit: usize,
    pending: AtomicUsize,
    /// `line.len()`, written under its lock: a start reads it without taking
    /// the lock when nobody waits.
    waiting: AtomicUsize,
    /// Services waiting for room, oldest first.
    line: Mutex<Line>,
}

/// The services waiting for room of `max_pending_tasks`, oldest first: weak
/// references to their places, gone once the service is dropped or got room.
#[derive(Debug, Default)]
struct Line {
    /// In the order of their first arrival (the number), so that a service
    /// woken at the head that found no room goes back to its place.
    places: VecDeque<(u64, Weak<Mutex<Place>>)>,
    /// The number of the next service to arrive.
    next: u64,
    /// The length at which references to places that are gone are dropped
    /// (doubled each time, so that the sweep is amortized).
    sweep_at: usize,
}

/// A waiting service's place in the line.
#[derive(Debug, Default)]
struct Place {
    /// The waker of its latest poll.
    waker: Option<Waker>,
    /// Whether the line holds a reference to it: a service polled again
    /// while it waits keeps its place (no search of the line).
    in_line: bool,
    /// Taken out of the line and woken, not polled since.
    woken: bool,
    /// Its number in the line, from its first arrival.
    number: Option<u64>,
}

/// A service's place in the line of `max_pending_tasks`, held while it waits
/// for room. A clone of the service does not wait: its ticket is empty.
#[derive(Debug, Default)]
pub(crate) struct RoomTicket(Option<Waiting>);

/// What a waiting service holds.
#[derive(Debug)]
struct Waiting {
    place: Arc<Mutex<Place>>,
    backlog: Arc<Backlog>,
}

impl Clone for RoomTicket {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl Drop for RoomTicket {
    /// A service woken for room and dropped before it polled again (a
    /// client that left) passes its wake-up on to the next in line.
    fn drop(&mut self) {
        if let Some(waiting) = self.0.take() {
            let woken = waiting
                .place
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .woken;
            if woken {
                waiting.backlog.wake(1);
            }
        }
    }
}

/// Services woken beyond the room freed by a start: a woken service may be
/// gone, and would pass the room on to nobody.
const SPARE_WAKEUPS: usize = 2;

impl Backlog {
    pub(crate) fn new(limit: usize, pending: usize) -> Self {
        Self {
            limit,
            pending: AtomicUsize::new(pending),
            waiting: AtomicUsize::new(0),
            line: Mutex::default(),
        }
    }

    /// A task was added.
    pub(crate) fn enter(&self) {
        self.pending.fetch_add(1, SeqCst);
    }

    /// `n` tasks left the backlog (started, or ended without starting):
    /// wakes about as many waiting services.
    pub(crate) fn leave(&self, n: usize) {
        // Saturating: tasks added before the bound was set were not counted
        // into it.
        let before = self
            .pending
            .fetch_update(SeqCst, SeqCst, |pending| Some(pending.saturating_sub(n)))
            .unwrap_or_else(|pending| pending);
        let after = before.saturating_sub(n);
        if after < self.limit {
            // One waiting service per unit of room freed, and a few more in
            // case a woken one is gone (a reset stream leaves its waker
            // behind); each that finds room passes it on to the next
            // (`poll_room`). Not all of them: n waiting services would cost
            // n² polls to serve.
            self.wake(n.min(self.limit - after) + SPARE_WAKEUPS);
        }
    }

    /// Wakes every waiting service (the layer closed: they all go on).
    pub(crate) fn wake_all(&self) {
        self.wake(usize::MAX);
    }

    /// Whether a service may take a request: `Pending` while `limit` tasks
    /// are pending and the layer is not `closed`.
    ///
    /// `ticket` is the calling service's: while it waits, it holds the
    /// service's place in the line, so that a service dropped while it
    /// waits (a reset stream) is skipped by the wake-ups.
    #[inline(never)]
    pub(crate) fn poll_room(
        self: &Arc<Self>,
        cx: &mut Context<'_>,
        ticket: &mut RoomTicket,
        closed: impl Fn() -> bool,
    ) -> Poll<()> {
        let full = || self.pending.load(SeqCst) >= self.limit && !closed();
        let room = |ticket: &mut RoomTicket| {
            // Out of the line (its entry, if still there, is skipped); the
            // next waiting service gets its turn too: it passes it on in
            // turn, or waits again if the room is gone.
            ticket.0 = None;
            self.wake(1);
            Poll::Ready(())
        };
        if !full() {
            return room(ticket);
        }
        let place = &ticket
            .0
            .get_or_insert_with(|| Waiting {
                place: Arc::default(),
                backlog: Arc::clone(self),
            })
            .place;
        let (join, number) = {
            let mut me = place.lock().unwrap_or_else(PoisonError::into_inner);
            match &mut me.waker {
                Some(waker) => waker.clone_from(cx.waker()),
                None => me.waker = Some(cx.waker().clone()),
            }
            me.woken = false;
            // Polled again while in the line: it keeps its place.
            (!std::mem::replace(&mut me.in_line, true), me.number)
        };
        // Not under the place's lock: the wake-ups lock the line, then places.
        if join {
            // Back at its place if it was woken and found no room.
            let number = self.line_up(Arc::downgrade(place), number);
            place.lock().unwrap_or_else(PoisonError::into_inner).number = Some(number);
        }
        // Checked again after registering (`waiting` is written first): a
        // start in between sees us and wakes us.
        if full() {
            Poll::Pending
        } else {
            room(ticket)
        }
    }

    /// Wakes up to `n` of the services waiting for room, oldest first;
    /// services that stopped waiting (dropped, or got room) are taken out of
    /// the line without counting.
    #[inline]
    fn wake(&self, n: usize) {
        if n > 0 && self.waiting.load(SeqCst) > 0 {
            self.wake_waiting(n);
        }
    }

    #[inline(never)]
    fn wake_waiting(&self, n: usize) {
        let mut woken = Vec::new();
        let mut line = self.line.lock().unwrap_or_else(PoisonError::into_inner);
        while woken.len() < n {
            let Some((_, place)) = line.places.pop_front() else {
                break;
            };
            // A service dropped while it waited, or one that found room
            // since: skipped, not counted.
            if let Some(place) = place.upgrade() {
                let mut place = place.lock().unwrap_or_else(PoisonError::into_inner);
                place.in_line = false;
                place.woken = true;
                if let Some(waker) = place.waker.take() {
                    woken.push(waker);
                }
            }
        }
        self.waiting.store(line.places.len(), SeqCst);
        drop(line);
        for waker in woken {
            waker.wake();
        }
    }

    /// Puts a service in the line: at the end when it first arrives (`None`:
    /// returns its number), else back at its place (a service woken at the
    /// head that found no room, among the few that did the same).
    fn line_up(&self, place: Weak<Mutex<Place>>, number: Option<u64>) -> u64 {
        let mut line = self.line.lock().unwrap_or_else(PoisonError::into_inner);
        if line.places.len() >= line.sweep_at {
            line.places.retain(|(_, place)| place.strong_count() > 0);
            line.sweep_at = (2 * line.places.len()).max(1024);
        }
        let number = match number {
            Some(number) => {
                let at = line.places.partition_point(|&(other, _)| other < number);
                line.places.insert(at, (number, place));
                number
            }
            None => {
                let number = line.next;
                line.next += 1;
                line.places.push_back((number, place));
                number
            }
        };
        self.waiting.store(line.places.len(), SeqCst);
        number
    }
}
