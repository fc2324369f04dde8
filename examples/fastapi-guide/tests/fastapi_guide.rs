//! Tests of the `fastapi-guide` example, FastAPI's background-tasks guide as
//! an axum app: every route is called over real HTTP on 127.0.0.1 and its
//! side effect (the guide's `log.txt`, email, cache entry, report, analytics,
//! ordering, concurrency, SQLite row) is checked after `handle.wait_idle()`.
//! The guide's own route is checked against the guide's bodies and log lines
//! byte for byte; `tests/side_by_side.rs` compares it with the guide's Python
//! apps under uvicorn when FastAPI is installed.
//!
//! The Redis path of `POST /posts` needs a real `redis-server`: it is
//! `#[ignore]`d and run by `.ci/run` with `REDIS_URL` set
//! (`cargo test -p fastapi-guide --test fastapi_guide -- --ignored`).

use fastapi_guide as guide;

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

use guide::{AnalyticsEvent, Config, Mail, Outbox, ParallelRun, Post, Tutorial, PROCESS_STEPS};

/// The failure guard of every wait.
const WAIT: Duration = Duration::from_secs(10);

/// The app, served on 127.0.0.1, with its mail sink and data directory.
struct TestApp {
    base: String,
    client: reqwest::Client,
    handle: BackgroundHandle,
    shed: guide::Shed,
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
    let guide::App {
        router,
        handle,
        shed,
    } = guide::app(config.clone()).await.unwrap();
    TestApp {
        base: serve(router).await,
        // Every request is bounded too: a handler that waited for its task would hang.
        client: reqwest::Client::builder()
            .no_proxy()
            .timeout(WAIT)
            .build()
            .unwrap(),
        handle,
        shed,
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

/// A request's status, `content-type`, `allow` header and body text.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    content_type: Option<String>,
    allow: Option<String>,
    text: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }
}

impl TestApp {
    /// Sends `method path` with no body and reads the whole answer.
    async fn send(&self, method: reqwest::Method, path: &str) -> Answer {
        let res = self
            .client
            .request(method, self.url(path))
            .send()
            .await
            .unwrap();
        let header = |name: &str| {
            res.headers()
                .get(name)
                .map(|v| v.to_str().unwrap().to_owned())
        };
        let (content_type, allow) = (header("content-type"), header("allow"));
        let status = StatusCode::from_u16(res.status().as_u16()).unwrap();
        let text = res.text().await.unwrap();
        Answer {
            status,
            content_type,
            allow,
            text,
        }
    }

    /// The guide's `log.txt` (empty if no task has written it yet).
    fn guide_log(&self) -> String {
        std::fs::read_to_string(self.config.guide_log()).unwrap_or_default()
    }
}

