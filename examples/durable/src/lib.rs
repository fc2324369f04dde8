//! Durable after-response jobs: `tower-background` decides *when* a job is
//! pushed (after the response, and only if it is a success), [apalis] stores
//! it and runs it, on one machine or many.
//!
//! - `POST /register` queues the welcome email as an in-process background
//!   task ([`BackgroundTasks::add`]): fast, and lost if the process dies
//!   before it has run, which is acceptable for a welcome email.
//! - `POST /invoices` stages the invoice email as a durable job: an
//!   after-response task whose body is the push to apalis storage. The job is
//!   written only once the handler's success response has been sent, so a
//!   request that fails or is cancelled by a timeout enqueues nothing. An
//!   apalis worker (in this process, or in `worker` processes on other
//!   machines) sends the invoice and retries it when the mail server fails.
//!
//! The storage is one of three apalis backends, chosen by [`Backend`]:
//! SQLite (a file, nothing to install), Redis (`REDIS_URL`, apalis-redis) or
//! Postgres (`DATABASE_URL`, apalis-postgres). The job type [`SendInvoice`],
//! the handlers and the worker function [`send_invoice`] are the same for all
//! three; only [`Store::connect`] differs.
//!
//! Jobs are delivered at least once: a worker that dies after it has sent an
//! invoice but before the store has recorded the job as done leaves a job that
//! apalis runs again. The job's key ([`SendInvoice::key`]) makes that second
//! run harmless: [`send_invoice`] asks the mail server's log ([`Journal`])
//! whether the invoice was already sent and does nothing if so.
//!
//! [apalis]: https://docs.rs/apalis

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;
use std::task::{Context, Poll};
use std::time::Duration;

use apalis::prelude::*;
use apalis_core::backend::{Backend as TaskSource, BackendConfig, WireFormatBackend};
use apalis_postgres::PostgresStorage;
use apalis_redis::{ConnectionManager, RedisStorage};
use apalis_sqlite::SqliteStorage;
use axum::error_handling::HandleErrorLayer;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{BoxError, Json, Router};
use serde::{Deserialize, Serialize};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tower::ServiceBuilder;
use tower_background::{BackgroundHandle, BackgroundLayer, BackgroundTasks, Completion};

pub use apalis::prelude::BoxDynError;

// ---------------------------------------------------------------------------
// The durable job and its worker function (the same for every backend)
// ---------------------------------------------------------------------------

/// The durable job: email the invoice of order `order` to `email`. Jobs are
/// stored as JSON, so they must be `Serialize + Deserialize`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendInvoice {
    /// The client's order reference; the job's key is made from it.
    pub order: String,
    pub email: String,
    pub amount_cents: u64,
}

impl SendInvoice {
    /// The idempotency key: one invoice email per order, however many times
    /// the job is pushed or delivered.
    pub fn key(&self) -> String {
        format!("invoice-{}", self.order)
    }

    fn subject(&self) -> String {
        format!(
            "Invoice {}: {}.{:02} EUR",
            self.order,
            self.amount_cents / 100,
            self.amount_cents % 100
        )
    }
}

/// How many times the store runs a job before it gives up on it (stored with
/// each job; apalis-redis 1.0 retries up to 25 times whatever this says).
pub const MAX_ATTEMPTS: usize = 5;

/// The apalis task function: runs on a worker, once per delivery. An `Err`
/// marks the attempt as failed and the store runs the job again later.
///
/// Idempotent by [`SendInvoice::key`]: a job delivered again after its
/// invoice was sent (its worker died before the store recorded it as done, or
/// the same job was pushed twice) sends nothing.
pub async fn send_invoice(
    job: SendInvoice,
    mail: Data<MailServer>,
    worker: WorkerContext,
) -> Result<(), BoxDynError> {
    let key = job.key();
    let attempt = mail.journal.attempt(&key).await?;
    if mail.journal.sent(&key).await? {
        tracing::info!(%key, attempt, "invoice already sent: nothing to do");
        return Ok(());
    }
    mail.send(&key, &job.email, &job.subject(), attempt, worker.name())
        .await?;
    tracing::info!(%key, attempt, worker = worker.name(), "invoice sent");
    Ok(())
}

/// Stages `job` on `tasks`: once the response has been sent, and only if its
/// status is a success, the job is pushed to `storage`.
///
/// The push is an after-response task, so a handler that fails (an error
/// response) or never finishes (a timeout drops it, its tasks are discarded)
/// enqueues nothing, wherever it staged the job. If the push itself fails
/// (the store is unreachable), it is logged with the job's key and the
/// after-response task fails, so [`BackgroundHandle::stats`] counts it; the
/// response was already sent. A transactional outbox closes that window.
pub fn push_after_response<S, Kind>(tasks: &BackgroundTasks, storage: &S, job: SendInvoice)
where
    S: TaskSink<SendInvoice, Kind> + Clone + Send + 'static,
    S::Error: fmt::Display + Send,
{
    let mut storage = storage.clone();
    tasks.add_with(move |done: Completion| async move {
        let key = job.key();
        if !done.status().is_success() {
            tracing::info!(%key, status = %done.status(), "the request failed: job not enqueued");
            return Ok(());
        }
        let task = TaskBuilder::new(job)
            .idempotency_key(&key)
            .max_attempts(MAX_ATTEMPTS)
            .build();
        match storage.push_task(task).await {
            Ok(()) => {
                tracing::info!(%key, "job enqueued");
                Ok(())
            }
            // Most often the job is not in the store. If the connection was
            // lost after the store took the job and before its answer came
            // back, it is: this push cannot tell.
            Err(error) => {
                tracing::error!(%key, %error, "push failed: the job is not enqueued");
                Err(format!("push of {key} failed: {error}"))
            }
        }
    });
}

