//! FastAPI's "Background Tasks" guide, every case as a route of one axum app.
//!
//! Each handler answers at once and queues its side effect on the request's
//! [`BackgroundTasks`]; the effect runs after the response body has been
//! sent. `tests/fastapi_guide.rs` calls every route over HTTP and checks its
//! side effect after `handle.wait_idle()`.
//!
//! Run it (a server: stop it with Ctrl-C, which drains the background tasks):
//!
//! ```text
//! cargo run --example fastapi_guide --features axum
//! curl -X POST 'http://127.0.0.1:3000/send-notification?email=ada@example.com'
//! curl -X POST 'http://127.0.0.1:3000/send-notification?email=ada@example.com&q=rust'
//! curl -X POST http://127.0.0.1:3000/register -H 'content-type: application/json' \
//!      -d '{"email":"ada@example.com","name":"Ada"}'
//! curl -X POST http://127.0.0.1:3000/users -H 'content-type: application/json' \
//!      -d '{"username":"ada","email":"ada@example.com","password":"correct horse"}'
//! curl -X POST http://127.0.0.1:3000/posts -H 'content-type: application/json' \
//!      -d '{"id":1,"title":"Hello","body":"First post"}'
//! curl http://127.0.0.1:3000/posts/1
//! curl -X POST http://127.0.0.1:3000/reports -H 'content-type: application/json' \
//!      -d '{"name":"q3","rows":[{"label":"north","value":12.5}]}'
//! curl 'http://127.0.0.1:3000/items/42?user_id=7'
//! curl -X POST http://127.0.0.1:3000/process
//! curl -X POST http://127.0.0.1:3000/parallel
//! curl -X POST http://127.0.0.1:3000/posts/1/stats
//! curl http://127.0.0.1:3000/posts/1/stats
//! ```
//!
//! Environment:
//!
//! | variable | default | what |
//! |---|---|---|
//! | `PORT` | `3000` | the port on 127.0.0.1 |
//! | `MAIL_URL` | a mail sink the example starts on 127.0.0.1 | where welcome emails are POSTed as JSON |
//! | `REDIS_URL` | unset: an in-process cache (moka) | the Redis server for `POST /posts` |
//! | `DATA_DIR` | a temporary directory | logs, reports and the SQLite database |
//! | `DATABASE_PATH` | `DATA_DIR/guide.db` | the SQLite database file |

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequestParts, Path as UrlPath, Query, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};
use tokio::io::AsyncWriteExt;
use tower_background::{BackgroundHandle, BackgroundLayer, BackgroundTasks};

/// Any error, for the example's fallible setup and tasks.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long `POST /posts` keeps a post in the cache (Redis `SETEX ... 3600`).
pub const CACHE_TTL: Duration = Duration::from_secs(3600);

/// The two sleeps of `POST /parallel`, run concurrently inside one task.
pub const PARALLEL_SLEEP: Duration = Duration::from_millis(300);

/// Where the app keeps its side effects and whom it talks to.
#[derive(Debug, Clone)]
pub struct Config {
    /// Logs and reports go here.
    pub data_dir: PathBuf,
    /// Welcome emails are POSTed here as JSON ([`Mail`]).
    pub mail_url: String,
    /// `Some`: cache posts in this Redis server; `None`: in-process (moka).
    pub redis_url: Option<String>,
    /// The SQLite database file (created if missing).
    pub database_path: PathBuf,
}

impl Config {
    /// Everything under `data_dir`, the in-process cache, mail to `mail_url`.
    pub fn new(data_dir: impl Into<PathBuf>, mail_url: impl Into<String>) -> Self {
        let data_dir = data_dir.into();
        Self {
            database_path: data_dir.join("guide.db"),
            data_dir,
            mail_url: mail_url.into(),
            redis_url: None,
        }
    }

