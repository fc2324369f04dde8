//! Memory per waiting task: with `max_concurrent_tasks(1)` and a
//! first task that blocks, queue 100,000 small tasks and report how much
//! memory each waiting task costs, and what is left once they have run.
//!
//! ```text
//! cargo run --release -p perf --example memory               # all cases, 100,000 tasks
//! cargo run --release -p perf --example memory -- 1000000    # another count
//! cargo run --release -p perf --example memory -- allocs     # allocations and bytes per request
//! cargo run --release -p perf --example memory -- instructions   # the same cases in instructions (valgrind)
//! ```
//!
//! Each case runs in a fresh child process of this binary (so that one case's
//! freed memory does not hide the next one's growth), on a current-thread
//! runtime:
//!
//! | case | what waits |
//! |---|---|
//! | `one_request` | one request queues all the tasks: one runner, the tasks in its request's queue |
//! | `many_requests` | as many requests, one task each: a runner per request waiting for a permit |
//! | `spawn` | reference: as many `tokio::spawn`s of a future that waits for a `Semaphore` permit, then does the same work |
//!
//! It reports the growth of the resident set (`VmRSS`), and of the live heap
//! bytes (counted by this binary's global allocator), per waiting task, next
//! to the size of the task's own future; then both again after the tasks
//! have run (and after `malloc_trim(0)`, which hands glibc's free pages back).
//!
//! The `allocs` mode counts the heap allocations and the bytes allocated per
//! request (2,000 requests after 200 of warm-up, current-thread runtime,
//! each request waiting for its tasks): the bare service, the layer with 0, 1
//! and 10 tasks, and `tokio::spawn` of 1 and 10 tasks awaited through their
//! `JoinHandle`s; then the layer with no task and with 1 task again, once
//! with every limit set (`max_concurrent_tasks(1024)`,
//! `max_pending_tasks(100_000)`, `max_tasks_per_request(100)`,
//! `task_timeout(30 s)`, none of them reached) and once with an
//! `on_task_end` hook, and one task under the three count limits without
//! the timeout, so that what the controls cost per request is measured in
//! the same run as the layer without them.
//!
//! The `instructions` mode runs each of those cases under callgrind
//! (`valgrind --tool=callgrind`, which must be installed) twice, with 1,000
//! and with 3,000 measured requests, and reports the difference of the two
//! totals / 2,000: the instructions of one request of the case, everything
//! it makes run on the thread included (the tasks and their runners), and
//! nothing else (start-up and warm-up cancel out).

use std::alloc::{GlobalAlloc, Layout, System};
use std::convert::Infallible;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tokio::sync::{oneshot, Semaphore};
use tower::{service_fn, Layer, ServiceExt};
use tower_background::{BackgroundLayer, BackgroundTasks, Execution};

/// Counts the live heap bytes of the process.
struct Counting;

static LIVE: AtomicI64 = AtomicI64::new(0);
/// Allocations made (`alloc`, `alloc_zeroed` and growing `realloc`s count one
/// each) and the bytes they asked for.
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static ALLOCATED: AtomicU64 = AtomicU64::new(0);

fn count(size: usize) {
    ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    ALLOCATED.fetch_add(size as u64, Ordering::Relaxed);
}

/// While `RECORD` is set, the sizes of the allocations made, in order (the
/// first `SIZES.len()` of them): one request's breakdown.
static RECORD: AtomicBool = AtomicBool::new(false);
static RECORDED: AtomicUsize = AtomicUsize::new(0);
#[allow(clippy::declare_interior_mutable_const)]
const ZERO: AtomicUsize = AtomicUsize::new(0);
static SIZES: [AtomicUsize; 32] = [ZERO; 32];

fn record(size: usize) {
    if RECORD.load(Ordering::Relaxed) {
        let i = RECORDED.fetch_add(1, Ordering::Relaxed);
        if let Some(slot) = SIZES.get(i) {
            slot.store(size, Ordering::Relaxed);
        }
    }
}

