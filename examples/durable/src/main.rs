//! `durable`: after-response jobs on apalis, one binary for the web server
//! and the workers.
//!
//! ```text
//! cargo run -p durable                 # the SQLite demo: web + worker in one process, then exits
//! cargo run -p durable -- serve        # the web server: pushes jobs after the response
//! cargo run -p durable -- worker       # a worker: pulls jobs and sends the invoices
//! cargo run -p durable --release -- bench   # the figures of docs/DURABLE.md
//! ```
//!
//! The backend comes from the environment: `REDIS_URL` (apalis-redis),
//! `DATABASE_URL` (apalis-postgres), otherwise a SQLite file (`SQLITE_PATH`,
//! default `durable-jobs.sqlite`). Run `durable help` for every option.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use durable::{
    jobs_done, parse_fail_first, router, run_worker, start, Backend, BoxDynError, Config,
    InvoiceCreated, Ledger, MailServer, NewInvoice, QueueConfig, Register, Store,
};

const USAGE: &str = "\
usage: durable [serve|worker|bench|demo|help] [options]

  (none), demo   SQLite demo in a temporary directory: web and worker in one process; exits
  serve          web server: POST /register, POST /invoices (pushes a job after the response)
  worker         apalis worker: runs the invoice jobs; SIGTERM or Ctrl-C finishes the jobs in hand, then exits
  bench          measures the push route against an in-process task, and jobs/s through two workers

backend (environment): REDIS_URL=redis://... | DATABASE_URL=postgres://... | SQLITE_PATH=file (default durable-jobs.sqlite)

options:
  --queue NAME               queue name (default invoices)
  --heartbeat-ms N           worker heartbeat (default 5000)
  --missed-heartbeats N      a worker silent for N heartbeats is dead; its jobs go to another (default 3)
  --poll-ms N                how often an idle worker asks the store for jobs (default 100)
  serve:  --addr IP:PORT (default 127.0.0.1:3000), --timeout-ms N (default 10000),
          --on-hold EMAIL (answer 409), --stalling EMAIL (never answer: 408 after the timeout)
  worker: --name NAME (default worker-HOST-PID; unique per store), --concurrency N (default 8), --latency-ms N (one send, default 5),
          --fail-first EMAIL=N (attempts 1..=N fail), --hang-first EMAIL (attempt 1 never ends)
  bench:  --requests N (per round, default 10000), --clients N (default 32), --jobs N (default 5000)
";

