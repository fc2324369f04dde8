//! Durable after-response jobs on apalis, in one process on SQLite (nothing
//! to install): the app is served on 127.0.0.1 and driven over real HTTP; the
//! tests wait for the pushes with `BackgroundHandle::wait_idle`, then read
//! the store and the mail server's log. They check that a job is pushed after
//! a successful response and retried by the worker until it succeeds (3
//! attempts), that a failed or timed-out request enqueues nothing, that a
//! pushed job survives a restart, that a redelivered job sends nothing, and
//! that a worker told to stop finishes and records the job in hand.
//!
//! The same checks across processes, on Redis and Postgres, are in
//! `tests/processes.rs`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use apalis::prelude::{TaskBuilder, TaskSink};
use durable::{
    jobs_done, run_worker, start, App, Backend, Config, Delivery, InvoiceCreated, Invoices,
    JobCounts, Ledger, MailServer, NewInvoice, QueueConfig, Register, SendInvoice, Store,
};
use reqwest::StatusCode;

/// Every wait is bounded by this.
const LIMIT: Duration = Duration::from_secs(10);

async fn store(db: &Path) -> Store {
    Store::connect(&Backend::Sqlite(db.to_owned()), QueueConfig::default())
        .await
        .expect("open the SQLite store")
}

async fn post<T: serde::Serialize>(app: &App, path: &str, body: &T) -> reqwest::Response {
    tokio::time::timeout(
        LIMIT,
        reqwest::Client::new().post(app.url(path)).json(body).send(),
    )
    .await
    .expect("the request timed out")
    .expect("the request failed")
}

async fn invoice(app: &App, order: &str, email: &str, amount_cents: u64) -> reqwest::Response {
    let body = NewInvoice {
        order: order.to_owned(),
        email: email.to_owned(),
        amount_cents,
    };
    post(app, "/invoices", &body).await
}

async fn wait_idle(app: &App) {
    tokio::time::timeout(LIMIT, app.handle.wait_idle())
        .await
        .expect("the after-response tasks did not finish");
}

async fn done(app: &App, expected: u64) -> JobCounts {
    tokio::time::timeout(LIMIT, jobs_done(&app.store, expected))
        .await
        .expect("the worker did not finish the jobs")
        .expect("read the store")
}

async fn log(store: &Store) -> BTreeMap<String, Delivery> {
    store
        .journal()
        .deliveries()
        .await
        .expect("read the mail log")
        .into_iter()
        .map(|d| (d.key.clone(), d))
        .collect()
}