    /// [`Config::new`], then `REDIS_URL` and `DATABASE_PATH` from the environment.
    pub fn from_env(data_dir: impl Into<PathBuf>, mail_url: impl Into<String>) -> Self {
        let mut config = Self::new(data_dir, mail_url);
        config.redis_url = std::env::var("REDIS_URL")
            .ok()
            .filter(|url| !url.is_empty());
        if let Some(path) = std::env::var_os("DATABASE_PATH") {
            config.database_path = path.into();
        }
        config
    }

    /// `POST /send-notification` appends here.
    pub fn notification_log(&self) -> PathBuf {
        self.data_dir.join("notifications.log")
    }

    /// `POST /reports` writes `NAME.csv` here.
    pub fn reports_dir(&self) -> PathBuf {
        self.data_dir.join("reports")
    }

    /// `GET /items/{id}` appends one JSON line per request here.
    pub fn analytics_log(&self) -> PathBuf {
        self.data_dir.join("analytics.jsonl")
    }

    /// `POST /process` appends its three steps here, in order.
    pub fn process_log(&self) -> PathBuf {
        self.data_dir.join("process.log")
    }

    /// `POST /parallel` appends one JSON line per run here.
    pub fn parallel_log(&self) -> PathBuf {
        self.data_dir.join("parallel.jsonl")
    }
}

// ---------------------------------------------------------------------------
// The app
// ---------------------------------------------------------------------------

#[derive(Clone)]
struct AppState {
    config: Arc<Config>,
    http: reqwest::Client,
    cache: Cache,
    db: SqlitePool,
}

/// Builds the app: opens the database and the cache, installs the
/// [`BackgroundLayer`], and returns the router with the layer's handle
/// (for `wait_idle` in tests and `shutdown` at the end of `main`).
pub async fn app(config: Config) -> Result<(Router, BackgroundHandle), BoxError> {
    std::fs::create_dir_all(&config.data_dir)?;
    std::fs::create_dir_all(config.reports_dir())?;

    let cache = match &config.redis_url {
        Some(url) => Cache::redis(url).await?,
        None => Cache::memory(),
    };

    // A pool, not a connection: tasks get a clone of it (an `Arc` inside)
    // and check a connection out only while they run, long after the
    // handler has returned.
    let db = SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(
            SqliteConnectOptions::new()
                .filename(&config.database_path)
                .create_if_missing(true),
        )
        .await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS post_stats (
             post_id INTEGER PRIMARY KEY,
             views   INTEGER NOT NULL
         )",
    )
    .execute(&db)
    .await?;

    let state = AppState {
        config: Arc::new(config),
        http: reqwest::Client::new(),
        cache,
        db,
    };

    let layer = BackgroundLayer::new().task_timeout(Duration::from_secs(30));
    let handle = layer.handle();
    let router = Router::new()
        .route("/send-notification", post(send_notification))
        .route("/register", post(register))
        .route("/users", post(create_user))
        .route("/posts", post(create_post))
        .route("/posts/{id}", get(cached_post))
        .route("/reports", post(create_report))
        .route("/items/{id}", get(read_item))
        .route("/process", post(process))
        .route("/parallel", post(parallel))
        .route("/posts/{id}/stats", post(count_view).get(post_stats))
        .with_state(state)
        .layer(layer);
    Ok((router, handle))
}

/// An error answer: `{"detail": "..."}`, like FastAPI's.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl ApiError {
    fn unprocessable(detail: impl Into<String>) -> Self {
        Self(StatusCode::UNPROCESSABLE_ENTITY, detail.into())
    }

    fn internal(err: impl std::fmt::Display) -> Self {
        tracing::error!(%err, "request failed");
        Self(StatusCode::INTERNAL_SERVER_ERROR, err.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "detail": self.1 }))).into_response()
    }
}

/// FastAPI answers 422 to any body it cannot read; so do we (axum's `Json`
/// alone answers 400 to bad JSON and 415 to a missing content type).
fn read_body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    body.map(|Json(value)| value).map_err(|rejection| {
        ApiError::unprocessable(format!("invalid body: {}", rejection.body_text()))
    })
}