/// Records the sizes of the allocations made while `f` runs.
async fn sizes_of<F: std::future::Future>(f: F) -> Vec<usize> {
    RECORDED.store(0, Ordering::Relaxed);
    RECORD.store(true, Ordering::Relaxed);
    f.await;
    RECORD.store(false, Ordering::Relaxed);
    let n = RECORDED.load(Ordering::Relaxed).min(SIZES.len());
    SIZES[..n]
        .iter()
        .map(|s| s.load(Ordering::Relaxed))
        .collect()
}

// SAFETY: every call is forwarded unchanged to `System`; the counter is an
// atomic that never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        count(layout.size());
        LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        count(layout.size());
        LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        System.alloc_zeroed(layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() {
            count(new_size - layout.size());
        }
        LIVE.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    extern "C" {
        fn malloc_trim(pad: usize) -> i32;
    }
    // SAFETY: glibc's malloc_trim only releases free memory; `System` is
    // glibc's malloc on this target.
    unsafe {
        malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}

fn rss_kb() -> i64 {
    std::fs::read_to_string("/proc/self/status")
        .expect("/proc/self/status (Linux)")
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .expect("VmRSS")
}

#[derive(Debug, Clone, Copy)]
struct Snapshot {
    rss_kb: i64,
    heap: i64,
}

fn snapshot() -> Snapshot {
    Snapshot {
        rss_kb: rss_kb(),
        heap: LIVE.load(Ordering::Relaxed),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("allocs") => return allocs(),
        Some("instructions") => return instructions(),
        Some("one") => {
            // One case, for `instructions`: `one INDEX REQUESTS`.
            let (_, layered, tasks, controls) =
                CASES[args[1].parse::<usize>().expect("a case index")];
            per_request(layered, tasks, controls, args[2].parse().expect("a count"));
            return;
        }
        _ => {}
    }
    if args.first().map(String::as_str) == Some("case") {
        let n = args[2].parse().expect("a count");
        run_case(&args[1], n);
        return;
    }
    let n: usize = args
        .first()
        .map_or(100_000, |a| a.parse().expect("a task count"));
    println!("{n} waiting tasks per case; sizes in bytes per waiting task");
    println!();
    println!("| case | task's own future | RSS growth while waiting | heap growth while waiting | heap growth beyond the future | RSS left after they ran (after malloc_trim) | heap left after they ran |");
    println!("|---|---|---|---|---|---|---|");
    let mut notes = String::new();
    for case in ["one_request", "many_requests", "spawn"] {
        let out = Command::new(std::env::current_exe().expect("current exe"))
            .args(["case", case, &n.to_string()])
            .output()
            .expect("run a case");
        assert!(
            out.status.success(),
            "{case}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        print!("{}", String::from_utf8_lossy(&out.stdout));
        notes.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    println!();
    print!("{notes}");
}

/// What the handler of the next request does.
#[derive(Default)]
struct Plan {
    blocker: Option<oneshot::Receiver<()>>,
    tasks: usize,
}

fn run_case(case: &str, n: usize) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(120), async {
            if case == "spawn" {
                spawn_case(n).await
            } else {
                layer_case(case, n).await
            }
        })
        .await
        .expect("the case finishes within 120 s");
    });
}

async fn small_task(ran: Arc<AtomicU64>) {
    ran.fetch_add(1, Ordering::Relaxed);
}

