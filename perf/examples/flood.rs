//! Floods, with and without the production controls, over real sockets:
//! an axum server on 127.0.0.1:0 and HTTP/1.1 clients in the same process.
//!
//! ```text
//! cargo run --release -p perf --example flood              # every case, a table
//! cargo run --release -p perf --example flood -- stuck     # one case
//! ```
//!
//! | case | the flood | the layer |
//! |---|---|---|
//! | `one-request` | one request adds 1,000,000 tasks, each holding 1 KiB | no controls |
//! | `one-request-capped` | the same | `max_tasks_per_request(1000)` |
//! | `stuck` | 20,000 requests (64 connections), one task each holding 1 KiB and waiting on a stuck downstream | no controls |
//! | `stuck-pending-only` | the same | `max_pending_tasks(1000)`, `LoadShedLayer` behind `HandleErrorLayer` (503) |
//! | `stuck-bounded` | the same | the same, and `max_concurrent_tasks(100)` |
//!
//! The stuck downstream is a `watch` channel the tasks wait on; once the
//! flood is answered and the accepted tasks have settled (started, or
//! waiting for a permit), it is released, and every accepted task must then
//! complete.
//!
//! Each case runs in a fresh child process of this binary, so that its peak
//! resident set (`VmHWM` in `/proc/self/status`) is its own. The live heap is
//! counted by this binary's global allocator. `pending` and `running` peaks
//! are sampled from `handle.stats()` every millisecond during the flood, and
//! read once more when the tasks have settled. The counts are checked
//! exactly (see `check`): the binary exits with status 1 if one is off, or
//! if a case takes longer than its time limit.

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::error_handling::HandleErrorLayer;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Extension, Router};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use tower::ServiceBuilder;
use tower_background::{BackgroundHandle, BackgroundLayer, BackgroundTasks, Stats};

// ---------------------------------------------------------------------------
// Live heap bytes, and their peak
// ---------------------------------------------------------------------------

struct Counting;

static LIVE: AtomicI64 = AtomicI64::new(0);
static PEAK: AtomicI64 = AtomicI64::new(0);

