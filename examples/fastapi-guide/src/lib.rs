//! FastAPI's "Background Tasks" guide as one axum app.
//!
//! `POST /send-notification/{email}` is the guide's own app, route, body and
//! log file: `tutorial002` (the "Dependency Injection" section, the default)
//! or `tutorial001` (the "Using `BackgroundTasks`" section), chosen with
//! [`Tutorial`]. The other routes carry the cases the guide describes in
//! prose (emails, a cache, reports, analytics, a database session), each
//! answering at once and queueing its side effect on the request's
//! [`BackgroundTasks`]; the effect runs after the response body has been
//! sent. Errors are FastAPI's: `{"detail": ...}` bodies, 404, 405, and 422 for
//! a request that fails validation.
//!
//! The layer is set up for production as the crate's docs recommend (see
//! [`Limits`]): at most as many tasks run at once as the SQLite pool has
//! connections, a bound on pending tasks answers `503` at once when it is
//! reached (tower's `LoadShedLayer` behind axum's `HandleErrorLayer`), each
//! request may add a few tasks only, every task has a timeout, and a task
//! runs only after a success (the default `RunPolicy::OnSuccess`, as in
//! FastAPI: a `422` runs none).
//!
//! `src/main.rs` serves it; `tests/` call every route over HTTP and check
//! its side effect after `handle.wait_idle()`.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::error_handling::HandleErrorLayer;
use axum::extract::path::ErrorKind;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{FromRequest, FromRequestParts, Query, RawPathParams, Request, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use tokio::io::AsyncWriteExt;
use tower::load_shed::error::Overloaded;
use tower::load_shed::LoadShedLayer;
use tower::ServiceBuilder;
use tower_background::{BackgroundHandle, BackgroundLayer, BackgroundTasks};

/// Any error, for the example's fallible setup and tasks.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long `POST /posts` keeps a post in the cache (Redis `SETEX ... 3600`).
pub const CACHE_TTL: Duration = Duration::from_secs(3600);

/// The two sleeps of `POST /parallel`, run concurrently inside one task.
pub const PARALLEL_SLEEP: Duration = Duration::from_millis(300);

/// Which of the guide's two apps `POST /send-notification/{email}` is: both
/// use that route and the file `log.txt`, with different bodies and lines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Tutorial {
    /// "Using `BackgroundTasks`" (`tutorial001.py`): a `def` task rewrites
    /// `log.txt` with `notification for {email}: some notification`; the
    /// answer is `{"message": "Notification sent in the background"}`.
    One,
    /// "Dependency Injection" (`tutorial002.py`): the dependency `get_query`
    /// appends `found query: {q}\n` when `q` is not empty, then the handler
    /// appends `message to {email}\n`; the answer is `{"message": "Message sent"}`.
    #[default]
    Two,
}

impl std::str::FromStr for Tutorial {
    type Err = String;

    /// `001`, `1` or `tutorial001`; `002`, `2` or `tutorial002`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().trim_start_matches("tutorial").trim_start_matches('0') {
            "1" => Ok(Tutorial::One),
            "2" => Ok(Tutorial::Two),
            _ => Err(format!(
                "unknown tutorial {s:?}: use 001 (Using BackgroundTasks) or 002 (Dependency Injection)"
            )),
        }
    }
}

impl std::fmt::Display for Tutorial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Tutorial::One => "tutorial001 (Using BackgroundTasks)",
            Tutorial::Two => "tutorial002 (Dependency Injection)",
        })
    }
}