// ---------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------

/// Where the jobs are stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// A SQLite file (created if missing): one machine, nothing to install.
    Sqlite(PathBuf),
    /// A Redis server, `redis://host:port`.
    Redis(String),
    /// A PostgreSQL database, `postgres://user@host:port/db`.
    Postgres(String),
}

/// The SQLite file used by `serve` and `worker` when neither `REDIS_URL` nor
/// `DATABASE_URL` is set (override with `SQLITE_PATH`).
pub const DEFAULT_SQLITE_PATH: &str = "durable-jobs.sqlite";

impl Backend {
    /// `REDIS_URL` selects Redis, `DATABASE_URL` Postgres, otherwise SQLite at
    /// `SQLITE_PATH` (default [`DEFAULT_SQLITE_PATH`]). Both URLs set is an
    /// error rather than a guess.
    pub fn from_env() -> Result<Self, String> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        match (var("REDIS_URL"), var("DATABASE_URL")) {
            (Some(_), Some(_)) => {
                Err("both REDIS_URL and DATABASE_URL are set: set the one to use".into())
            }
            (Some(url), None) => Ok(Backend::Redis(url)),
            (None, Some(url)) => Ok(Backend::Postgres(url)),
            (None, None) => Ok(Backend::Sqlite(
                var("SQLITE_PATH")
                    .unwrap_or_else(|| DEFAULT_SQLITE_PATH.into())
                    .into(),
            )),
        }
    }

    /// The backend and where it is, without a password.
    pub fn describe(&self) -> String {
        match self {
            Backend::Sqlite(path) => format!("SQLite at {}", path.display()),
            Backend::Redis(url) => format!("Redis at {}", redact(url)),
            Backend::Postgres(url) => format!("Postgres at {}", redact(url)),
        }
    }
}

/// `scheme://user:secret@host` -> `scheme://user:***@host`.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

/// The backend could not be reached or set up.
#[derive(Debug)]
pub struct ConnectError {
    /// What we tried to reach ([`Backend::describe`]).
    pub target: String,
    pub source: BoxDynError,
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot use the job store, {}: {}",
            self.target, self.source
        )
    }
}

impl std::error::Error for ConnectError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

/// How workers share a queue: heartbeats, and when a silent worker's jobs are
/// given to another one.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    /// The queue's name (several apps or tests can share one server).
    pub queue: String,
    /// How often a worker tells the store it is alive.
    pub heartbeat: Duration,
    /// A worker that missed this many heartbeats is dead: the other workers
    /// re-enqueue the jobs it held (apalis' orphan recovery).
    pub missed_heartbeats: usize,
    /// How often an idle worker asks the store for jobs.
    pub poll_interval: Duration,
    /// Jobs a worker fetches at a time.
    pub batch_size: usize,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            queue: "invoices".into(),
            heartbeat: Duration::from_secs(5),
            missed_heartbeats: 3,
            poll_interval: Duration::from_millis(100),
            batch_size: 10,
        }
    }
}

/// How long Redis remembers a pushed job's idempotency key: a second push of
/// the same key within this time is ignored.
pub const REDIS_IDEMPOTENCY_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// A connection to the job store: builds the apalis storage and the mail
/// server's log on it.
#[derive(Clone)]
pub struct Store {
    conn: Conn,
    config: QueueConfig,
}

#[derive(Clone)]
enum Conn {
    Sqlite(SqlitePool),
    Redis(ConnectionManager),
    Postgres(PgPool),
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.conn {
            Conn::Sqlite(_) => "sqlite",
            Conn::Redis(_) => "redis",
            Conn::Postgres(_) => "postgres",
        };
        f.debug_struct("Store")
            .field("backend", &kind)
            .field("queue", &self.config.queue)
            .finish()
    }
}

/// How long a connection attempt may take before the store counts as
/// unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