// ---------------------------------------------------------------------------
// Guide: "Using BackgroundTasks" (a synchronous task) and "Dependency
// Injection" (an extractor that queues a task of its own)
// ---------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
struct NotificationQuery {
    email: String,
}

/// `POST /send-notification?email=[&q=]`: appends to a log file after the
/// response.
async fn send_notification(
    tasks: BackgroundTasks,
    State(state): State<AppState>,
    LoggedQuery(q): LoggedQuery,
    Query(query): Query<NotificationQuery>,
) -> Json<Value> {
    let log = state.config.notification_log();
    let line = format!("notification sent to {}\n", query.email);
    // A plain function doing blocking file I/O: it runs on tokio's blocking
    // pool, like FastAPI runs a `def` task in its threadpool.
    tasks.add_blocking(move || append_line(&log, &line));
    Json(json!({ "message": "Notification sent in the background", "q": q }))
}

/// The guide's dependency `get_query`: an extractor that takes the same
/// per-request [`BackgroundTasks`] and, when the query has `q`, queues
/// `found query: Q` before the handler's own task (extractors run first).
#[derive(Debug)]
struct LoggedQuery(Option<String>);

impl FromRequestParts<AppState> for LoggedQuery {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        #[derive(Deserialize)]
        struct Q {
            q: Option<String>,
        }
        let tasks = BackgroundTasks::from_request_parts(parts, state)
            .await
            .map_err(IntoResponse::into_response)?;
        let Query(Q { q }) = Query::<Q>::from_request_parts(parts, state)
            .await
            .map_err(IntoResponse::into_response)?;
        if let Some(q) = &q {
            let log = state.config.notification_log();
            let line = format!("found query: {q}\n");
            tasks.add_blocking(move || append_line(&log, &line));
        }
        Ok(LoggedQuery(q))
    }
}

fn append_line(path: &Path, line: &str) -> std::io::Result<()> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?
        .write_all(line.as_bytes())
}

// ---------------------------------------------------------------------------
// Sending an email after the response (an async task with an HTTP client)
// ---------------------------------------------------------------------------

/// A welcome email, as POSTed to the mail endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mail {
    /// The recipient.
    pub to: String,
    /// The subject line.
    pub subject: String,
    /// The text.
    pub body: String,
}

async fn send_welcome_email(
    http: reqwest::Client,
    mail_url: String,
    to: String,
    name: String,
) -> Result<(), reqwest::Error> {
    let mail = Mail {
        to,
        subject: "Welcome!".to_owned(),
        body: format!("Hello {name}, thanks for signing up."),
    };
    http.post(&mail_url)
        .json(&mail)
        .send()
        .await?
        .error_for_status()?;
    Ok(())
}

#[derive(Debug, Deserialize)]
struct Registration {
    email: String,
    #[serde(default)]
    name: Option<String>,
}

/// `POST /register`: answers, then POSTs the welcome email to `MAIL_URL`.
async fn register(
    tasks: BackgroundTasks,
    State(state): State<AppState>,
    Json(registration): Json<Registration>,
) -> (StatusCode, Json<Value>) {
    let name = registration
        .name
        .unwrap_or_else(|| registration.email.clone());
    tasks.add(send_welcome_email(
        state.http.clone(),
        state.config.mail_url.clone(),
        registration.email.clone(),
        name,
    ));
    (
        StatusCode::CREATED,
        Json(json!({ "message": "registered", "email": registration.email })),
    )
}

// ---------------------------------------------------------------------------
// A validated body, then an email (nothing is queued for a bad request)
// ---------------------------------------------------------------------------

/// The body of `POST /users`.
#[derive(Debug, Deserialize)]
pub struct NewUser {
    /// 1 to 64 characters, no whitespace at the ends.
    pub username: String,
    /// A plausible email address.
    pub email: String,
    /// At least 8 characters; never echoed back.
    pub password: String,
}