/// The layer's production controls, and the deadlines of the clients its
/// tasks use. [`Limits::default`] is what `cargo run -p fastapi-guide`
/// serves with; tests shrink them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections in the SQLite pool, and the layer's
    /// `max_concurrent_tasks`: every running task can have a connection at
    /// once, so no task waits for the pool (or times out waiting for it)
    /// while it counts against its `task_timeout`. The others wait in the
    /// layer's FIFO, as pending tasks. Default 4.
    pub db_pool_size: u32,
    /// The layer's `max_pending_tasks`: tasks added and not started. At the
    /// bound the app answers `503 {"detail": ...}` with `Retry-After: 1` at
    /// once, queueing nothing, and counts the request in
    /// [`App::shed`]. Default 1,024.
    pub max_pending_tasks: usize,
    /// The layer's `max_tasks_per_request`: the most a route adds is 3
    /// (`POST /process`), so a request that adds more is a bug; its tasks
    /// past the cap are refused, counted in `Stats::refused` and logged
    /// once. Default 4.
    pub max_tasks_per_request: usize,
    /// The layer's `task_timeout`, a backstop behind the tasks' own
    /// deadlines, which come first and fail the task with a clear error:
    /// the pool's acquire timeout (10 s), SQLite's busy timeout (below) and
    /// the mail client's timeout (10 s). Default 30 s.
    pub task_timeout: Duration,
    /// How long a statement waits for SQLite's write lock before it fails
    /// with "database is locked". Default 5 s (sqlx's default).
    pub db_busy_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            db_pool_size: 4,
            max_pending_tasks: 1024,
            max_tasks_per_request: 4,
            task_timeout: Duration::from_secs(30),
            db_busy_timeout: Duration::from_secs(5),
        }
    }
}

/// How long a task waits for a connection of the pool before it fails.
pub const DB_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a welcome email may take, connection included.
pub const MAIL_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// The guide's app behind `POST /send-notification/{email}`.
    pub tutorial: Tutorial,
    /// The layer's controls and the clients' deadlines.
    pub limits: Limits,
}

impl Config {
    /// Everything under `data_dir`, the in-process cache, mail to `mail_url`,
    /// [`Tutorial::Two`].
    pub fn new(data_dir: impl Into<PathBuf>, mail_url: impl Into<String>) -> Self {
        let data_dir = data_dir.into();
        Self {
            database_path: data_dir.join("guide.db"),
            data_dir,
            mail_url: mail_url.into(),
            redis_url: None,
            tutorial: Tutorial::default(),
            limits: Limits::default(),
        }
    }

    /// [`Config::new`], then `REDIS_URL`, `DATABASE_PATH`, `TUTORIAL`,
    /// `DB_POOL_SIZE` and `MAX_PENDING_TASKS` from the environment.
    pub fn from_env(
        data_dir: impl Into<PathBuf>,
        mail_url: impl Into<String>,
    ) -> Result<Self, BoxError> {
        let mut config = Self::new(data_dir, mail_url);
        config.redis_url = std::env::var("REDIS_URL")
            .ok()
            .filter(|url| !url.is_empty());
        if let Some(path) = std::env::var_os("DATABASE_PATH") {
            config.database_path = path.into();
        }
        if let Ok(tutorial) = std::env::var("TUTORIAL") {
            config.tutorial = tutorial.parse()?;
        }
        if let Ok(size) = std::env::var("DB_POOL_SIZE") {
            config.limits.db_pool_size = positive(&size, "DB_POOL_SIZE")?;
        }
        if let Ok(bound) = std::env::var("MAX_PENDING_TASKS") {
            config.limits.max_pending_tasks = positive(&bound, "MAX_PENDING_TASKS")?;
        }
        Ok(config)
    }

