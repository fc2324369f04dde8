//! The `durable` binary as separate processes: one `serve` and two `worker`
//! processes on one job store, driven over real HTTP, checked in the store.
//!
//! On SQLite these run with the other tests. On Redis and Postgres they need
//! a server: they are `#[ignore]`d and run by `.ci/run` with `REDIS_URL` and
//! `DATABASE_URL` set:
//!
//! ```text
//! REDIS_URL=redis://127.0.0.1:6379 DATABASE_URL=postgres://user@127.0.0.1:5432/db \
//!   cargo test -p durable --test processes -- --ignored --nocapture
//! ```
//!
//! Each test uses a queue of its own (a name with the process id), so reruns
//! and parallel tests on one server do not see each other's jobs.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use apalis::prelude::{TaskBuilder, TaskSink};
use durable::{
    Backend, Delivery, Invoices, JobCounts, NewInvoice, QueueConfig, SendInvoice, Store,
};
use reqwest::StatusCode;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

/// Bound of every single wait, except where a test says otherwise.
const LIMIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------

/// A backend for one test: the environment for the processes, and a store
/// opened by the test to read the results.
struct Target {
    backend: Backend,
    queue: QueueConfig,
    /// `RUST_LOG` of the processes.
    log: &'static str,
    /// Keeps the SQLite file alive.
    _dir: Option<tempfile::TempDir>,
}

fn redis() -> Backend {
    Backend::Redis(std::env::var("REDIS_URL").expect("set REDIS_URL=redis://127.0.0.1:PORT"))
}

fn postgres() -> Backend {
    Backend::Postgres(
        std::env::var("DATABASE_URL").expect("set DATABASE_URL=postgres://USER@127.0.0.1:PORT/DB"),
    )
}

impl Target {
    fn new(backend: Backend, test: &str) -> Self {
        let queue = QueueConfig {
            queue: format!("{test}-{}", std::process::id()),
            ..QueueConfig::default()
        };
        Self {
            backend,
            queue,
            log: "warn",
            _dir: None,
        }
    }

    fn sqlite(test: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut target = Self::new(Backend::Sqlite(dir.path().join("jobs.sqlite")), test);
        target._dir = Some(dir);
        target
    }

    /// Opens the store and removes what a previous run left in this queue.
    async fn store(&self) -> Store {
        let store = tokio::time::timeout(LIMIT, Store::connect(&self.backend, self.queue.clone()))
            .await
            .expect("connect timed out")
            .expect("connect to the store");
        store.clear().await.expect("clear the queue");
        store
    }

    /// `durable ARGS` on this backend and queue.
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(binary());
        cmd.args(args)
            .args(["--queue", &self.queue.queue])
            .env_remove("REDIS_URL")
            .env_remove("DATABASE_URL")
            .env_remove("SQLITE_PATH")
            .env("RUST_LOG", self.log)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        match &self.backend {
            Backend::Sqlite(path) => cmd.env("SQLITE_PATH", path),
            Backend::Redis(url) => cmd.env("REDIS_URL", url),
            Backend::Postgres(url) => cmd.env("DATABASE_URL", url),
        };
        cmd
    }
}

fn worker_name(target: &Target, name: &str) -> String {
    format!("{name}@{}", target.queue.queue)
}

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_durable"))
}

// ---------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------

/// A `durable` process; killed if the test ends without stopping it.
struct Proc {
    child: Child,
    stdout: Lines<BufReader<ChildStdout>>,
    first_line: String,
}

impl Proc {
    /// Starts `cmd` and waits for its first line (`listening on ...` or
    /// `worker ... running`).
    async fn start(mut cmd: Command) -> Proc {
        let mut child = cmd.spawn().expect("start the durable binary");
        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let first_line = tokio::time::timeout(LIMIT, stdout.next_line())
            .await
            .expect("the process did not start in time")
            .expect("read its stdout")
            .expect("the process exited before it was ready");
        Proc {
            child,
            stdout,
            first_line,
        }
    }