async fn layer_case(case: &str, n: usize) {
    let ran = Arc::new(AtomicU64::new(0));
    let future_size = std::mem::size_of_val(&small_task(Arc::clone(&ran)));
    let layer = BackgroundLayer::new().max_concurrent_tasks(1);
    let handle = layer.handle();
    let plan = Arc::new(Mutex::new(Plan::default()));
    let svc = {
        let (plan, ran) = (Arc::clone(&plan), Arc::clone(&ran));
        layer.layer(service_fn(move |req: Request<Full<bytes::Bytes>>| {
            let tasks = req
                .extensions()
                .get::<BackgroundTasks>()
                .expect("the layer");
            let mut plan = plan.lock().expect("not poisoned");
            if let Some(blocker) = plan.blocker.take() {
                tasks.add(async move {
                    let _ = blocker.await;
                });
            }
            for _ in 0..plan.tasks {
                tasks.add(small_task(Arc::clone(&ran)));
            }
            std::future::ready(Ok::<_, Infallible>(Response::new(Full::new(
                bytes::Bytes::from_static(b"ok"),
            ))))
        }))
    };
    let call = || async {
        let res = svc
            .clone()
            .oneshot(Request::new(Full::default()))
            .await
            .expect("infallible");
        res.into_body().collect().await.expect("a body");
    };

    // The first task takes the only permit and blocks.
    let (release, blocker) = oneshot::channel();
    plan.lock().expect("not poisoned").blocker = Some(blocker);
    call().await;
    for _ in 0..1000 {
        if handle.stats().running == 1 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(handle.stats().running, 1, "the blocker runs");

    trim();
    let before = snapshot();
    if case == "one_request" {
        plan.lock().expect("not poisoned").tasks = n;
        call().await;
    } else {
        plan.lock().expect("not poisoned").tasks = 1;
        for _ in 1..n {
            call().await;
        }
        let sizes = sizes_of(async {
            call().await;
            tokio::task::yield_now().await;
        })
        .await;
        eprintln!("allocations of one request that queues one task (bytes, in order): {sizes:?}");
    }
    // Let every runner reach its wait for a permit.
    for _ in 0..3 {
        tokio::task::yield_now().await;
    }
    let waiting = snapshot();
    assert_eq!(handle.stats().pending, n as u64, "all the tasks wait");
    assert_eq!(ran.load(Ordering::Relaxed), 0, "none ran yet");

    release.send(()).expect("the blocker waits");
    handle.wait_idle().await;
    assert_eq!(ran.load(Ordering::Relaxed), n as u64, "every task ran");
    drop(svc);
    let after = snapshot();
    trim();
    let trimmed = snapshot();
    report(case, n, future_size, before, waiting, after, trimmed);
}

async fn spawn_case(n: usize) {
    let ran = Arc::new(AtomicU64::new(0));
    let limit = Arc::new(Semaphore::new(1));
    let blocker = Arc::clone(&limit).acquire_owned().await.expect("open");
    let task = |ran: Arc<AtomicU64>, limit: Arc<Semaphore>| async move {
        let _permit = limit.acquire_owned().await.expect("open");
        ran.fetch_add(1, Ordering::Relaxed);
    };
    let future_size = std::mem::size_of_val(&task(Arc::clone(&ran), Arc::clone(&limit)));
    let svc = {
        let (ran, limit) = (Arc::clone(&ran), Arc::clone(&limit));
        service_fn(move |_req: Request<Full<bytes::Bytes>>| {
            drop(tokio::spawn(task(Arc::clone(&ran), Arc::clone(&limit))));
            std::future::ready(Ok::<_, Infallible>(Response::new(Full::new(
                bytes::Bytes::from_static(b"ok"),
            ))))
        })
    };
    trim();
    let before = snapshot();
    let call = || async {
        let res = svc
            .clone()
            .oneshot(Request::new(Full::default()))
            .await
            .expect("infallible");
        res.into_body().collect().await.expect("a body");
    };
    for _ in 1..n {
        call().await;
    }
    let sizes = sizes_of(async {
        call().await;
        tokio::task::yield_now().await;
    })
    .await;
    eprintln!("allocations of one request that spawns one task (bytes, in order): {sizes:?}");
    for _ in 0..3 {
        tokio::task::yield_now().await;
    }
    let waiting = snapshot();
    assert_eq!(ran.load(Ordering::Relaxed), 0, "none ran yet");
    drop(blocker);
    while ran.load(Ordering::Relaxed) < n as u64 {
        tokio::task::yield_now().await;
    }
    // Let the finished tasks be released.
    for _ in 0..3 {
        tokio::task::yield_now().await;
    }
    drop(svc);
    let after = snapshot();
    trim();
    let trimmed = snapshot();
    report("spawn", n, future_size, before, waiting, after, trimmed);
}

fn report(
    case: &str,
    n: usize,
    future_size: usize,
    before: Snapshot,
    waiting: Snapshot,
    after: Snapshot,
    trimmed: Snapshot,
) {
    let per = |kb: i64| kb as f64 * 1024.0 / n as f64;
    let heap_per = (waiting.heap - before.heap) as f64 / n as f64;
    println!(
        "| `{case}` | {future_size} | {:.0} | {:.0} | {:.0} | {} kB ({} kB) | {} B |",
        per(waiting.rss_kb - before.rss_kb),
        heap_per,
        heap_per - future_size as f64,
        after.rss_kb - before.rss_kb,
        trimmed.rss_kb - before.rss_kb,
        after.heap - before.heap,
    );
}

// ---------------------------------------------------------------- allocs mode

const WARM_UP: u64 = 200;
const REQUESTS: u64 = 2_000;

/// The cases of the `allocs` and `instructions` modes: name, behind the
/// layer, tasks, the layer's controls. The first seven are compared in the
/// ratios printed by `instructions`; the last four measure the controls
/// against the same cases without them, in the same run.
const CASES: [(&str, bool, Tasks, Controls); 12] = [
    ("bare", false, Tasks::None, Controls::None),
    ("layer, no task", true, Tasks::None, Controls::None),
    (
        "layer, 1 task",
        true,
        Tasks::Layer(1, Execution::Sequential),
        Controls::None,
    ),
    (
        "tokio::spawn, 1 task",
        false,
        Tasks::Spawn(1),
        Controls::None,
    ),
    (
        "layer, 10 tasks (sequential)",
        true,
        Tasks::Layer(10, Execution::Sequential),
        Controls::None,
    ),
    (
        "layer, 10 tasks (concurrent)",
        true,
        Tasks::Layer(10, Execution::Concurrent),
        Controls::None,
    ),
    (
        "tokio::spawn, 10 tasks",
        false,
        Tasks::Spawn(10),
        Controls::None,
    ),
    (
        "layer, no task, limits",
        true,
        Tasks::None,
        Controls::Limits,
    ),
    (
        "layer, 1 task, limits",
        true,
        Tasks::Layer(1, Execution::Sequential),
        Controls::Limits,
    ),
    (
        "layer, no task, on_task_end hook",
        true,
        Tasks::None,
        Controls::Hook,
    ),
    (
        "layer, 1 task, on_task_end hook",
        true,
        Tasks::Layer(1, Execution::Sequential),
        Controls::Hook,
    ),
    (
        "layer, 1 task, limits without task_timeout",
        true,
        Tasks::Layer(1, Execution::Sequential),
        Controls::Counts,
    ),
];

/// A handler that queues (or spawns) `tasks` trivial tasks.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Tasks {
    None,
    Layer(usize, Execution),
    Spawn(usize),
}