impl Store {
    /// Connects to the backend and creates apalis' tables and the mail log if
    /// they are missing. The error names the backend and its URL.
    pub async fn connect(backend: &Backend, config: QueueConfig) -> Result<Store, ConnectError> {
        let fail = |source: BoxDynError| ConnectError {
            target: backend.describe(),
            source,
        };
        let conn = match backend {
            Backend::Sqlite(path) => {
                let options = SqliteConnectOptions::new()
                    .filename(path)
                    .create_if_missing(true)
                    // Several processes on one file: wait for the lock.
                    .busy_timeout(Duration::from_secs(10));
                let pool = SqlitePoolOptions::new()
                    .max_connections(4)
                    .acquire_timeout(CONNECT_TIMEOUT)
                    .connect_with(options)
                    .await
                    .map_err(|e| fail(e.into()))?;
                SqliteStorage::setup(&pool)
                    .await
                    .map_err(|e| fail(e.into()))?;
                Conn::Sqlite(pool)
            }
            Backend::Redis(url) => {
                let client = redis::Client::open(url.as_str()).map_err(|e| fail(e.into()))?;
                // One plain connection first: its error says why (the
                // connection manager retries, and would only time out).
                tokio::time::timeout(CONNECT_TIMEOUT, client.get_multiplexed_async_connection())
                    .await
                    .map_err(|_| fail("timed out".into()))?
                    .map_err(|e| fail(e.into()))?;
                let conn = tokio::time::timeout(
                    CONNECT_TIMEOUT,
                    redis::aio::ConnectionManager::new(client),
                )
                .await
                .map_err(|_| fail("timed out".into()))?
                .map_err(|e| fail(e.into()))?;
                Conn::Redis(conn)
            }
            Backend::Postgres(url) => {
                // One plain connection first: its error says why (the pool
                // retries, and would only time out).
                use sqlx::Connection as _;
                let first = tokio::time::timeout(CONNECT_TIMEOUT, sqlx::PgConnection::connect(url))
                    .await
                    .map_err(|_| fail("timed out".into()))?
                    .map_err(|e| fail(e.into()))?;
                let _ = first.close().await;
                let pool = PgPoolOptions::new()
                    .max_connections(8)
                    .acquire_timeout(CONNECT_TIMEOUT)
                    .connect(url)
                    .await
                    .map_err(|e| fail(e.into()))?;
                PostgresStorage::setup(&pool)
                    .await
                    .map_err(|e| fail(e.into()))?;
                Conn::Postgres(pool)
            }
        };
        let store = Store { conn, config };
        store.journal().setup().await.map_err(fail)?;
        Ok(store)
    }

    /// The queue's settings.
    pub fn config(&self) -> &QueueConfig {
        &self.config
    }

    /// The apalis storage of the invoice jobs, as a pusher.
    pub fn invoices(&self) -> Invoices {
        let c = &self.config;
        macro_rules! configure {
            ($config:ty) => {
                <$config>::default()
                    .queue(&c.queue)
                    .heartbeat_interval(c.heartbeat)
                    .missed_heartbeats(c.missed_heartbeats)
                    .batch_size(c.batch_size)
            };
        }
        match &self.conn {
            Conn::Sqlite(pool) => Invoices::Sqlite(
                SqliteStorage::new(pool).with_config(configure!(apalis_sqlite::Config)),
            ),
            Conn::Redis(conn) => Invoices::Redis(RedisStorage::new(conn.clone()).with_config(
                // apalis-redis 1.0 remembers an idempotency key only with a
                // TTL: without one (the default) it sets the key to expire at
                // once, and a second push of the same key is stored again.
                configure!(apalis_redis::Config).idempotency_ttl(Some(REDIS_IDEMPOTENCY_TTL)),
            )),
            Conn::Postgres(pool) => Invoices::Postgres(
                PostgresStorage::new(pool).with_config(configure!(apalis_postgres::Config)),
            ),
        }
    }

    /// The mail server's log, kept in the same backend.
    pub fn journal(&self) -> Journal {
        Journal {
            conn: self.conn.clone(),
            queue: self.config.queue.clone(),
        }
    }

    /// The invoice jobs in the store: how many, and how many are done.
    pub async fn job_counts(&self) -> Result<JobCounts, BoxDynError> {
        let queue = &self.config.queue;
        Ok(match &self.conn {
            Conn::Sqlite(pool) => {
                let (total, done): (i64, i64) = sqlx::query_as(
                    "SELECT COUNT(*), COALESCE(SUM(status = 'Done'), 0) FROM Jobs WHERE job_type = ?",
                )
                .bind(queue)
                .fetch_one(pool)
                .await?;
                JobCounts::new(total, done)
            }
            Conn::Postgres(pool) => {
                let (total, done): (i64, i64) = sqlx::query_as(
                    "SELECT COUNT(*), COUNT(*) FILTER (WHERE status = 'Done') \
                     FROM apalis.jobs WHERE job_type = $1",
                )
                .bind(queue)
                .fetch_one(pool)
                .await?;
                JobCounts::new(total, done)
            }
            Conn::Redis(conn) => {
                let mut conn = conn.clone();
                let (total, done): (u64, u64) = redis::pipe()
                    .hlen(format!("{queue}:data"))
                    .scard(format!("{queue}:done"))
                    .query_async(&mut conn)
                    .await?;
                JobCounts { total, done }
            }
        })
    }

    /// Removes this queue's jobs and mail log (the tests start clean on a
    /// shared server).
    pub async fn clear(&self) -> Result<(), BoxDynError> {
        let queue = &self.config.queue;
        match &self.conn {
            Conn::Sqlite(pool) => {
                sqlx::query("DELETE FROM Jobs WHERE job_type = ?")
                    .bind(queue)
                    .execute(pool)
                    .await?;
                sqlx::query("DELETE FROM durable_mail WHERE queue = ?")
                    .bind(queue)
                    .execute(pool)
                    .await?;
            }
            Conn::Postgres(pool) => {
                sqlx::query("DELETE FROM apalis.jobs WHERE job_type = $1")
                    .bind(queue)
                    .execute(pool)
                    .await?;
                sqlx::query("DELETE FROM durable_mail WHERE queue = $1")
                    .bind(queue)
                    .execute(pool)
                    .await?;
            }
            Conn::Redis(conn) => {
                let mut conn = conn.clone();
                let keys: Vec<String> = redis::cmd("KEYS")
                    .arg(format!("{queue}:*"))
                    .query_async(&mut conn)
                    .await?;
                if !keys.is_empty() {
                    redis::cmd("DEL")
                        .arg(keys)
                        .query_async::<()>(&mut conn)
                        .await?;
                }
            }
        }
        Ok(())
    }
}

