//! Memory per waiting task: with `max_concurrent_tasks(1)` and a
//! first task that blocks, queue 100,000 small tasks and report how much
//! memory each waiting task costs, and what is left once they have run.
//!
//! ```text
//! cargo run --release -p perf --example memory               # all cases, 100,000 tasks
//! cargo run --release -p perf --example memory -- 1000000    # another count
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
use tower_background::{BackgroundLayer, BackgroundTasks};

/// Counts the live heap bytes of the process.
struct Counting;

static LIVE: AtomicI64 = AtomicI64::new(0);

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
        LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        System.alloc_zeroed(layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
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
