//! Soak test: N requests at concurrency C over a loopback hyper server, K
//! background tasks each, then the same load with plain `tokio::spawn` in the
//! handler (the yardstick: the allocator may keep freed pages), then the
//! background run again (it must not raise the figures further).
//!
//! For each run it prints requests completed, tasks expected and completed
//! (must be equal), and the process RSS before, at its peak and after
//! `wait_idle` (from `/proc/self/status`; the peak is reset before each run
//! through `/proc/self/clear_refs`). Loopback only, bounded in time.
//!
//! ```text
//! cargo run --release -p perf --example soak                       # 200000 requests, C = 256, K = 3
//! cargo run --release -p perf --example soak -- --requests 50000 --concurrency 64 --tasks 5
//! cargo run --release -p perf --example soak -- --rounds 5   # five background runs
//! ```
//!
//! Exits with status 1 if any run lost or duplicated a task, or if the
//! last background run ended more than 10% (at least 8 MiB) above the
//! highest figure of the earlier runs (the allocator keeps freed pages).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tower::{service_fn, Layer};
use tower_background::{BackgroundLayer, BackgroundTasks};

/// No run may take longer than this.
const RUN_LIMIT: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, Copy)]
struct Args {
    requests: u64,
    concurrency: u64,
    tasks: u64,
    /// Background runs (the spawn baseline runs once, after the first).
    rounds: u64,
}

fn parse_args() -> Args {
    let mut args = Args {
        requests: 200_000,
        concurrency: 256,
        tasks: 3,
        rounds: 2,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .and_then(|v| v.replace('_', "").parse::<u64>().ok());
        let (Some(value), true) = (value, value.is_some_and(|v| v > 0)) else {
            eprintln!(
                "usage: soak [--requests N] [--concurrency C] [--tasks K] [--rounds R] (positive integers)"
            );
            std::process::exit(2);
        };
        match flag.as_str() {
            "--requests" | "-n" => args.requests = value,
            "--concurrency" | "-c" => args.concurrency = value,
            "--tasks" | "-k" => args.tasks = value,
            "--rounds" => args.rounds = value.max(2),
            other => {
                eprintln!("unknown argument {other}");
                std::process::exit(2);
            }
        }
    }
    args
}

/// (VmRSS, VmHWM) in KiB.
fn rss() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Resets VmHWM to the current RSS (Linux: "5" > /proc/self/clear_refs).
fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Background,
    Spawn,
}

#[derive(Debug)]
struct Run {
    label: String,
    requests: u64,
    expected: u64,
    completed: u64,
    before: u64,
    peak: u64,
    after: u64,
    elapsed: Duration,
}

/// The work of one task: a yield (so it really is asynchronous) and a count.
async fn work(counter: Arc<AtomicU64>, expected: u64, done: Arc<Notify>) {
    tokio::task::yield_now().await;
    if counter.fetch_add(1, Ordering::SeqCst) + 1 == expected {
        done.notify_one();
    }
}

async fn serve<S>(svc: S) -> (SocketAddr, watch::Sender<bool>, tokio::task::JoinHandle<()>)
where
    S: tower::Service<
            Request<Incoming>,
            Response = Response<tower_background::BackgroundBody<Full<Bytes>>>,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, mut stopped) = watch::channel(false);
    let task = tokio::spawn(async move {
        let graceful = GracefulShutdown::new();
        let builder = auto::Builder::new(TokioExecutor::new());
        loop {
            tokio::select! {
                conn = listener.accept() => {
                    let Ok((stream, _)) = conn else { continue };
                    let conn = builder
                        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc.clone()))
                        .into_owned();
                    let conn = graceful.watch(conn);
                    tokio::spawn(async move { let _ = conn.await; });
                }
                _ = stopped.changed() => break,
            }
        }
        drop(listener);
        graceful.shutdown().await;
    });
    (addr, stop, task)
}