fn grow(by: i64) {
    let now = LIVE.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every call is forwarded unchanged to `System`; the counters are
// atomics that never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grow(layout.size() as i64);
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        grow(layout.size() as i64);
        System.alloc_zeroed(layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        grow(new_size as i64 - layout.size() as i64);
        System.realloc(ptr, layout, new_size)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// `field` of `/proc/self/status` (`VmRSS:`, `VmHWM:`), in KiB.
fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .expect("/proc/self/status (Linux)")
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .expect("a VmRSS and a VmHWM line")
}

fn mib_from_kib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn mib_from_bytes(bytes: i64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

// ---------------------------------------------------------------------------
// The cases
// ---------------------------------------------------------------------------

const PAYLOAD: usize = 1024;
const CONNECTIONS: usize = 64;
/// Bound on each wait of a case (the flood, the settling, the drain).
const LIMIT: Duration = Duration::from_secs(300);

#[derive(Clone, Copy)]
struct Case {
    name: &'static str,
    requests: usize,
    tasks_per_request: usize,
    stuck: bool,
    per_request: Option<usize>,
    max_pending: Option<usize>,
    max_concurrent: Option<usize>,
}

const CASES: [Case; 5] = [
    Case {
        name: "one-request",
        requests: 1,
        tasks_per_request: 1_000_000,
        stuck: false,
        per_request: None,
        max_pending: None,
        max_concurrent: None,
    },
    Case {
        name: "one-request-capped",
        requests: 1,
        tasks_per_request: 1_000_000,
        stuck: false,
        per_request: Some(1000),
        max_pending: None,
        max_concurrent: None,
    },
    Case {
        name: "stuck",
        requests: 20_000,
        tasks_per_request: 1,
        stuck: true,
        per_request: None,
        max_pending: None,
        max_concurrent: None,
    },
    Case {
        name: "stuck-pending-only",
        requests: 20_000,
        tasks_per_request: 1,
        stuck: true,
        per_request: None,
        max_pending: Some(1000),
        max_concurrent: None,
    },
    Case {
        name: "stuck-bounded",
        requests: 20_000,
        tasks_per_request: 1,
        stuck: true,
        per_request: None,
        max_pending: Some(1000),
        max_concurrent: Some(100),
    },
];

impl Case {
    fn controls(&self) -> String {
        let mut c = Vec::new();
        if let Some(n) = self.per_request {
            c.push(format!("max_tasks_per_request({n})"));
        }
        if let Some(n) = self.max_pending {
            c.push(format!("max_pending_tasks({n}) + LoadShed"));
        }
        if let Some(n) = self.max_concurrent {
            c.push(format!("max_concurrent_tasks({n})"));
        }
        if c.is_empty() {
            "none".to_owned()
        } else {
            c.join(", ")
        }
    }

    fn layer(&self) -> BackgroundLayer {
        let mut layer = BackgroundLayer::new();
        if let Some(n) = self.per_request {
            layer = layer.max_tasks_per_request(n);
        }
        if let Some(n) = self.max_pending {
            layer = layer.max_pending_tasks(n);
        }
        if let Some(n) = self.max_concurrent {
            layer = layer.max_concurrent_tasks(n);
        }
        layer
    }

    /// The most tasks the layer may start at once.
    fn running_bound(&self) -> u64 {
        self.max_concurrent.map_or(u64::MAX, |n| n as u64)
    }
}

/// What a case measured.
struct Figures {
    accepted: u64,
    shed: u64,
    /// Stats once the flood was answered and the tasks had settled (before
    /// the release).
    settled: Stats,
    /// Stats after the release and `wait_idle`.
    end: Stats,
    peak_pending: u64,
    peak_running: u64,
    /// Tasks whose body ran to its end, counted by the tasks.
    ran: u64,
    rss_before_kib: u64,
    rss_peak_kib: u64,
    heap_growth: i64,
    flood: Duration,
    drain: Duration,
}

async fn bounded<F: std::future::Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(LIMIT, f).await {
        Ok(out) => out,
        Err(_) => {
            eprintln!("flood: {what} took longer than {LIMIT:?}");
            std::process::exit(1);
        }
    }
}

fn app(
    case: Case,
    layer: BackgroundLayer,
    rx: watch::Receiver<bool>,
    ran: Arc<AtomicU64>,
) -> Router {
    let router = Router::new().route(
        "/work",
        post(move |Extension(tasks): Extension<BackgroundTasks>| {
            let (rx, ran) = (rx.clone(), ran.clone());
            async move {
                for _ in 0..case.tasks_per_request {
                    let payload = vec![1u8; PAYLOAD];
                    let ran = ran.clone();
                    let rx = case.stuck.then(|| rx.clone());
                    tasks.add(async move {
                        if let Some(mut rx) = rx {
                            // The stuck downstream: resolves once released.
                            let _ = rx.wait_for(|released| *released).await;
                        }
                        std::hint::black_box(&payload);
                        ran.fetch_add(1, Ordering::Relaxed);
                    });
                }
                StatusCode::ACCEPTED
            }
        }),
    );
    if case.max_pending.is_some() {
        router.layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(|_: tower::BoxError| async {
                    StatusCode::SERVICE_UNAVAILABLE
                }))
                .layer(tower::load_shed::LoadShedLayer::new())
                .layer(layer),
        )
    } else {
        router.layer(layer)
    }
}

