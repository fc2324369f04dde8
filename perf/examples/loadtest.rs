//! End-to-end loopback benchmark of `BackgroundLayer` against bare axum and
//! hand-written `tokio::spawn`. Not a test: a harness that prints
//! tables for docs/PERFORMANCE.md.
//!
//! ```text
//! cargo run --release -p perf --example loadtest                 # throughput, latency, CPU, start delay
//! cargo run --release -p perf --example loadtest -- sleep        # tasks that sleep 100 ms: req/s, CPU, peak RSS vs spawn
//! cargo run --release -p perf --example loadtest -- h2           # HTTP/2 latency (h2load), one core busy and idle
//! cargo run --release -p perf --example loadtest -- instructions # server instructions per request (callgrind)
//! cargo run --release -p perf --example loadtest -- --concurrency 64 --rounds 6 --secs 3 --warmup 1
//! ```
//!
//! Every server variant runs in its own child process (`loadtest serve
//! VARIANT`, a multi-threaded tokio runtime with one worker per core) so its
//! CPU time and memory can be read from `/proc/<pid>`; the load generator is
//! this process: `--concurrency` keep-alive HTTP/1.1 connections, each
//! sending `GET /` and reading the whole response before sending the next.
//! The variants serve the same handler (a 5-byte text body):
//!
//! | variant | what the handler does |
//! |---|---|
//! | `bare` | nothing else; no layer |
//! | `layer_no_task` | nothing else, behind `BackgroundLayer` |
//! | `layer_1_task` | queues one task that increments an `AtomicU64` |
//! | `spawn_1_task` | `tokio::spawn`s the same task; no layer |
//! | `layer_no_task_limits`, `layer_1_task_limits` | `layer_no_task` and `layer_1_task` with `max_concurrent_tasks(1024)`, `max_pending_tasks(100_000)`, `max_tasks_per_request(100)` and `task_timeout(30 s)` set, none of them reached |
//! | `layer_1_task_delay` | like `layer_1_task`, and records the time from the end of the response body to the task's first poll |
//! | `layer_sleep_task`, `spawn_sleep_task` | the task sleeps 100 ms, then increments (the `sleep` mode; `layer_sleep` and `spawn_sleep` are the same variants under their former names) |
//!
//! The throughput variants are measured in alternating rounds (A B C D, then
//! D C B A, ...): each round opens fresh connections, warms up, then measures
//! requests, latencies and the server's CPU time over the same window. Ratios
//! are taken per round (paired), then their median is reported.
//!
//! The `sleep` mode (formerly `rss`, still accepted) starts a fresh server
//! per run for `layer_sleep_task` and `spawn_sleep_task`, alternating which
//! goes first, and reports per run the ratios of throughput, server CPU per
//! request and peak RSS (`VmHWM`), each against `spawn_sleep_task` of the
//! same run.
//!
//! The `h2` mode runs `h2load -n N -c 1 -m 1` (Debian's `nghttp2-client`)
//! against the same servers over h2c (HTTP/2 with prior knowledge, no
//! `TCP_NODELAY`: `axum::serve` does not set it), once with a busy-loop
//! process pinning one core and once without, and reports each variant's
//! mean response latency.