    async fn web(target: &Target, args: &[&str]) -> (Proc, SocketAddr) {
        let mut all = vec!["serve", "--addr", "127.0.0.1:0"];
        all.extend_from_slice(args);
        let web = Proc::start(target.command(&all)).await;
        // "listening on http://127.0.0.1:PORT, jobs to ..."
        let addr = web
            .first_line
            .strip_prefix("listening on http://")
            .and_then(|rest| rest.split(',').next())
            .and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line: {:?}", web.first_line));
        (web, addr)
    }

    /// A worker named `name` in its queue: `w1` is `w1@QUEUE` (Postgres keeps
    /// one table of workers for all queues, and a name is taken until its
    /// worker has been silent for the orphan timeout).
    async fn worker(target: &Target, name: &str, args: &[&str]) -> Proc {
        let name = worker_name(target, name);
        let mut all = vec!["worker", "--name", &name];
        all.extend_from_slice(args);
        let worker = Proc::start(target.command(&all)).await;
        assert!(worker
            .first_line
            .starts_with(&format!("worker {name} running")));
        worker
    }

    fn pid(&self) -> u32 {
        self.child.id().expect("the process is running")
    }

    /// SIGTERM, then its exit status and the rest of its stdout.
    async fn terminate(mut self) -> (ExitStatus, Vec<String>) {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
        let mut rest = Vec::new();
        tokio::time::timeout(LIMIT, async {
            while let Some(line) = self.stdout.next_line().await.unwrap() {
                rest.push(line);
            }
        })
        .await
        .expect("no end of stdout after SIGTERM");
        let status = tokio::time::timeout(LIMIT, self.child.wait())
            .await
            .expect("the process did not exit after SIGTERM")
            .unwrap();
        (status, rest)
    }

    /// SIGKILL: the process dies on the spot.
    async fn kill(mut self) {
        self.child.kill().await.expect("SIGKILL");
    }
}

// ---------------------------------------------------------------------------
// Waiting on the store
// ---------------------------------------------------------------------------

/// Polls `check` on the store's mail log every 20 ms until it returns true.
async fn until_log(
    store: &Store,
    what: &str,
    limit: Duration,
    check: impl Fn(&[Delivery]) -> bool,
) {
    let waited = tokio::time::timeout(limit, async {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        loop {
            tick.tick().await;
            if check(&store.journal().deliveries().await.expect("read the log")) {
                return;
            }
        }
    })
    .await;
    if waited.is_err() {
        let log = store.journal().deliveries().await.unwrap_or_default();
        panic!("timed out waiting for {what}; log: {log:?}");
    }
}

async fn all_done(store: &Store, expected: u64, limit: Duration) -> JobCounts {
    match tokio::time::timeout(limit, durable::jobs_done(store, expected)).await {
        Ok(counts) => counts.expect("read the store"),
        Err(_) => panic!(
            "not all {expected} jobs done in {limit:?}: {:?}",
            store.job_counts().await
        ),
    }
}

fn delivery<'a>(log: &'a [Delivery], key: &str) -> Option<&'a Delivery> {
    log.iter().find(|d| d.key == key)
}

async fn push(store: &Store, job: SendInvoice) {
    let key = job.key();
    let task = TaskBuilder::new(job).idempotency_key(&key).build();
    let pushed = match store.invoices() {
        Invoices::Sqlite(mut s) => s.push_task(task).await.map_err(|e| e.to_string()),
        Invoices::Redis(mut s) => s.push_task(task).await.map_err(|e| e.to_string()),
        Invoices::Postgres(mut s) => s.push_task(task).await.map_err(|e| e.to_string()),
    };
    pushed.expect("push a job");
}

fn invoice(order: &str, email: &str) -> SendInvoice {
    SendInvoice {
        order: order.into(),
        email: email.into(),
        amount_cents: 1_000,
    }
}

