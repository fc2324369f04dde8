//! Tests of `examples/fastapi_guide.rs`, FastAPI's background-tasks guide as
//! an axum app: every route is called over real HTTP on 127.0.0.1 and its
//! side effect (log file, email, cache entry, report, analytics, ordering,
//! concurrency, SQLite row) is checked after `handle.wait_idle()`.
//!
//! The Redis path of `POST /posts` needs a real `redis-server`: it is
//! `#[ignore]`d and run by `.ci/run` with `REDIS_URL` set
//! (`cargo test --all-features --test fastapi_guide -- --ignored`).

#[path = "../examples/fastapi_guide.rs"]
#[allow(dead_code)]
mod guide;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};
use tokio::time::timeout;
use tower_background::BackgroundHandle;

use guide::{AnalyticsEvent, Config, Mail, Outbox, ParallelRun, Post, PROCESS_STEPS};

/// The failure guard of every wait.
const WAIT: Duration = Duration::from_secs(10);

/// The app, served on 127.0.0.1, with its mail sink and data directory.
struct TestApp {
    base: String,
    client: reqwest::Client,
    handle: BackgroundHandle,
    config: Config,
    outbox: Outbox,
    _dir: TempDir,
}

/// Serves `router` on 127.0.0.1 (a free port) and returns its base URL.
async fn serve(router: Router) -> String {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    format!("http://{addr}")
}

async fn start() -> TestApp {
    start_with(|_| {}).await
}

/// Starts the example's mail sink and app; `edit` adjusts the config.
async fn start_with(edit: impl FnOnce(&mut Config)) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let (mail_url, outbox) = guide::start_mail_sink().await.unwrap();
    let mut config = Config::new(dir.path(), mail_url);
    edit(&mut config);
    let (router, handle) = guide::app(config.clone()).await.unwrap();
    TestApp {
        base: serve(router).await,
        // Every request is bounded too: a handler that waited for its task would hang.
        client: reqwest::Client::builder()
            .no_proxy()
            .timeout(WAIT)
            .build()
            .unwrap(),
        handle,
        config,
        outbox,
        _dir: dir,
    }
}

impl TestApp {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// POSTs `body` as JSON; returns the status and the JSON answer.
    async fn post_json(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        let res = self
            .client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap();
        read(res).await
    }

    async fn post_empty(&self, path: &str) -> (StatusCode, Value) {
        read(self.client.post(self.url(path)).send().await.unwrap()).await
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        read(self.client.get(self.url(path)).send().await.unwrap()).await
    }

    /// Waits (at most 10 s) until no task is pending or running.
    async fn idle(&self) {
        timeout(WAIT, self.handle.wait_idle())
            .await
            .expect("background tasks did not finish within 10 s");
    }

    /// Every task ever added completed successfully, and there were `n`.
    fn assert_completed(&self, n: u64) {
        let stats = self.handle.stats();
        assert_eq!((stats.total(), stats.completed), (n, n), "{stats:?}");
    }

    fn read_data(&self, path: std::path::PathBuf) -> String {
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }
}

/// Reads the whole body (the response ends here, and its tasks start).
async fn read(res: reqwest::Response) -> (StatusCode, Value) {
    let status = StatusCode::from_u16(res.status().as_u16()).unwrap();
    let text = res.text().await.unwrap();
    let value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (status, value)
}

fn welcome(to: &str, name: &str) -> Mail {
    Mail {
        to: to.to_owned(),
        subject: "Welcome!".to_owned(),
        body: format!("Hello {name}, thanks for signing up."),
    }
}

#[tokio::test]
async fn send_notification_appends_to_the_log_from_a_blocking_task() {
    let app = start().await;
    for email in ["ada@example.com", "grace@example.com"] {
        let (status, body) = app
            .post_empty(&format!("/send-notification?email={email}"))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["message"], "Notification sent in the background");
        // Tasks of different requests are independent: wait for this one's
        // before the next request, so that the log's order is defined.
        app.idle().await;
    }
    assert_eq!(
        app.read_data(app.config.notification_log()),
        "notification sent to ada@example.com\nnotification sent to grace@example.com\n"
    );
    app.assert_completed(2);
}

/// The guide's "Dependency Injection" case: an extractor queues its own task
/// on the same request's queue, before the handler's.
#[tokio::test]
async fn send_notification_with_q_logs_the_extractor_task_first() {
    let app = start().await;
    let (status, body) = app
        .post_empty("/send-notification?email=ada@example.com&q=rust")
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["q"], "rust");
    app.idle().await;
    assert_eq!(
        app.read_data(app.config.notification_log()),
        "found query: rust\nnotification sent to ada@example.com\n"
    );
    app.assert_completed(2);
}