/// How many invoice jobs the store holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobCounts {
    pub total: u64,
    pub done: u64,
}

impl JobCounts {
    fn new(total: i64, done: i64) -> Self {
        Self {
            total: total.max(0) as u64,
            done: done.max(0) as u64,
        }
    }
}

/// The apalis storage of the invoice jobs, whichever the backend.
#[derive(Clone)]
pub enum Invoices {
    Sqlite(SqliteStorage<SendInvoice>),
    Redis(RedisStorage<SendInvoice>),
    Postgres(PostgresStorage<SendInvoice>),
}

impl Invoices {
    /// [`push_after_response`] on this storage.
    pub fn push_after_response(&self, tasks: &BackgroundTasks, job: SendInvoice) {
        match self {
            Invoices::Sqlite(s) => push_after_response(tasks, s, job),
            Invoices::Redis(s) => push_after_response(tasks, s, job),
            Invoices::Postgres(s) => push_after_response(tasks, s, job),
        }
    }
}

/// Runs an apalis worker on `store` until `shutdown` resolves; then it stops
/// fetching, finishes the jobs in hand (each one recorded as done or failed in
/// the store) and returns.
///
/// `name` must be unique among the workers of a queue (it names the worker's
/// heartbeat and the jobs it holds).
pub async fn run_worker<F>(
    store: &Store,
    name: &str,
    mail: MailServer,
    concurrency: usize,
    shutdown: F,
) -> Result<(), WorkerError>
where
    F: Future<Output = ()> + Send + 'static,
{
    let poll = store.config.poll_interval;
    // The worker stops once its backend has ended its stream (see StopFetching).
    let (ended, stop) = oneshot::channel::<()>();
    let stop = async move {
        let _ = stop.await; // sent, or the backend dropped: either way, stop
        Ok::<_, WorkerError>(())
    };
    macro_rules! run {
        ($storage:expr, $close_first:expr) => {
            WorkerBuilder::new(name)
                .backend(StopFetching::new(
                    $storage.poll_with_interval(poll),
                    shutdown,
                    $close_first,
                    ended,
                ))
                .concurrency(concurrency)
                .data(mail)
                .build(send_invoice)
                .run_until(stop)
                .await
        };
    }
    match store.invoices() {
        // One writer at a time for the whole file: close the backend's own
        // store operations before the jobs in hand write theirs.
        Invoices::Sqlite(s) => run!(s, true),
        // Locks per key or per row: apalis' own order, the stream ends at the
        // stop. (apalis-redis' poll_close also unregisters the worker: it can
        // run only once, at the end.)
        Invoices::Redis(s) => run!(s, false),
        Invoices::Postgres(s) => run!(s, false),
    }
}

/// The backend of [`run_worker`]: `inner` until `shutdown` resolves, then a
/// stream that ends, so that the worker fetches nothing more, finishes the
/// jobs in hand and returns.
///
/// Why not simply `run_until(shutdown)`: once its stop signal has fired, an
/// apalis 1.0 worker no longer polls its backend until its last job is done
/// (it only calls `poll_close` then), but keeps whatever store operation the
/// backend had under way. apalis-sqlite runs each fetch, heartbeat and
/// recording of a job's start or end in a transaction (`BEGIN; UPDATE ...
/// RETURNING; COMMIT`): a stop that lands after the `UPDATE` leaves that
/// transaction open, holding SQLite's write lock on the file until the jobs in
/// hand end. Their own writes to the file (here the mail log) then wait
/// `busy_timeout` and fail, and so would the other workers' writes.
///
/// With `close_first`, when `shutdown` resolves this backend first runs
/// `inner`'s `poll_close` to its end while apalis still polls it: the
/// operations under way are finished, except a fetch, which is dropped (its
/// transaction rolled back: the jobs it was taking stay queued); the jobs
/// fetched and not started are put back in the queue. Only then does the
/// stream end. The worker's own `poll_close`, after the last job, records the
/// jobs in hand as done.
///
/// `ended` is sent when the stream ends and is `run_until`'s signal: an apalis
/// worker returns once its stream has ended, its stop signal has fired and its
/// jobs are done.
struct StopFetching<B> {
    inner: B,
    shutdown: Pin<Box<dyn Future<Output = ()> + Send>>,
    close_first: bool,
    phase: StopPhase,
    ended: Option<oneshot::Sender<()>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopPhase {
    Running,
    /// `shutdown` resolved: `inner.poll_close` is being driven.
    Closing,
    /// The stream has ended (or ends at the next `poll_next`).
    Stopped,
}

impl<B> StopFetching<B> {
    fn new<F>(inner: B, shutdown: F, close_first: bool, ended: oneshot::Sender<()>) -> Self
    where
        F: Future<Output = ()> + Send + 'static,
    {
        Self {
            inner,
            shutdown: Box::pin(shutdown),
            close_first,
            phase: StopPhase::Running,
            ended: Some(ended),
        }
    }

