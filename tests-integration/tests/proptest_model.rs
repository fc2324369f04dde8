//! Property tests of the semantics table (README, rows 1-12) against a small
//! reference model written from the documented contract, not from the code.
//!
//! `every_task_runs_once_or_is_counted`: one request per case, driven through
//! `tower::ServiceExt::oneshot` with a scripted body that the test polls frame
//! by frame like a server would. Random scenarios: the body's frames (data,
//! trailers, error), what it declares up front (exact `size_hint`,
//! `Content-Length`, `is_end_stream`), the request method and the status,
//! how far the "server" polls it and whether it honours `is_end_stream`; task
//! mixes of every kind and behaviour; execution mode, `run_on_abort`,
//! `task_timeout`, `max_concurrent_tasks`; late adds at random points; a
//! `shutdown` at a random point; current-thread or multi-thread runtime; late
//! adds and the body's drop on a thread outside the runtime. The model
//! derives how the response ended (`Outcome`) from what the body handed out
//! and what the server did with it, and from that (with the layer's or the
//! task's run policy, `run_on_abort`, task names and
//! `max_tasks_per_request`) the fate, order and `Stats` bucket of every
//! task. The harness also checks the timing rule:
//! no task starts, and `Stats` shows none started, before the server has let
//! go of the ended body (dropped it, or polled it again after its end,
//! `None` included); the tasks themselves check a "let go" flag that the
//! harness sets right before that moment.
//!
//! `concurrency_limit_holds_across_requests`: 1 to 4 requests at once
//! (spawned, on either runtime flavour), each with its own tasks and body
//! fate, under `max_concurrent_tasks(k)`: the number of tasks running at once
//! (measured by the tasks themselves) never exceeds `k`, every task ends in
//! exactly one `Stats` bucket, `total()` equals the tasks added, and
//! `pending` and `running` return to 0. Some tasks are added late (from a
//! spawned clone of the queue), and some cases shut the layer down while the
//! requests are in flight: then what ran is consistent and no async task
//! starts after `shutdown` has returned.
//!
//! `every_task_is_counted_when_the_runtime_goes_away`: the same cases, but
//! the runtime is shut down at a random point with everything in flight;
//! every task added is still counted once, nothing stays pending or running.
//!
//! `permit_waiters_start_in_the_order_they_became_ready`: under
//! `max_concurrent_tasks(1)`, with the permit held, bodies are let go of in a
//! random order; their tasks start in that order.
//!
//! Each case runs on its own runtime, with real time. The task timeout is
//! short (`TIMEOUT`) and only "slow" tasks wait for it. The case count is
//! `PROPTEST_CASES` (default 512 for the first property, half that for the
//! second, a quarter for the last two); a failing case shrinks to a small
//! scenario, printed with the model's expectations next to what happened.
//! On this 2-core machine, shared with other builds (load average about 10),
//! the file took 4.6-8.2 s with the defaults and 22-34 s with
//! `PROPTEST_CASES=2000` (the test binary's own "finished in" figure).
//!
//! ```sh
//! cargo test -p tests-integration --test proptest_model
//! PROPTEST_CASES=2000 cargo test -p tests-integration --test proptest_model
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, Once};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header::CONTENT_LENGTH, HeaderMap, Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use proptest::prelude::*;
use tower::{service_fn, Layer, ServiceExt};
use tower_background::{
    BackgroundBody, BackgroundHandle, BackgroundLayer, BackgroundTasks, Completion, Execution,
    Outcome, RunPolicy, ShutdownReport, Stats,
};

/// The layer's `task_timeout` when the scenario has one.
const TIMEOUT: Duration = Duration::from_millis(150);
/// How long a slow `add_blocking` closure sleeps (it outlives `TIMEOUT`).
const SLOW_BLOCKING: Duration = Duration::from_millis(400);
/// A grace long enough for every task of a scenario to end.
const LONG_GRACE: Duration = Duration::from_secs(8);
/// Bounds every wait.
const LIMIT: Duration = Duration::from_secs(20);
const PANIC_TEXT: &str = "deliberate panic from a proptest task";

// ---------------------------------------------------------------- scenario

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Add,
    Blocking,
    With,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Behave {
    Ok,
    Err,
    Panic,
    /// Outlives the timeout (or, without a timeout, takes a few ms).
    Slow,
}

#[derive(Debug, Clone)]
struct TaskSpec {
    kind: Kind,
    behave: Behave,
    /// `None`: added by the handler. `Some(p)`: added late, at checkpoint
    /// `1 + p % (checkpoints - 1)` (after the response, after a poll, or
    /// after the body was dropped).
    late: Option<u8>,
    /// The task's own run policy (`TaskOptions::run_policy`).
    policy: Option<Policy>,
    /// A name (`TaskOptions::name`, one of two): a named task replaces the
    /// request's pending task of the same name. Used only where the model
    /// knows the earlier task is still pending in the request: adds before
    /// the server lets go of the body (or the request fails) and before any
    /// shutdown.
    name: Option<bool>,
}

/// A run policy (`RunPolicy`), restated from its docs for the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Policy {
    /// Runs after a 1xx, 2xx or 3xx status (the layer's default).
    OnSuccess,
    Always,
    /// Runs when the body was delivered whole (`Finished` or `NoBody`).
    OnDelivery,
}

impl Policy {
    fn allows(self, status: StatusCode, outcome: Outcome) -> bool {
        match self {
            Policy::OnSuccess => status.as_u16() < 400,
            Policy::Always => true,
            Policy::OnDelivery => matches!(outcome, Outcome::Finished | Outcome::NoBody),
        }
    }

    fn of_layer(self) -> RunPolicy {
        match self {
            Policy::OnSuccess => RunPolicy::OnSuccess,
            Policy::Always => RunPolicy::Always,
            Policy::OnDelivery => RunPolicy::OnDelivery,
        }
    }
}

fn policy() -> impl Strategy<Value = Policy> {
    prop_oneof![
        Just(Policy::OnSuccess),
        Just(Policy::Always),
        Just(Policy::OnDelivery),
    ]
}

/// What the scripted body yields after its data frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Nothing: `None` after the data.
    Clean,
    /// A trailers frame after the data, then `None`.
    Trailers,
    /// An error frame after the data.
    Error,
}

/// One frame of the script.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Piece {
    /// A data frame of one byte.
    Data,
    Trailers,
    Error,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Ok,
    ServerError,
    /// 103 Early Hints, an informational status.
    EarlyHints,
    NoContent,
    NotModified,
}

impl Status {
    fn code(self) -> StatusCode {
        match self {
            Status::Ok => StatusCode::OK,
            Status::ServerError => StatusCode::INTERNAL_SERVER_ERROR,
            Status::EarlyHints => StatusCode::from_u16(103).unwrap(),
            Status::NoContent => StatusCode::NO_CONTENT,
            Status::NotModified => StatusCode::NOT_MODIFIED,
        }
    }
}

#[derive(Debug, Clone)]
enum Reply {
    /// The handler answers with a scripted body.
    Body {
        /// Data frames (one byte each).
        data: u8,
        end: End,
        /// The body reports `is_end_stream()` once it has no frame left
        /// (so also before any poll when it has no frame at all).
        eos_hint: bool,
        /// The body reports an exact `size_hint` (its data bytes left).
        exact: bool,
        /// The response carries `Content-Length: data`.
        content_length: bool,
        /// The driver polls at most this many times, then drops the body
        /// (`Some(0)`: never polled). `None`: polls to the end.
        polls: Option<u8>,
        /// A naive driver: it keeps polling a body that reports
        /// `is_end_stream()`, and polls once more after `None`; otherwise it
        /// stops at either, like hyper.
        ignore_eos: bool,
        status: Status,
        /// The request is a `HEAD` request.
        head: bool,
    },
    /// The inner service returns `Err`.
    ServiceError,
    /// The response future is polled once (the handler adds its tasks) and
    /// dropped before it has a response.
    FutureDropped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grace {
    Zero,
    Long,
}

#[derive(Debug, Clone)]
struct Scenario {
    execution: Execution,
    run_on_abort: bool,
    timeout: bool,
    limit: Option<u8>,
    reply: Reply,
    tasks: Vec<TaskSpec>,
    /// Checkpoint `s % checkpoints` (0 is before the request).
    shutdown: Option<(u8, Grace)>,
    /// Yield to the runtime at every checkpoint (lets started tasks run, so
    /// that one started too early is seen).
    yields: bool,
    /// A multi-thread runtime (two workers) instead of a current-thread one.
    multi_thread: bool,
    /// Late adds and the drop of the body happen on a thread outside the
    /// runtime (semantics row 9).
    off_runtime: bool,
    /// The layer's run policy; `None`: the default (`OnSuccess`).
    policy: Option<Policy>,
    /// `max_tasks_per_request`; used only where the model is sure of it
    /// (a response, no names, no shutdown).
    per_request: Option<u8>,
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![Just(Kind::Add), Just(Kind::Blocking), Just(Kind::With)]
}

fn behave() -> impl Strategy<Value = Behave> {
    prop_oneof![
        5 => Just(Behave::Ok),
        2 => Just(Behave::Err),
        2 => Just(Behave::Panic),
        1 => Just(Behave::Slow),
    ]
}

fn task() -> impl Strategy<Value = TaskSpec> {
    (
        kind(),
        behave(),
        prop::option::weighted(0.35, any::<u8>()),
        prop::option::weighted(0.15, policy()),
        prop::option::weighted(0.25, any::<bool>()),
    )
        .prop_map(|(kind, behave, late, policy, name)| TaskSpec {
            kind,
            behave,
            late,
            policy,
            name,
        })
}

fn status() -> impl Strategy<Value = Status> {
    prop_oneof![
        6 => Just(Status::Ok),
        2 => Just(Status::ServerError),
        1 => Just(Status::EarlyHints),
        1 => Just(Status::NoContent),
        1 => Just(Status::NotModified),
    ]
}

fn reply() -> impl Strategy<Value = Reply> {
    let end = prop_oneof![
        3 => Just(End::Clean),
        1 => Just(End::Trailers),
        1 => Just(End::Error),
    ];
    // Never polled is a case of its own (semantics rows 1 and 4).
    let polls = prop::option::weighted(0.45, prop_oneof![1 => Just(0u8), 3 => 0u8..5]);
    let body = (
        0u8..5,
        end,
        any::<bool>(),
        any::<bool>(),
        prop::bool::weighted(0.3),
        polls,
        prop::bool::weighted(0.2),
        status(),
        prop::bool::weighted(0.15),
    )
        .prop_map(
            |(data, end, eos_hint, exact, content_length, polls, ignore_eos, status, head)| {
                Reply::Body {
                    data,
                    end,
                    eos_hint,
                    exact,
                    content_length,
                    polls,
                    ignore_eos,
                    status,
                    head,
                }
            },
        );
    prop_oneof![
        8 => body,
        1 => Just(Reply::ServiceError),
        1 => Just(Reply::FutureDropped),
    ]
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        prop_oneof![Just(Execution::Sequential), Just(Execution::Concurrent)],
        any::<bool>(),
        any::<bool>(),
        prop::option::weighted(0.2, 1u8..3),
        reply(),
        prop::collection::vec(task(), 0..7),
        prop::option::weighted(
            0.4,
            (
                any::<u8>(),
                prop_oneof![Just(Grace::Zero), Just(Grace::Long)],
            ),
        ),
        any::<bool>(),
        any::<bool>(),
        prop::bool::weighted(0.25),
        (
            prop::option::weighted(0.5, policy()),
            prop::option::weighted(0.2, 1u8..4),
        ),
    )
        .prop_map(
            |(
                execution,
                run_on_abort,
                timeout,
                limit,
                reply,
                tasks,
                shutdown,
                yields,
                multi_thread,
                off_runtime,
                (policy, per_request),
            )| Scenario {
                execution,
                run_on_abort,
                timeout,
                limit,
                reply,
                tasks,
                shutdown,
                yields,
                multi_thread,
                off_runtime,
                policy,
                per_request,
            },
        )
}