    /// The guide's `log.txt`, written by `POST /send-notification/{email}`.
    pub fn guide_log(&self) -> PathBuf {
        self.data_dir.join("log.txt")
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

/// A setting that must be a whole number of at least 1.
fn positive<T>(value: &str, name: &str) -> Result<T, BoxError>
where
    T: std::str::FromStr + PartialOrd + From<u8>,
{
    match value.trim().parse::<T>() {
        Ok(n) if n >= T::from(1) => Ok(n),
        _ => Err(format!("{name}={value:?}: use a whole number of at least 1").into()),
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

/// The app, ready to serve, and what to watch it with.
#[derive(Debug)]
pub struct App {
    /// Every route, behind the background layer and its load shedding.
    pub router: Router,
    /// The layer's handle: `stats`, `wait_idle` (tests), `shutdown` (the
    /// end of `main`).
    pub handle: BackgroundHandle,
    /// The requests answered `503` because the layer's pending tasks were
    /// at [`Limits::max_pending_tasks`]: refused visibly, never queued.
    pub shed: Shed,
}

/// A count of the requests shed with `503` (cheap to clone: one counter).
#[derive(Debug, Clone, Default)]
pub struct Shed(Arc<AtomicU64>);

impl Shed {
    /// How many requests have been shed so far.
    pub fn count(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Builds the app: opens the database and the cache, installs the
/// [`BackgroundLayer`] with `config.limits`, and returns the router with the
/// layer's handle and the count of shed requests.
///
/// The stack, from the outside in: `HandleErrorLayer` turns an overload
/// into `503`, `LoadShedLayer` refuses a request at once while the
/// background layer reports not ready (its pending tasks are at the
/// bound), and the `BackgroundLayer` gives each request its tasks.
pub async fn app(config: Config) -> Result<App, BoxError> {
    std::fs::create_dir_all(&config.data_dir)?;
    std::fs::create_dir_all(config.reports_dir())?;
    let limits = config.limits;

    let cache = match &config.redis_url {
        Some(url) => Cache::redis(url).await?,
        None => Cache::memory(),
    };

    // A pool, not a connection: tasks get a clone of it (an `Arc` inside)
    // and check a connection out only while they run, long after the
    // handler has returned. It has as many connections as tasks may run at
    // once (`max_concurrent_tasks` below). Write-ahead logging with
    // `synchronous = NORMAL`, SQLite's usual server setting: a commit
    // appends to the log without waiting for the disk, so the pool writes
    // views as fast as they come instead of about a hundred a second (a
    // crash of the machine, not of the process, can lose the last commits).
    let db = SqlitePoolOptions::new()
        .max_connections(limits.db_pool_size)
        .acquire_timeout(DB_ACQUIRE_TIMEOUT)
        .connect_with(
            SqliteConnectOptions::new()
                .filename(&config.database_path)
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(limits.db_busy_timeout),
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

    let send_notification = match config.tutorial {
        Tutorial::One => post(send_notification_001),
        Tutorial::Two => post(send_notification_002),
    };
    let state = AppState {
        config: Arc::new(config),
        http: reqwest::Client::builder().timeout(MAIL_TIMEOUT).build()?,
        cache,
        db,
    };

    // The default run policy, `RunPolicy::OnSuccess`, runs a request's
    // tasks only after a 1xx, 2xx or 3xx answer, as FastAPI does.
    let background = BackgroundLayer::new()
        .max_concurrent_tasks(limits.db_pool_size as usize)
        .max_pending_tasks(limits.max_pending_tasks)
        .max_tasks_per_request(limits.max_tasks_per_request)
        .task_timeout(limits.task_timeout);
    let handle = background.handle();
    let shed = Shed::default();
    let on_error = {
        let shed = shed.clone();
        move |err: BoxError| {
            let shed = shed.clone();
            async move { shed_or_fail(&shed, err) }
        }
    };
    let router = Router::new()
        .route("/send-notification/{email}", send_notification)
        .route("/register", post(register))
        .route("/users", post(create_user))
        .route("/posts", post(create_post))
        .route("/posts/{id}", get(cached_post))
        .route("/reports", post(create_report))
        .route("/items/{id}", get(read_item))
        .route("/process", post(process))
        .route("/parallel", post(parallel))
        .route("/posts/{id}/stats", post(count_view).get(post_stats))
        // FastAPI's answers where no route or no method matches (axum keeps
        // its `Allow` header on the 405).
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "Not Found") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed")
        })
        .with_state(state)
        .layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(on_error))
                .layer(LoadShedLayer::new())
                .layer(background),
        );
    Ok(App {
        router,
        handle,
        shed,
    })
}

/// `LoadShedLayer`'s error, the only one the stack can produce, is a `503`
/// with `Retry-After`, counted and logged at debug level (a flood would
/// otherwise flood the log too).
fn shed_or_fail(shed: &Shed, err: BoxError) -> Response {
    if err.is::<Overloaded>() {
        shed.0.fetch_add(1, Ordering::Relaxed);
        tracing::debug!("background queue full: request shed with 503");
        let error = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "Too many background tasks are waiting: try again later",
        );
        ([(header::RETRY_AFTER, "1")], error).into_response()
    } else {
        ApiError::internal(err).into_response()
    }
}

// ---------------------------------------------------------------------------
// FastAPI's error bodies
// ---------------------------------------------------------------------------

/// An error answer, shaped like FastAPI's: `{"detail": "Not Found"}` for an
/// `HTTPException`, and for a request that fails validation `422` with
/// `{"detail": [{"type": ..., "loc": [...], "msg": ...}]}`, one entry per
/// problem, `loc` naming where it is (`["path", "email"]`, `["body",
/// "password"]`). The messages are axum's and serde's, not pydantic's.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    detail: Value,
}

