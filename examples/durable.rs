//! In-process tasks and durable jobs side by side, in one axum app.
//!
//! - `POST /register` queues the welcome email as an in-process background
//!   task ([`BackgroundTasks::add`]): fast, and lost if the process dies
//!   before it has run, which is acceptable for a welcome email.
//! - `POST /invoices` stages a durable job: an after-response task whose
//!   body is the push to [apalis] storage. The job is written only once the
//!   handler's success response has been sent, so a request that fails or is
//!   cancelled by a timeout enqueues nothing. An apalis worker in the same
//!   process sends the invoice and retries it when the mail server fails;
//!   once in the store, the job survives a crash or a restart.
//!
//! The storage is [`apalis_sqlite`] on a SQLite file in a temporary
//! directory, so nothing needs to be installed or running:
//!
//! ```text
//! cargo run --example durable
//! ```
//!
//! runs a self-contained demo (a few requests, one of them a job that fails
//! twice before it succeeds, one failed and one timed-out request) and exits.
//! `tests/durable.rs` drives the same app over HTTP and checks the rows of
//! the store. `RUST_LOG=info` shows what the worker and the tasks log.
//!
//! The handlers take the queue with `Extension<BackgroundTasks>`, which works
//! without this crate's `axum` feature; with the feature, `tasks:
//! BackgroundTasks` is the same thing.
//!
//! [apalis]: https://docs.rs/apalis

use std::collections::HashMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use apalis::prelude::*;
use apalis_sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions, SqliteStorage};
use axum::error_handling::HandleErrorLayer;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{BoxError, Extension, Json, Router};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tower::ServiceBuilder;
use tower_background::{BackgroundHandle, BackgroundLayer, BackgroundTasks, Completion};

// ---------------------------------------------------------------------------
// The durable job and its worker
// ---------------------------------------------------------------------------

/// The durable job: email invoice `invoice_id` to `email`. Jobs are stored as
/// JSON, so they must be `Serialize + Deserialize`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendInvoice {
    pub invoice_id: u64,
    pub email: String,
    pub amount_cents: u64,
}

/// How many times the store runs a job before it gives up on it
/// (apalis-sqlite's `max_attempts`, stored with each job).
pub const MAX_ATTEMPTS: usize = 5;

/// The apalis task function: runs on the worker, once per attempt. An `Err`
/// marks the attempt as failed; the store runs the job again until it
/// succeeds or has had [`MAX_ATTEMPTS`].
pub async fn send_invoice(job: SendInvoice, mailer: Data<Mailer>) -> Result<(), BoxDynError> {
    let subject = format!(
        "Invoice #{}: {}.{:02} EUR",
        job.invoice_id,
        job.amount_cents / 100,
        job.amount_cents % 100
    );
    mailer.send(&job.email, &subject).await?;
    Ok(())
}

/// Stages `job` on `tasks`: once the response has been sent, and only if its
/// status is a success, the job is pushed to `storage`.
///
/// The push is an after-response task, so a handler that fails (an error
/// response) or never finishes (a timeout drops it, its tasks are discarded)
/// enqueues nothing, wherever it staged the job. If the push itself fails,
/// the after-response task fails and is logged and counted like any task.
///
/// Any apalis storage works: `SqliteStorage` here, `RedisStorage` or
/// `PostgresStorage` on many machines.
pub fn push_after_response<S, Args, Kind>(tasks: &BackgroundTasks, storage: &S, job: Task<Args>)
where
    S: TaskSink<Args, Kind> + Clone + Send + 'static,
    S::Error: fmt::Display + Send,
    Args: Send + 'static,
{
    let mut storage = storage.clone();
    tasks.add_with(move |done: Completion| async move {
        if !done.status().is_success() {
            tracing::info!(status = %done.status(), "the request failed: job not enqueued");
            return Ok(());
        }
        storage.push_task(job).await
    });
}

// ---------------------------------------------------------------------------
// Stand-ins for the outside world
// ---------------------------------------------------------------------------

/// A stand-in mail server that records what it delivered. It can be told to
/// fail the first `n` sends to an address (a flaky SMTP relay).
#[derive(Clone, Default)]
pub struct Mailer {
    state: Arc<Mutex<MailerState>>,
}

#[derive(Default)]
struct MailerState {
    outbox: Vec<Mail>,
    failures_left: HashMap<String, u32>,
    attempts: HashMap<String, u32>,
}

/// A delivered email.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mail {
    pub to: String,
    pub subject: String,
}