impl NewUser {
    /// The first problem with this user, as a message for the client.
    pub fn validate(&self) -> Result<(), String> {
        let username = self.username.trim();
        if username.is_empty() || username.len() > 64 || username != self.username {
            return Err("username: must be 1 to 64 characters, without surrounding spaces".into());
        }
        if !is_valid_email(&self.email) {
            return Err(format!(
                "email: {:?} is not a valid email address",
                self.email
            ));
        }
        if self.password.chars().count() < 8 {
            return Err("password: must be at least 8 characters".into());
        }
        Ok(())
    }
}

/// `local@domain.tld`, no spaces, one `@`, a dotted domain of non-empty labels.
pub fn is_valid_email(email: &str) -> bool {
    let Some((local, domain)) = email.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && local.len() <= 64
        && !local.chars().any(|c| c.is_whitespace() || c.is_control())
        && domain.contains('.')
        && domain.split('.').all(|label| {
            !label.is_empty() && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// `POST /users`: 422 and nothing queued for a bad body; otherwise 201 at
/// once and the welcome email after the response.
async fn create_user(
    tasks: BackgroundTasks,
    State(state): State<AppState>,
    body: Result<Json<NewUser>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let user = read_body(body)?;
    user.validate().map_err(ApiError::unprocessable)?;
    // ... store the user (and hash the password) here ...
    tasks.add(send_welcome_email(
        state.http.clone(),
        state.config.mail_url.clone(),
        user.email.clone(),
        user.username.clone(),
    ));
    Ok((
        StatusCode::CREATED,
        Json(json!({ "username": user.username, "email": user.email })),
    ))
}

// ---------------------------------------------------------------------------
// Updating a cache after the response (Redis, or moka without REDIS_URL)
// ---------------------------------------------------------------------------

/// The post cache: Redis when `REDIS_URL` is set, in-process otherwise.
#[derive(Clone)]
pub enum Cache {
    /// A multiplexed connection: cheap to clone into every task.
    Redis(redis::aio::MultiplexedConnection),
    /// moka, with each entry's TTL honoured like Redis's `SETEX`.
    Memory(moka::future::Cache<String, Cached>),
}

/// A value of the in-process cache.
#[derive(Debug, Clone)]
pub struct Cached {
    value: String,
    ttl: Duration,
    stored: Instant,
}

struct EntryTtl;

impl moka::Expiry<String, Cached> for EntryTtl {
    fn expire_after_create(
        &self,
        _key: &String,
        value: &Cached,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

impl Cache {
    /// Connects to Redis.
    pub async fn redis(url: &str) -> Result<Self, BoxError> {
        let client = redis::Client::open(url)?;
        Ok(Cache::Redis(
            client.get_multiplexed_async_connection().await?,
        ))
    }

    /// An in-process cache of at most 10 000 entries.
    pub fn memory() -> Self {
        Cache::Memory(
            moka::future::Cache::builder()
                .max_capacity(10_000)
                .expire_after(EntryTtl)
                .build(),
        )
    }

    /// Stores `value` under `key` for `ttl` (whole seconds).
    pub async fn set_ex(&self, key: String, value: String, ttl: Duration) -> Result<(), BoxError> {
        match self {
            Cache::Redis(conn) => {
                let mut conn = conn.clone();
                redis::cmd("SET")
                    .arg(&key)
                    .arg(value)
                    .arg("EX")
                    .arg(ttl.as_secs())
                    .query_async::<()>(&mut conn)
                    .await?;
            }
            Cache::Memory(cache) => {
                let stored = Instant::now();
                cache.insert(key, Cached { value, ttl, stored }).await;
            }
        }
        Ok(())
    }

    /// The value under `key` and its remaining TTL in seconds (`None`: no TTL).
    pub async fn get_with_ttl(&self, key: &str) -> Result<Option<(String, Option<u64>)>, BoxError> {
        match self {
            Cache::Redis(conn) => {
                let mut conn = conn.clone();
                let (value, ttl): (Option<String>, i64) = redis::pipe()
                    .cmd("GET")
                    .arg(key)
                    .cmd("TTL")
                    .arg(key)
                    .query_async(&mut conn)
                    .await?;
                // TTL is -1 for a key without expiry (-2: no key).
                Ok(value.map(|value| (value, u64::try_from(ttl).ok())))
            }
            Cache::Memory(cache) => Ok(cache.get(key).await.map(|cached| {
                let left = cached.ttl.saturating_sub(cached.stored.elapsed());
                // Round up like Redis: a fresh one-hour entry reports 3600.
                let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
                (cached.value, Some(secs))
            })),
        }
    }
}

/// The body of `POST /posts`, and the cached value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Post {
    /// The post's id: the cache key is `post:{id}`.
    pub id: u64,
    /// Its title.
    pub title: String,
    /// Its text.
    pub body: String,
}

/// `POST /posts`: answers 201, then sets `post:{id}` for one hour.
async fn create_post(
    tasks: BackgroundTasks,
    State(state): State<AppState>,
    body: Result<Json<Post>, JsonRejection>,
) -> Result<(StatusCode, Json<Post>), ApiError> {
    let post = read_body(body)?;
    let key = format!("post:{}", post.id);
    let value = serde_json::to_string(&post).map_err(ApiError::internal)?;
    let cache = state.cache.clone();
    tasks.add(async move { cache.set_ex(key, value, CACHE_TTL).await });
    Ok((StatusCode::CREATED, Json(post)))
}

/// `GET /posts/{id}`: the cached post with its remaining TTL, or 404.
async fn cached_post(
    State(state): State<AppState>,
    UrlPath(id): UrlPath<u64>,
) -> Result<Json<Value>, ApiError> {
    let key = format!("post:{id}");
    match state
        .cache
        .get_with_ttl(&key)
        .await
        .map_err(ApiError::internal)?
    {
        Some((value, ttl)) => Ok(Json(json!({ "key": key, "value": value, "ttl_secs": ttl }))),
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("{key} is not cached"),
        )),
    }
}

// ---------------------------------------------------------------------------
// Generating a report file
// ---------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
struct ReportRequest {
    name: String,
    rows: Vec<ReportRow>,
}

#[derive(Debug, Deserialize)]
struct ReportRow {
    label: String,
    value: f64,
}

/// `POST /reports`: 202 at once, then `reports/NAME.csv` appears.
async fn create_report(
    tasks: BackgroundTasks,
    State(state): State<AppState>,
    body: Result<Json<ReportRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let report = read_body(body)?;
    // The name becomes a file name: no path separators, no dots.
    let name_ok = (1..=64).contains(&report.name.len())
        && report
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !name_ok {
        return Err(ApiError::unprocessable(
            "name: must be 1 to 64 letters, digits, '-' or '_'",
        ));
    }
    let file_name = format!("{}.csv", report.name);
    let path = state.config.reports_dir().join(&file_name);
    tasks.add(async move {
        let mut csv = String::from("label,value\n");
        let mut total = 0.0;
        for row in &report.rows {
            csv.push_str(&format!(
                "{},{}\n",
                row.label.replace([',', '\n'], " "),
                row.value
            ));
            total += row.value;
        }
        csv.push_str(&format!("total,{total}\n"));
        // Write then rename: a reader never sees half a report.
        let partial = path.with_extension("csv.partial");
        tokio::fs::write(&partial, csv).await?;
        tokio::fs::rename(&partial, &path).await
    });
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "report": format!("reports/{file_name}"), "status": "generating" })),
    ))
}