#[derive(Debug, Default)]
struct Args {
    command: String,
    queue: QueueConfig,
    addr: Option<SocketAddr>,
    timeout_ms: Option<u64>,
    on_hold: Vec<String>,
    stalling: Vec<String>,
    name: Option<String>,
    concurrency: Option<usize>,
    latency_ms: Option<u64>,
    fail_first: Vec<(String, u32)>,
    hang_first: Vec<String>,
    requests: Option<usize>,
    clients: Option<usize>,
    jobs: Option<usize>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args::default();
    let mut it = std::env::args().skip(1);
    fn num<T: std::str::FromStr>(flag: &str, value: Option<String>) -> Result<T, String> {
        let value = value.ok_or_else(|| format!("{flag} needs a value"))?;
        value
            .parse()
            .map_err(|_| format!("{flag}: not a number: {value:?}"))
    }
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--queue" => args.queue.queue = it.next().ok_or("--queue needs a value")?,
            "--heartbeat-ms" => args.queue.heartbeat = Duration::from_millis(num(&arg, it.next())?),
            "--missed-heartbeats" => args.queue.missed_heartbeats = num(&arg, it.next())?,
            "--poll-ms" => args.queue.poll_interval = Duration::from_millis(num(&arg, it.next())?),
            "--addr" => args.addr = Some(num(&arg, it.next())?),
            "--timeout-ms" => args.timeout_ms = Some(num(&arg, it.next())?),
            "--on-hold" => args
                .on_hold
                .push(it.next().ok_or("--on-hold needs a value")?),
            "--stalling" => args
                .stalling
                .push(it.next().ok_or("--stalling needs a value")?),
            "--name" => args.name = Some(it.next().ok_or("--name needs a value")?),
            "--concurrency" => args.concurrency = Some(num(&arg, it.next())?),
            "--latency-ms" => args.latency_ms = Some(num(&arg, it.next())?),
            "--fail-first" => args.fail_first.push(parse_fail_first(
                &it.next().ok_or("--fail-first needs a value")?,
            )?),
            "--hang-first" => args
                .hang_first
                .push(it.next().ok_or("--hang-first needs a value")?),
            "--requests" => args.requests = Some(num(&arg, it.next())?),
            "--clients" => args.clients = Some(num(&arg, it.next())?),
            "--jobs" => args.jobs = Some(num(&arg, it.next())?),
            flag if flag.starts_with('-') => return Err(format!("unknown option {flag}")),
            command if args.command.is_empty() => args.command = command.to_owned(),
            other => return Err(format!("unexpected argument {other:?}")),
        }
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("error: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    // The demo prints its own report; serve and worker log what they do.
    let default_filter = match args.command.as_str() {
        "" | "demo" | "bench" => "warn",
        _ => "warn,durable=info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match args.command.as_str() {
            "" | "demo" => demo().await,
            "serve" => serve(args).await,
            "worker" => worker(args).await,
            "bench" => bench(args).await,
            "help" => {
                print!("{USAGE}");
                Ok(())
            }
            other => Err(format!("unknown command {other:?}\n\n{USAGE}").into()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // Display, not Debug: one line that names the problem (and the URL).
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C.
async fn terminated() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn connect(queue: QueueConfig) -> Result<(Backend, Store), BoxDynError> {
    let backend = Backend::from_env()?;
    let store = Store::connect(&backend, queue).await?;
    Ok((backend, store))
}

async fn serve(args: Args) -> Result<(), BoxDynError> {
    let (backend, store) = connect(args.queue).await?;
    let mut ledger = Ledger::default();
    for email in &args.on_hold {
        ledger = ledger.on_hold(email);
    }
    for email in &args.stalling {
        ledger = ledger.stalling(email);
    }
    let background = durable::background_layer();
    let handle = background.handle();
    let app = router(
        &store,
        MailServer::new(store.journal()),
        ledger,
        background,
        Duration::from_millis(args.timeout_ms.unwrap_or(10_000)),
    );
    let addr = args
        .addr
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 3000)));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    // The tests read this line for the port.
    println!(
        "listening on http://{}, jobs to {}",
        listener.local_addr()?,
        backend.describe()
    );
    durable::serve(listener, app, terminated()).await?;
    // Every staged job is pushed before the process exits.
    let report = handle.shutdown(Duration::from_secs(10)).await;
    let stats = handle.stats();
    println!(
        "stopped: {} after-response tasks completed, {} failed, {} cancelled",
        stats.completed, stats.failed, report.cancelled
    );
    Ok(())
}

async fn worker(args: Args) -> Result<(), BoxDynError> {
    let (backend, store) = connect(args.queue).await?;
    // Unique among the workers of the store: host and process id.
    let name = args.name.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .or_else(|_| std::env::var("HOSTNAME"))
            .unwrap_or_default();
        match host.trim() {
            "" => format!("worker-{}", std::process::id()),
            host => format!("worker-{host}-{}", std::process::id()),
        }
    });
    let mut mail = MailServer::new(store.journal())
        .with_latency(Duration::from_millis(args.latency_ms.unwrap_or(5)));
    for (address, n) in &args.fail_first {
        mail = mail.failing_first(address, *n);
    }
    for address in &args.hang_first {
        mail = mail.hanging_first(address);
    }
    println!("worker {name} running, jobs from {}", backend.describe());
    run_worker(
        &store,
        &name,
        mail,
        args.concurrency.unwrap_or(8),
        terminated(),
    )
    .await?;
    println!("worker {name} stopped");
    Ok(())
}

// ---------------------------------------------------------------------------
// The demo: `cargo run -p durable`
// ---------------------------------------------------------------------------