// ---------------------------------------------------------------- the model

/// When something happens: a checkpoint, then a step within it
/// (0 handler adds, 1 the server lets go of the ended body, 2 late adds,
/// 3 shutdown).
type Key = (usize, u8);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Runs, and ends like its behaviour says.
    Runs,
    /// Runnable before a zero-grace shutdown: runs or is cancelled.
    Racy,
    Discarded,
    /// Its run policy does not allow it for this response.
    Skipped,
    /// Added beyond `max_tasks_per_request`.
    Refused,
    /// A later task of the same name replaced it while it was pending.
    Replaced,
    Cancelled,
}

fn script(data: u8, end: End) -> Vec<Piece> {
    let mut frames = vec![Piece::Data; data as usize];
    match end {
        End::Clean => {}
        End::Trailers => frames.push(Piece::Trailers),
        End::Error => frames.push(Piece::Error),
    }
    frames
}

/// What the response said about its body before anyone polled it.
#[derive(Debug, Clone, Copy)]
struct Declared {
    head: bool,
    status: StatusCode,
    /// `size_hint().exact()` of the body as the handler returned it.
    exact_len: Option<u64>,
    /// The `Content-Length` header.
    content_length: Option<u64>,
    /// `is_end_stream()` of the body as the handler returned it.
    end_stream: bool,
}

/// What the body handed out, one entry per frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handed {
    /// A data frame; whether the body reported `is_end_stream()` right after.
    Data {
        end_stream_after: bool,
    },
    Trailers,
    Error,
}

/// What the driver did with the scripted body, step by step.
#[derive(Debug)]
struct History {
    handed: Vec<Handed>,
    /// A poll returned `None`.
    got_none: bool,
    polls: usize,
    /// The checkpoint at which the server lets go of the ended body (the
    /// tasks start there): the first poll made after the body's end, or
    /// else the drop.
    let_go_cp: usize,
}

/// Simulates the driver on the script: it stops after `limit` polls, at an
/// error, and at `None` and when the body reports `is_end_stream()` (unless
/// `ignore_eos`: then it stops at the second `None`). Checkpoint `1 + j`
/// follows poll `j`; `2 + polls` follows the drop.
fn simulate(frames: &[Piece], eos_hint: bool, ignore_eos: bool, limit: Option<u8>) -> History {
    let mut idx = 0;
    let mut h = History {
        handed: Vec::new(),
        got_none: false,
        polls: 0,
        let_go_cp: 0,
    };
    // The body has ended (`None`, trailers, or data after which it reports
    // its end; the driver stops at an error).
    let mut ended = false;
    let mut let_go = None;
    let mut nones = 0;
    loop {
        if limit.is_some_and(|l| h.polls == l as usize) {
            break;
        }
        let end_stream = eos_hint && idx == frames.len();
        if end_stream && !ignore_eos {
            break;
        }
        h.polls += 1;
        let cp = 1 + h.polls;
        if ended {
            // Polled again after its end.
            let_go.get_or_insert(cp);
        }
        let Some(&piece) = frames.get(idx) else {
            h.got_none = true;
            ended = true;
            nones += 1;
            if !ignore_eos || nones == 2 {
                break;
            }
            continue;
        };
        idx += 1;
        match piece {
            Piece::Data => {
                let end_stream_after = eos_hint && idx == frames.len();
                h.handed.push(Handed::Data { end_stream_after });
                ended |= end_stream_after;
            }
            Piece::Trailers => {
                h.handed.push(Handed::Trailers);
                ended = true;
            }
            Piece::Error => {
                h.handed.push(Handed::Error);
                break;
            }
        }
    }
    h.let_go_cp = let_go.unwrap_or(2 + h.polls);
    h
}

/// How the response ended, from what the body handed out and what the
/// server did with it (the contract's words, semantics rows 1 and 4).
fn outcome_of(d: &Declared, h: &History) -> Outcome {
    if h.polls == 0 {
        // Dropped without ever being polled: `NoBody` only when the
        // response had nothing to send.
        let nothing_to_send = d.head
            || d.status.is_informational()
            || d.status == StatusCode::NO_CONTENT
            || d.status == StatusCode::NOT_MODIFIED
            || d.exact_len == Some(0)
            || d.end_stream;
        return if nothing_to_send {
            Outcome::NoBody
        } else {
            Outcome::Aborted
        };
    }
    // The first frame that ends the body decides.
    for piece in &h.handed {
        match piece {
            Handed::Error => return Outcome::BodyError,
            Handed::Trailers => return Outcome::Finished,
            Handed::Data {
                end_stream_after: true,
            } => return Outcome::Finished,
            Handed::Data { .. } => {}
        }
    }
    if h.got_none {
        return Outcome::Finished;
    }
    // Dropped before its end: finished only if it had handed over exactly
    // the length it declared.
    let bytes = h
        .handed
        .iter()
        .filter(|p| matches!(p, Handed::Data { .. }))
        .count() as u64;
    if d.exact_len.or(d.content_length) == Some(bytes) {
        Outcome::Finished
    } else {
        Outcome::Aborted
    }
}

#[derive(Debug)]
struct Model {
    /// The name each task is added with.
    names: Vec<Option<bool>>,
    /// The layer's `max_tasks_per_request`.
    per_request: Option<u8>,
    /// Number of body polls the driver makes.
    polls: usize,
    /// Shown in failure reports.
    #[allow(dead_code)]
    checkpoints: usize,
    /// The checkpoint at which the tasks may start (shown in reports).
    #[allow(dead_code)]
    let_go_cp: Option<usize>,
    /// The checkpoint of each task's add (handler adds: 1).
    add_cp: Vec<usize>,
    /// The shutdown checkpoint.
    shutdown_cp: Option<usize>,
    /// How the response ended, when there is one.
    completion: Option<(StatusCode, Outcome)>,
    fates: Vec<Fate>,
    /// Tasks that run (or may run), in the order they would start.
    run_order: Vec<usize>,
    racy: bool,
}

impl Model {
    fn new(s: &Scenario) -> Model {
        let (polls, let_go_cp, completion) = match &s.reply {
            Reply::Body {
                data,
                end,
                eos_hint,
                exact,
                content_length,
                polls,
                ignore_eos,
                status,
                head,
            } => {
                let frames = script(*data, *end);
                let declared = Declared {
                    head: *head,
                    status: status.code(),
                    exact_len: exact.then_some(*data as u64),
                    content_length: content_length.then_some(*data as u64),
                    end_stream: *eos_hint && frames.is_empty(),
                };
                let h = simulate(&frames, *eos_hint, *ignore_eos, *polls);
                let outcome = outcome_of(&declared, &h);
                (h.polls, Some(h.let_go_cp), Some((status.code(), outcome)))
            }
            Reply::ServiceError | Reply::FutureDropped => (0, None, None),
        };
        // cp 0: before the request; 1: after the response; 1 + j: after poll
        // j; 2 + polls: after the body was dropped.
        let checkpoints = 3 + polls;
        let add_cp: Vec<usize> = s
            .tasks
            .iter()
            .map(|t| match t.late {
                None => 1,
                Some(p) => 1 + p as usize % (checkpoints - 1),
            })
            .collect();
        let shutdown_cp = s.shutdown.map(|(p, _)| p as usize % checkpoints);
        let shutdown_key: Key = shutdown_cp.map_or((usize::MAX, 0), |cp| (cp, 3));
        let zero_grace = matches!(s.shutdown, Some((_, Grace::Zero)));

        // Where a task's name counts: added while the request still holds
        // its tasks (before the server lets go of the body, or before the
        // inner service fails) and before any shutdown.
        let held_until: Key = let_go_cp.map_or((1, 1), |cp| (cp, 1)).min(shutdown_key);
        let key_of =
            |i: usize| -> Key { (add_cp[i], if s.tasks[i].late.is_some() { 2 } else { 0 }) };
        let names: Vec<Option<bool>> = (0..s.tasks.len())
            .map(|i| s.tasks[i].name.filter(|_| key_of(i) < held_until))
            .collect();
        let per_request = s.per_request.filter(|_| {
            completion.is_some() && s.shutdown.is_none() && names.iter().all(Option::is_none)
        });
        let mut fates = Vec::new();
        for (i, t) in s.tasks.iter().enumerate() {
            let add: Key = (add_cp[i], if t.late.is_some() { 2 } else { 0 });
            let replaced = names[i].is_some()
                && (0..s.tasks.len())
                    .any(|j| names[j] == names[i] && (key_of(j), j) > (key_of(i), i));
            let before = (0..s.tasks.len())
                .filter(|&j| (key_of(j), j) < (key_of(i), i))
                .count();
            let fate = if per_request.is_some_and(|cap| before >= cap as usize) {
                Fate::Refused
            } else if replaced {
                Fate::Replaced
            } else if shutdown_key < add {
                Fate::Cancelled
            } else {
                match (completion, let_go_cp) {
                    (Some((status, outcome)), Some(let_go)) => {
                        let start = add.max((let_go, 1));
                        let policy = t.policy.or(s.policy).unwrap_or(Policy::OnSuccess);
                        if shutdown_key < start {
                            Fate::Cancelled
                        } else if t.kind != Kind::With && !policy.allows(status, outcome) {
                            Fate::Skipped
                        } else if t.kind != Kind::With && !s.run_on_abort && !outcome.is_delivered()
                        {
                            Fate::Discarded
                        } else if zero_grace {
                            Fate::Racy
                        } else {
                            Fate::Runs
                        }
                    }
                    _ => Fate::Discarded,
                }
            };
            fates.push(fate);
        }
        let mut run_order: Vec<usize> = (0..s.tasks.len())
            .filter(|&i| matches!(fates[i], Fate::Runs | Fate::Racy))
            .collect();
        run_order.sort_by_key(|&i| {
            let add: Key = (add_cp[i], if s.tasks[i].late.is_some() { 2 } else { 0 });
            (add, i)
        });
        let racy = fates.contains(&Fate::Racy);
        Model {
            names,
            per_request,
            polls,
            checkpoints,
            let_go_cp,
            add_cp,
            shutdown_cp,
            completion,
            fates,
            run_order,
            racy,
        }
    }