// ---------------------------------------------------------------------------
// Analytics after the response
// ---------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
struct ItemQuery {
    user_id: Option<String>,
}

/// One line of the analytics log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnalyticsEvent {
    /// The request path.
    pub endpoint: String,
    /// `user_id` from the query, or `anonymous`.
    pub user: String,
    /// From the handler's start to the task's start, which comes after the
    /// response has been sent: the duration the client saw.
    pub duration_ms: f64,
}

/// `GET /items/{id}?user_id=`: the item, then an analytics record.
async fn read_item(
    tasks: BackgroundTasks,
    State(state): State<AppState>,
    UrlPath(id): UrlPath<u64>,
    Query(query): Query<ItemQuery>,
    uri: Uri,
) -> Json<Value> {
    let started = Instant::now();
    let event_for = move |duration: Duration| AnalyticsEvent {
        endpoint: uri.path().to_owned(),
        user: query.user_id.unwrap_or_else(|| "anonymous".to_owned()),
        duration_ms: duration.as_secs_f64() * 1000.0,
    };
    let log = state.config.analytics_log();
    tasks.add(async move {
        let event = event_for(started.elapsed());
        let line = serde_json::to_string(&event).map_err(std::io::Error::other)? + "\n";
        append_line_async(&log, &line).await
    });
    Json(json!({ "id": id, "name": format!("item {id}") }))
}