#[tokio::test]
async fn register_posts_the_welcome_email_to_the_mail_endpoint() {
    let app = start().await;
    let (status, body) = app
        .post_json(
            "/register",
            &json!({ "email": "ada@example.com", "name": "Ada" }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    app.idle().await;
    assert_eq!(app.outbox.mails(), vec![welcome("ada@example.com", "Ada")]);
    app.assert_completed(1);
}

/// A mail endpoint that reports each email at once on `received` but
/// answers only when the test adds a permit to `release`.
async fn gated_mail_sink() -> (String, mpsc::UnboundedReceiver<Mail>, Arc<Semaphore>) {
    #[derive(Clone)]
    struct Gate(mpsc::UnboundedSender<Mail>, Arc<Semaphore>);
    async fn receive(State(Gate(tx, release)): State<Gate>, Json(mail): Json<Mail>) -> StatusCode {
        let _ = tx.send(mail);
        release.acquire().await.unwrap().forget();
        StatusCode::ACCEPTED
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let release = Arc::new(Semaphore::new(0));
    let router = Router::new()
        .route("/mail", post(receive))
        .with_state(Gate(tx, release.clone()));
    (format!("{}/mail", serve(router).await), rx, release)
}

#[tokio::test]
async fn users_answers_at_once_and_sends_the_email_after_the_response() {
    let (mail_url, mut received, release) = gated_mail_sink().await;
    let app = start_with(|config| config.mail_url = mail_url).await;

    let (status, body) = app
        .post_json(
            "/users",
            &json!({ "username": "ada", "email": "ada@example.com", "password": "correct horse" }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(
        body,
        json!({ "username": "ada", "email": "ada@example.com" })
    );

    // The response is here; the email is being sent and cannot finish
    // until the mail endpoint answers.
    let mail = timeout(WAIT, received.recv()).await.unwrap().unwrap();
    assert_eq!(mail, welcome("ada@example.com", "ada"));
    let stats = app.handle.stats();
    assert_eq!((stats.running, stats.completed), (1, 0), "{stats:?}");

    release.add_permits(1);
    app.idle().await;
    app.assert_completed(1);
}

#[tokio::test]
async fn users_rejects_a_bad_body_with_422_and_queues_nothing() {
    let app = start().await;
    let cases: [(&str, &str, &str); 6] = [
        (
            "application/json",
            r#"{"username": "ada", "#,
            "invalid body",
        ),
        (
            "application/json",
            r#"{"username": "ada", "email": "ada@example.com"}"#,
            "password",
        ),
        (
            "text/plain",
            r#"{"username":"ada","email":"ada@example.com","password":"12345678"}"#,
            "Content-Type",
        ),
        (
            "application/json",
            r#"{"username":"ada","email":"not-an-email","password":"12345678"}"#,
            "email",
        ),
        (
            "application/json",
            r#"{"username":"ada","email":"ada@example","password":"12345678"}"#,
            "not a valid email",
        ),
        (
            "application/json",
            r#"{"username":"ada","email":"ada@example.com","password":"short"}"#,
            "password",
        ),
    ];
    for (content_type, body, expected) in cases {
        let res = app
            .client
            .post(app.url("/users"))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        let (status, answer) = read(res).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{body} -> {answer}"
        );
        let detail = answer["detail"]
            .as_str()
            .unwrap_or_else(|| panic!("no detail: {answer}"));
        assert!(
            detail.contains(expected),
            "{body} -> {detail:?} lacks {expected:?}"
        );
    }
    app.idle().await;
    assert_eq!(
        app.handle.stats().total(),
        0,
        "a rejected request queued a task"
    );
    assert_eq!(app.outbox.mails(), vec![]);

    // The same app still sends the email for a good request.
    let good = json!({ "username": "ada", "email": "ada@example.com", "password": "12345678" });
    assert_eq!(app.post_json("/users", &good).await.0, StatusCode::CREATED);
    app.idle().await;
    assert_eq!(app.outbox.mails(), vec![welcome("ada@example.com", "ada")]);
    app.assert_completed(1);
}

fn sample_post(id: u64) -> Post {
    Post {
        id,
        title: "Hello".to_owned(),
        body: "First post".to_owned(),
    }
}

/// Creates a post, waits for its task, and checks the cache through
/// `GET /posts/{id}`: the value and a one-hour TTL.
async fn check_post_is_cached(app: &TestApp, id: u64) {
    let post = sample_post(id);
    let (status, body) = app
        .post_json("/posts", &serde_json::to_value(&post).unwrap())
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    app.idle().await;
    app.assert_completed(1);

    let (status, cached) = app.get(&format!("/posts/{id}")).await;
    assert_eq!(status, StatusCode::OK, "{cached}");
    assert_eq!(cached["key"], format!("post:{id}"));
    let value: Post = serde_json::from_str(cached["value"].as_str().unwrap()).unwrap();
    assert_eq!(value, post);
    let ttl = cached["ttl_secs"]
        .as_u64()
        .unwrap_or_else(|| panic!("no TTL: {cached}"));
    assert!(ttl > 0 && ttl <= 3600, "TTL {ttl}");
}

#[tokio::test]
async fn posts_updates_the_in_process_cache_with_a_one_hour_ttl() {
    let app = start().await;
    assert!(app.config.redis_url.is_none());
    let (status, _) = app.get("/posts/7").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    check_post_is_cached(&app, 7).await;
}

#[tokio::test]
#[ignore = "needs redis-server"]
async fn posts_updates_redis_with_a_one_hour_ttl() {
    let redis_url = std::env::var("REDIS_URL").expect("set REDIS_URL=redis://127.0.0.1:PORT");
    let app = start_with(|config| config.redis_url = Some(redis_url.clone())).await;
    // A key of its own, so reruns against the same server do not collide.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let id = u64::from(std::process::id()) * 1_000_000_000 + u64::from(nanos);
    check_post_is_cached(&app, id).await;

    // And straight from Redis.
    let key = format!("post:{id}");
    let client = redis::Client::open(redis_url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let value: Option<String> = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    let value: Post = serde_json::from_str(&value.expect("the key is set")).unwrap();
    assert_eq!(value, sample_post(id));
    let ttl: i64 = redis::cmd("TTL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(ttl > 0 && ttl <= 3600, "TTL {ttl}");
    redis::cmd("DEL")
        .arg(&key)
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
}

#[tokio::test]
async fn reports_generates_the_report_file() {
    let app = start().await;
    let request = json!({
        "name": "q3-sales",
        "rows": [{ "label": "north", "value": 12.5 }, { "label": "south", "value": 30 }],
    });
    let (status, body) = app.post_json("/reports", &request).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["report"], "reports/q3-sales.csv");

    // A name that would escape the reports directory is refused, queueing nothing.
    let (status, _) = app
        .post_json("/reports", &json!({ "name": "../x", "rows": [] }))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);

    app.idle().await;
    let dir = app.config.reports_dir();
    assert_eq!(
        app.read_data(dir.join("q3-sales.csv")),
        "label,value\nnorth,12.5\nsouth,30\ntotal,42.5\n"
    );
    let files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(files, ["q3-sales.csv"], "no partial file is left");
    app.assert_completed(1);
}

#[tokio::test]
async fn items_records_analytics_after_the_response() {
    let app = start().await;
    let (status, item) = app.get("/items/42?user_id=7").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(item, json!({ "id": 42, "name": "item 42" }));
    // Tasks of different requests are independent: wait before the next
    // request so that the log's order is defined.
    app.idle().await;
    let (status, _) = app.get("/items/43").await;
    assert_eq!(status, StatusCode::OK);
    app.idle().await;

    let events: Vec<AnalyticsEvent> = app
        .read_data(app.config.analytics_log())
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(
        (events[0].endpoint.as_str(), events[0].user.as_str()),
        ("/items/42", "7")
    );
    assert_eq!(
        (events[1].endpoint.as_str(), events[1].user.as_str()),
        ("/items/43", "anonymous")
    );
    for event in &events {
        assert!(
            event.duration_ms > 0.0 && event.duration_ms < 10_000.0,
            "{event:?}"
        );
    }
    app.assert_completed(2);
}

#[tokio::test]
async fn process_runs_its_three_tasks_in_order() {
    let app = start().await;
    let (status, body) = app.post_empty("/process").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["queued"], 3);
    app.idle().await;
    // The first step sleeps longest: run concurrently they would log 3, 2, 1.
    let log = app.read_data(app.config.process_log());
    assert_eq!(log.lines().collect::<Vec<_>>(), PROCESS_STEPS);
    app.assert_completed(3);
}

#[tokio::test]
async fn parallel_runs_two_sleeps_concurrently_in_one_task() {
    let app = start().await;
    let (status, _) = app.post_empty("/parallel").await;
    assert_eq!(status, StatusCode::OK);
    app.idle().await;
    let log = app.read_data(app.config.parallel_log());
    let run: ParallelRun = serde_json::from_str(log.trim_end()).unwrap();
    assert_eq!(run.sleeps_ms, [300, 300]);
    // Sequential sleeps would take >= 600 ms; concurrent ones about 300.
    assert!(
        run.elapsed_ms >= 300.0 && run.elapsed_ms < 550.0,
        "two 300 ms sleeps took {} ms",
        run.elapsed_ms
    );
    app.assert_completed(1);
}

#[tokio::test]
async fn post_stats_updates_sqlite_through_a_pool_after_the_response() {
    let app = start().await;
    assert!(app.config.database_path.starts_with(app._dir.path()));
    for id in [5, 5, 6, 5] {
        let (status, body) = app.post_empty(&format!("/posts/{id}/stats")).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    }
    app.idle().await;
    app.assert_completed(4);

    let (status, body) = app.get("/posts/5/stats").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({ "post_id": 5, "views": 3 }));

    // And straight from the database file, on a connection of our own.
    let options = sqlx::sqlite::SqliteConnectOptions::new().filename(&app.config.database_path);
    let db = sqlx::SqlitePool::connect_with(options).await.unwrap();
    let rows: Vec<(i64, i64)> =
        sqlx::query_as("SELECT post_id, views FROM post_stats ORDER BY post_id")
            .fetch_all(&db)
            .await
            .unwrap();
    assert_eq!(rows, [(5, 3), (6, 1)]);
    db.close().await;
}