    /// What task `i` records when it starts.
    fn entry(&self, s: &Scenario, i: usize) -> String {
        match (s.tasks[i].kind, self.completion) {
            (Kind::With, Some((status, outcome))) => {
                format!("t{i}:{outcome:?}:{}", status.as_u16())
            }
            _ => format!("t{i}"),
        }
    }

    /// The bucket task `i` ends in if it runs to its end.
    fn bucket(s: &Scenario, i: usize) -> usize {
        match s.tasks[i].behave {
            Behave::Ok => 0,
            Behave::Err => 1,
            Behave::Panic => 2,
            Behave::Slow if s.timeout => 3,
            Behave::Slow => 0,
        }
    }
}

fn buckets(stats: &Stats) -> [u64; 4] {
    [
        stats.completed,
        stats.failed,
        stats.panicked,
        stats.timed_out,
    ]
}

// ---------------------------------------------------------------- probes

/// What the tasks of one request record.
#[derive(Default)]
struct Probe {
    /// Set by the harness right before it drops the body or polls it again
    /// after its end.
    let_go: AtomicBool,
    /// Every task's entry, in the order they started.
    entered: Mutex<Vec<String>>,
    /// Contract violations seen from inside the tasks.
    faults: Mutex<Vec<String>>,
    /// Set once a `shutdown` call has returned: from then on no task may
    /// start (pending ones are dropped without running, later ones are
    /// cancelled).
    closed: AtomicBool,
}

impl Probe {
    /// Called first thing by every task. `exact_close`: the task can tell
    /// exactly whether it started after `shutdown` returned. That holds for
    /// an async task on a current-thread runtime, which cannot start while
    /// the test's own future is running `shutdown`. Elsewhere a task that the
    /// layer started just before the close may reach its first line just
    /// after it, which is allowed.
    fn enter(&self, entry: String, exact_close: bool) {
        if !self.let_go.load(SeqCst) {
            self.fault(format!(
                "{entry} started before the server let go of the body"
            ));
        }
        if exact_close && self.closed.load(SeqCst) {
            self.fault(format!("{entry} started after shutdown returned"));
        }
        self.entered.lock().unwrap().push(entry);
    }

    fn fault(&self, fault: String) {
        self.faults.lock().unwrap().push(fault);
    }
}

/// How many tasks of a layer run at once, measured by the tasks.
#[derive(Default)]
struct Gauge {
    running: AtomicUsize,
    peak: AtomicUsize,
    /// Tasks handed to the layer (the concurrency property counts them,
    /// since a dropped runtime may stop a handler before its adds).
    added: AtomicUsize,
}

/// A task's slot in the [`Gauge`], given back when the task's future (or
/// closure) ends, panics or is dropped.
struct Held(Arc<Gauge>);

impl Gauge {
    fn hold(self: &Arc<Self>) -> Held {
        let now = self.running.fetch_add(1, SeqCst) + 1;
        self.peak.fetch_max(now, SeqCst);
        Held(Arc::clone(self))
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, SeqCst);
    }
}

// ---------------------------------------------------------------- the body

/// A body whose frames are scripted; the driver decides how far it is polled.
struct ScriptBody {
    frames: std::collections::VecDeque<Piece>,
    eos_hint: bool,
    exact: bool,
    data_left: u64,
}

impl ScriptBody {
    fn new(frames: Vec<Piece>, eos_hint: bool, exact: bool) -> Self {
        let data_left = frames.iter().filter(|p| **p == Piece::Data).count() as u64;
        ScriptBody {
            frames: frames.into(),
            eos_hint,
            exact,
            data_left,
        }
    }
}

impl Body for ScriptBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let Some(piece) = self.frames.pop_front() else {
            return Poll::Ready(None);
        };
        Poll::Ready(Some(match piece {
            Piece::Data => {
                self.data_left -= 1;
                Ok(Frame::data(Bytes::from_static(b"x")))
            }
            Piece::Trailers => {
                let mut trailers = HeaderMap::new();
                trailers.insert("x-checksum", "1".parse().unwrap());
                Ok(Frame::trailers(trailers))
            }
            Piece::Error => Err(std::io::Error::other("scripted body error")),
        }))
    }

    fn is_end_stream(&self) -> bool {
        self.eos_hint && self.frames.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        if self.exact {
            SizeHint::with_exact(self.data_left)
        } else {
            SizeHint::default()
        }
    }
}

// ---------------------------------------------------------------- the driver

fn add_task(
    tasks: &BackgroundTasks,
    s: &Scenario,
    i: usize,
    probe: &Arc<Probe>,
    gauge: &Arc<Gauge>,
) {
    let spec = s.tasks[i].clone();
    let probe = Arc::clone(probe);
    let gauge = Arc::clone(gauge);
    let slow_async = if s.timeout {
        Duration::from_secs(3600)
    } else {
        Duration::from_millis(3)
    };
    let slow_blocking = if s.timeout {
        SLOW_BLOCKING
    } else {
        Duration::from_millis(3)
    };
    // A blocking closure past its deadline is counted and left to finish:
    // what it does afterwards is not a task of the layer running.
    let gauged = !(s.timeout && spec.kind == Kind::Blocking && spec.behave == Behave::Slow);
    let exact_close = !s.multi_thread;
    let name = format!("t{i}");
    let mut options = tasks.options();
    if let Some(policy) = spec.policy {
        options = options.run_policy(policy.of_layer());
    }
    if let Some(second) = Model::new(s).names[i] {
        options = options.name(if second { "second" } else { "first" });
    }
    match spec.kind {
        Kind::Add => options.add(async move {
            probe.enter(name, exact_close);
            let _held = gauge.hold();
            run_async(spec.behave, slow_async).await
        }),
        Kind::With => options.add_with(move |done: Completion| async move {
            probe.enter(
                format!("{name}:{:?}:{}", done.outcome(), done.status().as_u16()),
                exact_close,
            );
            let _held = gauge.hold();
            run_async(spec.behave, slow_async).await
        }),
        Kind::Blocking => options.add_blocking(move || {
            probe.enter(name, false);
            let _held = gauged.then(|| gauge.hold());
            match spec.behave {
                Behave::Ok => Ok(()),
                Behave::Err => Err("deliberate error"),
                Behave::Panic => panic!("{PANIC_TEXT}"),
                Behave::Slow => {
                    std::thread::sleep(slow_blocking);
                    Ok(())
                }
            }
        }),
    }
}

async fn run_async(behave: Behave, slow: Duration) -> Result<(), &'static str> {
    match behave {
        Behave::Ok => Ok(()),
        Behave::Err => Err("deliberate error"),
        Behave::Panic => panic!("{PANIC_TEXT}"),
        Behave::Slow => {
            tokio::time::sleep(slow).await;
            Ok(())
        }
    }
}

struct Observed {
    entered: Vec<String>,
    /// Violations of the timing rule (from the tasks and from `Stats`).
    faults: Vec<String>,
    peak: usize,
    stats: Stats,
    report: Option<ShutdownReport>,
    polls: usize,
}

struct Driver<'a> {
    s: &'a Scenario,
    m: &'a Model,
    handle: BackgroundHandle,
    probe: Arc<Probe>,
    gauge: Arc<Gauge>,
    tasks: Arc<Mutex<Option<BackgroundTasks>>>,
    report: Option<ShutdownReport>,
}

impl Driver<'_> {
    async fn checkpoint(&mut self, cp: usize) {
        for i in 0..self.s.tasks.len() {
            if self.s.tasks[i].late.is_some() && self.m.add_cp[i] == cp {
                let tasks = self.tasks.lock().unwrap().clone();
                let tasks = tasks.expect("the handler ran before any late add");
                if self.s.off_runtime {
                    let (s, probe, gauge) = (self.s, &self.probe, &self.gauge);
                    std::thread::scope(|scope| {
                        scope.spawn(|| add_task(&tasks, s, i, probe, gauge));
                    });
                } else {
                    add_task(&tasks, self.s, i, &self.probe, &self.gauge);
                }
            }
        }
        if self.s.yields {
            for _ in 0..4 {
                tokio::task::yield_now().await;
            }
        }
        if !self.probe.let_go.load(SeqCst) {
            // The body is streaming, or ended but still held: nothing may
            // have started.
            let st = self.handle.stats();
            if st.running + buckets(&st).iter().sum::<u64>() > 0 {
                self.probe.fault(format!(
                    "checkpoint {cp}: a task started before the server let go of the body: {st:?}"
                ));
            }
        }
        if self.m.shutdown_cp == Some(cp) {
            let grace = match self.s.shutdown {
                Some((_, Grace::Long)) => {
                    // Waiting is pointless while the body holds the tasks back.
                    let blocked = self
                        .m
                        .fates
                        .iter()
                        .zip(&self.m.add_cp)
                        .any(|(f, &a)| *f == Fate::Cancelled && a <= cp);
                    if blocked {
                        Duration::from_millis(20)
                    } else {
                        LONG_GRACE
                    }
                }
                _ => Duration::ZERO,
            };
            let report = tokio::time::timeout(LIMIT, self.handle.shutdown(grace))
                .await
                .expect("shutdown returns");
            self.probe.closed.store(true, SeqCst);
            self.report = Some(report);
        }
    }
}