impl ApiError {
    /// `{"detail": message}` with `status` (FastAPI's `HTTPException`).
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            detail: Value::String(message.into()),
        }
    }

    /// A validation error: 422 with one entry in `detail`.
    pub fn validation(loc: &[&str], kind: &str, msg: impl Into<String>) -> Self {
        Self {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            detail: json!([{ "type": kind, "loc": loc, "msg": msg.into() }]),
        }
    }

    fn internal(err: impl std::fmt::Display) -> Self {
        tracing::error!(%err, "request failed");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, err.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "detail": self.detail }))).into_response()
    }
}

impl ApiError {
    /// A path parameter that does not parse is FastAPI's 422, not axum's
    /// 400. `keys` are the route's parameter names, in order, for the errors
    /// that give only an index (a single `Path<u64>` gives neither).
    fn from_path_rejection(rejection: PathRejection, keys: &[String]) -> Self {
        let msg = rejection.body_text();
        let PathRejection::FailedToDeserializePathParams(failed) = &rejection else {
            return Self::internal(msg);
        };
        let (key, kind) = match failed.kind() {
            ErrorKind::ParseErrorAtKey { key, .. } | ErrorKind::DeserializeError { key, .. } => {
                (Some(key.as_str()), "parsing")
            }
            ErrorKind::InvalidUtf8InPathParam { key } => (Some(key.as_str()), "utf8"),
            ErrorKind::ParseErrorAtIndex { index, .. } => {
                (keys.get(*index).map(String::as_str), "parsing")
            }
            ErrorKind::ParseError { .. } if keys.len() == 1 => (Some(keys[0].as_str()), "parsing"),
            _ => (None, "parsing"),
        };
        match key {
            Some(key) => Self::validation(&["path", key], kind, msg),
            None => Self::validation(&["path"], kind, msg),
        }
    }
}

/// FastAPI answers 422 to any body it cannot read; so do we (axum's `Json`
/// alone answers 400 to bad JSON and 415 to a missing content type).
impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        let msg = rejection.body_text();
        match &rejection {
            JsonRejection::JsonDataError(_) => {
                // serde names a missing field "missing field `name`".
                let missing = msg
                    .split("missing field `")
                    .nth(1)
                    .and_then(|rest| rest.split('`').next());
                match missing {
                    Some(field) => Self::validation(&["body", field], "missing", msg.clone()),
                    None => Self::validation(&["body"], "value_error", msg),
                }
            }
            JsonRejection::MissingJsonContentType(_) => {
                Self::validation(&["body"], "content_type", msg)
            }
            _ => Self::validation(&["body"], "json_invalid", msg),
        }
    }
}

/// `Path<T>` whose rejection is an [`ApiError`] (422).
#[derive(Debug)]
pub struct PathParam<T>(pub T);

impl<S, T> FromRequestParts<S> for PathParam<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Send,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(PathParam(value)),
            Err(rejection) => {
                let keys: Vec<String> = match RawPathParams::from_request_parts(parts, state).await
                {
                    Ok(params) => params.iter().map(|(key, _)| key.to_owned()).collect(),
                    Err(_) => Vec::new(),
                };
                Err(ApiError::from_path_rejection(rejection, &keys))
            }
        }
    }
}