    fn end(&mut self) {
        self.phase = StopPhase::Stopped;
        if let Some(ended) = self.ended.take() {
            let _ = ended.send(());
        }
    }
}

impl<B: TaskSource> StopFetching<B> {
    /// Running: watches `shutdown`. Closing: drives `inner.poll_close`.
    /// Ready(true) once the stream is to end.
    fn poll_stop(
        &mut self,
        cx: &mut Context<'_>,
        worker: &WorkerContext,
    ) -> Poll<Result<bool, B::Error>> {
        if self.phase == StopPhase::Running && self.shutdown.as_mut().poll(cx).is_ready() {
            self.phase = if self.close_first {
                StopPhase::Closing
            } else {
                StopPhase::Stopped
            };
        }
        match self.phase {
            StopPhase::Running => Poll::Ready(Ok(false)),
            StopPhase::Closing => match self.inner.poll_close(cx, worker) {
                Poll::Ready(Ok(())) => {
                    self.phase = StopPhase::Stopped;
                    Poll::Ready(Ok(true))
                }
                Poll::Ready(Err(e)) => {
                    self.end();
                    Poll::Ready(Err(e))
                }
                Poll::Pending => Poll::Pending,
            },
            StopPhase::Stopped => Poll::Ready(Ok(true)),
        }
    }
}

impl<B: TaskSource> TaskSource for StopFetching<B> {
    type Task = B::Task;
    type Error = B::Error;

    fn poll_ready(
        &mut self,
        cx: &mut Context<'_>,
        worker: &WorkerContext,
    ) -> Poll<Result<(), B::Error>> {
        match self.poll_stop(cx, worker) {
            Poll::Ready(Ok(false)) => self.inner.poll_ready(cx, worker),
            // The worker calls poll_next next, which ends the stream.
            Poll::Ready(Ok(true)) => Poll::Ready(Ok(())),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        worker: &WorkerContext,
    ) -> Poll<Option<Result<B::Task, B::Error>>> {
        match self.poll_stop(cx, worker) {
            Poll::Ready(Ok(false)) => {}
            Poll::Ready(Ok(true)) => {
                self.end();
                return Poll::Ready(None);
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(e))),
            Poll::Pending => return Poll::Pending,
        }
        let next = self.inner.poll_next(cx, worker);
        if let Poll::Ready(None) = next {
            self.end();
        }
        next
    }

    fn poll_close(
        &mut self,
        cx: &mut Context<'_>,
        worker: &WorkerContext,
    ) -> Poll<Result<(), B::Error>> {
        let closed = self.inner.poll_close(cx, worker);
        if closed.is_ready() {
            self.end();
        }
        closed
    }
}

impl<B: BackendConfig> BackendConfig for StopFetching<B> {
    type Args = B::Args;
    type Id = B::Id;
    type Kind = B::Kind;
    type Config = B::Config;
    type Layer = B::Layer;

    fn config(&self) -> &Self::Config {
        self.inner.config()
    }

    fn middleware(&mut self, worker: &mut WorkerContext) -> Self::Layer {
        self.inner.middleware(worker)
    }
}

impl<B: WireFormatBackend> WireFormatBackend for StopFetching<B> {
    type Codec = B::Codec;
    type Compact = B::Compact;

    fn codec(&self) -> &Self::Codec {
        self.inner.codec()
    }
}

// ---------------------------------------------------------------------------
// The mail server (a stand-in for the outside world) and its log
// ---------------------------------------------------------------------------

/// A stand-in mail server. What it delivers is written to the [`Journal`],
/// in the job store, so that every process sees it. It can be told to fail
/// or to hang, per address, to play a flaky relay.
#[derive(Clone, Debug)]
pub struct MailServer {
    journal: Journal,
    /// Sends to this address fail until the job's attempt number is above it.
    fail_first: HashMap<String, u32>,
    /// The first attempt for this address hangs (its worker is killed in the
    /// crash test); later attempts send.
    hang_first: Vec<String>,
    /// How long one send takes.
    pub latency: Duration,
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

impl MailServer {
    pub fn new(journal: Journal) -> Self {
        Self {
            journal,
            fail_first: HashMap::new(),
            hang_first: Vec::new(),
            latency: Duration::from_millis(5),
        }
    }

    /// Attempts `1..=failures` to `address` fail.
    pub fn failing_first(mut self, address: &str, failures: u32) -> Self {
        self.fail_first.insert(address.to_owned(), failures);
        self
    }

    /// The first attempt to `address` never finishes.
    pub fn hanging_first(mut self, address: &str) -> Self {
        self.hang_first.push(address.to_owned());
        self
    }

    /// Each send takes `latency`.
    pub fn with_latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }

    /// The log of what was sent.
    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// Sends one message; `attempt` is the job's delivery number (1, 2, ...).
    pub async fn send(
        &self,
        key: &str,
        to: &str,
        subject: &str,
        attempt: u32,
        sender: &str,
    ) -> Result<(), BoxDynError> {
        if attempt == 1 && self.hang_first.iter().any(|a| a == to) {
            tracing::info!(%key, "the mail server hangs on this one");
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(self.latency).await; // the network
        if self.fail_first.get(to).is_some_and(|n| attempt <= *n) {
            return Err(MailError(format!("421 try again later ({to}, attempt {attempt})")).into());
        }
        self.journal.record_send(key, to, subject, sender).await
    }
}

/// The mail server's log, per queue, in the job store: for every key, how many
/// times a worker started the job (`attempts`) and how many times the mail
/// was actually sent (`sends`, 1 when all is well), and by whom.
#[derive(Clone)]
pub struct Journal {
    conn: Conn,
    queue: String,
}

impl fmt::Debug for Journal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Journal")
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

/// One key of the [`Journal`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub key: String,
    /// Times a worker ran the job for this key (a job that found the mail
    /// already sent counts too).
    pub attempts: u32,
    /// Times the mail was sent.
    pub sends: u32,
    pub to: String,
    pub subject: String,
    /// The worker (or `web`) that sent it.
    pub sent_by: String,
}

const MAIL_TABLE: &str = "CREATE TABLE IF NOT EXISTS durable_mail (\
     queue TEXT NOT NULL, key TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, \
     sends INTEGER NOT NULL DEFAULT 0, recipient TEXT NOT NULL DEFAULT '', \
     subject TEXT NOT NULL DEFAULT '', sent_by TEXT NOT NULL DEFAULT '', \
     PRIMARY KEY (queue, key))";

type Row = (String, i64, i64, String, String, String);

impl Journal {
    fn redis_key(&self, what: &str) -> String {
        format!("{}:mail:{what}", self.queue)
    }