async fn drive(s: &Scenario, m: &Model) -> Observed {
    let mut layer = BackgroundLayer::new()
        .execution(s.execution)
        .run_on_abort(s.run_on_abort);
    if s.timeout {
        layer = layer.task_timeout(TIMEOUT);
    }
    if let Some(limit) = s.limit {
        layer = layer.max_concurrent_tasks(limit as usize);
    }
    if let Some(policy) = s.policy {
        layer = layer.run_policy(policy.of_layer());
    }
    if let Some(cap) = m.per_request {
        layer = layer.max_tasks_per_request(cap.into());
    }
    let probe: Arc<Probe> = Arc::default();
    let gauge: Arc<Gauge> = Arc::default();
    let slot: Arc<Mutex<Option<BackgroundTasks>>> = Arc::default();
    let mut d = Driver {
        s,
        m,
        handle: layer.handle(),
        probe: Arc::clone(&probe),
        gauge: Arc::clone(&gauge),
        tasks: Arc::clone(&slot),
        report: None,
    };

    let scenario = s.clone();
    let (handler_probe, handler_gauge) = (Arc::clone(&probe), Arc::clone(&gauge));
    let svc = layer.layer(service_fn(move |req: Request<()>| {
        let tasks = req.extensions().get::<BackgroundTasks>().unwrap().clone();
        *slot.lock().unwrap() = Some(tasks.clone());
        let s = scenario.clone();
        let (probe, gauge) = (Arc::clone(&handler_probe), Arc::clone(&handler_gauge));
        async move {
            for i in 0..s.tasks.len() {
                if s.tasks[i].late.is_none() {
                    add_task(&tasks, &s, i, &probe, &gauge);
                }
            }
            match s.reply {
                Reply::Body {
                    data,
                    end,
                    eos_hint,
                    exact,
                    content_length,
                    status,
                    ..
                } => {
                    let body = ScriptBody::new(script(data, end), eos_hint, exact);
                    let mut res = Response::new(body);
                    *res.status_mut() = status.code();
                    if content_length {
                        res.headers_mut()
                            .insert(CONTENT_LENGTH, u64::from(data).into());
                    }
                    Ok(res)
                }
                Reply::ServiceError => Err(std::io::Error::other("handler failed")),
                Reply::FutureDropped => std::future::pending().await,
            }
        }
    }));

    d.checkpoint(0).await;
    let mut polls = 0;
    match s.reply {
        Reply::Body {
            polls: limit,
            ignore_eos,
            head,
            ..
        } => {
            let method = if head { Method::HEAD } else { Method::GET };
            let req = Request::builder().method(method).body(()).unwrap();
            let res = svc.oneshot(req).await.expect("a response");
            d.checkpoint(1).await;
            let mut body: BackgroundBody<ScriptBody> = res.into_body();
            // The driver's own view: the body has ended.
            let mut ended = false;
            let mut nones = 0;
            loop {
                if limit.is_some_and(|l| polls == l as usize)
                    || (!ignore_eos && body.is_end_stream())
                {
                    break;
                }
                if ended {
                    // Polled again after its end: the server lets go.
                    probe.let_go.store(true, SeqCst);
                }
                let frame = body.frame().await;
                polls += 1;
                let stop = match &frame {
                    None => {
                        ended = true;
                        nones += 1;
                        !ignore_eos || nones == 2
                    }
                    Some(Err(_)) => true,
                    Some(Ok(f)) => {
                        ended |= f.is_trailers() || body.is_end_stream();
                        false
                    }
                };
                d.checkpoint(1 + polls).await;
                if stop {
                    break;
                }
            }
            probe.let_go.store(true, SeqCst);
            if s.off_runtime {
                std::thread::spawn(move || drop(body)).join().unwrap();
            } else {
                drop(body);
            }
            d.checkpoint(2 + polls).await;
        }
        Reply::ServiceError => {
            assert!(svc.oneshot(Request::new(())).await.is_err());
            d.checkpoint(1).await;
            d.checkpoint(2).await;
        }
        Reply::FutureDropped => {
            let mut fut = Box::pin(svc.oneshot(Request::new(())));
            std::future::poll_fn(|cx| {
                assert!(fut.as_mut().poll(cx).is_pending());
                Poll::Ready(())
            })
            .await;
            drop(fut);
            d.checkpoint(1).await;
            d.checkpoint(2).await;
        }
    }
    tokio::time::timeout(LIMIT, d.handle.wait_idle())
        .await
        .expect("wait_idle resolves once every task has ended");
    let entered = probe.entered.lock().unwrap().clone();
    let faults = probe.faults.lock().unwrap().clone();
    Observed {
        entered,
        faults,
        peak: gauge.peak.load(SeqCst),
        stats: d.handle.stats(),
        report: d.report,
        polls,
    }
}

fn silence_deliberate_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let text = info
                .payload()
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| info.payload().downcast_ref::<&str>().copied())
                .unwrap_or("");
            if !text.contains(PANIC_TEXT) {
                default(info);
            }
        }));
    });
}

fn runtime(multi_thread: bool) -> tokio::runtime::Runtime {
    if multi_thread {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    }
    .unwrap()
}

fn run_case(s: &Scenario) -> Result<(), TestCaseError> {
    silence_deliberate_panics();
    let m = Model::new(s);
    let rt = runtime(s.multi_thread);
    let o = rt.block_on(drive(s, &m));
    rt.shutdown_background();
    let ctx = format!(
        "\nmodel: {m:?}\nentered: {:?}\nfaults: {:?}\npeak: {}\nstats: {:?}\nreport: {:?}",
        o.entered, o.faults, o.peak, o.stats, o.report
    );
    check(s, &m, &o).map_err(|e| TestCaseError::fail(format!("{e}{ctx}")))
}

fn check(s: &Scenario, m: &Model, o: &Observed) -> Result<(), TestCaseError> {
    let n = s.tasks.len() as u64;
    let st = &o.stats;
    prop_assert_eq!(o.polls, m.polls, "the driver polled as the model simulated");
    prop_assert!(
        o.faults.is_empty(),
        "no task starts before the server lets go of its ended body"
    );
    if let Some(limit) = s.limit {
        prop_assert!(
            o.peak <= limit as usize,
            "max_concurrent_tasks({}) exceeded: {} at once",
            limit,
            o.peak
        );
    }
    prop_assert_eq!((st.pending, st.running), (0, 0), "idle at the end");
    prop_assert_eq!(st.total(), n, "every task is counted exactly once");
    let expect_count = |f: Fate| m.fates.iter().filter(|&&x| x == f).count() as u64;
    prop_assert_eq!(st.discarded, expect_count(Fate::Discarded), "discarded");
    prop_assert_eq!(st.skipped, expect_count(Fate::Skipped), "skipped");
    prop_assert_eq!(st.replaced, expect_count(Fate::Replaced), "replaced");
    prop_assert_eq!(st.refused, expect_count(Fate::Refused), "refused");

    // No task entered twice, and only tasks that may run entered.
    let mut seen = std::collections::HashSet::new();
    for e in &o.entered {
        prop_assert!(seen.insert(e.clone()), "task entered twice: {}", e);
    }
    let expected: Vec<String> = m.run_order.iter().map(|&i| m.entry(s, i)).collect();
    let bucket_of = |entry: &str| {
        let i = m.run_order[expected.iter().position(|x| x == entry).unwrap()];
        Model::bucket(s, i)
    };
    for e in &o.entered {
        prop_assert!(
            expected.contains(e),
            "{} entered but the model says it must not run (or wrong completion)",
            e
        );
    }
    // Tasks added after the shutdown (at a later checkpoint) are cancelled
    // after the report was made.
    let late_after_shutdown = (0..s.tasks.len())
        .filter(|&i| {
            let add: Key = (m.add_cp[i], if s.tasks[i].late.is_some() { 2 } else { 0 });
            m.shutdown_cp.is_some_and(|cp| add > (cp, 3))
        })
        .count() as u64;

    // With `task_timeout`, a blocking closure's deadline runs from when it is
    // handed to tokio's blocking pool: on a loaded machine even a quick one
    // may wait there past its deadline, and is then counted as timed out,
    // having started late or not at all.
    let flexible = |i: usize| s.timeout && s.tasks[i].kind == Kind::Blocking;
    let unstarted: Vec<usize> = m
        .run_order
        .iter()
        .copied()
        .filter(|&i| flexible(i) && !o.entered.contains(&m.entry(s, i)))
        .collect();
    let started: Vec<String> = m
        .run_order
        .iter()
        .filter(|i| !unstarted.contains(i))
        .map(|&i| m.entry(s, i))
        .collect();

    if !m.racy {
        // Deterministic: exact order (sequential) or set (concurrent).
        if s.execution == Execution::Sequential {
            prop_assert_eq!(&o.entered, &started, "sequential run order");
        } else {
            let mut a = o.entered.clone();
            let mut b = started.clone();
            a.sort();
            b.sort();
            prop_assert_eq!(a, b, "concurrent: the tasks that ran");
        }
        // Each task's bucket; a flexible one may be timed out instead.
        let (mut least, mut most) = ([0u64; 4], [0u64; 4]);
        for &i in &m.run_order {
            let b = Model::bucket(s, i);
            if flexible(i) && b != 3 {
                most[b] += 1;
                most[3] += 1;
            } else {
                least[b] += 1;
                most[b] += 1;
            }
        }
        let got = buckets(st);
        prop_assert_eq!(
            got.iter().sum::<u64>(),
            m.run_order.len() as u64,
            "every task that runs ends in completed/failed/panicked/timed_out"
        );
        for b in 0..4 {
            prop_assert!(
                least[b] <= got[b] && got[b] <= most[b],
                "completed/failed/panicked/timed_out: {:?}, between {:?} and {:?}",
                got,
                least,
                most
            );
        }
        prop_assert_eq!(st.cancelled, expect_count(Fate::Cancelled), "cancelled");
    } else {
        // A zero-grace shutdown raced the tasks: what ran is consistent.
        let ended: u64 = buckets(st).iter().sum();
        prop_assert!(
            ended <= (o.entered.len() + unstarted.len()) as u64,
            "ended tasks had started"
        );
        prop_assert_eq!(
            st.cancelled,
            n - ended - st.discarded - st.skipped - st.replaced - st.refused,
            "the rest is cancelled"
        );
        if s.execution == Execution::Sequential {
            prop_assert!(
                started.starts_with(&o.entered),
                "sequential: the tasks that ran are a prefix of the order"
            );
        }
        if s.execution == Execution::Sequential && !m.run_order.iter().any(|&i| flexible(i)) {
            prop_assert!(
                o.entered.len() as u64 <= ended + 1,
                "sequential: at most one task was cut off by the shutdown"
            );
            let mut want = [0u64; 4];
            for e in o.entered.iter().take(ended as usize) {
                want[bucket_of(e)] += 1;
            }
            prop_assert_eq!(buckets(st), want, "buckets of the tasks that ended");
        } else {
            let mut most = [0u64; 4];
            for e in &o.entered {
                most[bucket_of(e)] += 1;
            }
            most[3] += m.run_order.iter().filter(|&&i| flexible(i)).count() as u64;
            for (got, max) in buckets(st).iter().zip(most) {
                prop_assert!(*got <= max, "a bucket counts a task that never started");
            }
        }
    }
    if let Some(report) = &o.report {
        prop_assert_eq!(
            report.cancelled,
            st.cancelled - late_after_shutdown,
            "the report counts what the shutdown cancelled"
        );
        prop_assert!(report.completed <= st.completed);
    } else {
        prop_assert!(m.shutdown_cp.is_none());
    }
    Ok(())
}