// ---------------------------------------------------------------------------
// 1 web + 2 workers, N requests: every job done once, both workers busy
// ---------------------------------------------------------------------------

/// Requests: one in 50 is refused by the handler (409), one in 100 stalls
/// until the 300 ms request timeout (408); the others are accepted (201).
fn email_of(i: usize) -> &'static str {
    if i % 50 == 7 {
        "hold@example.com"
    } else if i % 100 == 13 {
        "stall@example.com"
    } else {
        "customer@example.com"
    }
}

async fn one_web_two_workers(mut target: Target, n: usize) {
    // The timed-out requests' discarded tasks are expected: no warning each.
    target.log = "warn,tower_background=error";
    let store = target.store().await;
    let (web, addr) = Proc::web(
        &target,
        &[
            "--timeout-ms",
            "300",
            "--on-hold",
            "hold@example.com",
            "--stalling",
            "stall@example.com",
        ],
    )
    .await;
    let w1 = Proc::worker(&target, "w1", &[]).await;
    let w2 = Proc::worker(&target, "w2", &[]).await;

    // N requests from 32 concurrent clients.
    let started = Instant::now();
    let client = reqwest::Client::builder().timeout(LIMIT).build().unwrap();
    let next = Arc::new(AtomicUsize::new(0));
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..32 {
        let (client, next) = (client.clone(), next.clone());
        let url = format!("http://{addr}/invoices");
        clients.spawn(async move {
            let mut statuses = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return statuses;
                }
                let body = NewInvoice {
                    order: format!("o{i}"),
                    email: email_of(i).into(),
                    amount_cents: 100 + i as u64,
                };
                let res = client.post(&url).json(&body).send().await;
                statuses.push((i, res.map(|r| r.status()).map_err(|e| e.to_string())));
            }
        });
    }
    let mut statuses = BTreeMap::new();
    while let Some(done) = clients.join_next().await {
        statuses.extend(done.unwrap());
    }
    let sent_in = started.elapsed();
    assert_eq!(statuses.len(), n);
    let mut accepted = BTreeSet::new();
    for (i, status) in &statuses {
        let expected = match email_of(*i) {
            "hold@example.com" => StatusCode::CONFLICT,
            "stall@example.com" => StatusCode::REQUEST_TIMEOUT,
            _ => StatusCode::CREATED,
        };
        assert_eq!(status.as_ref(), Ok(&expected), "request {i}");
        if expected == StatusCode::CREATED {
            accepted.insert(format!("invoice-o{i}"));
        }
    }

    // Every accepted request's job is done, and nothing else is in the store.
    let counts = all_done(&store, accepted.len() as u64, Duration::from_secs(60)).await;
    let all_in = started.elapsed();
    assert_eq!(counts.total, accepted.len() as u64);
    let log = store.journal().deliveries().await.unwrap();
    let keys: BTreeSet<String> = log.iter().map(|d| d.key.clone()).collect();
    assert_eq!(
        keys, accepted,
        "the mail log has exactly the accepted requests' keys"
    );
    // Exactly once: each invoice was sent one time.
    let twice: Vec<&Delivery> = log.iter().filter(|d| d.sends != 1).collect();
    assert!(twice.is_empty(), "sent other than once: {twice:?}");
    let share = |w: &str| {
        let name = worker_name(&target, w);
        log.iter().filter(|d| d.sent_by == name).count()
    };
    let (by_w1, by_w2) = (share("w1"), share("w2"));
    assert_eq!(by_w1 + by_w2, accepted.len());
    assert!(by_w1 > 0 && by_w2 > 0, "w1 sent {by_w1}, w2 sent {by_w2}");
    let rerun = log.iter().filter(|d| d.attempts != 1).count();
    println!(
        "{}: {n} requests in {:.2} s, {} accepted; all jobs done after {:.2} s; \
         w1 sent {by_w1}, w2 sent {by_w2}; jobs run more than once: {rerun}",
        target.backend.describe(),
        sent_in.as_secs_f64(),
        accepted.len(),
        all_in.as_secs_f64(),
    );

    // Graceful stops; the web server counted every push as completed.
    for worker in [w1, w2] {
        let (status, _) = worker.terminate().await;
        assert!(status.success(), "{status}");
    }
    let (status, lines) = web.terminate().await;
    assert!(status.success(), "{status}");
    // The timed-out requests' tasks were discarded; the others completed.
    let timed_out = (0..n)
        .filter(|i| email_of(*i) == "stall@example.com")
        .count();
    let expected = format!(
        "stopped: {} after-response tasks completed, 0 failed, 0 cancelled",
        n - timed_out
    );
    assert_eq!(lines.last(), Some(&expected), "{lines:?}");
    store.clear().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_one_web_two_workers() {
    one_web_two_workers(Target::sqlite("sqlite-web-workers"), 300).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server (REDIS_URL)"]
async fn redis_one_web_two_workers_1000_requests() {
    one_web_two_workers(Target::new(redis(), "redis-web-workers"), 1000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL (DATABASE_URL)"]
async fn postgres_one_web_two_workers_1000_requests() {
    one_web_two_workers(Target::new(postgres(), "pg-web-workers"), 1000).await;
}

// ---------------------------------------------------------------------------
// A worker killed with a job in hand: the other one recovers it
// ---------------------------------------------------------------------------

async fn killed_worker_job_is_recovered(mut target: Target) {
    // Short heartbeats: a worker silent for 2 x 500 ms is dead. To measure
    // other settings, set DURABLE_HEARTBEAT_MS and DURABLE_MISSED_HEARTBEATS.
    let setting = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .map(|v| v.parse::<u64>().expect("a number"))
            .unwrap_or(default)
    };
    let heartbeat_ms = setting("DURABLE_HEARTBEAT_MS", 500);
    let missed = setting("DURABLE_MISSED_HEARTBEATS", 2);
    target.queue.heartbeat = Duration::from_millis(heartbeat_ms);
    target.queue.missed_heartbeats = missed as usize;
    let (heartbeat_arg, missed_arg) = (heartbeat_ms.to_string(), missed.to_string());
    let hb = [
        "--heartbeat-ms",
        heartbeat_arg.as_str(),
        "--missed-heartbeats",
        missed_arg.as_str(),
    ];
    // The dead worker's last heartbeat, the timeout, the survivor's next
    // heartbeat, and a margin (Redis counts in whole seconds).
    let recovery_limit = Duration::from_millis(heartbeat_ms * (missed + 2) + 10_000);
    let store = target.store().await;

    // w1 takes the job; its first attempt hangs.
    let mut args = hb.to_vec();
    args.extend(["--hang-first", "hang@example.com"]);
    let w1 = Proc::worker(&target, "w1", &args).await;
    push(&store, invoice("crash", "hang@example.com")).await;
    until_log(&store, "w1 to start the job", LIMIT, |log| {
        delivery(log, "invoice-crash").is_some_and(|d| d.attempts == 1)
    })
    .await;

    // w2 joins, then w1 dies with the job in hand.
    let w2 = Proc::worker(&target, "w2", &hb).await;
    let killed = Instant::now();
    w1.kill().await;
    until_log(
        &store,
        "w2 to send the recovered job",
        recovery_limit,
        |log| delivery(log, "invoice-crash").is_some_and(|d| d.sends == 1),
    )
    .await;
    let recovered_in = killed.elapsed();
    all_done(&store, 1, LIMIT).await;

    let log = store.journal().deliveries().await.unwrap();
    let d = delivery(&log, "invoice-crash").unwrap();
    assert_eq!((d.attempts, d.sends), (2, 1), "{d:?}");
    assert_eq!(d.sent_by, worker_name(&target, "w2"));
    println!(
        "{}: job of the killed worker sent by the other {:.2} s after SIGKILL \
         (heartbeat {heartbeat_ms} ms, dead after {missed} missed)",
        target.backend.describe(),
        recovered_in.as_secs_f64()
    );
    let (status, _) = w2.terminate().await;
    assert!(status.success(), "{status}");
    store.clear().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server (REDIS_URL)"]
async fn redis_killed_worker_job_is_recovered() {
    killed_worker_job_is_recovered(Target::new(redis(), "redis-crash")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL (DATABASE_URL)"]
async fn postgres_killed_worker_job_is_recovered() {
    killed_worker_job_is_recovered(Target::new(postgres(), "pg-crash")).await;
}

// ---------------------------------------------------------------------------
// Retries: fails twice, then succeeds
// ---------------------------------------------------------------------------

async fn failing_job_is_retried(target: Target) {
    let store = target.store().await;
    let worker = Proc::worker(&target, "w1", &["--fail-first", "flaky@example.com=2"]).await;
    push(&store, invoice("flaky", "flaky@example.com")).await;
    all_done(&store, 1, Duration::from_secs(30)).await;
    let log = store.journal().deliveries().await.unwrap();
    let d = delivery(&log, "invoice-flaky").unwrap();
    assert_eq!((d.attempts, d.sends), (3, 1), "{d:?}");
    let (status, _) = worker.terminate().await;
    assert!(status.success(), "{status}");
    store.clear().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_failing_job_is_retried() {
    failing_job_is_retried(Target::sqlite("sqlite-retry")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server (REDIS_URL)"]
async fn redis_failing_job_is_retried() {
    failing_job_is_retried(Target::new(redis(), "redis-retry")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL (DATABASE_URL)"]
async fn postgres_failing_job_is_retried() {
    failing_job_is_retried(Target::new(postgres(), "pg-retry")).await;
}

// ---------------------------------------------------------------------------
// SIGTERM: the worker finishes the job in hand, then exits
// ---------------------------------------------------------------------------

async fn sigterm_finishes_the_job_in_hand(target: Target) {
    let store = target.store().await;
    // One send takes 1.5 s. The worker asks the store for jobs every
    // millisecond, so that the SIGTERM often lands while one of its fetches is
    // under way: on SQLite, apalis alone would keep that fetch's transaction,
    // and the file's write lock, until the job ended (see run_worker).
    let worker = Proc::worker(&target, "w1", &["--latency-ms", "1500", "--poll-ms", "1"]).await;
    push(&store, invoice("slow", "slow@example.com")).await;
    until_log(&store, "the worker to start the job", LIMIT, |log| {
        delivery(log, "invoice-slow").is_some_and(|d| d.attempts == 1)
    })
    .await;
    let (status, lines) = worker.terminate().await;
    assert!(status.success(), "{status}");
    assert_eq!(
        lines,
        [format!("worker {} stopped", worker_name(&target, "w1"))]
    );
    // Sent once, and recorded as done before the worker exited.
    let log = store.journal().deliveries().await.unwrap();
    let d = delivery(&log, "invoice-slow").unwrap();
    assert_eq!((d.attempts, d.sends), (1, 1), "{d:?}");
    assert_eq!(
        store.job_counts().await.unwrap(),
        JobCounts { total: 1, done: 1 }
    );
    store.clear().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_sigterm_finishes_the_job_in_hand() {
    sigterm_finishes_the_job_in_hand(Target::sqlite("sqlite-sigterm")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server (REDIS_URL)"]
async fn redis_sigterm_finishes_the_job_in_hand() {
    sigterm_finishes_the_job_in_hand(Target::new(redis(), "redis-sigterm")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL (DATABASE_URL)"]
async fn postgres_sigterm_finishes_the_job_in_hand() {
    sigterm_finishes_the_job_in_hand(Target::new(postgres(), "pg-sigterm")).await;
}

// ---------------------------------------------------------------------------
// Faults: the backend unreachable at start, or lost while serving
// ---------------------------------------------------------------------------

/// A loopback port where nothing listens.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

async fn unreachable_at_start(backend: Backend, shown: &str) {
    let target = Target::new(backend, "unreachable");
    for command in ["serve", "worker"] {
        let out = tokio::time::timeout(
            LIMIT,
            target.command(&[command]).stderr(Stdio::piped()).output(),
        )
        .await
        .expect("the process did not exit")
        .unwrap();
        assert_eq!(out.status.code(), Some(1), "{command}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.starts_with(&format!("error: cannot use the job store, {shown}: ")),
            "{command}: {stderr}"
        );
        assert_eq!(stderr.lines().count(), 1, "{command}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[tokio::test]
async fn redis_unreachable_at_start_is_a_clear_error() {
    let url = format!("redis://127.0.0.1:{}", closed_port());
    unreachable_at_start(Backend::Redis(url.clone()), &format!("Redis at {url}")).await;
}

#[tokio::test]
async fn postgres_unreachable_at_start_is_a_clear_error() {
    let url = format!("postgres://durable:secret@127.0.0.1:{}/jobs", closed_port());
    let shown = url.replace(":secret@", ":***@");
    unreachable_at_start(Backend::Postgres(url), &format!("Postgres at {shown}")).await;
}

/// A TCP proxy to `upstream` that can be cut: then it closes every
/// connection and accepts no new one, as if the backend went away.
struct Proxy {
    addr: SocketAddr,
    cut: tokio::sync::watch::Sender<bool>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cut, cut_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let mut accept_cut = cut_rx.clone();
            loop {
                let (mut inbound, _) = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok(conn) => conn,
                        Err(_) => return,
                    },
                    _ = accept_cut.wait_for(|cut| *cut) => return, // drops the listener
                };
                let mut conn_cut = cut_rx.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = conn_cut.wait_for(|cut| *cut) => {}
                    }
                });
            }
        });
        Proxy { addr, cut }
    }

    fn cut(&self) {
        self.cut.send_replace(true);
    }
}

/// `scheme://[userinfo@]host:port/rest` -> its `host:port`, and the same URL
/// with `replacement` there.
fn split_authority(url: &str, replacement: SocketAddr) -> (SocketAddr, String) {
    use std::net::ToSocketAddrs;
    let (scheme, rest) = url.split_once("://").unwrap();
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((user, hostport)) => (format!("{user}@"), hostport),
        None => (String::new(), authority),
    };
    let upstream = hostport
        .to_socket_addrs()
        .expect("resolve the backend's address")
        .next()
        .expect("an address");
    (
        upstream,
        format!("{scheme}://{userinfo}{replacement}{path}"),
    )
}

async fn backend_lost_while_serving(backend: Backend) {
    let url = match &backend {
        Backend::Redis(url) | Backend::Postgres(url) => url.clone(),
        Backend::Sqlite(_) => unreachable!(),
    };
    let (upstream, _) = split_authority(&url, "127.0.0.1:1".parse().unwrap());
    let proxy = Proxy::start(upstream).await;
    let (_, via_proxy) = split_authority(&url, proxy.addr);
    // The test reads the store directly; the web server goes through the proxy.
    let direct = Target::new(backend.clone(), "lost");
    let store = direct.store().await;
    let target = Target {
        backend: match backend {
            Backend::Redis(_) => Backend::Redis(via_proxy),
            _ => Backend::Postgres(via_proxy),
        },
        queue: direct.queue.clone(),
        log: "warn",
        _dir: None,
    };
    let mut cmd = target.command(&["serve", "--addr", "127.0.0.1:0"]);
    // The error event goes to stderr: keep it.
    let logs = tempfile::NamedTempFile::new().unwrap();
    cmd.env("RUST_LOG", "warn,durable=info")
        .stderr(logs.reopen().unwrap());
    let web = Proc::start(cmd).await;
    let addr: SocketAddr = web.first_line["listening on http://".len()..]
        .split(',')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let client = reqwest::Client::builder().timeout(LIMIT).build().unwrap();
    let post = |order: &'static str| {
        client
            .post(format!("http://{addr}/invoices"))
            .json(&NewInvoice {
                order: order.into(),
                email: "ada@example.com".into(),
                amount_cents: 100,
            })
            .send()
    };
    assert_eq!(post("before").await.unwrap().status(), StatusCode::CREATED);
    // The first push has been answered (the server has the job and the web
    // server knows it: cutting before the answer arrives would fail a push
    // whose job is stored).
    tokio::time::timeout(LIMIT, async {
        loop {
            let logs = std::fs::read_to_string(logs.path()).unwrap();
            if logs
                .lines()
                .any(|l| l.contains("job enqueued") && l.contains("key=invoice-before"))
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the first job was not pushed");

    proxy.cut();
    // The response is sent; the push after it fails.
    assert_eq!(post("lost").await.unwrap().status(), StatusCode::CREATED);

    let (status, lines) = web.terminate().await;
    let logs = std::fs::read_to_string(logs.path()).unwrap();
    assert!(status.success(), "{status}");
    assert_eq!(
        lines.last().map(String::as_str),
        Some("stopped: 1 after-response tasks completed, 1 failed, 0 cancelled"),
        "{lines:?}\n{logs}"
    );
    let failure = logs
        .lines()
        .find(|line| line.contains("push failed"))
        .unwrap_or_else(|| panic!("no push failure logged: {logs}"));
    assert!(failure.contains("key=invoice-lost"), "{failure}");
    assert_eq!(
        store.job_counts().await.unwrap().total,
        1,
        "only the first job"
    );
    store.clear().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server (REDIS_URL)"]
async fn redis_lost_while_serving_fails_the_push_and_logs_its_key() {
    backend_lost_while_serving(redis()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL (DATABASE_URL)"]
async fn postgres_lost_while_serving_fails_the_push_and_logs_its_key() {
    backend_lost_while_serving(postgres()).await;
}

// ---------------------------------------------------------------------------
// The same order twice: one job, one email
// ---------------------------------------------------------------------------

/// `failed_pushes`: how the backend answers the second push of a key
/// (Redis and SQLite ignore it, Postgres refuses it: a failed push).
async fn same_order_twice_is_one_job(target: Target, failed_pushes: u64) {
    let store = target.store().await;
    let (web, addr) = Proc::web(&target, &[]).await;
    let worker = Proc::worker(&target, "w1", &[]).await;
    let client = reqwest::Client::builder().timeout(LIMIT).build().unwrap();
    for _ in 0..2 {
        let res = client
            .post(format!("http://{addr}/invoices"))
            .json(&NewInvoice {
                order: "twice".into(),
                email: "ada@example.com".into(),
                amount_cents: 100,
            })
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::CREATED);
    }
    let (status, lines) = web.terminate().await; // every push has been tried
    assert!(status.success(), "{status}");
    let expected = format!(
        "stopped: {} after-response tasks completed, {failed_pushes} failed, 0 cancelled",
        2 - failed_pushes
    );
    assert_eq!(lines.last(), Some(&expected), "{lines:?}");
    assert_eq!(all_done(&store, 1, LIMIT).await.total, 1);
    let log = store.journal().deliveries().await.unwrap();
    let d = delivery(&log, "invoice-twice").unwrap();
    assert_eq!((d.attempts, d.sends), (1, 1), "{d:?}");
    let (status, _) = worker.terminate().await;
    assert!(status.success(), "{status}");
    store.clear().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_same_order_twice_is_one_job() {
    same_order_twice_is_one_job(Target::sqlite("sqlite-twice"), 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server (REDIS_URL)"]
async fn redis_same_order_twice_is_one_job() {
    same_order_twice_is_one_job(Target::new(redis(), "redis-twice"), 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL (DATABASE_URL)"]
async fn postgres_same_order_twice_is_one_job() {
    same_order_twice_is_one_job(Target::new(postgres(), "pg-twice"), 1).await;
}