async fn append_line_async(path: &Path, line: &str) -> std::io::Result<()> {
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .await?;
    file.write_all(line.as_bytes()).await?;
    // tokio's `File` writes on the blocking pool: without `flush` the task
    // could end (and `wait_idle` return) before the line is in the file.
    file.flush().await
}

// ---------------------------------------------------------------------------
// Several tasks in order; concurrency inside one task
// ---------------------------------------------------------------------------

/// The steps of `POST /process`, in the order they must run.
pub const PROCESS_STEPS: [&str; 3] = ["1 validate", "2 transform", "3 store"];

/// `POST /process`: three tasks that run one after another, in the order
/// they were added (the layer's default `Execution::Sequential`), even
/// though the first one is the slowest.
async fn process(tasks: BackgroundTasks, State(state): State<AppState>) -> Json<Value> {
    for (i, step) in PROCESS_STEPS.into_iter().enumerate() {
        let log = state.config.process_log();
        let delay = Duration::from_millis(40 - 20 * i as u64);
        tasks.add(async move {
            tokio::time::sleep(delay).await;
            append_line_async(&log, &format!("{step}\n")).await
        });
    }
    Json(json!({ "queued": PROCESS_STEPS.len() }))
}

/// One line of the parallel log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParallelRun {
    /// Each sleep, in milliseconds.
    pub sleeps_ms: [u64; 2],
    /// How long the task took, measured inside it.
    pub elapsed_ms: f64,
}

/// `POST /parallel`: one task that awaits two sleeps (think: two API calls)
/// with `tokio::join!`: it takes the longer of the two, not their sum.
async fn parallel(tasks: BackgroundTasks, State(state): State<AppState>) -> Json<Value> {
    let log = state.config.parallel_log();
    tasks.add(async move {
        let started = Instant::now();
        tokio::join!(
            tokio::time::sleep(PARALLEL_SLEEP),
            tokio::time::sleep(PARALLEL_SLEEP)
        );
        let ms = PARALLEL_SLEEP.as_millis() as u64;
        let run = ParallelRun {
            sleeps_ms: [ms, ms],
            elapsed_ms: started.elapsed().as_secs_f64() * 1000.0,
        };
        let line = serde_json::to_string(&run).map_err(std::io::Error::other)? + "\n";
        append_line_async(&log, &line).await
    });
    Json(json!({ "message": "two sleeps running concurrently in one task" }))
}

// ---------------------------------------------------------------------------
// A database after the response (FastAPI: an AsyncSession; here: a sqlx pool)
// ---------------------------------------------------------------------------

/// `POST /posts/{id}/stats`: 202, then the post's view count goes up by one.
async fn count_view(
    tasks: BackgroundTasks,
    State(state): State<AppState>,
    UrlPath(id): UrlPath<i64>,
) -> (StatusCode, Json<Value>) {
    // Move a clone of the pool into the task, never a connection or a
    // transaction borrowed from the request: those end with the handler.
    let db = state.db.clone();
    tasks.add(async move {
        sqlx::query(
            "INSERT INTO post_stats (post_id, views) VALUES (?1, 1)
             ON CONFLICT (post_id) DO UPDATE SET views = views + 1",
        )
        .bind(id)
        .execute(&db)
        .await
        .map(drop)
    });
    (
        StatusCode::ACCEPTED,
        Json(json!({ "post_id": id, "status": "counting" })),
    )
}