/// Sends `requests` POSTs over `connections` keep-alive connections; returns
/// (202s, 503s). Any other answer ends the process with status 1.
async fn flood(addr: SocketAddr, requests: usize, connections: usize) -> (u64, u64) {
    let next = Arc::new(AtomicU64::new(0));
    let accepted = Arc::new(AtomicU64::new(0));
    let shed = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..connections.min(requests) {
        let (next, accepted, shed) = (next.clone(), accepted.clone(), shed.clone());
        workers.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .expect("handshake");
            tokio::spawn(conn);
            while next.fetch_add(1, Ordering::Relaxed) < requests as u64 {
                sender.ready().await.expect("connection ready");
                let req = http::Request::post("/work")
                    .header("host", "127.0.0.1")
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                let res = sender.send_request(req).await.expect("response");
                let status = res.status();
                res.into_body().collect().await.expect("body");
                match status {
                    StatusCode::ACCEPTED => accepted.fetch_add(1, Ordering::Relaxed),
                    StatusCode::SERVICE_UNAVAILABLE => shed.fetch_add(1, Ordering::Relaxed),
                    other => {
                        eprintln!("flood: unexpected status {other}");
                        std::process::exit(1);
                    }
                };
            }
        }));
    }
    for w in workers {
        w.await.expect("client worker");
    }
    (
        accepted.load(Ordering::Relaxed),
        shed.load(Ordering::Relaxed),
    )
}