async fn shutdown(app: App) {
    tokio::time::timeout(LIMIT, app.shutdown())
        .await
        .expect("shutdown timed out")
        .expect("shutdown failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_are_pushed_after_the_response_and_retried_until_they_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        fail_first: vec![("flaky@example.com".into(), 2)],
        ..Config::default()
    };
    let app = start(store(&dir.path().join("jobs.sqlite")).await, config)
        .await
        .unwrap();

    let res = post(
        &app,
        "/register",
        &Register {
            email: "ada@example.com".into(),
        },
    )
    .await;
    assert_eq!(res.status(), StatusCode::CREATED);
    let mut keys = Vec::new();
    for (order, email, amount_cents) in [
        ("1", "ada@example.com", 12_000),
        ("2", "flaky@example.com", 990),
        ("3", "grace@example.com", 4_250),
    ] {
        let res = invoice(&app, order, email, amount_cents).await;
        assert_eq!(res.status(), StatusCode::CREATED);
        keys.push(res.json::<InvoiceCreated>().await.unwrap().job_key);
    }
    assert_eq!(keys, ["invoice-1", "invoice-2", "invoice-3"]);

    // The pushes (and the welcome email) are after-response tasks.
    wait_idle(&app).await;
    let stats = app.handle.stats();
    assert_eq!(stats.completed, 4, "{stats:?}");
    assert_eq!(
        stats.failed + stats.discarded + stats.cancelled,
        0,
        "{stats:?}"
    );

    // The worker runs them; the flaky one fails twice, then succeeds.
    assert_eq!(done(&app, 3).await, JobCounts { total: 3, done: 3 });
    let log = log(&app.store).await;
    let state: Vec<(&str, u32, u32, &str)> = log
        .values()
        .map(|d| (d.key.as_str(), d.attempts, d.sends, d.subject.as_str()))
        .collect();
    assert_eq!(
        state,
        [
            ("invoice-1", 1, 1, "Invoice 1: 120.00 EUR"),
            ("invoice-2", 3, 1, "Invoice 2: 9.90 EUR"),
            ("invoice-3", 1, 1, "Invoice 3: 42.50 EUR"),
            ("welcome-ada@example.com", 0, 1, "Welcome!"),
        ]
    );

    shutdown(app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_request_enqueues_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        ledger: Ledger::default().on_hold("mallory@example.com"),
        worker: false,
        ..Config::default()
    };
    let app = start(store(&dir.path().join("jobs.sqlite")).await, config)
        .await
        .unwrap();

    // The handler stages the job, then fails: 409.
    let res = invoice(&app, "1", "mallory@example.com", 66_600).await;
    assert_eq!(res.status(), StatusCode::CONFLICT);
    // A successful request next to it, so "no job" is not an empty store by accident.
    let res = invoice(&app, "2", "ada@example.com", 12_000).await;
    assert_eq!(res.status(), StatusCode::CREATED);

    wait_idle(&app).await;
    // Both after-response tasks ran; the failed request's one pushed nothing.
    assert_eq!(app.handle.stats().completed, 2);
    assert_eq!(
        app.store.job_counts().await.unwrap(),
        JobCounts { total: 1, done: 0 } // no worker in this app
    );

    shutdown(app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_cancelled_by_a_timeout_enqueues_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        ledger: Ledger::default().stalling("slow@example.com"),
        request_timeout: Duration::from_millis(500),
        ..Config::default()
    };
    let app = start(store(&dir.path().join("jobs.sqlite")).await, config)
        .await
        .unwrap();

    // The handler stages the job, then hangs until the timeout drops it.
    let res = invoice(&app, "1", "slow@example.com", 1_500).await;
    assert_eq!(res.status(), StatusCode::REQUEST_TIMEOUT);
    let res = invoice(&app, "2", "ada@example.com", 12_000).await;
    assert_eq!(res.status(), StatusCode::CREATED);

    wait_idle(&app).await;
    let stats = app.handle.stats();
    assert_eq!((stats.completed, stats.discarded), (1, 1), "{stats:?}");
    done(&app, 1).await;
    let keys: Vec<String> = log(&app.store).await.into_keys().collect();
    assert_eq!(keys, ["invoice-2"]);

    shutdown(app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_job_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("jobs.sqlite");

    // First process: no worker, the job waits in the store.
    let config = Config {
        worker: false,
        ..Config::default()
    };
    let app = start(store(&db).await, config).await.unwrap();
    let res = invoice(&app, "1", "ada@example.com", 12_000).await;
    assert_eq!(res.status(), StatusCode::CREATED);
    wait_idle(&app).await;
    shutdown(app).await;

    // Second process on the same file: its worker sends the invoice.
    let app = start(store(&db).await, Config::default()).await.unwrap();
    done(&app, 1).await;
    let log = log(&app.store).await;
    assert_eq!(
        (log["invoice-1"].attempts, log["invoice-1"].sends),
        (1, 1),
        "{log:?}"
    );

    shutdown(app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_job_sends_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let app = start(
        store(&dir.path().join("jobs.sqlite")).await,
        Config::default(),
    )
    .await
    .unwrap();
    let res = invoice(&app, "1", "ada@example.com", 12_000).await;
    assert_eq!(res.status(), StatusCode::CREATED);
    wait_idle(&app).await;
    done(&app, 1).await;

    // The same job again, as a redelivery would bring it (pushed without its
    // idempotency key, so that the store takes it): it runs, and sends nothing.
    let job = SendInvoice {
        order: "1".into(),
        email: "ada@example.com".into(),
        amount_cents: 12_000,
    };
    let Invoices::Sqlite(mut storage) = app.store.invoices() else {
        unreachable!("a SQLite store")
    };
    storage
        .push_task(TaskBuilder::new(job).build())
        .await
        .unwrap();
    done(&app, 2).await;
    let log = log(&app.store).await;
    assert_eq!(
        (log["invoice-1"].attempts, log["invoice-1"].sends),
        (2, 1),
        "{log:?}"
    );

    shutdown(app).await;
}

#[tokio::test]
async fn an_unusable_store_is_an_error_that_names_it() {
    let dir = tempfile::tempdir().unwrap();
    // A directory where the file should be.
    let err = Store::connect(
        &Backend::Sqlite(dir.path().to_owned()),
        QueueConfig::default(),
    )
    .await
    .unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with(&format!(
            "cannot use the job store, SQLite at {}: ",
            dir.path().display()
        )),
        "{text}"
    );
}

/// A worker told to stop while it runs a job finishes that job: the mail is
/// sent once and the job recorded as done before `run_worker` returns. The
/// worker asks the store for jobs every millisecond, so that in some rounds
/// the stop arrives while one of its fetches is under way: apalis alone would
/// keep that fetch's transaction open, and with it SQLite's write lock on the
/// file, until the job ended; the job's write to the mail log would wait
/// `busy_timeout` (10 s) and fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_worker_finishes_and_records_the_job_in_hand() {
    const ROUNDS: usize = 10;
    for round in 0..ROUNDS {
        let dir = tempfile::tempdir().unwrap();
        let config = QueueConfig {
            poll_interval: Duration::from_millis(1),
            ..QueueConfig::default()
        };
        let store = Store::connect(&Backend::Sqlite(dir.path().join("jobs.sqlite")), config)
            .await
            .expect("open the SQLite store");
        let mail = MailServer::new(store.journal()).with_latency(Duration::from_millis(200));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let worker = tokio::spawn({
            let store = store.clone();
            async move {
                run_worker(&store, "w1", mail, 8, async move {
                    let _ = stopped.await;
                })
                .await
            }
        });
        let Invoices::Sqlite(mut storage) = store.invoices() else {
            unreachable!("a SQLite store")
        };
        let job = SendInvoice {
            order: format!("r{round}"),
            email: "ada@example.com".into(),
            amount_cents: 100,
        };
        let key = job.key();
        storage
            .push_task(TaskBuilder::new(job).idempotency_key(&key).build())
            .await
            .unwrap();

        // The job has started (its attempt is counted): stop the worker.
        tokio::time::timeout(LIMIT, async {
            let mut tick = tokio::time::interval(Duration::from_millis(2));
            loop {
                tick.tick().await;
                if log(&store).await.get(&key).is_some_and(|d| d.attempts == 1) {
                    return;
                }
            }
        })
        .await
        .expect("the worker did not start the job");
        stop.send(()).unwrap();
        // Beyond busy_timeout, so that a blocked write shows as a wrong log
        // rather than as a timeout here.
        tokio::time::timeout(LIMIT * 2, worker)
            .await
            .expect("the worker did not stop")
            .unwrap()
            .expect("the worker failed");

        let log = log(&store).await;
        assert_eq!(
            (log[&key].attempts, log[&key].sends),
            (1, 1),
            "round {round}: {log:?}"
        );
        assert_eq!(
            store.job_counts().await.unwrap(),
            JobCounts { total: 1, done: 1 },
            "round {round}"
        );
    }
}