/// `GET /posts/{id}/stats`: the view count (0 if never counted).
async fn post_stats(
    State(state): State<AppState>,
    UrlPath(id): UrlPath<i64>,
) -> Result<Json<Value>, ApiError> {
    let views: Option<i64> = sqlx::query_scalar("SELECT views FROM post_stats WHERE post_id = ?1")
        .bind(id)
        .fetch_optional(&state.db)
        .await
        .map_err(ApiError::internal)?;
    Ok(Json(json!({ "post_id": id, "views": views.unwrap_or(0) })))
}

// ---------------------------------------------------------------------------
// The mail sink: a stand-in for the mail provider's HTTP API
// ---------------------------------------------------------------------------

/// The emails the mail sink received.
#[derive(Debug, Clone, Default)]
pub struct Outbox(Arc<Mutex<Vec<Mail>>>);

impl Outbox {
    /// A copy of every email received so far.
    pub fn mails(&self) -> Vec<Mail> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn push(&self, mail: Mail) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(mail);
    }
}

/// Starts an HTTP server on 127.0.0.1 (a free port) that accepts
/// `POST /mail` with a JSON [`Mail`]. Returns its URL and its outbox.
pub async fn start_mail_sink() -> std::io::Result<(String, Outbox)> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
    let url = format!("http://{}/mail", listener.local_addr()?);
    let outbox = Outbox::default();
    let router = Router::new()
        .route("/mail", post(receive_mail))
        .with_state(outbox.clone());
    tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, router).await {
            tracing::error!(%err, "mail sink stopped");
        }
    });
    Ok((url, outbox))
}

async fn receive_mail(State(outbox): State<Outbox>, Json(mail): Json<Mail>) -> StatusCode {
    tracing::info!(to = %mail.to, subject = %mail.subject, "mail sink: email received");
    outbox.push(mail);
    StatusCode::ACCEPTED
}

// ---------------------------------------------------------------------------
// main: a server, stopped with Ctrl-C
// ---------------------------------------------------------------------------

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tower_background=debug".into()),
        )
        .init();

    // Keep the temporary directory alive until the end of `main`.
    let (data_dir, _temp_dir) = match std::env::var_os("DATA_DIR") {
        Some(dir) => (PathBuf::from(dir), None),
        None => {
            let dir = tempfile::Builder::new()
                .prefix("fastapi-guide-")
                .tempdir()?;
            (dir.path().to_owned(), Some(dir))
        }
    };
    let mail_url = match std::env::var("MAIL_URL") {
        Ok(url) if !url.is_empty() => url,
        _ => start_mail_sink().await?.0,
    };
    let config = Config::from_env(&data_dir, mail_url);
    println!("data directory: {}", config.data_dir.display());
    println!("database:       {}", config.database_path.display());
    println!("mail endpoint:  {}", config.mail_url);
    match &config.redis_url {
        Some(url) => println!("post cache:     Redis at {url}"),
        None => println!("post cache:     in-process (set REDIS_URL to use Redis)"),
    }

    let (router, handle) = app(config).await?;
    let port: u16 = match std::env::var("PORT") {
        Ok(port) => port.parse()?,
        Err(_) => 3000,
    };
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!(
        "listening on http://{}  (Ctrl-C to stop)",
        listener.local_addr()?
    );

    axum::serve(listener, router)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
            println!("shutting down: no new connections, draining background tasks");
        })
        .await?;
    // The server has stopped: give the queued tasks 10 s to finish.
    let report = handle.shutdown(Duration::from_secs(10)).await;
    println!(
        "background tasks: {} completed while draining, {} cancelled; totals {:?}",
        report.completed,
        report.cancelled,
        handle.stats()
    );
    Ok(())
}