/// `tutorial002` ("Dependency Injection"): the guide's requests get the
/// guide's body, and `log.txt` gets the guide's lines: `found query: {q}`
/// from the dependency first, then `message to {email}`, the email taken
/// literally from the path (`+` stays `+`, `%40` is `@`).
#[tokio::test]
async fn tutorial002_send_notification_answers_and_logs_as_the_guide() {
    let app = start().await;
    assert_eq!(app.config.tutorial, Tutorial::Two, "the default");
    let cases = [
        (
            "/send-notification/ada@example.com",
            "message to ada@example.com\n",
        ),
        (
            "/send-notification/ada@example.com?q=rust",
            "found query: rust\nmessage to ada@example.com\n",
        ),
        (
            "/send-notification/a+b@example.com",
            "message to a+b@example.com\n",
        ),
        (
            "/send-notification/grace%40example.com",
            "message to grace@example.com\n",
        ),
        // `if q:` skips an empty `q`, with or without `=`.
        (
            "/send-notification/ada@example.com?q=",
            "message to ada@example.com\n",
        ),
        (
            "/send-notification/ada@example.com?q",
            "message to ada@example.com\n",
        ),
        // A repeated `q` is the last one (axum's `Query<T>` would answer 400).
        (
            "/send-notification/ada@example.com?q=first&q=last",
            "found query: last\nmessage to ada@example.com\n",
        ),
        // Query values are form-decoded: `+` is a space there, as in FastAPI.
        (
            "/send-notification/ada@example.com?q=a+b%C3%A9",
            "found query: a bé\nmessage to ada@example.com\n",
        ),
        // Other query parameters are ignored.
        (
            "/send-notification/ada@example.com?x=1",
            "message to ada@example.com\n",
        ),
    ];
    let mut expected_log = String::new();
    for (path, lines) in cases {
        let answer = app.send(reqwest::Method::POST, path).await;
        assert_eq!(answer.status, StatusCode::OK, "{path}: {answer:?}");
        assert_eq!(answer.content_type.as_deref(), Some("application/json"));
        assert_eq!(answer.text, r#"{"message":"Message sent"}"#, "{path}");
        // Tasks of different requests are independent: wait for this one's
        // before the next request, so that the log's order is defined.
        app.idle().await;
        expected_log.push_str(lines);
        assert_eq!(app.guide_log(), expected_log, "after {path}");
    }
    let tasks = expected_log.lines().count() as u64;
    app.assert_completed(tasks);
}

/// `tutorial001` ("Using `BackgroundTasks`"): `log.txt` is rewritten by each
/// request (`mode="w"`) with one line without a newline.
#[tokio::test]
async fn tutorial001_send_notification_answers_and_logs_as_the_guide() {
    let app = start_with(|config| config.tutorial = Tutorial::One).await;
    for (path, log) in [
        (
            "/send-notification/ada@example.com",
            "notification for ada@example.com: some notification",
        ),
        (
            "/send-notification/a+b@example.com?q=rust",
            "notification for a+b@example.com: some notification",
        ),
    ] {
        let answer = app.send(reqwest::Method::POST, path).await;
        assert_eq!(answer.status, StatusCode::OK, "{path}: {answer:?}");
        assert_eq!(
            answer.text,
            r#"{"message":"Notification sent in the background"}"#
        );
        app.idle().await;
        assert_eq!(app.guide_log(), log, "after {path}");
    }
    app.assert_completed(2);
}

/// FastAPI's error answers: `{"detail": "Not Found"}` where no route
/// matches (the guide's URL without the email, the old `?email=` form),
/// `{"detail": "Method Not Allowed"}` with `Allow` for another method, and
/// nothing is queued for either (no handler or extractor ran).
#[tokio::test]
async fn unknown_routes_and_methods_get_fastapis_json_errors() {
    let app = start().await;
    for path in [
        "/send-notification?q=rust",
        "/send-notification?email=ada@example.com&q=rust",
        "/send-notification/?q=rust",
        "/no-such-route",
    ] {
        let answer = app.send(reqwest::Method::POST, path).await;
        assert_eq!(answer.status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(answer.content_type.as_deref(), Some("application/json"));
        assert_eq!(answer.text, r#"{"detail":"Not Found"}"#, "{path}");
    }
    let answer = app
        .send(
            reqwest::Method::GET,
            "/send-notification/ada@example.com?q=rust",
        )
        .await;
    assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(answer.text, r#"{"detail":"Method Not Allowed"}"#);
    assert_eq!(answer.allow.as_deref(), Some("POST"));
    app.idle().await;
    assert_eq!(app.handle.stats().total(), 0, "{:?}", app.handle.stats());
    assert_eq!(app.guide_log(), "");
}

/// A path parameter that fails validation is FastAPI's 422 with a `detail`
/// list naming it. The email is a `String`, so only a path that is not UTF-8
/// fails (uvicorn would decode it to U+FFFD and answer 200; axum refuses it).
/// As in FastAPI, the dependency (`GetQuery`, the first extractor) has run
/// before the email is validated, and has queued its task; as in FastAPI,
/// that task never runs, because the response is an error: the layer's
/// default `RunPolicy::OnSuccess` skips it and counts it in `Stats::skipped`.
#[tokio::test]
async fn an_email_that_fails_validation_is_a_422_and_the_dependencys_task_is_skipped() {
    let app = start().await;
    let answer = app
        .send(reqwest::Method::POST, "/send-notification/%FF?q=rust")
        .await;
    assert_eq!(
        answer.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{answer:?}"
    );
    assert_eq!(answer.content_type.as_deref(), Some("application/json"));
    let detail = &answer.json()["detail"][0];
    assert_eq!(detail["loc"], json!(["path", "email"]), "{}", answer.text);
    assert_eq!(detail["type"], "utf8");
    app.idle().await;
    // run policy: a 422 is not a success, so the dependency's task was
    // queued (total 1) and skipped, never run: `log.txt` is not written.
    assert_eq!(app.guide_log(), "");
    assert!(!app.config.guide_log().exists(), "log.txt was created");
    let stats = app.handle.stats();
    assert_eq!(
        (stats.total(), stats.skipped, stats.completed),
        (1, 1, 0),
        "{stats:?}"
    );

    // The same request with a valid email runs both tasks.
    let answer = app
        .send(
            reqwest::Method::POST,
            "/send-notification/ada@example.com?q=rust",
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    app.idle().await;
    assert_eq!(
        app.guide_log(),
        "found query: rust\nmessage to ada@example.com\n"
    );
    let stats = app.handle.stats();
    assert_eq!(
        (stats.total(), stats.skipped, stats.completed),
        (3, 1, 2),
        "{stats:?}"
    );
}

/// Path parameters of the other routes are validated the same way, and a
/// repeated query parameter is the last one there too.
#[tokio::test]
async fn other_routes_validate_path_parameters_with_422() {
    let app = start().await;
    for (method, path) in [
        (reqwest::Method::GET, "/items/abc"),
        (reqwest::Method::GET, "/posts/-1"),
        (reqwest::Method::POST, "/posts/x/stats"),
    ] {
        let answer = app.send(method, path).await;
        assert_eq!(answer.status, StatusCode::UNPROCESSABLE_ENTITY, "{path}");
        let detail = &answer.json()["detail"][0];
        assert_eq!(
            detail["loc"],
            json!(["path", "id"]),
            "{path}: {}",
            answer.text
        );
        assert!(
            detail["msg"].as_str().unwrap().contains("id"),
            "{}",
            answer.text
        );
    }
    app.idle().await;
    assert_eq!(app.handle.stats().total(), 0, "nothing queued");

    let (status, _) = app.get("/items/1?user_id=7&user_id=8").await;
    assert_eq!(status, StatusCode::OK);
    app.idle().await;
    let event: AnalyticsEvent =
        serde_json::from_str(app.read_data(app.config.analytics_log()).trim_end()).unwrap();
    assert_eq!(event.user, "8");
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
    // (content type, body, where the problem is, a word of the message)
    let cases: [(&str, &str, Value, &str); 6] = [
        (
            "application/json",
            r#"{"username": "ada", "#,
            json!(["body"]),
            "EOF",
        ),
        (
            "application/json",
            r#"{"username": "ada", "email": "ada@example.com"}"#,
            json!(["body", "password"]),
            "missing field",
        ),
        (
            "text/plain",
            r#"{"username":"ada","email":"ada@example.com","password":"12345678"}"#,
            json!(["body"]),
            "Content-Type",
        ),
        (
            "application/json",
            r#"{"username":"ada","email":"not-an-email","password":"12345678"}"#,
            json!(["body", "email"]),
            "not a valid email",
        ),
        (
            "application/json",
            r#"{"username":"ada","email":"ada@example","password":"12345678"}"#,
            json!(["body", "email"]),
            "not a valid email",
        ),
        (
            "application/json",
            r#"{"username":"ada","email":"ada@example.com","password":"short"}"#,
            json!(["body", "password"]),
            "at least 8",
        ),
    ];
    for (content_type, body, loc, expected) in cases {
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
        // FastAPI's shape: a list of problems, each with where and what.
        let problem = &answer["detail"][0];
        assert_eq!(problem["loc"], loc, "{body} -> {answer}");
        let msg = problem["msg"]
            .as_str()
            .unwrap_or_else(|| panic!("no msg: {answer}"));
        assert!(
            msg.contains(expected),
            "{body} -> {msg:?} lacks {expected:?}"
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
    let (status, answer) = app
        .post_json("/reports", &json!({ "name": "../x", "rows": [] }))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(answer["detail"][0]["loc"], json!(["body", "name"]));

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

// ---------------------------------------------------------------------------
// The production controls under load
// ---------------------------------------------------------------------------

/// `POST /posts/{id}/stats` `n` times, at most `clients` at once, each
/// client on its own connection; returns the number of 202s and of 503s,
/// and panics on any other answer.
async fn count_views(app: &TestApp, id: i64, n: usize, clients: usize) -> (u64, u64) {
    let url = app.url(&format!("/posts/{id}/stats"));
    let mut workers = tokio::task::JoinSet::new();
    for client in 0..clients {
        let share = n / clients + usize::from(client < n % clients);
        let url = url.clone();
        // One client (so one connection) per worker, like h2load's `-c`.
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(WAIT)
            .build()
            .unwrap();
        workers.spawn(async move {
            let (mut accepted, mut shed) = (0u64, 0u64);
            for _ in 0..share {
                let res = http.post(&url).send().await.unwrap();
                let status = res.status().as_u16();
                let retry_after = res.headers().get("retry-after").cloned();
                let body = res.text().await.unwrap();
                match status {
                    202 => accepted += 1,
                    503 => {
                        assert_eq!(retry_after.unwrap(), "1");
                        let detail: Value = serde_json::from_str(&body).unwrap();
                        assert!(detail["detail"].as_str().unwrap().contains("try again"));
                        shed += 1;
                    }
                    other => panic!("unexpected {other}: {body}"),
                }
            }
            (accepted, shed)
        });
    }
    let mut totals = (0, 0);
    while let Some(result) = timeout(WAIT * 3, workers.join_next())
        .await
        .expect("the flood did not end within 30 s")
    {
        let (accepted, shed) = result.unwrap();
        totals.0 += accepted;
        totals.1 += shed;
    }
    totals
}

/// The views of post `id` in the database, read through the app.
async fn views(app: &TestApp, id: i64) -> u64 {
    let (status, body) = app.get(&format!("/posts/{id}/stats")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["views"].as_u64().unwrap()
}

/// With the database's write lock held by another connection, the tasks
/// that count views cannot finish: `db_pool_size` of them run (blocked on
/// the lock), the next ones wait, and once `max_pending_tasks` wait, the app
/// answers 503 at once and queues nothing. When the lock goes, every view
/// that got a 202 is in the database, and every 503 is counted.
#[tokio::test]
async fn a_full_backlog_answers_503_and_every_accepted_view_is_counted() {
    let app = start_with(|config| {
        config.limits.db_pool_size = 2;
        config.limits.max_pending_tasks = 8;
        // The test holds the lock for far less; a slow machine must not
        // turn the wait into "database is locked".
        config.limits.db_busy_timeout = WAIT * 3;
    })
    .await;
    // Create the row first, so that the count below starts from 1.
    assert_eq!(
        app.post_empty("/posts/9/stats").await.0,
        StatusCode::ACCEPTED
    );
    app.idle().await;

    use sqlx::Connection;
    let options = sqlx::sqlite::SqliteConnectOptions::new().filename(&app.config.database_path);
    let mut lock = sqlx::SqliteConnection::connect_with(&options)
        .await
        .unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut lock)
        .await
        .unwrap();

    // One request at a time: each adds its task before the next asks for
    // room, so the backlog fills exactly and the rest are shed.
    let (accepted, shed) = count_views(&app, 9, 40, 1).await;
    let stats = app.handle.stats();
    assert!(
        (8..=10).contains(&accepted),
        "2 running + 8 pending (a task may still count as pending while it \
         takes its permit): {accepted} accepted, {stats:?}"
    );
    assert_eq!(accepted + shed, 40);
    assert_eq!(app.shed.count(), shed, "every 503 is counted");
    assert_eq!(stats.pending + stats.running, accepted, "{stats:?}");
    assert!(stats.running <= 2, "the pool's size: {stats:?}");

    sqlx::query("COMMIT").execute(&mut lock).await.unwrap();
    lock.close().await.unwrap();
    app.idle().await;
    let stats = app.handle.stats();
    assert_eq!(
        (stats.total(), stats.completed),
        (accepted + 1, accepted + 1),
        "every accepted view completed, none failed or timed out: {stats:?}"
    );
    assert_eq!(views(&app, 9).await, accepted + 1);
}

/// The h2load scenario in small: 16 clients send 800 views with a bound of
/// 4 pending tasks. How many are shed depends on timing; that none is lost
/// does not: 202s = views in the database = tasks completed, 503s = shed.
#[tokio::test]
async fn a_flood_of_views_is_counted_or_shed_never_lost() {
    let app = start_with(|config| {
        config.limits.max_pending_tasks = 4;
    })
    .await;
    let (accepted, shed) = count_views(&app, 3, 800, 16).await;
    assert_eq!(accepted + shed, 800);
    assert_eq!(app.shed.count(), shed);
    app.idle().await;
    let stats = app.handle.stats();
    assert_eq!(
        (stats.total(), stats.completed),
        (accepted, accepted),
        "{stats:?}"
    );
    assert_eq!(views(&app, 3).await, accepted);
}

/// `max_tasks_per_request`: a request that adds more tasks than the cap
/// has the extra ones refused and counted, never run.
#[tokio::test]
async fn tasks_over_the_per_request_cap_are_refused_and_counted() {
    let app = start_with(|config| config.limits.max_tasks_per_request = 2).await;
    let (status, body) = app.post_empty("/process").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["queued"], 3);
    app.idle().await;
    let log = app.read_data(app.config.process_log());
    assert_eq!(log.lines().collect::<Vec<_>>(), PROCESS_STEPS[..2]);
    let stats = app.handle.stats();
    assert_eq!(
        (stats.total(), stats.completed, stats.refused),
        (3, 2, 1),
        "{stats:?}"
    );
}

/// The defaults are the production controls the README describes.
#[test]
fn the_default_limits_match_the_pool_and_bound_the_backlog() {
    let limits = guide::Limits::default();
    assert_eq!(limits.db_pool_size, 4);
    assert_eq!(limits.max_pending_tasks, 1024);
    assert_eq!(limits.max_tasks_per_request, 4);
    assert!(PROCESS_STEPS.len() <= limits.max_tasks_per_request);
    assert_eq!(limits.task_timeout, Duration::from_secs(30));
    assert!(limits.task_timeout > guide::DB_ACQUIRE_TIMEOUT + limits.db_busy_timeout);
    assert!(limits.task_timeout > guide::MAIL_TIMEOUT);
}