/// The mail server refused a message.
#[derive(Debug)]
pub struct MailError(String);

impl fmt::Display for MailError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "mail server unavailable: {}", self.0)
    }
}

impl std::error::Error for MailError {}

impl Mailer {
    /// The first `failures` sends to `address` fail.
    pub fn failing_first(self, address: &str, failures: u32) -> Self {
        self.lock()
            .failures_left
            .insert(address.to_owned(), failures);
        self
    }

    /// Sends one message.
    pub async fn send(&self, to: &str, subject: &str) -> Result<(), MailError> {
        tokio::time::sleep(Duration::from_millis(5)).await; // the network
        let mut state = self.lock();
        *state.attempts.entry(to.to_owned()).or_default() += 1;
        if let Some(left) = state.failures_left.get_mut(to).filter(|left| **left > 0) {
            *left -= 1;
            return Err(MailError(format!("421 try again later ({to})")));
        }
        state.outbox.push(Mail {
            to: to.to_owned(),
            subject: subject.to_owned(),
        });
        Ok(())
    }

    /// Everything delivered so far, in order.
    pub fn outbox(&self) -> Vec<Mail> {
        self.lock().outbox.clone()
    }

    /// How many sends to `address` were tried, failed ones included.
    pub fn attempts(&self, address: &str) -> u32 {
        self.lock().attempts.get(address).copied().unwrap_or(0)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MailerState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A stand-in for the accounting system that books invoices. Customers "on
/// hold" are refused; booking for a "stalling" customer never answers.
#[derive(Clone, Default)]
pub struct Ledger {
    on_hold: Vec<String>,
    stalling: Vec<String>,
    booked: Arc<Mutex<Vec<u64>>>,
}

impl Ledger {
    /// Invoices for `email` are refused.
    pub fn on_hold(mut self, email: &str) -> Self {
        self.on_hold.push(email.to_owned());
        self
    }

    /// Booking an invoice for `email` hangs (until a timeout drops it).
    pub fn stalling(mut self, email: &str) -> Self {
        self.stalling.push(email.to_owned());
        self
    }

    async fn book(&self, invoice_id: u64, email: &str) -> Result<(), AppError> {
        if self.stalling.iter().any(|e| e == email) {
            std::future::pending::<()>().await;
        }
        if self.on_hold.iter().any(|e| e == email) {
            return Err(AppError::OnHold(email.to_owned()));
        }
        self.booked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(invoice_id);
        Ok(())
    }

    /// The invoices booked so far.
    pub fn booked(&self) -> Vec<u64> {
        self.booked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

// ---------------------------------------------------------------------------
// The HTTP app
// ---------------------------------------------------------------------------

#[derive(Clone)]
struct AppState {
    invoices: SqliteStorage<SendInvoice>,
    mailer: Mailer,
    ledger: Ledger,
    next_invoice: Arc<AtomicU64>,
}

#[derive(Debug, Deserialize, Serialize)]
pub struct Register {
    pub email: String,
}

#[derive(Debug, Deserialize, Serialize)]
pub struct NewInvoice {
    pub email: String,
    pub amount_cents: u64,
}

/// The answer to `POST /invoices`: the invoice and the key of its email job.
#[derive(Debug, Deserialize, Serialize)]
pub struct InvoiceCreated {
    pub invoice_id: u64,
    pub job_key: String,
}

#[derive(Debug)]
enum AppError {
    OnHold(String),
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        match self {
            AppError::OnHold(email) => (
                StatusCode::CONFLICT,
                format!("the account of {email} is on hold"),
            )
                .into_response(),
        }
    }
}

/// `POST /register`: the welcome email is an in-process background task.
async fn register(
    State(app): State<AppState>,
    Extension(tasks): Extension<BackgroundTasks>,
    Json(req): Json<Register>,
) -> (StatusCode, &'static str) {
    // ... create the account ...
    let mailer = app.mailer.clone();
    tasks.add(async move { mailer.send(&req.email, "Welcome!").await });
    (StatusCode::CREATED, "registered")
}

/// `POST /invoices`: the invoice email is a durable job, pushed after the
/// response.
async fn create_invoice(
    State(app): State<AppState>,
    Extension(tasks): Extension<BackgroundTasks>,
    Json(req): Json<NewInvoice>,
) -> Result<(StatusCode, Json<InvoiceCreated>), AppError> {
    let invoice_id = app.next_invoice.fetch_add(1, Ordering::Relaxed);
    // The idempotency key names the job in the store, and a second push of
    // the same invoice is ignored. (apalis-sqlite generates the job's id: it
    // must be a ULID.)
    let job_key = format!("invoice-{invoice_id}");
    let job = TaskBuilder::new(SendInvoice {
        invoice_id,
        email: req.email.clone(),
        amount_cents: req.amount_cents,
    })
    .idempotency_key(&job_key)
    .max_attempts(MAX_ATTEMPTS)
    .build();
    // Staged now, pushed only if the response below is a success.
    push_after_response(&tasks, &app.invoices, job);

    app.ledger.book(invoice_id, &req.email).await?;
    Ok((
        StatusCode::CREATED,
        Json(InvoiceCreated {
            invoice_id,
            job_key,
        }),
    ))
}

// ---------------------------------------------------------------------------
// Starting and stopping
// ---------------------------------------------------------------------------

/// What the app is made of; the test builds its own.
#[derive(Clone)]
pub struct Config {
    pub mailer: Mailer,
    pub ledger: Ledger,
    /// Requests that take longer are answered `408` and the tasks they
    /// staged are discarded.
    pub request_timeout: Duration,
    /// Run the apalis worker in this process (off: jobs wait in the store).
    pub worker: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            mailer: Mailer::default(),
            ledger: Ledger::default(),
            request_timeout: Duration::from_secs(10),
            worker: true,
        }
    }
}

/// The running app: HTTP server, background tasks and the apalis worker.
pub struct App {
    pub addr: SocketAddr,
    pub handle: BackgroundHandle,
    pub pool: SqlitePool,
    stop_server: oneshot::Sender<()>,
    server: JoinHandle<std::io::Result<()>>,
    worker: Option<Running>,
}

/// The apalis worker's task and the way to stop it.
struct Running {
    stop: oneshot::Sender<()>,
    run: JoinHandle<Result<(), WorkerError>>,
}

/// Opens (or creates) the job store, a SQLite file, and runs apalis'
/// migrations.
pub async fn open_store(path: &Path) -> Result<SqlitePool, BoxDynError> {
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true);
    let pool = SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await?;
    SqliteStorage::setup(&pool).await?;
    Ok(pool)
}