/// `Json<T>` whose rejection is an [`ApiError`] (422).
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let Json(value) = Json::<T>::from_request(req, state).await?;
        Ok(JsonBody(value))
    }
}

/// The last value of `key` in a query string, as FastAPI reads a repeated
/// parameter declared as a single value (`?q=a&q=b` is `b`). axum's
/// `Query<T>` rejects a repeated field instead.
fn last_query_value(query: &[(String, String)], key: &str) -> Option<String> {
    query
        .iter()
        .rev()
        .find(|(name, _)| name == key)
        .map(|(_, value)| value.clone())
}

// ---------------------------------------------------------------------------
// The guide's own app: `POST /send-notification/{email}`
// ---------------------------------------------------------------------------

/// `tutorial001`: `def write_notification(email, message="")` opens
/// `log.txt` with `mode="w"` and writes one line without a newline.
fn write_notification(path: &Path, email: &str, message: &str) -> std::io::Result<()> {
    std::fs::write(path, format!("notification for {email}: {message}"))
}

/// `tutorial001`'s `send_notification`: the `def` task runs on tokio's
/// blocking pool (`add_blocking`), as FastAPI runs it in its threadpool.
async fn send_notification_001(
    tasks: BackgroundTasks,
    State(state): State<AppState>,
    PathParam(email): PathParam<String>,
) -> Json<Value> {
    let log = state.config.guide_log();
    tasks
        .named("write-notification")
        .add_blocking(move || write_notification(&log, &email, "some notification"));
    Json(json!({ "message": "Notification sent in the background" }))
}

/// `tutorial002`'s dependency `get_query`: an extractor that takes the same
/// per-request [`BackgroundTasks`] and, `if q:`, queues `found query: {q}\n`.
/// Extractors run in argument order, before the handler, so its task comes
/// before the handler's, as FastAPI solves a dependency before the endpoint.
#[derive(Debug)]
struct GetQuery(Option<String>);

impl FromRequestParts<AppState> for GetQuery {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        let tasks = BackgroundTasks::from_request_parts(parts, state)
            .await
            .map_err(IntoResponse::into_response)?;
        // Every pair, so that a repeated `q` is the last one (as in FastAPI),
        // not axum's 400 "duplicate field".
        let Query(query) = Query::<Vec<(String, String)>>::from_request_parts(parts, state)
            .await
            .map_err(IntoResponse::into_response)?;
        let q = last_query_value(&query, "q");
        // Python's `if q:`: neither a missing nor an empty `q` is logged.
        if let Some(q) = q.as_deref().filter(|q| !q.is_empty()) {
            let log = state.config.guide_log();
            let message = format!("found query: {q}\n");
            tasks
                .named("log-query")
                .add_blocking(move || write_log(&log, &message));
        }
        Ok(GetQuery(q))
    }
}

/// `tutorial002`'s `def write_log(message)`: appends to `log.txt`.
fn write_log(path: &Path, message: &str) -> std::io::Result<()> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?
        .write_all(message.as_bytes())
}

