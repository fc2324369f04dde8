//! How long one request with many ready tasks holds up the other requests
//! of a current-thread server, beyond the time its handler spends adding
//! them.
//!
//! ```text
//! cargo run --release -p perf --example stall                # 100,000 tasks, 3 runs per case
//! cargo run --release -p perf --example stall -- 10000 5     # another count, 5 runs
//! cargo run --release -p perf --example stall -- 100000 3 sequential   # one case
//! ```
//!
//! On a current-thread runtime, a "ticker" sends one request without tasks
//! through the same service after another, yielding to the scheduler
//! between two, and stamps the time each one completes. Meanwhile one "big"
//! request's handler adds N tasks that are ready at once (each increments a
//! counter), and its body ends. The longest gap between two ticks, less the
//! part of that gap spent in the big handler's own add loop (which no
//! scheduler can interleave), is the stall that running the tasks caused.
//!
//! | case | the big request |
//! |---|---|
//! | `sequential` | `BackgroundLayer::new()`: the N tasks run one after another |
//! | `concurrent` | `Execution::Concurrent`: one spawned future per task |
//! | `spawn` | reference: the handler `tokio::spawn`s the N tasks (the layer stays in place for the ticker's requests) |
//!
//! The figure before the big request (`idle gap`) is the ticker's own
//! longest gap, the floor of the measurement.
//!
//! Times are taken twice: on the wall clock, and on the runtime thread's CPU
//! clock (`CLOCK_THREAD_CPUTIME_ID`). Everything of a current-thread runtime
//! runs on that one thread, so its CPU clock measures the work that held the
//! other requests up, without the time the operating system gave the core to
//! other processes; on a shared machine the wall-clock figures include that.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A point in time on two clocks: the wall clock and this thread's CPU clock.
#[derive(Debug, Clone, Copy)]
struct Stamp {
    wall: Instant,
    cpu: Duration,
}

impl Stamp {
    fn now() -> Self {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid timespec to write to.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
        Stamp {
            wall: Instant::now(),
            cpu: Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32),
        }
    }
}

/// Two durations: on the wall clock and on the thread's CPU clock.
#[derive(Debug, Clone, Copy, Default)]
struct Both {
    wall: Duration,
    cpu: Duration,
}

impl Both {
    fn between(a: Stamp, b: Stamp) -> Self {
        Both {
            wall: b.wall.saturating_duration_since(a.wall),
            cpu: b.cpu.saturating_sub(a.cpu),
        }
    }

    fn max(self, other: Both) -> Both {
        Both {
            wall: self.wall.max(other.wall),
            cpu: self.cpu.max(other.cpu),
        }
    }

    fn show(self) -> String {
        format!("{:.3} ({:.3})", ms(self.cpu), ms(self.wall))
    }
}

use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{service_fn, Layer, Service, ServiceExt};
use tower_background::{BackgroundLayer, BackgroundTasks, Execution};

/// The longest the ticker runs (a bound on its loop).
const MAX_TICKS: usize = 5_000_000;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n: u64 = args
        .first()
        .map_or(100_000, |a| a.parse().expect("a task count"));
    let runs: usize = args.get(1).map_or(3, |a| a.parse().expect("a run count"));
    let cases: Vec<&str> = match args.get(2) {
        Some(case) => vec![case.as_str()],
        None => vec!["sequential", "concurrent", "spawn"],
    };
    println!("one request adds {n} ready tasks on a current-thread runtime; times in ms, {runs} runs per case");
    println!();
    println!("Each figure: thread CPU time (wall-clock time in parentheses).");
    println!();
    println!("| case | handler's add loop | idle gap (floor) | longest stall of the other requests beyond the add loop | all tasks done, after the add loop | ticks while the tasks ran |");
    println!("|---|---|---|---|---|---|");
    for case in cases {
        assert!(
            ["sequential", "concurrent", "spawn"].contains(&case),
            "unknown case {case:?}"
        );
        for _ in 0..runs {
            let r = run(case, n);
            println!(
                "| `{case}` | {} | {} | **{}** | {} | {} |",
                r.add_loop.show(),
                r.idle_gap.show(),
                r.stall.show(),
                r.drained.show(),
                r.ticks_while_running
            );
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

struct Measured {
    add_loop: Both,
    idle_gap: Both,
    stall: Both,
    drained: Both,
    ticks_while_running: usize,
}

/// The add loop of the big request: when it started and ended.
#[derive(Default)]
struct AddLoop {
    started: Option<Stamp>,
    ended: Option<Stamp>,
}

fn run(case: &str, n: u64) -> Measured {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(120), measure(case, n))
            .await
            .expect("the case finishes within 120 s")
    })
}