/// Samples the peaks of `pending` and `running` every millisecond until
/// `stop` is set.
async fn sample(handle: BackgroundHandle, stop: Arc<AtomicBool>) -> (u64, u64) {
    let (mut pending, mut running) = (0, 0);
    loop {
        let s = handle.stats();
        pending = pending.max(s.pending);
        running = running.max(s.running);
        if stop.load(Ordering::Relaxed) {
            return (pending, running);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn run(case: Case) -> Figures {
    let layer = case.layer();
    let handle = layer.handle();
    let (tx, rx) = watch::channel(false);
    let ran = Arc::new(AtomicU64::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = app(case, layer, rx, ran.clone());
    let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let rss_before_kib = status_kib("VmRSS:");
    let heap_before = LIVE.load(Ordering::Relaxed);
    PEAK.store(heap_before, Ordering::Relaxed);
    let _ = std::fs::write("/proc/self/clear_refs", "5"); // VmHWM := VmRSS

    let stop = Arc::new(AtomicBool::new(false));
    let sampler = tokio::spawn(sample(handle.clone(), stop.clone()));
    let start = Instant::now();
    let (accepted, shed) = bounded("the flood", flood(addr, case.requests, CONNECTIONS)).await;
    let flood_time = start.elapsed();

    // Settle: every accepted task has started, or waits for a permit.
    let settled = if case.stuck {
        let running = (accepted * case.tasks_per_request as u64).min(case.running_bound());
        bounded("the settling", async {
            loop {
                let s = handle.stats();
                if s.running == running {
                    return s;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
    } else {
        handle.stats()
    };
    stop.store(true, Ordering::Relaxed);
    let (peak_pending, peak_running) = sampler.await.unwrap();
    let peak_pending = peak_pending.max(settled.pending);
    let peak_running = peak_running.max(settled.running);

    let drain = Instant::now();
    tx.send_replace(true);
    bounded("wait_idle", handle.wait_idle()).await;
    let drain = drain.elapsed();
    let end = handle.stats();
    let rss_peak_kib = status_kib("VmHWM:");
    let heap_growth = PEAK.load(Ordering::Relaxed) - heap_before;
    server.abort();
    Figures {
        accepted,
        shed,
        settled,
        end,
        peak_pending,
        peak_running,
        ran: ran.load(Ordering::Relaxed),
        rss_before_kib,
        rss_peak_kib,
        heap_growth,
        flood: flood_time,
        drain,
    }
}

/// The exact counts each case must show; returns what is off.
fn check(case: Case, f: &Figures) -> Vec<String> {
    let mut off = Vec::new();
    let mut expect = |what: &str, got: u64, want: u64| {
        if got != want {
            off.push(format!("{what}: {got}, expected {want}"));
        }
    };
    let k = case.tasks_per_request as u64;
    expect(
        "requests answered",
        f.accepted + f.shed,
        case.requests as u64,
    );
    let added = f.accepted * k;
    let kept = case
        .per_request
        .map_or(added, |cap| f.accepted * k.min(cap as u64));
    expect("total() after the flood", f.settled.total(), added);
    expect("total() at the end", f.end.total(), added);
    expect("refused", f.end.refused, added - kept);
    expect("completed", f.end.completed, kept);
    expect("tasks that ran", f.ran, kept);
    expect("pending at the end", f.end.pending, 0);
    expect("running at the end", f.end.running, 0);
    expect(
        "failed + panicked + timed out + discarded + cancelled + skipped + replaced",
        f.end.failed
            + f.end.panicked
            + f.end.timed_out
            + f.end.discarded
            + f.end.cancelled
            + f.end.skipped
            + f.end.replaced,
        0,
    );
    if case.max_pending.is_none() {
        expect("503s without a bound", f.shed, 0);
    }
    if let Some(bound) = case.max_pending {
        // Requests in flight when the bound was reached may still add theirs.
        let ceiling = (bound + CONNECTIONS * case.tasks_per_request) as u64;
        if f.peak_pending > ceiling {
            off.push(format!("peak pending {} over {ceiling}", f.peak_pending));
        }
    }
    if f.peak_running > case.running_bound() {
        off.push(format!("peak running {} over the limit", f.peak_running));
    }
    if case.max_concurrent.is_some() && f.shed == 0 {
        off.push("a bounded flood against a stuck downstream shed nothing".to_owned());
    }
    off
}

fn row(case: Case, f: &Figures) -> String {
    format!(
        "| `{}` | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1}s + {:.1}s |",
        case.name,
        case.controls(),
        case.requests,
        f.accepted,
        f.shed,
        f.end.total(),
        f.end.refused,
        f.peak_pending,
        f.peak_running,
        f.end.completed,
        mib_from_kib(f.rss_before_kib),
        mib_from_kib(f.rss_peak_kib),
        mib_from_bytes(f.heap_growth),
        f.flood.as_secs_f64(),
        f.drain.as_secs_f64(),
    )
}

const HEADER: &str = "| case | controls | requests | 202 | 503 | total() | refused | peak pending | peak running | completed after release | RSS before | peak RSS (VmHWM) | peak heap growth | flood + drain |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|";

fn child(name: &str) {
    let case = *CASES
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no case {name}"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let figures = rt.block_on(run(case));
    let off = check(case, &figures);
    println!("{}", row(case, &figures));
    if !off.is_empty() {
        for o in off {
            eprintln!("flood: {}: {o}", case.name);
        }
        std::process::exit(1);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, name] = args.as_slice() {
        if flag == "--child" {
            return child(name);
        }
    }
    let chosen: Vec<Case> = if args.is_empty() {
        CASES.to_vec()
    } else {
        args.iter()
            .map(|a| {
                *CASES.iter().find(|c| c.name == a).unwrap_or_else(|| {
                    eprintln!(
                        "flood: unknown case {a}; the cases: {}",
                        CASES.map(|c| c.name).join(", ")
                    );
                    std::process::exit(2)
                })
            })
            .collect()
    };
    let exe = std::env::current_exe().unwrap();
    let mut rows = Vec::new();
    let mut failed = false;
    for case in chosen {
        eprintln!("flood: {} ...", case.name);
        let out = Command::new(&exe)
            .args(["--child", case.name])
            .output()
            .expect("run a case in a child process");
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        rows.push(String::from_utf8_lossy(&out.stdout).trim().to_owned());
        failed |= !out.status.success();
    }
    println!("{HEADER}");
    for r in rows {
        println!("{r}");
    }
    if failed {
        eprintln!("flood: a case failed its checks (above)");
        std::process::exit(1);
    }
}