// ------------------------------------- several requests under a task limit

/// What a task of the concurrency property does while it holds its slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Work {
    /// Yields a few times (async) and returns `Ok`.
    Ok,
    Err,
    Panic,
    /// Sleeps this many milliseconds, then returns `Ok`.
    Sleep(u8),
}

/// How the "server" treats a request of the concurrency property.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    /// A body of this many data frames, read to `None` (`Finished`).
    Read(u8),
    /// A body of `frames` data frames, dropped after `after` of them
    /// (`Aborted`).
    Cut { frames: u8, after: u8 },
    /// A body of two data frames, never polled: a `HEAD` request (`NoBody`)
    /// or a `GET` (`Aborted`).
    Unpolled { head: bool },
    /// The inner service fails (every task is discarded).
    ServiceError,
}

impl Plan {
    /// How the response ends, by the contract.
    fn outcome(self) -> Option<Outcome> {
        match self {
            Plan::Read(_) => Some(Outcome::Finished),
            Plan::Cut { .. } => Some(Outcome::Aborted),
            Plan::Unpolled { head: true } => Some(Outcome::NoBody),
            Plan::Unpolled { head: false } => Some(Outcome::Aborted),
            Plan::ServiceError => None,
        }
    }

    fn frames(self) -> u8 {
        match self {
            Plan::Read(frames) | Plan::Cut { frames, .. } => frames,
            Plan::Unpolled { .. } => 2,
            Plan::ServiceError => 0,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct LoadTask {
    kind: Kind,
    work: Work,
    /// Added from a future the handler spawns with a clone of the queue, a
    /// few yields later (before or after the body's end).
    late: bool,
}

#[derive(Debug, Clone)]
struct LoadRequest {
    plan: Plan,
    /// The response is a 500 (else a 200).
    server_error: bool,
    tasks: Vec<LoadTask>,
}

#[derive(Debug, Clone)]
struct Load {
    limit: u8,
    execution: Execution,
    run_on_abort: bool,
    multi_thread: bool,
    requests: Vec<LoadRequest>,
    /// A `shutdown` after this many yields, while the requests are in
    /// flight.
    shutdown: Option<(u8, Grace)>,
    /// The layer's run policy; `None`: the default (`OnSuccess`).
    policy: Option<Policy>,
}

fn work() -> impl Strategy<Value = Work> {
    prop_oneof![
        5 => Just(Work::Ok),
        1 => Just(Work::Err),
        1 => Just(Work::Panic),
        2 => (1u8..4).prop_map(Work::Sleep),
    ]
}

fn plan() -> impl Strategy<Value = Plan> {
    prop_oneof![
        5 => (0u8..4).prop_map(Plan::Read),
        2 => (1u8..4).prop_flat_map(|frames| (0..frames).prop_map(move |after| Plan::Cut { frames, after })),
        2 => any::<bool>().prop_map(|head| Plan::Unpolled { head }),
        1 => Just(Plan::ServiceError),
    ]
}

fn load() -> impl Strategy<Value = Load> {
    let task = (kind(), work(), prop::bool::weighted(0.25))
        .prop_map(|(kind, work, late)| LoadTask { kind, work, late });
    let request = (
        plan(),
        prop::bool::weighted(0.2),
        prop::collection::vec(task, 0..6),
    )
        .prop_map(|(plan, server_error, tasks)| LoadRequest {
            plan,
            server_error,
            tasks,
        });
    (
        1u8..4,
        prop_oneof![Just(Execution::Sequential), Just(Execution::Concurrent)],
        any::<bool>(),
        any::<bool>(),
        prop::collection::vec(request, 1..=4),
        prop::option::weighted(
            0.25,
            (0u8..40, prop_oneof![Just(Grace::Zero), Just(Grace::Long)]),
        ),
        prop::option::weighted(0.5, policy()),
    )
        .prop_map(
            |(limit, execution, run_on_abort, multi_thread, requests, shutdown, policy)| Load {
                limit,
                execution,
                run_on_abort,
                multi_thread,
                requests,
                shutdown,
                policy,
            },
        )
}

/// What becomes of a task of `kind` of request `request` (no shutdown).
fn load_fate(l: &Load, request: &LoadRequest, kind: Kind) -> Fate {
    let Some(outcome) = request.plan.outcome() else {
        return Fate::Discarded;
    };
    let status = if request.server_error {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::OK
    };
    let policy = l.policy.unwrap_or(Policy::OnSuccess);
    if kind == Kind::With {
        Fate::Runs
    } else if !policy.allows(status, outcome) {
        Fate::Skipped
    } else if !l.run_on_abort && !outcome.is_delivered() {
        Fate::Discarded
    } else {
        Fate::Runs
    }
}

fn add_load_task(
    tasks: &BackgroundTasks,
    name: String,
    task: LoadTask,
    expected: Option<Outcome>,
    probe: &Arc<Probe>,
    gauge: &Arc<Gauge>,
    exact_close: bool,
) {
    gauge.added.fetch_add(1, SeqCst);
    let probe = Arc::clone(probe);
    let gauge = Arc::clone(gauge);
    let work = task.work;
    match task.kind {
        Kind::Add => tasks.add(async move {
            probe.enter(name, exact_close);
            let _held = gauge.hold();
            load_async(work).await
        }),
        Kind::With => tasks.add_with(move |done: Completion| async move {
            if Some(done.outcome()) != expected {
                probe.fault(format!("{name} saw {:?}", done.outcome()));
            }
            probe.enter(name, exact_close);
            let _held = gauge.hold();
            load_async(work).await
        }),
        Kind::Blocking => tasks.add_blocking(move || {
            probe.enter(name, false);
            let _held = gauge.hold();
            match work {
                Work::Ok => {
                    std::thread::yield_now();
                    Ok(())
                }
                Work::Err => Err("deliberate error"),
                Work::Panic => panic!("{PANIC_TEXT}"),
                Work::Sleep(ms) => {
                    std::thread::sleep(Duration::from_millis(ms.into()));
                    Ok(())
                }
            }
        }),
    }
}

async fn load_async(work: Work) -> Result<(), &'static str> {
    for _ in 0..3 {
        tokio::task::yield_now().await;
    }
    match work {
        Work::Ok => Ok(()),
        Work::Err => Err("deliberate error"),
        Work::Panic => panic!("{PANIC_TEXT}"),
        Work::Sleep(ms) => {
            tokio::time::sleep(Duration::from_millis(ms.into())).await;
            Ok(())
        }
    }
}

struct LoadObserved {
    /// Per request: the entries of the tasks that started.
    entered: Vec<Vec<String>>,
    faults: Vec<String>,
    peak: usize,
    /// Tasks still holding a slot after `wait_idle`.
    holding: usize,
    stats: Stats,
    report: Option<ShutdownReport>,
}

type Spawned = Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>;

/// A concurrency case under way: the requests, late adders and shutdown
/// are spawned on the current runtime.
struct InFlight {
    handle: BackgroundHandle,
    probes: Arc<Vec<Arc<Probe>>>,
    gauge: Arc<Gauge>,
    set: tokio::task::JoinSet<()>,
    adders: Spawned,
    shutdown: Option<tokio::task::JoinHandle<ShutdownReport>>,
}

fn start_load(l: &Load) -> InFlight {
    let mut layer = BackgroundLayer::new()
        .execution(l.execution)
        .run_on_abort(l.run_on_abort)
        .max_concurrent_tasks(l.limit as usize);
    if let Some(policy) = l.policy {
        layer = layer.run_policy(policy.of_layer());
    }
    let handle = layer.handle();
    let probes: Arc<Vec<Arc<Probe>>> =
        Arc::new(l.requests.iter().map(|_| Arc::default()).collect());
    let gauge: Arc<Gauge> = Arc::default();
    // The handlers' late adders: joined before `wait_idle`.
    let adders: Spawned = Arc::default();

    let requests = Arc::new(l.requests.clone());
    let (handler_probes, handler_gauge) = (Arc::clone(&probes), Arc::clone(&gauge));
    let handler_adders = Arc::clone(&adders);
    let exact_close = !l.multi_thread;
    let svc = layer.layer(service_fn(move |req: Request<()>| {
        let tasks = req.extensions().get::<BackgroundTasks>().unwrap().clone();
        let r: usize = req.uri().path()[1..].parse().unwrap();
        let request = requests[r].clone();
        let probe = Arc::clone(&handler_probes[r]);
        let gauge = Arc::clone(&handler_gauge);
        let adders = Arc::clone(&handler_adders);
        async move {
            let expected = request.plan.outcome();
            for (i, &task) in request.tasks.iter().enumerate() {
                if !task.late {
                    add_load_task(
                        &tasks,
                        format!("r{r}t{i}"),
                        task,
                        expected,
                        &probe,
                        &gauge,
                        exact_close,
                    );
                }
            }
            if request.tasks.iter().any(|t| t.late) {
                let (request, probe, gauge) =
                    (request.clone(), Arc::clone(&probe), Arc::clone(&gauge));
                let adder = tokio::spawn(async move {
                    for _ in 0..=r {
                        tokio::task::yield_now().await;
                    }
                    for (i, &task) in request.tasks.iter().enumerate() {
                        if task.late {
                            add_load_task(
                                &tasks,
                                format!("r{r}t{i}"),
                                task,
                                expected,
                                &probe,
                                &gauge,
                                exact_close,
                            );
                        }
                    }
                });
                adders.lock().unwrap().push(adder);
            }
            tokio::task::yield_now().await;
            if request.plan == Plan::ServiceError {
                return Err(std::io::Error::other("handler failed"));
            }
            let frames = vec![Piece::Data; request.plan.frames().into()];
            let mut res = Response::new(ScriptBody::new(frames, false, false));
            if request.server_error {
                *res.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            }
            Ok(res)
        }
    }));

    let shutdown = l.shutdown.map(|(yields, grace)| {
        let (handle, probes) = (handle.clone(), Arc::clone(&probes));
        tokio::spawn(async move {
            for _ in 0..yields {
                tokio::task::yield_now().await;
            }
            let grace = match grace {
                Grace::Zero => Duration::ZERO,
                Grace::Long => LONG_GRACE,
            };
            let report = handle.shutdown(grace).await;
            for probe in probes.iter() {
                probe.closed.store(true, SeqCst);
            }
            report
        })
    });

    let mut set = tokio::task::JoinSet::new();
    for (r, request) in l.requests.iter().enumerate() {
        let svc = svc.clone();
        let probe = Arc::clone(&probes[r]);
        let plan = request.plan;
        set.spawn(async move {
            let method = match plan {
                Plan::Unpolled { head: true } => Method::HEAD,
                _ => Method::GET,
            };
            let req = Request::builder()
                .method(method)
                .uri(format!("/{r}"))
                .body(())
                .unwrap();
            let Ok(res) = svc.oneshot(req).await else {
                return;
            };
            let mut body = res.into_body();
            let polls = match plan {
                Plan::Read(frames) => usize::from(frames) + 1,
                Plan::Cut { after, .. } => after.into(),
                Plan::Unpolled { .. } | Plan::ServiceError => 0,
            };
            for _ in 0..polls {
                tokio::task::yield_now().await;
                if body.frame().await.is_none() {
                    break;
                }
            }
            probe.let_go.store(true, SeqCst);
            drop(body);
        });
    }
    InFlight {
        handle,
        probes,
        gauge,
        set,
        adders,
        shutdown,
    }
}

async fn drive_load(l: &Load) -> LoadObserved {
    let InFlight {
        handle,
        probes,
        gauge,
        mut set,
        adders,
        shutdown,
    } = start_load(l);
    let report = tokio::time::timeout(LIMIT, async {
        while let Some(joined) = set.join_next().await {
            joined.expect("a request driver panicked");
        }
        // Every handler has run, so every late adder is in the list.
        let adders = std::mem::take(&mut *adders.lock().unwrap());
        for adder in adders {
            adder.await.expect("a late adder panicked");
        }
        match shutdown {
            Some(shutdown) => Some(shutdown.await.expect("shutdown panicked")),
            None => None,
        }
    })
    .await
    .expect("every request is driven to its end");
    tokio::time::timeout(LIMIT, handle.wait_idle())
        .await
        .expect("wait_idle resolves once every task has ended");
    LoadObserved {
        entered: probes
            .iter()
            .map(|p| p.entered.lock().unwrap().clone())
            .collect(),
        faults: probes
            .iter()
            .flat_map(|p| p.faults.lock().unwrap().clone())
            .collect(),
        peak: gauge.peak.load(SeqCst),
        holding: gauge.running.load(SeqCst),
        stats: handle.stats(),
        report,
    }
}

fn run_load(l: &Load) -> Result<(), TestCaseError> {
    silence_deliberate_panics();
    let rt = runtime(l.multi_thread);
    let o = rt.block_on(drive_load(l));
    rt.shutdown_background();
    let ctx = format!(
        "\nentered: {:?}\nfaults: {:?}\npeak: {}\nstats: {:?}\nreport: {:?}",
        o.entered, o.faults, o.peak, o.stats, o.report
    );
    check_load(l, &o).map_err(|e| TestCaseError::fail(format!("{e}{ctx}")))
}

fn check_load(l: &Load, o: &LoadObserved) -> Result<(), TestCaseError> {
    let st = &o.stats;
    prop_assert!(
        o.peak <= l.limit as usize,
        "max_concurrent_tasks({}) exceeded: {} tasks ran at once",
        l.limit,
        o.peak
    );
    prop_assert!(o.faults.is_empty(), "tasks saw contract violations");
    prop_assert_eq!((st.pending, st.running), (0, 0), "idle at the end");
    prop_assert_eq!(st.timed_out, 0, "no timeout");
    prop_assert_eq!((st.refused, st.replaced), (0, 0), "refused, replaced");

    // Without a shutdown: what each task does, exactly. With one: what the
    // tasks that started do, and the others are discarded or cancelled.
    let mut want = [0u64; 5]; // completed, failed, panicked, discarded, skipped
    let mut started = [0u64; 3];
    let mut added = 0;
    for (r, request) in l.requests.iter().enumerate() {
        // The order of a sequence: the handler's adds, then the late ones.
        let mut order: Vec<usize> = (0..request.tasks.len()).collect();
        order.sort_by_key(|&i| (request.tasks[i].late, i));
        let mut expected = Vec::new();
        for i in order {
            let task = request.tasks[i];
            added += 1;
            let name = format!("r{r}t{i}");
            match load_fate(l, request, task.kind) {
                Fate::Discarded => {
                    want[3] += 1;
                    continue;
                }
                Fate::Skipped => {
                    want[4] += 1;
                    continue;
                }
                _ => {}
            }
            let bucket = match task.work {
                Work::Ok | Work::Sleep(_) => 0,
                Work::Err => 1,
                Work::Panic => 2,
            };
            want[bucket] += 1;
            if o.entered[r].contains(&name) {
                started[bucket] += 1;
            }
            expected.push(name);
        }
        let entered = &o.entered[r];
        let positions: Vec<Option<usize>> = entered
            .iter()
            .map(|e| expected.iter().position(|x| x == e))
            .collect();
        prop_assert!(
            positions.iter().all(Option::is_some),
            "request {}: a task ran that must not",
            r
        );
        let mut unique = positions.clone();
        unique.dedup();
        unique.sort();
        unique.dedup();
        prop_assert_eq!(
            unique.len(),
            entered.len(),
            "request {}: a task ran twice",
            r
        );
        if l.execution == Execution::Sequential {
            prop_assert!(
                positions.windows(2).all(|w| w[0] < w[1]),
                "request {}: sequential order",
                r
            );
        }
        if l.shutdown.is_none() {
            prop_assert_eq!(
                entered.len(),
                expected.len(),
                "request {}: every task ran",
                r
            );
        }
    }
    prop_assert_eq!(st.total(), added, "every task is counted exactly once");
    if l.shutdown.is_none() {
        prop_assert_eq!(o.holding, 0, "idle, yet a task still runs");
        prop_assert_eq!(st.cancelled, 0, "no shutdown, nothing cancelled");
        prop_assert_eq!(
            [
                st.completed,
                st.failed,
                st.panicked,
                st.discarded,
                st.skipped
            ],
            want,
            "completed/failed/panicked/discarded/skipped"
        );
    } else {
        let ended = [st.completed, st.failed, st.panicked];
        for (k, (got, most)) in ended.iter().zip(started).enumerate() {
            prop_assert!(
                *got <= most,
                "bucket {} counts {} tasks, {} started",
                k,
                got,
                most
            );
        }
        prop_assert!(st.discarded <= want[3], "discarded beyond the model");
        prop_assert!(st.skipped <= want[4], "skipped beyond the model");
        let report = o.report.as_ref().expect("the shutdown reported");
        prop_assert!(report.cancelled <= st.cancelled);
        prop_assert!(report.completed <= st.completed);
    }
    Ok(())
}

/// Semantics row 12 when the runtime goes away: the runtime that serves a
/// concurrency case is shut down after `yields` yields, with requests,
/// bodies, permit waits and tasks in flight (tokio drops every spawned
/// future; blocking closures are waited for). Every task the handlers
/// added is still counted exactly once, and nothing stays pending or
/// running.
fn run_dropped_runtime(l: &Load, yields: u8) -> Result<(), TestCaseError> {
    silence_deliberate_panics();
    let rt = runtime(l.multi_thread);
    let in_flight = rt.block_on(async {
        let in_flight = start_load(l);
        for _ in 0..yields {
            tokio::task::yield_now().await;
        }
        in_flight
    });
    let (handle, gauge) = (in_flight.handle.clone(), Arc::clone(&in_flight.gauge));
    rt.shutdown_timeout(LIMIT);
    drop(in_flight);
    let st = handle.stats();
    let added = gauge.added.load(SeqCst) as u64;
    prop_assert_eq!(
        (st.pending, st.running),
        (0, 0),
        "nothing pending or running once the runtime is gone: {:?}",
        st
    );
    prop_assert_eq!(
        st.total(),
        added,
        "every task added is counted exactly once: {:?}",
        st
    );
    let peak = gauge.peak.load(SeqCst);
    prop_assert!(
        peak <= l.limit as usize,
        "max_concurrent_tasks({}) exceeded: {}",
        l.limit,
        peak
    );
    Ok(())
}

/// Semantics row 8: tasks waiting for a permit of `max_concurrent_tasks(1)`
/// start in the order they became ready. A first request's task holds the
/// only permit; the other requests' bodies are then let go of (dropped) in
/// the order `order`, each request with one task of kind `kinds[r]`; once
/// the permit is released, the tasks start in that order.
fn run_fifo(order: &[usize], kinds: &[Kind], multi_thread: bool) -> Result<(), TestCaseError> {
    silence_deliberate_panics();
    let rt = runtime(multi_thread);
    let (log, stats) = rt.block_on(async {
        let layer = BackgroundLayer::new().max_concurrent_tasks(1);
        let handle = layer.handle();
        let log: Arc<Mutex<Vec<usize>>> = Arc::default();
        let (held_tx, held_rx) = tokio::sync::oneshot::channel::<()>();
        let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
        let gate = Arc::new(Mutex::new(Some((held_tx, release_rx))));
        let (handler_log, kinds) = (Arc::clone(&log), kinds.to_vec());
        let svc = layer.layer(service_fn(move |req: Request<()>| {
            let tasks = req.extensions().get::<BackgroundTasks>().unwrap().clone();
            let path = req.uri().path();
            if path == "/gate" {
                let (held_tx, release_rx) = gate.lock().unwrap().take().unwrap();
                tasks.add(async move {
                    held_tx.send(()).unwrap();
                    let _ = release_rx.await;
                });
            } else {
                let r: usize = path[1..].parse().unwrap();
                let log = Arc::clone(&handler_log);
                match kinds[r] {
                    Kind::Add => tasks.add(async move { log.lock().unwrap().push(r) }),
                    Kind::Blocking => tasks.add_blocking(move || log.lock().unwrap().push(r)),
                    Kind::With => tasks
                        .add_with(move |_: Completion| async move { log.lock().unwrap().push(r) }),
                }
            }
            async { Ok::<_, std::io::Error>(Response::new(http_body_util::Empty::<Bytes>::new())) }
        }));
        let get = |path: String| {
            svc.clone()
                .oneshot(Request::builder().uri(path).body(()).unwrap())
        };
        drop(get("/gate".into()).await.unwrap());
        tokio::time::timeout(LIMIT, held_rx)
            .await
            .expect("the gate task holds the permit")
            .unwrap();
        let mut bodies: Vec<Option<_>> = Vec::new();
        for r in 0..order.len() {
            bodies.push(Some(get(format!("/{r}")).await.unwrap()));
        }
        for &r in order {
            drop(bodies[r].take());
        }
        release_tx.send(()).unwrap();
        tokio::time::timeout(LIMIT, handle.wait_idle())
            .await
            .expect("every task ends");
        let log = log.lock().unwrap().clone();
        (log, handle.stats())
    });
    rt.shutdown_background();
    prop_assert_eq!(&log, &order.to_vec(), "start order against let-go order");
    prop_assert_eq!(stats.completed, order.len() as u64 + 1);
    Ok(())
}

// ---------------------------------------------------------------- the runs

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        max_shrink_iters: 2000,
        ..ProptestConfig::default()
    })]

    #[test]
    fn every_task_runs_once_or_is_counted(s in scenario()) {
        run_case(&s)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases().div_ceil(2),
        max_shrink_iters: 2000,
        ..ProptestConfig::default()
    })]

    #[test]
    fn concurrency_limit_holds_across_requests(l in load()) {
        run_load(&l)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases().div_ceil(4),
        max_shrink_iters: 2000,
        ..ProptestConfig::default()
    })]

    #[test]
    fn permit_waiters_start_in_the_order_they_became_ready(
        order in (2usize..7).prop_flat_map(|n| Just((0..n).collect::<Vec<_>>()).prop_shuffle()),
        kinds in prop::collection::vec(kind(), 6),
        multi_thread in any::<bool>(),
    ) {
        run_fifo(&order, &kinds, multi_thread)?;
    }

    #[test]
    fn every_task_is_counted_when_the_runtime_goes_away(l in load(), yields in 0u8..60) {
        run_dropped_runtime(&l, yields)?;
    }
}