/// Starts the app on 127.0.0.1 (a free port) with its job store at `db`.
pub async fn start(db: &Path, config: Config) -> Result<App, BoxDynError> {
    let pool = open_store(db).await?;
    let invoices = SqliteStorage::<SendInvoice>::new(&pool);

    let worker = config.worker.then(|| {
        // Polls the store every 100 ms. A failed attempt is written back
        // (status `Failed`, `attempts` + 1) and fetched again, until the
        // job's `max_attempts`.
        let worker = WorkerBuilder::new("invoice-mailer")
            .backend(
                invoices
                    .clone()
                    .poll_with_interval(Duration::from_millis(100)),
            )
            .data(config.mailer.clone())
            .build(send_invoice);
        let (stop, stopped) = oneshot::channel::<()>();
        let run = tokio::spawn(worker.run_until(async move {
            let _ = stopped.await;
            Ok::<_, WorkerError>(())
        }));
        Running { stop, run }
    });

    let background = BackgroundLayer::new();
    let handle = background.handle();
    let state = AppState {
        invoices,
        mailer: config.mailer,
        ledger: config.ledger,
        next_invoice: Arc::new(AtomicU64::new(1)),
    };
    let router = Router::new()
        .route("/register", post(register))
        .route("/invoices", post(create_invoice))
        .with_state(state)
        .layer(background)
        // Outside the background layer: a timeout drops the request's
        // future, and the tasks it staged are discarded.
        .layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(|_: BoxError| async {
                    StatusCode::REQUEST_TIMEOUT
                }))
                .timeout(config.request_timeout),
        );

    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    let (stop_server, server_stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = server_stopped.await;
            })
            .await
    });

    Ok(App {
        addr,
        handle,
        pool,
        stop_server,
        server,
        worker,
    })
}