/// What the layer is configured with beyond its execution mode.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Controls {
    /// `BackgroundLayer::new()`.
    None,
    /// Every limit set, none of them reached: `max_concurrent_tasks(1024)`,
    /// `max_pending_tasks(100_000)`, `max_tasks_per_request(100)`,
    /// `task_timeout(30 s)`.
    Limits,
    /// An `on_task_end` hook that counts the tasks it sees.
    Hook,
    /// The three limits on task counts of `Limits`, without its
    /// `task_timeout`.
    Counts,
}

fn allocs() {
    println!(
        "allocations and bytes allocated per request, {REQUESTS} requests after {WARM_UP} of warm-up, \
         current-thread runtime; each request waits for its tasks"
    );
    println!();
    println!("| case | allocations/request | bytes allocated/request | beyond `bare` |");
    println!("|---|---|---|---|");
    let mut bare = (0.0, 0.0);
    for (name, layered, tasks, controls) in CASES {
        let (n, bytes) = per_request(layered, tasks, controls, REQUESTS);
        if name == "bare" {
            bare = (n, bytes);
        }
        println!(
            "| {name} | {n:.2} | {bytes:.0} | +{:.2} allocations, +{:.0} B |",
            n - bare.0,
            bytes - bare.1
        );
    }
}

/// Allocations and bytes per request of one case.
fn per_request(layered: bool, tasks: Tasks, controls: Controls, requests: u64) -> (f64, f64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        let ran = Arc::new(AtomicU64::new(0));
        let execution = match tasks {
            Tasks::Layer(_, execution) => execution,
            _ => Execution::Sequential,
        };
        let ended = Arc::new(AtomicU64::new(0));
        let layer = BackgroundLayer::new().execution(execution);
        let layer = match controls {
            Controls::None => layer,
            Controls::Limits => layer
                .max_concurrent_tasks(1024)
                .max_pending_tasks(100_000)
                .max_tasks_per_request(100)
                .task_timeout(Duration::from_secs(30)),
            Controls::Counts => layer
                .max_concurrent_tasks(1024)
                .max_pending_tasks(100_000)
                .max_tasks_per_request(100),
            Controls::Hook => {
                let ended = Arc::clone(&ended);
                layer.on_task_end(move |_| {
                    ended.fetch_add(1, Ordering::Relaxed);
                })
            }
        };
        let handle = layer.handle();
        let joins: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> =
            Arc::new(Mutex::new(Vec::with_capacity(16)));
        let inner = {
            let (ran, joins) = (Arc::clone(&ran), Arc::clone(&joins));
            service_fn(move |req: Request<Full<bytes::Bytes>>| {
                match tasks {
                    Tasks::None => {}
                    Tasks::Layer(n, _) => {
                        let queue = req
                            .extensions()
                            .get::<BackgroundTasks>()
                            .expect("the layer");
                        for _ in 0..n {
                            queue.add(small_task(Arc::clone(&ran)));
                        }
                    }
                    Tasks::Spawn(n) => {
                        let mut joins = joins.lock().expect("not poisoned");
                        for _ in 0..n {
                            joins.push(tokio::spawn(small_task(Arc::clone(&ran))));
                        }
                    }
                }
                std::future::ready(Ok::<_, Infallible>(Response::new(Full::new(
                    bytes::Bytes::from_static(b"ok"),
                ))))
            })
        };
        let wait = matches!(tasks, Tasks::Layer(..)).then_some(&handle);
        let counted = if layered {
            drive(layer.layer(inner), wait, &joins, requests).await
        } else {
            drive(inner, wait, &joins, requests).await
        };
        let n = (ALLOCATIONS.load(Ordering::Relaxed) - counted.0) as f64 / requests as f64;
        let bytes = (ALLOCATED.load(Ordering::Relaxed) - counted.1) as f64 / requests as f64;
        let per_task = match tasks {
            Tasks::None => 0,
            Tasks::Layer(n, _) | Tasks::Spawn(n) => n as u64,
        };
        assert_eq!(
            ran.load(Ordering::Relaxed),
            (WARM_UP + requests) * per_task,
            "every task ran"
        );
        if controls == Controls::Hook {
            assert_eq!(
                ended.load(Ordering::Relaxed),
                (WARM_UP + requests) * per_task,
                "the hook saw every task"
            );
        }
        (n, bytes)
    })
}