/// `tutorial002`'s `send_notification`. `GetQuery` comes first: FastAPI runs
/// the dependency before it validates the endpoint's own parameters, so a
/// request whose `email` fails validation has already queued `found query`.
async fn send_notification_002(
    tasks: BackgroundTasks,
    State(state): State<AppState>,
    GetQuery(_q): GetQuery,
    PathParam(email): PathParam<String>,
) -> Json<Value> {
    let log = state.config.guide_log();
    let message = format!("message to {email}\n");
    tasks
        .named("log-message")
        .add_blocking(move || write_log(&log, &message));
    Json(json!({ "message": "Message sent" }))
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
    JsonBody(registration): JsonBody<Registration>,
) -> (StatusCode, Json<Value>) {
    let name = registration
        .name
        .unwrap_or_else(|| registration.email.clone());
    tasks.named("welcome-email").add(send_welcome_email(
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
    /// The first problem with this user: the field and a message for the client.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let username = self.username.trim();
        if username.is_empty() || username.len() > 64 || username != self.username {
            return Err((
                "username",
                "must be 1 to 64 characters, without surrounding spaces".into(),
            ));
        }
        if !is_valid_email(&self.email) {
            return Err((
                "email",
                format!("{:?} is not a valid email address", self.email),
            ));
        }
        if self.password.chars().count() < 8 {
            return Err(("password", "must be at least 8 characters".into()));
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
    JsonBody(user): JsonBody<NewUser>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    user.validate()
        .map_err(|(field, msg)| ApiError::validation(&["body", field], "value_error", msg))?;
    // ... store the user (and hash the password) here ...
    tasks.named("welcome-email").add(send_welcome_email(
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
    JsonBody(post): JsonBody<Post>,
) -> Result<(StatusCode, Json<Post>), ApiError> {
    let key = format!("post:{}", post.id);
    let value = serde_json::to_string(&post).map_err(ApiError::internal)?;
    let cache = state.cache.clone();
    tasks
        .named("cache-post")
        .add(async move { cache.set_ex(key, value, CACHE_TTL).await });
    Ok((StatusCode::CREATED, Json(post)))
}

/// `GET /posts/{id}`: the cached post with its remaining TTL, or 404.
async fn cached_post(
    State(state): State<AppState>,
    PathParam(id): PathParam<u64>,
) -> Result<Json<Value>, ApiError> {
    let key = format!("post:{id}");
    match state
        .cache
        .get_with_ttl(&key)
        .await
        .map_err(ApiError::internal)?
    {
        Some((value, ttl)) => Ok(Json(json!({ "key": key, "value": value, "ttl_secs": ttl }))),
        None => Err(ApiError::new(
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
    JsonBody(report): JsonBody<ReportRequest>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    // The name becomes a file name: no path separators, no dots.
    let name_ok = (1..=64).contains(&report.name.len())
        && report
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !name_ok {
        return Err(ApiError::validation(
            &["body", "name"],
            "value_error",
            "must be 1 to 64 letters, digits, '-' or '_'",
        ));
    }
    let file_name = format!("{}.csv", report.name);
    let path = state.config.reports_dir().join(&file_name);
    tasks.named("write-report").add(async move {
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
    PathParam(id): PathParam<u64>,
    Query(query): Query<Vec<(String, String)>>,
    uri: Uri,
) -> Json<Value> {
    let started = Instant::now();
    let user = last_query_value(&query, "user_id").unwrap_or_else(|| "anonymous".to_owned());
    let event_for = move |duration: Duration| AnalyticsEvent {
        endpoint: uri.path().to_owned(),
        user,
        duration_ms: duration.as_secs_f64() * 1000.0,
    };
    let log = state.config.analytics_log();
    tasks.named("analytics").add(async move {
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
        // Each step has a name of its own: a second task of the same name
        // would replace the first while it is pending.
        tasks.named(step).add(async move {
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
    tasks.named("parallel-sleeps").add(async move {
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
///
/// The task is one statement, so SQLite commits the view whole or not at
/// all. A timeout (the layer's `task_timeout`, or a shutdown that cancels
/// it) drops the task at its next `.await`, which can come *after* the
/// commit: the view is then in the database although the task is counted
/// as timed out. The write does not need to be idempotent here, because
/// nothing runs it twice: the layer never retries a task, and a client that
/// got its 202 has no reason to resend. A task that can be repeated (a
/// retry on failure, a hook that requeues timed-out work, a durable queue
/// that delivers at least once) must be idempotent: give each view an id in
/// the handler and record it with `INSERT ... ON CONFLICT DO NOTHING` in the
/// same transaction as the count. And the pool's own deadlines come first
/// (a connection within 10 s, SQLite's lock within 5 s), so the 30 s
/// timeout fires only if the statement itself stalls.
async fn count_view(
    tasks: BackgroundTasks,
    State(state): State<AppState>,
    PathParam(id): PathParam<i64>,
) -> (StatusCode, Json<Value>) {
    // Move a clone of the pool into the task, never a connection or a
    // transaction borrowed from the request: those end with the handler.
    let db = state.db.clone();
    tasks.named("count-view").add(async move {
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
    PathParam(id): PathParam<i64>,
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