    async fn setup(&self) -> Result<(), BoxDynError> {
        match &self.conn {
            Conn::Sqlite(pool) => {
                sqlx::query(MAIL_TABLE).execute(pool).await?;
            }
            Conn::Postgres(pool) => {
                // Processes starting together on a new database would race
                // on CREATE TABLE IF NOT EXISTS (a unique violation in
                // pg_type): one at a time.
                let mut tx = pool.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock(7001001)")
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(MAIL_TABLE).execute(&mut *tx).await?;
                tx.commit().await?;
            }
            Conn::Redis(conn) => {
                let mut conn = conn.clone();
                redis::cmd("PING").query_async::<()>(&mut conn).await?;
            }
        }
        Ok(())
    }

    /// Counts one more run of the job `key`; returns its number (1 first).
    pub async fn attempt(&self, key: &str) -> Result<u32, BoxDynError> {
        const UPSERT: &str = "INSERT INTO durable_mail (queue, key, attempts) VALUES ($1, $2, 1) \
             ON CONFLICT (queue, key) DO UPDATE SET attempts = durable_mail.attempts + 1 \
             RETURNING attempts";
        let n: i64 = match &self.conn {
            Conn::Sqlite(pool) => {
                sqlx::query_scalar(UPSERT)
                    .bind(&self.queue)
                    .bind(key)
                    .fetch_one(pool)
                    .await?
            }
            Conn::Postgres(pool) => {
                let n: i32 = sqlx::query_scalar(UPSERT)
                    .bind(&self.queue)
                    .bind(key)
                    .fetch_one(pool)
                    .await?;
                n.into()
            }
            Conn::Redis(conn) => {
                let mut conn = conn.clone();
                redis::cmd("HINCRBY")
                    .arg(self.redis_key("attempts"))
                    .arg(key)
                    .arg(1)
                    .query_async(&mut conn)
                    .await?
            }
        };
        Ok(n.try_into().unwrap_or(u32::MAX))
    }

    /// Whether the mail of `key` was sent.
    pub async fn sent(&self, key: &str) -> Result<bool, BoxDynError> {
        const SENDS: &str = "SELECT sends FROM durable_mail WHERE queue = $1 AND key = $2";
        Ok(match &self.conn {
            Conn::Sqlite(pool) => {
                let n: Option<i64> = sqlx::query_scalar(SENDS)
                    .bind(&self.queue)
                    .bind(key)
                    .fetch_optional(pool)
                    .await?;
                n.unwrap_or(0) > 0
            }
            Conn::Postgres(pool) => {
                let n: Option<i32> = sqlx::query_scalar(SENDS)
                    .bind(&self.queue)
                    .bind(key)
                    .fetch_optional(pool)
                    .await?;
                n.unwrap_or(0) > 0
            }
            Conn::Redis(conn) => {
                let mut conn = conn.clone();
                let n: Option<u32> = redis::cmd("HGET")
                    .arg(self.redis_key("sends"))
                    .arg(key)
                    .query_async(&mut conn)
                    .await?;
                n.unwrap_or(0) > 0
            }
        })
    }

    /// Writes down one sent mail.
    pub async fn record_send(
        &self,
        key: &str,
        to: &str,
        subject: &str,
        sender: &str,
    ) -> Result<(), BoxDynError> {
        const SEND: &str =
            "INSERT INTO durable_mail (queue, key, sends, recipient, subject, sent_by) \
             VALUES ($1, $2, 1, $3, $4, $5) ON CONFLICT (queue, key) DO UPDATE SET \
             sends = durable_mail.sends + 1, recipient = $3, subject = $4, sent_by = $5";
        match &self.conn {
            Conn::Sqlite(pool) => {
                sqlx::query(SEND)
                    .bind(&self.queue)
                    .bind(key)
                    .bind(to)
                    .bind(subject)
                    .bind(sender)
                    .execute(pool)
                    .await?;
            }
            Conn::Postgres(pool) => {
                sqlx::query(SEND)
                    .bind(&self.queue)
                    .bind(key)
                    .bind(to)
                    .bind(subject)
                    .bind(sender)
                    .execute(pool)
                    .await?;
            }
            Conn::Redis(conn) => {
                let mut conn = conn.clone();
                redis::pipe()
                    .atomic()
                    .cmd("HINCRBY")
                    .arg(self.redis_key("sends"))
                    .arg(key)
                    .arg(1)
                    .ignore()
                    .hset(self.redis_key("to"), key, to)
                    .ignore()
                    .hset(self.redis_key("subject"), key, subject)
                    .ignore()
                    .hset(self.redis_key("sent_by"), key, sender)
                    .ignore()
                    .query_async::<()>(&mut conn)
                    .await?;
            }
        }
        Ok(())
    }