/// Sends the warm-up and measured requests through `svc`, each followed by
/// the wait for its tasks; returns the counters at the start of the
/// measured requests.
async fn drive<S, B>(
    svc: S,
    wait: Option<&tower_background::BackgroundHandle>,
    joins: &Mutex<Vec<tokio::task::JoinHandle<()>>>,
    requests: u64,
) -> (u64, u64)
where
    S: tower::Service<Request<Full<bytes::Bytes>>, Response = Response<B>, Error = Infallible>
        + Clone,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let mut counted = (0, 0);
    for i in 0..WARM_UP + requests {
        if i == WARM_UP {
            counted = (
                ALLOCATIONS.load(Ordering::Relaxed),
                ALLOCATED.load(Ordering::Relaxed),
            );
        }
        let res = svc
            .clone()
            .oneshot(Request::new(Full::default()))
            .await
            .expect("infallible");
        drop(res.into_body().collect().await.expect("a body"));
        if let Some(handle) = wait {
            handle.wait_idle().await;
        }
        loop {
            let next = joins.lock().expect("not poisoned").pop();
            match next {
                Some(join) => join.await.expect("the task does not panic"),
                None => break,
            }
        }
    }
    counted
}

/// Total instructions of `memory one INDEX REQUESTS` under callgrind.
fn callgrind_total(index: usize, requests: u64) -> u64 {
    let dir = std::env::temp_dir().join(format!("memory-callgrind-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let out = dir.join(format!("out.{index}.{requests}"));
    let exe = std::env::current_exe().expect("current exe");
    let status = Command::new("valgrind")
        .args(["-q", "--tool=callgrind"])
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg(exe)
        .args(["one", &index.to_string(), &requests.to_string()])
        .status()
        .expect("valgrind (apt-get install valgrind)");
    assert!(status.success(), "the case ran under callgrind");
    let text = std::fs::read_to_string(&out).expect("the callgrind output");
    let _ = std::fs::remove_dir_all(&dir);
    text.lines()
        .find_map(|l| {
            l.strip_prefix("totals:")
                .or_else(|| l.strip_prefix("summary:"))
        })
        .expect("a totals line")
        .trim()
        .parse()
        .expect("a count")
}

fn instructions() {
    println!(
        "instructions per request under callgrind: (total with 3,000 requests - total with 1,000) / 2,000, \
         current-thread runtime; each request waits for its tasks"
    );
    println!();
    println!("| case | instructions/request | beyond `bare` |");
    println!("|---|---|---|");
    let mut per = Vec::new();
    for (index, (name, _, _, _)) in CASES.iter().enumerate() {
        let low = callgrind_total(index, 1_000);
        let high = callgrind_total(index, 3_000);
        let one = high.saturating_sub(low) as f64 / 2_000.0;
        let bare = per.first().copied().unwrap_or(one);
        println!("| {name} | {one:.0} | +{:.0} |", one - bare);
        per.push(one);
    }
    println!();
    println!(
        "layer, 1 task / tokio::spawn, 1 task = {:.2}x; layer, 10 tasks (concurrent) / tokio::spawn, 10 tasks = {:.2}x; \
         layer, 10 tasks (sequential) / tokio::spawn, 10 tasks = {:.2}x",
        per[2] / per[3],
        per[5] / per[6],
        per[4] / per[6]
    );
    println!(
        "one task through the layer (layer 1 task - layer no task) / one spawn (spawn 1 task - bare) = {:.0} / {:.0} = {:.2}x",
        per[2] - per[1],
        per[3] - per[0],
        (per[2] - per[1]) / (per[3] - per[0])
    );
    println!(
        "controls, same run: layer no task with limits / without = {:.0} / {:.0} = {:.3}x; \
         layer 1 task with limits / without = {:.0} / {:.0} = {:.3}x; \
         layer 1 task with an on_task_end hook / without = {:.0} / {:.0} = {:.3}x; \
         layer 1 task with the limits but no task_timeout / without = {:.0} / {:.0} = {:.3}x",
        per[7],
        per[1],
        per[7] / per[1],
        per[8],
        per[2],
        per[8] / per[2],
        per[10],
        per[2],
        per[10] / per[2],
        per[11],
        per[2],
        per[11] / per[2]
    );
}