async fn demo() -> Result<(), BoxDynError> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("jobs.sqlite");
    let store = Store::connect(&Backend::Sqlite(db.clone()), QueueConfig::default()).await?;
    let app = start(
        store,
        Config {
            ledger: Ledger::default()
                .on_hold("mallory@example.com")
                .stalling("slow@example.com"),
            request_timeout: Duration::from_millis(500),
            worker: true,
            fail_first: vec![("flaky@example.com".into(), 2)],
        },
    )
    .await?;
    println!("app on http://{}, job store {}", app.addr, db.display());

    let client = reqwest::Client::new();
    let res = client
        .post(app.url("/register"))
        .json(&Register {
            email: "ada@example.com".into(),
        })
        .send()
        .await?;
    println!("POST /register ada@example.com    -> {}", res.status());
    for (order, email, amount_cents) in [
        ("A-1", "ada@example.com", 12_000),
        ("A-2", "grace@example.com", 4_250),
        ("A-3", "flaky@example.com", 990), // the mail server fails twice for this one
        ("A-4", "mallory@example.com", 66_600), // the handler fails: 409
        ("A-5", "slow@example.com", 1_500), // the handler times out: 408
    ] {
        let res = client
            .post(app.url("/invoices"))
            .json(&NewInvoice {
                order: order.into(),
                email: email.into(),
                amount_cents,
            })
            .send()
            .await?;
        let status = res.status();
        let body = res.text().await?;
        let what = serde_json::from_str::<InvoiceCreated>(&body)
            .map(|c| format!("job {}", c.job_key))
            .unwrap_or(body);
        println!("POST /invoices {email:<20} -> {status} {what}");
    }

    // The after-response tasks: the welcome email and the pushes.
    tokio::time::timeout(Duration::from_secs(10), app.handle.wait_idle()).await?;
    let stats = app.handle.stats();
    println!(
        "\nafter-response tasks: {} completed, {} failed, {} discarded (the timed-out request's push)",
        stats.completed, stats.failed, stats.discarded
    );
    let counts = tokio::time::timeout(Duration::from_secs(20), jobs_done(&app.store, 3)).await??;
    println!(
        "jobs in the store: {} ({} done; nothing for the failed and the timed-out request)",
        counts.total, counts.done
    );
    println!("\nthe mail server's log:");
    let log = app.store.journal().deliveries().await?;
    for d in &log {
        println!(
            "  {:<30} {:<20} runs={} sent={} by {:<11} {}",
            d.key, d.to, d.attempts, d.sends, d.sent_by, d.subject
        );
    }
    app.shutdown().await?;
    println!("\nshut down cleanly");

    let invoices: Vec<_> = log
        .iter()
        .filter(|d| d.key.starts_with("invoice-"))
        .collect();
    let flaky = invoices.iter().find(|d| d.to == "flaky@example.com");
    if invoices.len() != 3
        || invoices.iter().any(|d| d.sends != 1)
        || flaky.map(|d| d.attempts) != Some(3)
    {
        return Err(
            "expected three invoices, each sent once, the flaky one on its third run".into(),
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The measurements of docs/DURABLE.md: `cargo run -p durable --release -- bench`
// ---------------------------------------------------------------------------

async fn bench(args: Args) -> Result<(), BoxDynError> {
    let requests = args.requests.unwrap_or(10_000);
    let clients = args.clients.unwrap_or(32).max(1);
    let jobs = args.jobs.unwrap_or(5_000);
    let mut queue = args.queue;
    queue.queue = format!("bench-{}", std::process::id());
    let (backend, store) = connect(queue.clone()).await?;
    store.clear().await?;
    println!(
        "{}; {requests} requests per round, {clients} clients, keep-alive",
        backend.describe()
    );

    // 1. The same route, pushing a job after the response or running an
    // in-process task, in alternating rounds on one server.
    let app = start(
        store.clone(),
        Config {
            worker: false,
            ..Config::default()
        },
    )
    .await?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .build()?;
    // Per route: requests/s as the clients see them (the responses), and
    // requests/s until every after-response task has finished (what the
    // server can sustain: the pushes must keep up).
    let mut rates: [Vec<(f64, f64)>; 2] = [Vec::new(), Vec::new()];
    let mut order = 0usize;
    for round in 0..7 {
        let route = ["/invoices", "/invoices/in-process"][round % 2];
        let started = Instant::now();
        drive(&client, &app.url(route), requests, clients, &mut order).await?;
        let responded = started.elapsed();
        tokio::time::timeout(Duration::from_secs(120), app.handle.wait_idle()).await?;
        let idle = started.elapsed();
        // Round 0 warms up (connections, tables); it is not counted.
        if round > 0 {
            let rate = |d: Duration| requests as f64 / d.as_secs_f64();
            rates[round % 2].push((rate(responded), rate(idle)));
        }
    }
    let stats = app.handle.stats();
    app.shutdown().await?;
    if stats.failed > 0 {
        return Err(format!("{} pushes failed", stats.failed).into());
    }
    let median = |v: &[(f64, f64)], pick: fn(&(f64, f64)) -> f64| {
        let mut v: Vec<f64> = v.iter().map(pick).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (push_resp, push_done) = (median(&rates[0], |r| r.0), median(&rates[0], |r| r.1));
    let (task_resp, task_done) = (median(&rates[1], |r| r.0), median(&rates[1], |r| r.1));
    println!(
        "requests/s, median of 3 rounds each     responses   until every task finished\n\
         POST /invoices (push after response)   {push_resp:>9.0}   {push_done:>9.0}\n\
         POST /invoices/in-process (task)       {task_resp:>9.0}   {task_done:>9.0}\n\
         ratio push / in-process                {:>9.2}   {:>9.2}",
        push_resp / task_resp,
        push_done / task_done,
    );

    // 2. Jobs per second through two worker processes: `jobs` jobs wait in
    // the store, then two `durable worker` processes start.
    store.clear().await?;
    let mut staged = Vec::with_capacity(jobs);
    for i in 0..jobs {
        staged.push(
            TaskBuilder::new(durable::SendInvoice {
                order: format!("J-{i}"),
                email: "bench@example.com".into(),
                amount_cents: 100,
            })
            .build(),
        );
    }
    push_all(&store, staged).await?;
    let exe = std::env::current_exe()?;
    let started = Instant::now();
    let mut workers = Vec::new();
    for n in 1..=2 {
        workers.push(
            tokio::process::Command::new(&exe)
                .args(["worker", "--name", &format!("bench-{n}@{}", queue.queue)])
                .args(["--queue", &queue.queue])
                .env("RUST_LOG", "warn")
                .stdout(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()?,
        );
    }
    let counts =
        tokio::time::timeout(Duration::from_secs(300), jobs_done(&store, jobs as u64)).await??;
    let elapsed = started.elapsed();
    for mut w in workers {
        terminate(&mut w).await;
    }
    let log = store.journal().deliveries().await?;
    let by = |n: u32| {
        let name = format!("bench-{n}@{}", queue.queue);
        log.iter().filter(|d| d.sent_by == name).count()
    };
    println!(
        "two workers (concurrency 8 each, 5 ms per send): {} jobs in {:.2} s = {:.0} jobs/s \
         (bench-1 {}, bench-2 {}; process start included)",
        counts.done,
        elapsed.as_secs_f64(),
        counts.done as f64 / elapsed.as_secs_f64(),
        by(1),
        by(2),
    );
    store.clear().await?;
    Ok(())
}

use apalis::prelude::{TaskBuilder, TaskSink};

async fn push_all(
    store: &Store,
    tasks: Vec<apalis::prelude::Task<durable::SendInvoice>>,
) -> Result<(), BoxDynError> {
    use durable::Invoices;
    for task in tasks {
        match store.invoices() {
            Invoices::Sqlite(mut s) => s.push_task(task).await?,
            Invoices::Redis(mut s) => s.push_task(task).await?,
            Invoices::Postgres(mut s) => s.push_task(task).await?,
        }
    }
    Ok(())
}

/// SIGTERM, then wait for the exit.
async fn terminate(child: &mut tokio::process::Child) {
    if let Some(pid) = child.id() {
        let _ = tokio::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
}

/// `requests` POSTs from `clients` concurrent clients.
async fn drive(
    client: &reqwest::Client,
    url: &str,
    requests: usize,
    clients: usize,
    order: &mut usize,
) -> Result<(), BoxDynError> {
    let first = *order;
    *order += requests;
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(first));
    let end = first + requests;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..clients {
        let client = client.clone();
        let url = url.to_owned();
        let next = next.clone();
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= end {
                    return Ok::<_, reqwest::Error>(());
                }
                let res = client
                    .post(&url)
                    .json(&NewInvoice {
                        order: format!("B-{i}"),
                        email: "bench@example.com".into(),
                        amount_cents: 100,
                    })
                    .send()
                    .await?
                    .error_for_status()?;
                res.bytes().await?;
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}