use std::convert::Infallible;
use std::io::{BufRead, BufReader, Write as _};
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::Path;
use axum::routing::get;
use axum::{Extension, Router};
use bytes::Bytes;
use http::Response;
use http_body::{Frame, SizeHint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tower_background::{BackgroundHandle, BackgroundLayer, BackgroundTasks};

// ---------------------------------------------------------------- options

#[derive(Debug, Clone)]
struct Options {
    concurrency: usize,
    rounds: usize,
    secs: f64,
    warmup: f64,
    client_threads: usize,
    /// The throughput variants; the first is the baseline of the ratios.
    variants: Vec<String>,
    /// Whether `--variants` was given.
    variants_given: bool,
    /// Requests measured per variant in the `instructions` mode.
    requests: u64,
    /// Requests per h2load run in the `h2` mode.
    h2_requests: u64,
}

impl Options {
    fn parse(args: &[String]) -> Self {
        let mut o = Options {
            concurrency: 64,
            rounds: 6,
            secs: 3.0,
            warmup: 1.0,
            client_threads: 2,
            variants: ["bare", "layer_no_task", "layer_1_task", "spawn_1_task"]
                .map(String::from)
                .to_vec(),
            variants_given: false,
            requests: 20_000,
            h2_requests: 400,
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut value = || -> String {
                it.next()
                    .unwrap_or_else(|| panic!("{a} needs a value"))
                    .clone()
            };
            match a.as_str() {
                "--concurrency" | "-c" => o.concurrency = value().parse().expect("a number"),
                "--rounds" | "-r" => o.rounds = value().parse().expect("a number"),
                "--secs" | "-s" => o.secs = value().parse().expect("seconds"),
                "--warmup" | "-w" => o.warmup = value().parse().expect("seconds"),
                "--client-threads" => o.client_threads = value().parse().expect("a number"),
                "--variants" => {
                    o.variants = value().split(',').map(String::from).collect();
                    o.variants_given = true;
                    for v in &o.variants {
                        variant(v);
                    }
                }
                "rss" | "sleep" | "instructions" | "h2" => {}
                "--requests" => o.requests = value().parse().expect("a number"),
                "--h2-requests" | "-n" => o.h2_requests = value().parse().expect("a number"),
                other => panic!(
                    "unknown argument {other:?}; usage: loadtest [sleep|h2|instructions] [--variants a,b,..] [--concurrency N] \
                     [--rounds N] [--secs S] [--warmup S] [--client-threads N] [--requests N] [--h2-requests N]"
                ),
            }
        }
        assert!(o.concurrency > 0 && o.rounds > 0 && o.secs > 0.0);
        o
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve") => serve(args.get(1).expect("serve VARIANT")),
        Some("busy") => busy(),
        Some("rss" | "sleep") => sleep(&Options::parse(&args)),
        Some("h2") => h2(&Options::parse(&args)),
        Some("instructions") => instructions(&Options::parse(&args)),
        _ => throughput(&Options::parse(&args)),
    }
}

// ---------------------------------------------------------------- server (child process)

/// Tasks that have run, in this server process.
static RAN: AtomicU64 = AtomicU64::new(0);
/// Start delays (ns) recorded by the `layer_1_task_delay` variant.
static DELAYS: Mutex<Vec<u64>> = Mutex::new(Vec::new());
static EPOCH: OnceLock<Instant> = OnceLock::new();

fn now_ns() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// A one-frame body that stamps the time at which it yields its last frame.
struct StampBody {
    data: Option<Bytes>,
    ended_at: Arc<AtomicU64>,
}

impl http_body::Body for StampBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let data = self.data.take();
        if data.is_some() {
            self.ended_at.store(now_ns(), Ordering::Release);
        }
        Poll::Ready(data.map(|d| Ok(Frame::data(d))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

pin_project_lite::pin_project! {
    /// A body that forwards everything (the `floor_no_task` variant).
    struct PassBody<B> {
        #[pin]
        inner: B,
    }
}

impl<B: http_body::Body> http_body::Body for PassBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

async fn hello() -> &'static str {
    "hello"
}

/// Where a variant puts `BackgroundLayer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placement {
    /// No layer.
    None,
    /// `Router::layer`, as an application usually does.
    Route,
    /// Not `BackgroundLayer` but the floor of its shape, by `Router::layer`:
    /// a layer that inserts one `Arc` (of the size of a request's queue)
    /// into the request's extensions and wraps the response body in a
    /// pass-through body.
    Floor,
}

/// The handler of `/` and where the layer goes, by variant name.
fn variant(name: &str) -> (&'static str, Placement) {
    match name {
        "bare" => ("hello", Placement::None),
        "layer_no_task" => ("hello", Placement::Route),
        "layer_1_task" => ("task", Placement::Route),
        "layer_no_task_limits" => ("hello", Placement::Route),
        "layer_1_task_limits" => ("task", Placement::Route),
        "spawn_1_task" => ("spawn", Placement::None),
        "floor_no_task" => ("hello", Placement::Floor),
        "layer_1_task_delay" => ("delay", Placement::Route),
        "layer_sleep_task" | "layer_sleep" => ("task_sleep", Placement::Route),
        "spawn_sleep_task" | "spawn_sleep" => ("spawn_sleep", Placement::None),
        other => panic!("unknown variant {other:?}"),
    }
}

fn routes(handler: &str) -> Router {
    match handler {
        "hello" => Router::new().route("/", get(hello)),
        "task" => Router::new().route(
            "/",
            get(|Extension(tasks): Extension<BackgroundTasks>| async move {
                tasks.add(async {
                    RAN.fetch_add(1, Ordering::Relaxed);
                });
                "hello"
            }),
        ),
        "spawn" => Router::new().route(
            "/",
            get(|| async {
                tokio::spawn(async {
                    RAN.fetch_add(1, Ordering::Relaxed);
                });
                "hello"
            }),
        ),
        "delay" => Router::new().route(
            "/",
            get(|Extension(tasks): Extension<BackgroundTasks>| async move {
                let ended_at = Arc::new(AtomicU64::new(0));
                let stamp = Arc::clone(&ended_at);
                tasks.add(async move {
                    let first_poll = now_ns();
                    let end = stamp.load(Ordering::Acquire);
                    if end > 0 {
                        DELAYS
                            .lock()
                            .expect("not poisoned")
                            .push(first_poll.saturating_sub(end));
                    }
                    RAN.fetch_add(1, Ordering::Relaxed);
                });
                Response::new(axum::body::Body::new(StampBody {
                    data: Some(Bytes::from_static(b"hello")),
                    ended_at,
                }))
            }),
        ),
        "task_sleep" => Router::new().route(
            "/",
            get(|Extension(tasks): Extension<BackgroundTasks>| async move {
                tasks.add(async {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    RAN.fetch_add(1, Ordering::Relaxed);
                });
                "hello"
            }),
        ),
        "spawn_sleep" => Router::new().route(
            "/",
            get(|| async {
                tokio::spawn(async {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    RAN.fetch_add(1, Ordering::Relaxed);
                });
                "hello"
            }),
        ),
        other => unreachable!("handler {other}"),
    }
}

/// The variant's router, with the layer in place for `Placement::Route`,
/// plus the control route `/stats/{expect}` (outside the layer): it waits
/// for the tasks, then reports `ran completed delays p50 p99` (delays in ns).
fn app(name: &str, layer: &BackgroundLayer) -> Router {
    let (handler, placement) = variant(name);
    let mut router = routes(handler);
    match placement {
        Placement::None => {}
        Placement::Route => router = router.layer(layer.clone()),
        Placement::Floor => {
            #[derive(Clone)]
            struct Marker(#[allow(dead_code)] Arc<[u64; 23]>);
            router = router.layer(
                tower::ServiceBuilder::new()
                    .map_request(|mut req: axum::extract::Request| {
                        req.extensions_mut().insert(Marker(Arc::new([0; 23])));
                        req
                    })
                    .map_response(|res: axum::response::Response| {
                        res.map(|inner| axum::body::Body::new(PassBody { inner }))
                    }),
            );
        }
    }
    let handle = layer.handle();
    router.route(
        "/stats/{expect}",
        get(move |Path(expect): Path<u64>| stats(handle.clone(), expect)),
    )
}

async fn stats(handle: BackgroundHandle, expect: u64) -> String {
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        handle.wait_idle().await;
        // `tokio::spawn`ed tasks have no `wait_idle`: wait for the count
        // (bounded by the timeout above).
        while RAN.load(Ordering::Relaxed) < expect {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
    let mut delays = std::mem::take(&mut *DELAYS.lock().expect("not poisoned"));
    delays.sort_unstable();
    format!(
        "{} {} {} {} {}",
        RAN.load(Ordering::Relaxed),
        handle.stats().completed,
        delays.len(),
        percentile(&delays, 0.50),
        percentile(&delays, 0.99),
    )
}

fn serve(variant: &str) {
    let _ = EPOCH.get_or_init(Instant::now);
    // Exit when the parent closes our stdin (or dies).
    std::thread::spawn(|| {
        let mut sink = String::new();
        while std::io::stdin().read_line(&mut sink).is_ok_and(|n| n > 0) {}
        std::process::exit(0);
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("an address").port();
        println!("{port}");
        std::io::stdout().flush().expect("stdout");
        let layer = BackgroundLayer::new();
        // The `_limits` variants: every limit set, none of them reached.
        let layer = if variant.ends_with("_limits") {
            layer
                .max_concurrent_tasks(1024)
                .max_pending_tasks(100_000)
                .max_tasks_per_request(100)
                .task_timeout(Duration::from_secs(30))
        } else {
            layer
        };
        axum::serve(listener, app(variant, &layer))
            .await
            .expect("serve");
    });
}

/// A server variant in a child process of this binary.
struct Server {
    variant: String,
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn start(variant: &str) -> Self {
        Self::start_under(variant, &[])
    }

    /// Starts the server under `wrapper` (e.g. `valgrind --tool=callgrind`).
    fn start_under(variant: &str, wrapper: &[&str]) -> Self {
        let exe = std::env::current_exe().expect("current exe");
        let exe = exe.to_str().expect("a UTF-8 path");
        let mut argv: Vec<&str> = wrapper.to_vec();
        argv.extend([exe, "serve", variant]);
        let mut child = Command::new(argv[0])
            .args(&argv[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the server process");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped stdout"))
            .read_line(&mut line)
            .expect("read the port");
        let port: u16 = line.trim().parse().expect("the server prints its port");
        Server {
            variant: variant.to_owned(),
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU time of all the server's threads so far, in ns
    /// (`/proc/<pid>/task/*/schedstat`, falling back to `/proc/<pid>/stat`).
    fn cpu_ns(&self) -> u64 {
        let tasks = format!("/proc/{}/task", self.pid());
        let mut sum = 0u64;
        let mut any = false;
        if let Ok(dir) = std::fs::read_dir(&tasks) {
            for entry in dir.flatten() {
                let path = entry.path().join("schedstat");
                if let Ok(text) = std::fs::read_to_string(path) {
                    if let Some(ns) = text
                        .split_whitespace()
                        .next()
                        .and_then(|f| f.parse::<u64>().ok())
                    {
                        sum += ns;
                        any = true;
                    }
                }
            }
        }
        if any {
            return sum;
        }
        // utime + stime, in clock ticks of 10 ms (USER_HZ = 100 on Linux).
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))
            .expect("/proc/<pid>/stat");
        let after = &stat[stat.rfind(')').expect("comm") + 2..];
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks: u64 =
            fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
        ticks * 10_000_000
    }

    /// A field of `/proc/<pid>/status`, in kB.
    fn status_kb(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("/proc/<pid>/status");
        status
            .lines()
            .find_map(|l| {
                l.strip_prefix(field)?
                    .trim_start_matches(':')
                    .trim()
                    .strip_suffix("kB")?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("{field} in /proc/<pid>/status"))
    }

    /// Asks the server to wait for its tasks and report.
    async fn stats(&self, expect: u64) -> ServerStats {
        let body = get_text(self.addr, &format!("/stats/{expect}")).await;
        let f: Vec<u64> = body
            .split_whitespace()
            .map(|x| x.parse().expect("a number"))
            .collect();
        ServerStats {
            ran: f[0],
            completed: f[1],
            delays: f[2],
            delay_p50_ns: f[3],
            delay_p99_ns: f[4],
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
struct ServerStats {
    ran: u64,
    completed: u64,
    delays: u64,
    delay_p50_ns: u64,
    delay_p99_ns: u64,
}

// ---------------------------------------------------------------- load generator

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";

/// Reads one response from `stream` into `buf`; returns its status code.
async fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> u16 {
    buf.clear();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await.expect("read a response");
        assert!(n > 0, "the server closed the connection");
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = std::str::from_utf8(&buf[..end]).expect("an ASCII head");
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())?
            })
            .expect("a content-length");
        let status: u16 = head[9..12].parse().expect("a status code");
        while buf.len() < end + 4 + length {
            let n = stream.read(&mut chunk).await.expect("read a body");
            assert!(n > 0, "the server closed the connection");
            buf.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(buf.len(), end + 4 + length, "one response at a time");
        return status;
    }
}

async fn get_text(addr: SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    stream.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    let status = read_response(&mut stream, &mut buf).await;
    assert_eq!(status, 200, "{path}");
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a head")
        + 4;
    String::from_utf8(buf[end..].to_vec()).expect("text")
}

/// What one round measured.
#[derive(Debug, Clone)]
struct Round {
    /// Responses received, warm-up included (for the task count check).
    responses: u64,
    /// Responses completed inside the measurement window.
    measured: u64,
    window: Duration,
    /// Server CPU time over the window.
    cpu_ns: u64,
    /// Latencies (µs) of the requests completed in the window, sorted.
    latencies_us: Vec<u32>,
}

impl Round {
    fn rps(&self) -> f64 {
        self.measured as f64 / self.window.as_secs_f64()
    }

    fn cpu_us_per_request(&self) -> f64 {
        self.cpu_ns as f64 / 1_000.0 / self.measured as f64
    }
}

/// Drives `server` with `o.concurrency` connections for one round.
fn round(client: &tokio::runtime::Runtime, server: &Server, o: &Options) -> Round {
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let addr = server.addr;
    let clients: Vec<_> = (0..o.concurrency)
        .map(|_| {
            let (measuring, stop) = (Arc::clone(&measuring), Arc::clone(&stop));
            client.spawn(async move {
                let mut stream = TcpStream::connect(addr).await.expect("connect");
                stream.set_nodelay(true).expect("nodelay");
                let mut buf = Vec::with_capacity(4096);
                let mut latencies = Vec::with_capacity(1 << 16);
                let mut responses = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let sent = Instant::now();
                    stream.write_all(REQUEST).await.expect("write a request");
                    let status = read_response(&mut stream, &mut buf).await;
                    assert_eq!(status, 200);
                    responses += 1;
                    if measuring.load(Ordering::Relaxed) {
                        latencies.push(sent.elapsed().as_micros().min(u32::MAX as u128) as u32);
                    }
                }
                (responses, latencies)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(o.warmup));
    let cpu0 = server.cpu_ns();
    let t0 = Instant::now();
    measuring.store(true, Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs_f64(o.secs));
    measuring.store(false, Ordering::Relaxed);
    let window = t0.elapsed();
    let cpu1 = server.cpu_ns();
    stop.store(true, Ordering::Relaxed);
    let mut responses = 0;
    let mut latencies_us = Vec::new();
    client.block_on(async {
        for c in clients {
            let (r, l) = c.await.expect("a client task");
            responses += r;
            latencies_us.extend(l);
        }
    });
    latencies_us.sort_unstable();
    Round {
        responses,
        measured: latencies_us.len() as u64,
        window,
        cpu_ns: cpu1 - cpu0,
        latencies_us,
    }
}

fn percentile<T: Copy + Default>(sorted: &[T], p: f64) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn client_runtime(o: &Options) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(o.client_threads)
        .enable_all()
        .build()
        .expect("a client runtime")
}

fn describe_machine(o: &Options) {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "unknown".into());
    println!(
        "machine: {cpus} CPUs ({model}); concurrency {}, {} rounds of {}s (+{}s warm-up), {} client threads",
        o.concurrency, o.rounds, o.secs, o.warmup, o.client_threads
    );
}

// ---------------------------------------------------------------- throughput mode

fn throughput(o: &Options) {
    describe_machine(o);
    let variants: Vec<&str> = o.variants.iter().map(String::as_str).collect();
    let servers: Vec<Server> = variants.iter().map(|v| Server::start(v)).collect();
    let client = client_runtime(o);
    let mut rounds: Vec<Vec<Round>> = vec![Vec::new(); variants.len()];
    for r in 0..o.rounds {
        let order: Vec<usize> = if r % 2 == 0 {
            (0..variants.len()).collect()
        } else {
            (0..variants.len()).rev().collect()
        };
        for i in order {
            let measured = round(&client, &servers[i], o);
            eprintln!(
                "round {} {:>14}: {:>9.0} req/s  p50 {:>5} µs  p99 {:>5} µs  cpu {:>6.2} µs/req",
                r + 1,
                variants[i],
                measured.rps(),
                percentile(&measured.latencies_us, 0.5),
                percentile(&measured.latencies_us, 0.99),
                measured.cpu_us_per_request()
            );
            rounds[i].push(measured);
        }
    }

    // Task count check: every response of a task variant ran its task.
    let mut checks = Vec::new();
    for (i, server) in servers.iter().enumerate() {
        let responses: u64 = rounds[i].iter().map(|r| r.responses).sum();
        let s = client.block_on(server.stats(responses));
        checks.push((server.variant.as_str(), responses, s));
    }

    println!();
    println!("| variant | req/s median (min-max) | ratio to the first variant (paired median) | p50 latency | p99 latency | server CPU/request |");
    println!("|---|---|---|---|---|---|");
    let bare_rps: Vec<f64> = rounds[0].iter().map(Round::rps).collect();
    for (i, v) in variants.iter().enumerate() {
        let rps: Vec<f64> = rounds[i].iter().map(Round::rps).collect();
        let ratios: Vec<f64> = rps.iter().zip(&bare_rps).map(|(a, b)| a / b).collect();
        let min = rps.iter().copied().fold(f64::INFINITY, f64::min);
        let max = rps.iter().copied().fold(0.0, f64::max);
        let mut all: Vec<u32> = rounds[i]
            .iter()
            .flat_map(|r| r.latencies_us.iter().copied())
            .collect();
        all.sort_unstable();
        let cpu: Vec<f64> = rounds[i].iter().map(Round::cpu_us_per_request).collect();
        println!(
            "| `{v}` | {:.0} ({:.0}-{:.0}) | {:.3} | {} µs | {} µs | {:.2} µs |",
            median(&rps),
            min,
            max,
            median(&ratios),
            percentile(&all, 0.5),
            percentile(&all, 0.99),
            median(&cpu),
        );
    }
    // Paired ratios of the targets, for the variants that were run.
    let index = |name: &str| variants.iter().position(|v| *v == name);
    let paired = |a: usize, b: usize, f: fn(&Round) -> f64| -> f64 {
        let ratios: Vec<f64> = rounds[a]
            .iter()
            .zip(&rounds[b])
            .map(|(x, y)| f(x) / f(y))
            .collect();
        median(&ratios)
    };
    println!();
    for (a, b, what, target) in [
        ("layer_no_task", "bare", "throughput", ">= 0.97"),
        (
            "floor_no_task",
            "bare",
            "throughput",
            "none: the floor of the layer's shape",
        ),
        (
            "layer_no_task",
            "floor_no_task",
            "throughput",
            "none: the layer over its floor",
        ),
        ("layer_1_task", "spawn_1_task", "throughput", ">= 0.97"),
        (
            "layer_sleep_task",
            "spawn_sleep_task",
            "throughput",
            ">= 0.97",
        ),
        (
            "layer_1_task_outer",
            "spawn_1_task",
            "throughput",
            ">= 0.97",
        ),
        (
            "layer_1_task",
            "spawn_1_task",
            "server CPU/request",
            "<= 1.03",
        ),
        (
            "layer_1_task_outer",
            "spawn_1_task",
            "server CPU/request",
            "<= 1.05",
        ),
        (
            "layer_sleep_task",
            "spawn_sleep_task",
            "server CPU/request",
            "<= 1.05",
        ),
    ] {
        if let (Some(ia), Some(ib)) = (index(a), index(b)) {
            let ratio = if what == "throughput" {
                paired(ia, ib, Round::rps)
            } else {
                paired(ia, ib, Round::cpu_us_per_request)
            };
            println!(
                "target: {what} {a} / {b} = {ratio:.3} (target {target}; paired median over {} rounds)",
                o.rounds
            );
        }
    }
    println!();
    println!(
        "| variant | responses received | tasks run | counted completed by the layer | check |"
    );
    println!("|---|---|---|---|---|");
    for (v, responses, s) in &checks {
        let (expected_ran, check) = match variant(v) {
            ("task" | "task_sleep", _) => {
                (*responses, s.ran == *responses && s.completed == *responses)
            }
            ("spawn" | "spawn_sleep", _) => (*responses, s.ran == *responses),
            _ => (0, s.ran == 0 && s.completed == 0),
        };
        println!(
            "| `{v}` | {responses} | {} (expected {expected_ran}) | {} | {} |",
            s.ran,
            s.completed,
            if check { "ok" } else { "MISMATCH" }
        );
    }
    drop(servers);

    // Start delay, in its own server: stamping costs an allocation per
    // request, which stays out of the throughput figures above.
    let server = Server::start("layer_1_task_delay");
    let mut responses = 0;
    let mut rps = Vec::new();
    for _ in 0..2 {
        let r = round(&client, &server, o);
        responses += r.responses;
        rps.push(r.rps());
    }
    let s = client.block_on(server.stats(responses));
    println!();
    println!(
        "start delay (end of response body -> first poll of the task), `layer_1_task_delay`, \
         {} connections, {:.0} req/s: p50 {:.1} µs, p99 {:.1} µs over {} tasks (target p99 <= 1 ms); \
         tasks run {} of {} responses: {}",
        o.concurrency,
        median(&rps),
        s.delay_p50_ns as f64 / 1_000.0,
        s.delay_p99_ns as f64 / 1_000.0,
        s.delays,
        s.ran,
        responses,
        if s.ran == responses && s.delays == responses { "ok" } else { "MISMATCH" }
    );
}

// ---------------------------------------------------------------- sleep mode

/// Tasks that await: handlers queue (or `tokio::spawn`) a task that sleeps
/// 100 ms. Each run starts a fresh server per variant, so that its peak RSS
/// belongs to that run; the ratios are taken within the run.
fn sleep(o: &Options) {
    describe_machine(o);
    let client = client_runtime(o);
    let variants = ["layer_sleep_task", "spawn_sleep_task"];
    // Per run and variant: (req/s, CPU µs/request, idle RSS kB, peak RSS kB).
    let mut runs: Vec<[(f64, f64, u64, u64); 2]> = Vec::new();
    for run in 0..o.rounds {
        let mut row = [(0.0, 0.0, 0, 0); 2];
        for i in [run % 2, 1 - run % 2] {
            let server = Server::start(variants[i]);
            let idle = server.status_kb("VmRSS");
            let r = round(&client, &server, o);
            let s = client.block_on(server.stats(r.responses));
            let hwm = server.status_kb("VmHWM");
            eprintln!(
                "run {} {:>16}: {:>8.0} req/s, cpu {:>6.2} µs/req, RSS idle {idle} kB, peak {hwm} kB, tasks run {} of {}",
                run + 1,
                variants[i],
                r.rps(),
                r.cpu_us_per_request(),
                s.ran,
                r.responses
            );
            assert_eq!(s.ran, r.responses, "every task ran");
            row[i] = (r.rps(), r.cpu_us_per_request(), idle, hwm);
        }
        runs.push(row);
    }
    println!();
    println!("| run | `layer_sleep_task` req/s | `spawn_sleep_task` req/s | throughput ratio | CPU/request ratio | peak RSS ratio (kB / kB) | growth over idle ratio |");
    println!("|---|---|---|---|---|---|---|");
    let mut ratios: [Vec<f64>; 4] = Default::default();
    for (n, [l, s]) in runs.iter().enumerate() {
        let r = [
            l.0 / s.0,
            l.1 / s.1,
            l.3 as f64 / s.3 as f64,
            (l.3 - l.2) as f64 / (s.3 - s.2) as f64,
        ];
        println!(
            "| {} | {:.0} | {:.0} | {:.3} | {:.3} | {:.3} ({} / {}) | {:.3} |",
            n + 1,
            l.0,
            s.0,
            r[0],
            r[1],
            r[2],
            l.3,
            s.3,
            r[3]
        );
        for (all, x) in ratios.iter_mut().zip(r) {
            all.push(x);
        }
    }
    println!();
    let range = |v: &[f64]| {
        let min = v.iter().copied().fold(f64::INFINITY, f64::min);
        let max = v.iter().copied().fold(0.0, f64::max);
        format!("median {:.3} (range {min:.3}-{max:.3})", median(v))
    };
    println!(
        "target: throughput layer_sleep_task / spawn_sleep_task = {} (target >= 0.97)",
        range(&ratios[0])
    );
    println!(
        "target: server CPU/request layer_sleep_task / spawn_sleep_task = {} (target <= 1.05)",
        range(&ratios[1])
    );
    println!(
        "target: peak RSS layer_sleep_task / spawn_sleep_task = {} (target <= 1.15); growth over idle {}",
        range(&ratios[2]),
        range(&ratios[3])
    );
}

// ---------------------------------------------------------------- h2 mode

/// Spins one core until the parent closes stdin (the `h2` mode's busy core).
fn busy() {
    std::thread::spawn(|| {
        let mut sink = String::new();
        while std::io::stdin().read_line(&mut sink).is_ok_and(|n| n > 0) {}
        std::process::exit(0);
    });
    let mut x = 0u64;
    loop {
        x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
    }
}

/// A duration printed by h2load (`141us`, `1.06ms`, `2.1s`), in ms.
fn h2load_ms(text: &str) -> f64 {
    let (number, scale) = if let Some(n) = text.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1000.0)
    } else {
        panic!("an h2load duration: {text:?}")
    };
    number.parse::<f64>().expect("a number") * scale
}

/// Runs h2load against `server`'s `/` over h2c, one connection and one
/// stream at a time; returns the (min, max, mean) response time in ms.
fn h2load(server: &Server, requests: u64) -> (f64, f64, f64) {
    let url = format!("http://{}/", server.addr);
    let out = Command::new("h2load")
        .args(["-n", &requests.to_string(), "-c", "1", "-m", "1", &url])
        .output()
        .expect("h2load (apt-get install nghttp2-client)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "h2load failed: {text}");
    let done = format!("{requests} succeeded");
    assert!(
        text.contains(&done),
        "h2load: not every request succeeded: {text}"
    );
    let line = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("time for request:"))
        .expect("h2load's 'time for request' line");
    // min max mean sd +/-sd
    let fields: Vec<&str> = line.split_whitespace().collect();
    (
        h2load_ms(fields[0]),
        h2load_ms(fields[1]),
        h2load_ms(fields[2]),
    )
}

/// HTTP/2 mean response latency, one stream at a time, with one core busy
/// and idle. Every variant is measured in each round, alternating the order.
fn h2(o: &Options) {
    let variants: Vec<&str> = if o.variants_given {
        o.variants.iter().map(String::as_str).collect()
    } else {
        vec!["bare", "layer_1_task", "spawn_1_task"]
    };
    println!(
        "h2load -n {} -c 1 -m 1 over h2c (no TCP_NODELAY), {} rounds; mean response time in ms",
        o.h2_requests, o.rounds
    );
    let servers: Vec<Server> = variants.iter().map(|v| Server::start(v)).collect();
    // Warm-up: the first requests of a fresh server (lazy initialisation,
    // first connection) are not what is compared.
    for server in &servers {
        h2load(server, 100);
    }
    let client = client_runtime(o);
    // means[load][variant][round]
    let mut means = vec![vec![Vec::new(); variants.len()]; 2];
    for r in 0..o.rounds {
        for (load, busy) in [(0, true), (1, false)] {
            let hog = busy.then(|| {
                let exe = std::env::current_exe().expect("current exe");
                Command::new(exe)
                    .arg("busy")
                    .stdin(Stdio::piped())
                    .spawn()
                    .expect("start the busy loop")
            });
            if hog.is_some() {
                std::thread::sleep(Duration::from_millis(200));
            }
            let order: Vec<usize> = if r % 2 == 0 {
                (0..variants.len()).collect()
            } else {
                (0..variants.len()).rev().collect()
            };
            for i in order {
                let (min, max, mean) = h2load(&servers[i], o.h2_requests);
                eprintln!(
                    "round {} {:>4} {:>14}: mean {mean:.3} ms (min {min:.3}, max {max:.3})",
                    r + 1,
                    if busy { "busy" } else { "idle" },
                    variants[i]
                );
                means[load][i].push(mean);
            }
            if let Some(mut hog) = hog {
                drop(hog.stdin.take());
                let _ = hog.kill();
                let _ = hog.wait();
            }
        }
    }
    // Every task ran.
    for (i, server) in servers.iter().enumerate() {
        let handler = variant(variants[i]).0;
        if handler == "hello" {
            continue;
        }
        let expected = 100 + 2 * o.rounds as u64 * o.h2_requests;
        let s = client.block_on(server.stats(expected));
        assert_eq!(s.ran, expected, "{}: every task ran", variants[i]);
    }
    println!();
    println!("| variant | one core busy: mean per round (ms) | idle: mean per round (ms) |");
    println!("|---|---|---|");
    let list = |v: &[f64]| {
        v.iter()
            .map(|m| format!("{m:.3}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    for (i, v) in variants.iter().enumerate() {
        println!(
            "| `{v}` | {} | {} |",
            list(&means[0][i]),
            list(&means[1][i])
        );
    }
    println!();
    if let (Some(b), Some(l)) = (
        variants.iter().position(|v| *v == "bare"),
        variants.iter().position(|v| *v == "layer_1_task"),
    ) {
        for (load, name) in [(0, "busy"), (1, "idle")] {
            let bare = median(&means[load][b]);
            let layer = median(&means[load][l]);
            let bound = 1.5 * bare + 0.2;
            println!(
                "target ({name}): layer_1_task {layer:.3} ms <= 1.5 x bare {bare:.3} ms + 0.2 ms = {bound:.3} ms: {} \
                 (medians over {} rounds)",
                if layer <= bound { "met" } else { "NOT met" },
                o.rounds
            );
        }
    }
}

// ---------------------------------------------------------------- instructions mode

/// Sends `total` requests over `concurrency` connections, then returns.
fn fixed(client: &tokio::runtime::Runtime, addr: SocketAddr, concurrency: usize, total: u64) {
    let per = total / concurrency as u64;
    client.block_on(async {
        let clients: Vec<_> = (0..concurrency)
            .map(|_| {
                tokio::spawn(async move {
                    let mut stream = TcpStream::connect(addr).await.expect("connect");
                    stream.set_nodelay(true).expect("nodelay");
                    let mut buf = Vec::with_capacity(4096);
                    for _ in 0..per {
                        stream.write_all(REQUEST).await.expect("write a request");
                        assert_eq!(read_response(&mut stream, &mut buf).await, 200);
                    }
                })
            })
            .collect();
        for c in clients {
            c.await.expect("a client");
        }
    });
}

/// Instructions executed by the server per request, counted by callgrind
/// (`valgrind` must be installed): deterministic, so unlike req/s it does
/// not move with the other load of a shared machine. The counters are
/// zeroed after a warm-up and dumped after `--requests` requests and the
/// wait for their tasks.
fn instructions(o: &Options) {
    let concurrency = o.concurrency.min(16);
    let measured = o.requests / concurrency as u64 * concurrency as u64;
    println!(
        "server instructions per request under callgrind: {measured} requests over {concurrency} connections \
         after {} warm-up requests",
        measured / 10
    );
    let client = client_runtime(o);
    let dir = std::env::temp_dir().join(format!("loadtest-callgrind-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let out = dir.join("callgrind.out.%p");
    let out_arg = format!("--callgrind-out-file={}", out.display());
    println!();
    println!("| variant | instructions/request | over the first variant |");
    println!("|---|---|---|");
    let mut first = None;
    for v in &o.variants {
        let server = Server::start_under(v, &["valgrind", "-q", "--tool=callgrind", &out_arg]);
        fixed(&client, server.addr, concurrency, measured / 10);
        let _ = client.block_on(server.stats(0));
        let control = |flag: &str| {
            let ok = Command::new("callgrind_control")
                .args([flag, &server.pid().to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .expect("callgrind_control (valgrind)")
                .success();
            assert!(ok, "callgrind_control {flag}");
        };
        control("-z");
        fixed(&client, server.addr, concurrency, measured);
        let responses = measured / 10 + measured;
        let s = client.block_on(server.stats(if variant(v).0 == "hello" {
            0
        } else {
            responses
        }));
        control("-d");
        // The dump is `<out>.<n>`; its `totals:` line holds the count.
        let prefix = format!("callgrind.out.{}.", server.pid());
        let mut total = None;
        for _ in 0..200 {
            total = std::fs::read_dir(&dir)
                .expect("the directory")
                .flatten()
                .find_map(|e| {
                    let name = e.file_name().into_string().ok()?;
                    if !name.starts_with(&prefix) {
                        return None;
                    }
                    let text = std::fs::read_to_string(e.path()).ok()?;
                    text.lines()
                        .find_map(|l| {
                            l.strip_prefix("totals:")
                                .or_else(|| l.strip_prefix("summary:"))
                        })?
                        .trim()
                        .parse::<u64>()
                        .ok()
                });
            if total.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let total = total.expect("a callgrind dump");
        let per = total as f64 / measured as f64;
        let base = *first.get_or_insert(per);
        println!(
            "| `{v}` | {per:.0} | {:+.0} ({:.3}x) |{}",
            per - base,
            per / base,
            if variant(v).0 == "hello" || s.ran == responses {
                ""
            } else {
                " task count MISMATCH"
            }
        );
        drop(server);
    }
    if std::env::var_os("LOADTEST_KEEP_CALLGRIND").is_some() {
        println!(
            "\ncallgrind dumps kept in {} (callgrind_annotate FILE)",
            dir.display()
        );
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
}