impl App {
    /// `http://127.0.0.1:PORT{path}`
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Graceful shutdown, in order: the server (no new request), the
    /// background tasks (every staged job is pushed), the worker.
    pub async fn shutdown(self) -> Result<(), BoxDynError> {
        let _ = self.stop_server.send(());
        self.server.await??;
        let report = self.handle.shutdown(Duration::from_secs(10)).await;
        if report.cancelled > 0 {
            return Err(format!("{} background tasks were cancelled", report.cancelled).into());
        }
        if let Some(Running { stop, run }) = self.worker {
            let _ = stop.send(());
            run.await??;
        }
        self.pool.close().await;
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Reading the store
// ---------------------------------------------------------------------------

/// One row of apalis-sqlite's `Jobs` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRow {
    /// The job's idempotency key, `invoice-N`.
    pub key: String,
    /// `Pending`, `Queued`, `Running`, `Done`, `Failed` or `Killed`.
    pub status: String,
    /// Attempts so far.
    pub attempts: i64,
    pub job: SendInvoice,
}

impl JobRow {
    /// Done, or failed for good.
    pub fn is_finished(&self) -> bool {
        match self.status.as_str() {
            "Done" | "Killed" => true,
            "Failed" => self.attempts >= MAX_ATTEMPTS as i64,
            _ => false,
        }
    }
}

/// The invoice jobs in the store, in the order they were pushed.
pub async fn job_rows(pool: &SqlitePool) -> Result<Vec<JobRow>, BoxDynError> {
    let rows: Vec<(String, String, i64, Vec<u8>)> = sqlx::query_as(
        "SELECT idempotency_key, status, attempts, job FROM Jobs \
         WHERE job_type = ? ORDER BY rowid",
    )
    // apalis-sqlite's default queue name is the job's type name.
    .bind(std::any::type_name::<SendInvoice>())
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|(key, status, attempts, job)| {
            Ok(JobRow {
                key,
                status,
                attempts,
                job: serde_json::from_slice(&job)?,
            })
        })
        .collect()
}

/// Resolves once every invoice job in the store has finished, reading the
/// store every 50 ms. Bound it with a timeout.
pub async fn jobs_finished(pool: &SqlitePool) -> Result<Vec<JobRow>, BoxDynError> {
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tick.tick().await;
        let rows = job_rows(pool).await?;
        if rows.iter().all(JobRow::is_finished) {
            return Ok(rows);
        }
    }
}

// ---------------------------------------------------------------------------
// The demo: `cargo run --example durable --features axum`
// ---------------------------------------------------------------------------

#[tokio::main]
async fn main() -> Result<(), BoxDynError> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();

    let dir = tempfile::tempdir()?;
    let db = dir.path().join("jobs.sqlite");
    let mailer = Mailer::default().failing_first("flaky@example.com", 2);
    let app = start(
        &db,
        Config {
            mailer: mailer.clone(),
            ledger: Ledger::default()
                .on_hold("mallory@example.com")
                .stalling("slow@example.com"),
            request_timeout: Duration::from_millis(500),
            worker: true,
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
    for (email, amount_cents) in [
        ("ada@example.com", 12_000),
        ("grace@example.com", 4_250),
        ("flaky@example.com", 990), // the mail server fails twice for this one
        ("mallory@example.com", 66_600), // the handler fails: 409
        ("slow@example.com", 1_500), // the handler times out: 408
    ] {
        let res = client
            .post(app.url("/invoices"))
            .json(&NewInvoice {
                email: email.into(),
                amount_cents,
            })
            .send()
            .await?;
        println!(
            "POST /invoices {email:<20} -> {} {}",
            res.status(),
            res.text().await?
        );
    }

    // The after-response tasks: the welcome email and the pushes.
    tokio::time::timeout(Duration::from_secs(10), app.handle.wait_idle()).await?;
    let stats = app.handle.stats();
    println!(
        "\nafter-response tasks: {} completed, {} failed, {} discarded (the timed-out request's push)",
        stats.completed, stats.failed, stats.discarded
    );

    let mut rows =
        tokio::time::timeout(Duration::from_secs(20), jobs_finished(&app.pool)).await??;
    rows.sort_by_key(|row| row.job.invoice_id);
    println!("\njobs in the store (nothing for the failed and the timed-out request):");
    for row in &rows {
        println!(
            "  {:<10} {:<5} attempts={} {}",
            row.key, row.status, row.attempts, row.job.email
        );
    }
    println!("\ndelivered by the mail server:");
    for mail in mailer.outbox() {
        println!("  {:<20} {}", mail.to, mail.subject);
    }
    println!(
        "  (sends tried for flaky@example.com: {})",
        mailer.attempts("flaky@example.com")
    );

    app.shutdown().await?;
    println!("\nshut down cleanly");

    let all_done = rows.len() == 3 && rows.iter().all(|r| r.status == "Done");
    if !all_done {
        return Err("expected three invoice jobs, all done".into());
    }
    Ok(())
}