// ------------------------------------------------ fixed cases of the model

fn fixed(s: Scenario) {
    if let Err(e) = run_case(&s) {
        panic!("{s:#?}: {e}");
    }
}

fn t(kind: Kind, behave: Behave, late: Option<u8>) -> TaskSpec {
    TaskSpec {
        kind,
        behave,
        late,
        policy: None,
        name: None,
    }
}

fn base(reply: Reply, tasks: Vec<TaskSpec>) -> Scenario {
    Scenario {
        execution: Execution::Sequential,
        run_on_abort: true,
        timeout: true,
        limit: None,
        reply,
        tasks,
        shutdown: None,
        yields: true,
        multi_thread: false,
        off_runtime: false,
        policy: None,
        per_request: None,
    }
}

fn body(data: u8, end: End, polls: Option<u8>) -> Reply {
    Reply::Body {
        data,
        end,
        eos_hint: false,
        exact: false,
        content_length: false,
        polls,
        ignore_eos: false,
        status: Status::Ok,
        head: false,
    }
}

fn streamed(data: u8, polls: Option<u8>) -> Reply {
    body(data, End::Clean, polls)
}

/// Plain and `add_with` tasks, with `run_on_abort(false)`: the plain task
/// runs only if the response was delivered, and the `add_with` task records
/// the outcome, which the model checks.
fn outcome_probe(reply: Reply) -> Scenario {
    let mut s = base(
        reply,
        vec![
            t(Kind::Add, Behave::Ok, None),
            t(Kind::With, Behave::Ok, None),
        ],
    );
    s.run_on_abort = false;
    s
}