async fn run(mode: Mode, label: &str, args: Args) -> Run {
    let (before, _) = rss();
    let peak_reset = reset_peak();
    let expected = args.requests * args.tasks;
    let counter = Arc::new(AtomicU64::new(0));
    let done = Arc::new(Notify::new());
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let k = args.tasks;
    let (c, d) = (Arc::clone(&counter), Arc::clone(&done));
    // Both modes go through the layer (so the response types match); the
    // spawn mode adds no task to it and spawns its work instead.
    let svc = layer.layer(service_fn(move |req: Request<Incoming>| {
        match mode {
            Mode::Background => {
                let tasks = req.extensions().get::<BackgroundTasks>().unwrap();
                for _ in 0..k {
                    tasks.add(work(Arc::clone(&c), expected, Arc::clone(&d)));
                }
            }
            Mode::Spawn => {
                let (c, d) = (Arc::clone(&c), Arc::clone(&d));
                tokio::spawn(async move {
                    for _ in 0..k {
                        work(Arc::clone(&c), expected, Arc::clone(&d)).await;
                    }
                });
            }
        }
        async { Ok::<_, Infallible>(Response::new(Full::from("ok"))) }
    }));
    let (addr, stop, server) = serve(svc).await;
    let start = Instant::now();

    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(args.concurrency as usize)
        .build_http::<Empty<Bytes>>();
    let uri: http::Uri = format!("http://{addr}/").parse().unwrap();
    let next = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..args.concurrency {
        let (client, next, uri) = (client.clone(), Arc::clone(&next), uri.clone());
        let n = args.requests;
        workers.push(tokio::spawn(async move {
            let mut ok = 0u64;
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let res = client.get(uri.clone()).await.expect("request");
                assert_eq!(res.status(), 200);
                res.into_body().collect().await.expect("body");
                ok += 1;
            }
            ok
        }));
    }
    let mut requests = 0;
    for w in workers {
        requests += w.await.expect("client worker");
    }
    // Wait for every task.
    match mode {
        Mode::Background => handle.wait_idle().await,
        Mode::Spawn => {
            let notified = done.notified();
            if counter.load(Ordering::SeqCst) < expected {
                notified.await;
            }
        }
    }
    let elapsed = start.elapsed();
    let (after, peak) = rss();
    drop(client);
    let _ = stop.send(true);
    server.await.expect("server");
    let completed = match mode {
        Mode::Background => {
            let stats = handle.stats();
            assert_eq!(stats.completed, counter.load(Ordering::SeqCst), "{stats:?}");
            stats.completed
        }
        Mode::Spawn => counter.load(Ordering::SeqCst),
    };
    Run {
        label: if peak_reset {
            label.to_owned()
        } else {
            format!("{label} (peak: whole process)")
        },
        requests,
        expected,
        completed,
        before,
        peak,
        after,
        elapsed,
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

#[tokio::main]
async fn main() {
    let args = parse_args();
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "soak: {} requests, concurrency {}, {} tasks each, {} worker threads, loopback",
        args.requests, args.concurrency, args.tasks, workers
    );
    let mut runs = Vec::new();
    let mut plan = vec![
        (Mode::Background, "tower-background, run 1".to_owned()),
        (Mode::Spawn, "tokio::spawn in the handler".to_owned()),
    ];
    for round in 2..=args.rounds {
        plan.push((Mode::Background, format!("tower-background, run {round}")));
    }
    for (mode, label) in plan {
        let r = tokio::time::timeout(RUN_LIMIT, run(mode, &label, args))
            .await
            .unwrap_or_else(|_| panic!("{label} took longer than {RUN_LIMIT:?}"));
        println!(
            "  {}: {} requests in {:.1?}, tasks {}/{}",
            r.label, r.requests, r.elapsed, r.completed, r.expected
        );
        runs.push(r);
    }

    println!();
    println!("| run | requests | tasks expected | tasks completed | RSS before | RSS peak | RSS after wait_idle | time |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in &runs {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.1?} |",
            r.label,
            r.requests,
            r.expected,
            r.completed,
            mib(r.before),
            mib(r.peak),
            mib(r.after),
            r.elapsed
        );
    }

    let lost = runs
        .iter()
        .any(|r| r.completed != r.expected || r.requests != args.requests);
    // The allocator keeps freed pages, so the yardstick for the last run
    // is the highest figure any earlier run left behind (the spawn baseline
    // included), with 10% (at least 8 MiB) of slack.
    let (earlier, last) = runs.split_at(runs.len() - 1);
    let last = &last[0];
    let (first, baseline) = (&earlier[0], &earlier[1]);
    let highest_after = earlier.iter().map(|r| r.after).max().unwrap_or(0);
    let highest_peak = earlier.iter().map(|r| r.peak).max().unwrap_or(0);
    let slack = |kib: u64| kib + (kib / 10).max(8 * 1024);
    let grew = last.after > slack(highest_after) || last.peak > slack(highest_peak);
    println!();
    println!(
        "tasks: {}",
        if lost {
            "LOST OR DUPLICATED"
        } else {
            "all completed exactly once"
        }
    );
    println!(
        "last background run: after {} (first {}, spawn baseline {}, highest earlier {}), \
         peak {} (first {}, spawn baseline {}, highest earlier {}): {}",
        mib(last.after),
        mib(first.after),
        mib(baseline.after),
        mib(highest_after),
        mib(last.peak),
        mib(first.peak),
        mib(baseline.peak),
        mib(highest_peak),
        if grew { "GREW" } else { "no growth" }
    );
    if lost || grew {
        std::process::exit(1);
    }
}