async fn measure(case: &str, n: u64) -> Measured {
    let ran = Arc::new(AtomicU64::new(0));
    let add_loop = Arc::new(Mutex::new(AddLoop::default()));
    let layer = match case {
        "concurrent" => BackgroundLayer::new().execution(Execution::Concurrent),
        _ => BackgroundLayer::new(),
    };
    let handle = layer.handle();
    let spawn = case == "spawn";
    let inner = {
        let (ran, add_loop) = (Arc::clone(&ran), Arc::clone(&add_loop));
        service_fn(move |req: Request<Full<bytes::Bytes>>| {
            if req.uri().path() == "/big" {
                let tasks = req.extensions().get::<BackgroundTasks>();
                let started = Stamp::now();
                for _ in 0..n {
                    let ran = Arc::clone(&ran);
                    let task = async move {
                        ran.fetch_add(1, Ordering::Relaxed);
                    };
                    if spawn {
                        drop(tokio::spawn(task));
                    } else {
                        tasks.expect("the layer").add(task);
                    }
                }
                let mut l = add_loop.lock().expect("not poisoned");
                l.started = Some(started);
                l.ended = Some(Stamp::now());
            }
            std::future::ready(Ok::<_, Infallible>(Response::new(Full::new(
                bytes::Bytes::from_static(b"ok"),
            ))))
        })
    };
    let svc = layer.layer(inner);
    async fn call<S, B>(svc: S, path: &'static str)
    where
        S: Service<Request<Full<bytes::Bytes>>, Response = Response<B>, Error = Infallible>,
        B: http_body::Body,
        B::Error: std::fmt::Debug,
    {
        let req = Request::builder()
            .uri(path)
            .body(Full::default())
            .expect("a request");
        let res = svc.oneshot(req).await.expect("infallible");
        res.into_body().collect().await.expect("a body");
    }

    // The ticker: other requests, one after another.
    let stop = Arc::new(AtomicBool::new(false));
    let ticker = {
        let (svc, stop) = (svc.clone(), Arc::clone(&stop));
        tokio::spawn(async move {
            let mut ticks = Vec::with_capacity(1 << 20);
            for _ in 0..MAX_TICKS {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                call(svc.clone(), "/").await;
                ticks.push(Stamp::now());
                tokio::task::yield_now().await;
            }
            ticks
        })
    };
    tokio::time::sleep(Duration::from_millis(30)).await;
    let big_sent = Stamp::now();
    let big = tokio::spawn(call(svc.clone(), "/big"));
    big.await.expect("the big request");
    // Every task ran (bounded by the case's timeout).
    while ran.load(Ordering::Relaxed) < n {
        tokio::task::yield_now().await;
    }
    let done = Stamp::now();
    if !spawn {
        handle.wait_idle().await;
        assert_eq!(handle.stats().completed, n, "every task completed");
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    stop.store(true, Ordering::Relaxed);
    let ticks = ticker.await.expect("the ticker");

    let (started, ended) = {
        let l = add_loop.lock().expect("not poisoned");
        (
            l.started.expect("the add loop ran"),
            l.ended.expect("ended"),
        )
    };
    // A gap [a, b] less its part that overlaps the add loop, on both clocks.
    let beyond = |a: Stamp, b: Stamp| -> Both {
        let gap = Both::between(a, b);
        let wall = b
            .wall
            .min(ended.wall)
            .saturating_duration_since(a.wall.max(started.wall));
        let cpu = b.cpu.min(ended.cpu).saturating_sub(a.cpu.max(started.cpu));
        Both {
            wall: gap.wall.saturating_sub(wall),
            cpu: gap.cpu.saturating_sub(cpu),
        }
    };
    let mut idle_gap = Both::default();
    let mut stall = Both::default();
    let mut ticks_while_running = 0;
    for w in ticks.windows(2) {
        if w[1].wall <= big_sent.wall {
            idle_gap = idle_gap.max(Both::between(w[0], w[1]));
        } else {
            stall = stall.max(beyond(w[0], w[1]));
        }
        if w[1].wall > ended.wall && w[1].wall <= done.wall {
            ticks_while_running += 1;
        }
    }
    assert!(ticks.len() > 10, "the ticker ran");
    Measured {
        add_loop: Both::between(started, ended),
        idle_gap,
        stall,
        drained: Both::between(ended, done),
        ticks_while_running,
    }
}