fn expect_outcome(s: &Scenario, want: Outcome) {
    let m = Model::new(s);
    assert_eq!(m.completion.map(|c| c.1), Some(want), "the model: {s:?}");
    fixed(s.clone());
}

#[test]
fn model_every_behaviour_in_sequence() {
    fixed(base(
        streamed(3, None),
        vec![
            t(Kind::Add, Behave::Ok, None),
            t(Kind::Blocking, Behave::Panic, None),
            t(Kind::With, Behave::Err, None),
            t(Kind::Add, Behave::Slow, None),
            t(Kind::Blocking, Behave::Slow, None),
            t(Kind::Add, Behave::Ok, Some(7)),
        ],
    ));
}

#[test]
fn model_dropped_mid_stream_without_run_on_abort() {
    let mut s = base(
        streamed(4, Some(2)),
        vec![
            t(Kind::Add, Behave::Ok, None),
            t(Kind::With, Behave::Ok, None),
            t(Kind::Blocking, Behave::Ok, Some(200)),
        ],
    );
    s.run_on_abort = false;
    fixed(s);
}

#[test]
fn model_shutdown_mid_stream_cancels_everything() {
    let mut s = base(
        streamed(3, None),
        vec![
            t(Kind::Add, Behave::Ok, None),
            t(Kind::With, Behave::Ok, Some(0)),
            t(Kind::Add, Behave::Ok, Some(5)),
        ],
    );
    s.shutdown = Some((2, Grace::Long));
    fixed(s);
}

#[test]
fn model_concurrent_with_limit_and_late_adds() {
    let mut s = base(
        Reply::Body {
            data: 2,
            end: End::Trailers,
            eos_hint: true,
            exact: true,
            content_length: true,
            polls: None,
            ignore_eos: false,
            status: Status::ServerError,
            head: false,
        },
        vec![
            t(Kind::Add, Behave::Slow, None),
            t(Kind::With, Behave::Ok, None),
            t(Kind::Blocking, Behave::Err, Some(1)),
            t(Kind::Add, Behave::Ok, Some(9)),
        ],
    );
    s.execution = Execution::Concurrent;
    s.limit = Some(1);
    s.shutdown = Some((200, Grace::Long));
    fixed(s);
}

#[test]
fn model_no_response_discards() {
    for reply in [Reply::ServiceError, Reply::FutureDropped] {
        let mut s = base(
            reply,
            vec![
                t(Kind::Add, Behave::Ok, None),
                t(Kind::With, Behave::Ok, None),
                t(Kind::Add, Behave::Ok, Some(1)),
            ],
        );
        s.shutdown = Some((2, Grace::Zero));
        fixed(s);
    }
}

#[test]
fn model_body_error_without_run_on_abort() {
    let mut s = base(
        body(0, End::Error, None),
        vec![t(Kind::Add, Behave::Ok, None)],
    );
    s.run_on_abort = false;
    s.timeout = false;
    s.yields = false;
    fixed(s);
}

/// Regression (semantics row 9): no task added by the handler; a late add
/// and the drop of the body happen outside the runtime. The tasks must run
/// on the runtime that served the request.
#[test]
fn model_late_add_and_drop_off_the_runtime() {
    let mut s = base(
        streamed(2, Some(1)),
        vec![
            t(Kind::Add, Behave::Ok, Some(0)),
            t(Kind::With, Behave::Ok, Some(2)),
        ],
    );
    s.off_runtime = true;
    fixed(s);
}

/// Semantics rows 1 and 4: a body dropped unpolled that had something to
/// send (even an empty one that does not say so) was aborted, so
/// `run_on_abort(false)` discards the plain task.
#[test]
fn model_unpolled_body_with_something_to_send_is_aborted() {
    for data in [0, 3] {
        for end in [End::Clean, End::Trailers] {
            expect_outcome(&outcome_probe(body(data, end, Some(0))), Outcome::Aborted);
        }
    }
    // A Content-Length is not a size_hint: unpolled, it was aborted.
    let mut reply = body(0, End::Clean, Some(0));
    if let Reply::Body { content_length, .. } = &mut reply {
        *content_length = true;
    }
    expect_outcome(&outcome_probe(reply), Outcome::Aborted);
}

/// Semantics rows 1 and 4: a body dropped unpolled with nothing to send is
/// `NoBody`, and its plain tasks run even with `run_on_abort(false)`.
#[test]
fn model_unpolled_body_with_nothing_to_send_is_no_body() {
    let unpolled = || body(2, End::Clean, Some(0));
    let mut cases = Vec::new();
    for code in [Status::EarlyHints, Status::NoContent, Status::NotModified] {
        let mut reply = unpolled();
        if let Reply::Body { status, .. } = &mut reply {
            *status = code;
        }
        cases.push(reply);
    }
    let mut head = unpolled();
    if let Reply::Body { head: h, .. } = &mut head {
        *h = true;
    }
    cases.push(head);
    // An exact size of 0 (with trailers to send, even).
    let mut empty = body(0, End::Trailers, Some(0));
    if let Reply::Body { exact, .. } = &mut empty {
        *exact = true;
    }
    cases.push(empty);
    // Reports its end before any poll: the driver never polls it.
    let mut ended = body(0, End::Clean, None);
    if let Reply::Body { eos_hint, .. } = &mut ended {
        *eos_hint = true;
    }
    cases.push(ended);
    for reply in cases {
        expect_outcome(&outcome_probe(reply), Outcome::NoBody);
    }
}

/// A body dropped once it has handed over exactly its declared length
/// (exact size_hint or Content-Length) has finished, even if it was never
/// polled for its trailers or its `None`.
#[test]
fn model_dropped_at_its_declared_length_finished() {
    for (exact, content_length) in [(true, false), (false, true)] {
        let reply = Reply::Body {
            data: 3,
            end: End::Trailers,
            eos_hint: false,
            exact,
            content_length,
            polls: Some(3),
            ignore_eos: false,
            status: Status::Ok,
            head: false,
        };
        expect_outcome(&outcome_probe(reply), Outcome::Finished);
    }
    // One byte short: aborted.
    let mut reply = body(3, End::Clean, Some(2));
    if let Reply::Body { content_length, .. } = &mut reply {
        *content_length = true;
    }
    expect_outcome(&outcome_probe(reply), Outcome::Aborted);
}