    /// Every key of the log, sorted by key.
    pub async fn deliveries(&self) -> Result<Vec<Delivery>, BoxDynError> {
        const ALL: &str = "SELECT key, attempts, sends, recipient, subject, sent_by \
             FROM durable_mail WHERE queue = $1 ORDER BY key";
        let rows: Vec<Row> = match &self.conn {
            Conn::Sqlite(pool) => {
                sqlx::query_as(ALL)
                    .bind(&self.queue)
                    .fetch_all(pool)
                    .await?
            }
            Conn::Postgres(pool) => {
                let rows: Vec<(String, i32, i32, String, String, String)> = sqlx::query_as(ALL)
                    .bind(&self.queue)
                    .fetch_all(pool)
                    .await?;
                rows.into_iter()
                    .map(|(k, a, s, t, j, b)| (k, a.into(), s.into(), t, j, b))
                    .collect()
            }
            Conn::Redis(conn) => {
                let mut conn = conn.clone();
                type Hash = HashMap<String, String>;
                let (attempts, sends, to, subject, sent_by): (Hash, Hash, Hash, Hash, Hash) =
                    redis::pipe()
                        .hgetall(self.redis_key("attempts"))
                        .hgetall(self.redis_key("sends"))
                        .hgetall(self.redis_key("to"))
                        .hgetall(self.redis_key("subject"))
                        .hgetall(self.redis_key("sent_by"))
                        .query_async(&mut conn)
                        .await?;
                let mut keys: Vec<&String> = attempts.keys().chain(sends.keys()).collect();
                keys.sort();
                keys.dedup();
                let num = |h: &Hash, k: &str| h.get(k).and_then(|v| v.parse().ok()).unwrap_or(0);
                let text = |h: &Hash, k: &str| h.get(k).cloned().unwrap_or_default();
                keys.into_iter()
                    .map(|k| {
                        (
                            k.clone(),
                            num(&attempts, k),
                            num(&sends, k),
                            text(&to, k),
                            text(&subject, k),
                            text(&sent_by, k),
                        )
                    })
                    .collect()
            }
        };
        Ok(rows
            .into_iter()
            .map(|(key, attempts, sends, to, subject, sent_by)| Delivery {
                key,
                attempts: attempts.try_into().unwrap_or(0),
                sends: sends.try_into().unwrap_or(0),
                to,
                subject,
                sent_by,
            })
            .collect())
    }
}

// ---------------------------------------------------------------------------
// Stand-in for the accounting system the handler calls
// ---------------------------------------------------------------------------

/// Books invoices. Customers "on hold" are refused; booking for a "stalling"
/// customer never answers (until a timeout drops the request).
#[derive(Clone, Debug, Default)]
pub struct Ledger {
    pub on_hold: Vec<String>,
    pub stalling: Vec<String>,
}

impl Ledger {
    pub fn on_hold(mut self, email: &str) -> Self {
        self.on_hold.push(email.to_owned());
        self
    }

    pub fn stalling(mut self, email: &str) -> Self {
        self.stalling.push(email.to_owned());
        self
    }