/// Run policies (the layer's, or a task's own): by default a 4xx or 5xx
/// response skips the plain tasks; `Always` runs them; `OnDelivery` skips
/// them when the body was aborted, before `run_on_abort(false)` would
/// discard them; `add_with` tasks run in every case.
#[test]
fn model_run_policies() {
    let tasks = |own: Option<Policy>| {
        let mut plain = t(Kind::Add, Behave::Ok, None);
        plain.policy = own;
        let mut blocking = t(Kind::Blocking, Behave::Ok, Some(2));
        blocking.policy = own;
        vec![plain, blocking, t(Kind::With, Behave::Ok, None)]
    };
    for (status, polls, layer, own, want) in [
        (Status::ServerError, None, None, None, Fate::Skipped),
        (
            Status::ServerError,
            None,
            Some(Policy::Always),
            None,
            Fate::Runs,
        ),
        (
            Status::ServerError,
            None,
            None,
            Some(Policy::Always),
            Fate::Runs,
        ),
        (
            Status::Ok,
            Some(1),
            Some(Policy::OnDelivery),
            None,
            Fate::Skipped,
        ),
        (
            Status::Ok,
            Some(1),
            None,
            Some(Policy::OnDelivery),
            Fate::Skipped,
        ),
        (Status::Ok, Some(1), None, None, Fate::Discarded),
        (
            Status::NotModified,
            Some(0),
            Some(Policy::OnDelivery),
            None,
            Fate::Runs,
        ),
    ] {
        let mut reply = streamed(2, polls);
        if let Reply::Body { status: st, .. } = &mut reply {
            *st = status;
        }
        let mut s = base(reply, tasks(own));
        s.run_on_abort = false;
        s.policy = layer;
        let m = Model::new(&s);
        assert_eq!(m.fates, [want, want, Fate::Runs], "the model: {s:?}");
        fixed(s);
    }
}

/// Named tasks: a task added while the request still holds its tasks
/// replaces the pending one of the same name (the last one wins), also
/// when it is added late; the replaced ones are counted as such even when
/// the request then fails.
#[test]
fn model_named_tasks_replace_pending_ones() {
    let named = |kind: Kind, late: Option<u8>, second: bool| {
        let mut task = t(kind, Behave::Ok, late);
        task.name = Some(second);
        task
    };
    for reply in [streamed(3, None), Reply::ServiceError] {
        let tasks = vec![
            named(Kind::Add, None, false),
            named(Kind::Blocking, None, true),
            named(Kind::With, None, false),
            // Added after the first poll, before the end: replaces t2.
            named(Kind::Add, Some(1), false),
            t(Kind::Add, Behave::Ok, None),
        ];
        let s = base(reply.clone(), tasks);
        let m = Model::new(&s);
        let replaced = m.fates.iter().filter(|f| **f == Fate::Replaced).count();
        // Without a response, the late add comes after the tasks were
        // discarded: it replaces nothing.
        let want = if matches!(reply, Reply::ServiceError) {
            1
        } else {
            2
        };
        assert_eq!(replaced, want, "the model: {m:?}");
        fixed(s);
    }
}

/// `max_tasks_per_request(2)`: the third task a request adds, late or not,
/// and every one after it is refused, whatever becomes of the response.
#[test]
fn model_tasks_beyond_the_per_request_cap_are_refused() {
    for status in [Status::Ok, Status::ServerError] {
        let mut reply = streamed(2, None);
        if let Reply::Body { status: st, .. } = &mut reply {
            *st = status;
        }
        let mut s = base(
            reply,
            vec![
                t(Kind::Add, Behave::Ok, Some(1)),
                t(Kind::With, Behave::Ok, None),
                t(Kind::Blocking, Behave::Ok, None),
                t(Kind::Add, Behave::Ok, None),
            ],
        );
        s.per_request = Some(2);
        let m = Model::new(&s);
        // Added in the order t1, t2, t3 (the handler), t0 (late).
        let t2 = if status == Status::Ok {
            Fate::Runs
        } else {
            Fate::Skipped
        };
        assert_eq!(
            m.fates,
            [Fate::Refused, Fate::Runs, t2, Fate::Refused],
            "the model: {m:?}"
        );
        fixed(s);
    }
}

/// The timing rule, each way the server lets go: tasks start at the poll
/// after the trailers, at the drop after a data frame that ends the body,
/// at the poll after it when the driver ignores `is_end_stream`, at the
/// drop after `None` or the poll after it, and at the drop after an error;
/// never inside the poll that ends the body (the checkpoint after that poll
/// yields and checks `Stats`).
#[test]
fn model_tasks_start_when_the_server_lets_go() {
    for multi_thread in [false, true] {
        for (end, eos_hint, ignore_eos) in [
            (End::Trailers, false, false),
            (End::Trailers, true, false),
            (End::Clean, true, false),
            (End::Clean, true, true),
            (End::Clean, false, false),
            (End::Clean, false, true),
            (End::Error, false, false),
        ] {
            let reply = Reply::Body {
                data: 2,
                end,
                eos_hint,
                exact: false,
                content_length: false,
                polls: None,
                ignore_eos,
                status: Status::Ok,
                head: false,
            };
            let mut s = base(
                reply,
                vec![
                    t(Kind::Add, Behave::Ok, None),
                    t(Kind::Blocking, Behave::Ok, None),
                    t(Kind::With, Behave::Ok, Some(3)),
                ],
            );
            s.execution = Execution::Concurrent;
            s.multi_thread = multi_thread;
            fixed(s);
        }
    }
}

/// The gauge of the concurrency property does see tasks that overlap: with
/// no limit, three concurrent tasks that wait for each other all run at
/// once.
#[test]
fn gauge_sees_tasks_that_run_at_once() {
    let rt = runtime(true);
    let peak = rt.block_on(async {
        let layer = BackgroundLayer::new().execution(Execution::Concurrent);
        let handle = layer.handle();
        let gauge: Arc<Gauge> = Arc::default();
        let barrier = Arc::new(tokio::sync::Barrier::new(3));
        let (g, b) = (Arc::clone(&gauge), Arc::clone(&barrier));
        let svc = layer.layer(service_fn(move |req: Request<()>| {
            let tasks = req.extensions().get::<BackgroundTasks>().unwrap().clone();
            for _ in 0..3 {
                let (g, b) = (Arc::clone(&g), Arc::clone(&b));
                tasks.add(async move {
                    let _held = g.hold();
                    b.wait().await;
                });
            }
            async { Ok::<_, std::io::Error>(Response::new(http_body_util::Empty::<Bytes>::new())) }
        }));
        let res = svc.oneshot(Request::new(())).await.unwrap();
        res.into_body().collect().await.unwrap();
        tokio::time::timeout(LIMIT, handle.wait_idle())
            .await
            .expect("the three tasks meet");
        gauge.peak.load(SeqCst)
    });
    rt.shutdown_background();
    assert_eq!(peak, 3);
}

/// A task that was queued but had not started when a zero-grace `shutdown`
/// returned: `shutdown` counts it as cancelled, and it must never start
/// ("pending ones are dropped without running"). The task's executor is kept
/// busy from before the body ends until after `shutdown` has returned, so
/// the task cannot have started in between: for an async task, the only
/// worker of a multi-thread runtime (the test runs on the `block_on`
/// thread, which is not a worker); for an `add_blocking` closure, the only
/// thread of the blocking pool. Then a marker queued behind the task runs,
/// and the task must not have run before it.
fn queued_task_after_shutdown(blocking: bool) -> (ShutdownReport, bool) {
    let rt = if blocking {
        tokio::runtime::Builder::new_current_thread()
            .max_blocking_threads(1)
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
    }
    .unwrap();
    let result = rt.block_on(async move {
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let (busy_tx, busy_rx) = tokio::sync::oneshot::channel::<()>();
        let busy = move || {
            busy_tx.send(()).unwrap();
            // Bounded: the test sends the release (or drops the sender).
            let _ = release_rx.recv_timeout(LIMIT);
        };
        let blocker = if blocking {
            tokio::task::spawn_blocking(busy)
        } else {
            tokio::spawn(async move { busy() })
        };
        busy_rx.await.unwrap();

        let layer = BackgroundLayer::new();
        let handle = layer.handle();
        let ran = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&ran);
        let svc = layer.layer(service_fn(move |req: Request<()>| {
            let tasks = req.extensions().get::<BackgroundTasks>().unwrap().clone();
            let flag = Arc::clone(&flag);
            if blocking {
                tasks.add_blocking(move || flag.store(true, SeqCst));
            } else {
                tasks.add(async move { flag.store(true, SeqCst) });
            }
            async {
                Ok::<_, std::io::Error>(Response::new(http_body_util::Full::new(
                    Bytes::from_static(b"x"),
                )))
            }
        }));
        let res = svc.oneshot(Request::new(())).await.unwrap();
        res.into_body().collect().await.unwrap();
        // Lets the layer hand the task to its executor (a closure reaches
        // the blocking pool's queue).
        for _ in 0..16 {
            tokio::task::yield_now().await;
        }
        let report = handle.shutdown(Duration::ZERO).await;
        release_tx.send(()).unwrap();
        blocker.await.unwrap();
        // A marker queued behind the task on the same executor.
        if blocking {
            tokio::task::spawn_blocking(|| ()).await.unwrap();
        } else {
            tokio::spawn(async {
                for _ in 0..16 {
                    tokio::task::yield_now().await;
                }
            })
            .await
            .unwrap();
        }
        (report, ran.load(SeqCst))
    });
    rt.shutdown_background();
    result
}

#[test]
fn queued_async_task_does_not_run_after_shutdown() {
    let (report, ran) = queued_task_after_shutdown(false);
    assert_eq!(report.cancelled, 1);
    assert!(
        !ran,
        "the task counted as cancelled ran after shutdown returned"
    );
}

/// Regression, found by `concurrency_limit_holds_across_requests`: with a
/// zero-grace shutdown while requests were in flight on a multi-thread
/// runtime, `add_blocking` closures still queued on tokio's blocking pool
/// were counted as cancelled and started afterwards.
#[test]
fn queued_blocking_closure_does_not_run_after_shutdown() {
    let (report, ran) = queued_task_after_shutdown(true);
    assert_eq!(report.cancelled, 1);
    assert!(
        !ran,
        "the closure counted as cancelled ran after shutdown returned"
    );
}