    async fn book(&self, email: &str) -> Result<(), AppError> {
        if self.stalling.iter().any(|e| e == email) {
            std::future::pending::<()>().await;
        }
        if self.on_hold.iter().any(|e| e == email) {
            return Err(AppError::OnHold(email.to_owned()));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// The HTTP app (the same for every backend)
// ---------------------------------------------------------------------------

#[derive(Clone)]
struct AppState {
    invoices: Invoices,
    mail: MailServer,
    ledger: Ledger,
}

#[derive(Debug, Deserialize, Serialize)]
pub struct Register {
    pub email: String,
}

#[derive(Debug, Deserialize, Serialize)]
pub struct NewInvoice {
    /// The client's reference of the order.
    pub order: String,
    pub email: String,
    pub amount_cents: u64,
}

/// The answer to `POST /invoices`: the key of the invoice's email job.
#[derive(Debug, Deserialize, Serialize)]
pub struct InvoiceCreated {
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
    tasks: BackgroundTasks,
    Json(req): Json<Register>,
) -> (StatusCode, &'static str) {
    // ... create the account ...
    let mail = app.mail.clone();
    tasks.add(async move {
        let key = format!("welcome-{}", req.email);
        mail.send(&key, &req.email, "Welcome!", 1, "web").await
    });
    (StatusCode::CREATED, "registered")
}

/// `POST /invoices`: the invoice email is a durable job, pushed after the
/// response.
async fn create_invoice(
    State(app): State<AppState>,
    tasks: BackgroundTasks,
    Json(req): Json<NewInvoice>,
) -> Result<(StatusCode, Json<InvoiceCreated>), AppError> {
    let job = SendInvoice {
        order: req.order,
        email: req.email,
        amount_cents: req.amount_cents,
    };
    let job_key = job.key();
    let email = job.email.clone();
    // Staged now, pushed only if the response below is a success.
    app.invoices.push_after_response(&tasks, job);

    app.ledger.book(&email).await?;
    Ok((StatusCode::CREATED, Json(InvoiceCreated { job_key })))
}

/// `POST /invoices/in-process`: the same route with an in-process task in
/// place of the push (the mail is sent by this process, after the response,
/// and is lost if it dies). Only here to measure the difference; see
/// docs/DURABLE.md.
async fn create_invoice_in_process(
    State(app): State<AppState>,
    tasks: BackgroundTasks,
    Json(req): Json<NewInvoice>,
) -> Result<(StatusCode, Json<InvoiceCreated>), AppError> {
    let job = SendInvoice {
        order: req.order,
        email: req.email,
        amount_cents: req.amount_cents,
    };
    let job_key = job.key();
    let email = job.email.clone();
    let latency = app.mail.latency;
    tasks.add(async move {
        tokio::time::sleep(latency).await; // the same send, without its log
        drop(job);
    });

    app.ledger.book(&email).await?;
    Ok((StatusCode::CREATED, Json(InvoiceCreated { job_key })))
}

/// At most this many after-response tasks run at once (the rest wait in
/// order). A burst of requests would otherwise start one push per request at
/// the same moment: thousands of pushes waiting on a few connections, until
/// the pool's acquire timeout (SQLite, Postgres) or the Redis client's 500 ms
/// response timeout fails them.
pub const MAX_CONCURRENT_TASKS: usize = 256;

/// The layer that runs the after-response tasks, with
/// [`MAX_CONCURRENT_TASKS`].
pub fn background_layer() -> BackgroundLayer {
    BackgroundLayer::new().max_concurrent_tasks(MAX_CONCURRENT_TASKS)
}

/// The router with its layers: background tasks inside, the request timeout
/// outside (a timeout drops the request's future, and the tasks it staged are
/// discarded).
pub fn router(
    store: &Store,
    mail: MailServer,
    ledger: Ledger,
    background: BackgroundLayer,
    request_timeout: Duration,
) -> Router {
    let state = AppState {
        invoices: store.invoices(),
        mail,
        ledger,
    };
    Router::new()
        .route("/register", post(register))
        .route("/invoices", post(create_invoice))
        .route("/invoices/in-process", post(create_invoice_in_process))
        .with_state(state)
        .layer(background)
        .layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(|_: BoxError| async {
                    StatusCode::REQUEST_TIMEOUT
                }))
                .timeout(request_timeout),
        )
}

// ---------------------------------------------------------------------------
// Starting and stopping (web and worker in one process: the demo and tests)
// ---------------------------------------------------------------------------

/// What an in-process app is made of.
#[derive(Clone, Debug)]
pub struct Config {
    pub ledger: Ledger,
    /// Requests that take longer are answered `408` and the tasks they
    /// staged are discarded.
    pub request_timeout: Duration,
    /// Run an apalis worker in this process (off: jobs wait in the store).
    pub worker: bool,
    /// The mail server's behaviour (its journal is replaced by the store's).
    pub fail_first: Vec<(String, u32)>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            ledger: Ledger::default(),
            request_timeout: Duration::from_secs(10),
            worker: true,
            fail_first: Vec::new(),
        }
    }
}

/// An in-process worker: the way to stop it and its task.
type RunningWorker = (oneshot::Sender<()>, JoinHandle<Result<(), WorkerError>>);

/// The running app: HTTP server, background tasks and, optionally, a worker.
pub struct App {
    pub addr: SocketAddr,
    pub handle: BackgroundHandle,
    pub store: Store,
    stop_server: oneshot::Sender<()>,
    server: JoinHandle<std::io::Result<()>>,
    worker: Option<RunningWorker>,
}

impl fmt::Debug for App {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("App")
            .field("addr", &self.addr)
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

/// Serves `router` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Starts the app on 127.0.0.1 (a free port) on `store`.
pub async fn start(store: Store, config: Config) -> Result<App, BoxDynError> {
    let mut mail = MailServer::new(store.journal());
    for (address, n) in &config.fail_first {
        mail = mail.failing_first(address, *n);
    }
    let worker = config.worker.then(|| {
        let (stop, stopped) = oneshot::channel::<()>();
        let store = store.clone();
        let mail = mail.clone();
        let run = tokio::spawn(async move {
            run_worker(&store, "in-process", mail, 8, async move {
                let _ = stopped.await;
            })
            .await
        });
        (stop, run)
    });

    let background = background_layer();
    let handle = background.handle();
    let router = router(
        &store,
        mail,
        config.ledger,
        background,
        config.request_timeout,
    );
    let listener = tokio::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    let (stop_server, server_stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, router, async move {
        let _ = server_stopped.await;
    }));
    Ok(App {
        addr,
        handle,
        store,
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
        if let Some((stop, run)) = self.worker {
            let _ = stop.send(());
            run.await??;
        }
        Ok(())
    }
}

/// Resolves once the store holds `expected` invoice jobs, all done, reading
/// it every 50 ms. Bound it with a timeout.
pub async fn jobs_done(store: &Store, expected: u64) -> Result<JobCounts, BoxDynError> {
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tick.tick().await;
        let counts = store.job_counts().await?;
        if counts.total == expected && counts.done == expected {
            return Ok(counts);
        }
    }
}

/// `ADDR=N` (for `--fail-first`).
pub fn parse_fail_first(arg: &str) -> Result<(String, u32), String> {
    let (address, n) = arg
        .split_once('=')
        .ok_or_else(|| format!("expected ADDRESS=N, got {arg:?}"))?;
    let n = u32::from_str(n).map_err(|e| format!("{arg:?}: {e}"))?;
    Ok((address.to_owned(), n))
}
