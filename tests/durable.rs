//! Durable after-response jobs on apalis (issue 7), end to end: the app of
//! `examples/durable.rs` is served on 127.0.0.1 and driven over real HTTP;
//! the tests wait for the pushes with `BackgroundHandle::wait_idle`, then
//! read apalis-sqlite's `Jobs` table and the worker's side effects. They
//! check that a job is pushed after a successful response and retried by
//! the worker until it succeeds (3 attempts), that a failed or timed-out
//! request enqueues nothing, and that a pushed job survives a restart.

#[path = "../examples/durable.rs"]
#[allow(dead_code)]
mod durable;

use std::collections::BTreeMap;
use std::time::Duration;

use durable::{
    job_rows, jobs_finished, start, App, Config, InvoiceCreated, JobRow, Ledger, Mail, Mailer,
    NewInvoice, Register, SendInvoice,
};
use reqwest::StatusCode;

/// Every wait is bounded by this.
const LIMIT: Duration = Duration::from_secs(10);

async fn post<T: serde::Serialize>(app: &App, path: &str, body: &T) -> reqwest::Response {
    tokio::time::timeout(
        LIMIT,
        reqwest::Client::new().post(app.url(path)).json(body).send(),
    )
    .await
    .expect("the request timed out")
    .expect("the request failed")
}

async fn invoice(app: &App, email: &str, amount_cents: u64) -> reqwest::Response {
    let body = NewInvoice {
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

async fn rows_by_key(app: &App) -> BTreeMap<String, JobRow> {
    job_rows(&app.pool)
        .await
        .expect("read the Jobs table")
        .into_iter()
        .map(|row| (row.key.clone(), row))
        .collect()
}

async fn finished_rows(app: &App) -> BTreeMap<String, JobRow> {
    tokio::time::timeout(LIMIT, jobs_finished(&app.pool))
        .await
        .expect("the worker did not finish the jobs")
        .expect("read the Jobs table")
        .into_iter()
        .map(|row| (row.key.clone(), row))
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
    let mailer = Mailer::default().failing_first("flaky@example.com", 2);
    let config = Config {
        mailer: mailer.clone(),
        ..Config::default()
    };
    let app = start(&dir.path().join("jobs.sqlite"), config)
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
    let mut created = Vec::new();
    for (email, amount_cents) in [
        ("ada@example.com", 12_000),
        ("flaky@example.com", 990),
        ("grace@example.com", 4_250),
    ] {
        let res = invoice(&app, email, amount_cents).await;
        assert_eq!(res.status(), StatusCode::CREATED);
        created.push(res.json::<InvoiceCreated>().await.unwrap());
    }
    let keys: Vec<&str> = created.iter().map(|c| c.job_key.as_str()).collect();
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

    // Every job is in the store, with its payload.
    let rows = rows_by_key(&app).await;
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert_eq!(
        rows["invoice-2"].job,
        SendInvoice {
            invoice_id: 2,
            email: "flaky@example.com".into(),
            amount_cents: 990,
        }
    );

    // The worker runs them; the flaky one fails twice, then succeeds.
    let rows = finished_rows(&app).await;
    let state: Vec<(&str, &str, i64)> = rows
        .values()
        .map(|r| (r.key.as_str(), r.status.as_str(), r.attempts))
        .collect();
    assert_eq!(
        state,
        [
            ("invoice-1", "Done", 1),
            ("invoice-2", "Done", 3),
            ("invoice-3", "Done", 1),
        ]
    );
    assert_eq!(mailer.attempts("flaky@example.com"), 3);
    let mut outbox = mailer.outbox();
    outbox.sort_by(|a, b| a.subject.cmp(&b.subject));
    assert_eq!(
        outbox,
        [
            mail("ada@example.com", "Invoice #1: 120.00 EUR"),
            mail("flaky@example.com", "Invoice #2: 9.90 EUR"),
            mail("grace@example.com", "Invoice #3: 42.50 EUR"),
            mail("ada@example.com", "Welcome!"),
        ]
    );

    shutdown(app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_request_enqueues_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::default().on_hold("mallory@example.com");
    let config = Config {
        ledger: ledger.clone(),
        worker: false,
        ..Config::default()
    };
    let app = start(&dir.path().join("jobs.sqlite"), config)
        .await
        .unwrap();

    // The handler stages the job, then fails: 409.
    let res = invoice(&app, "mallory@example.com", 66_600).await;
    assert_eq!(res.status(), StatusCode::CONFLICT);
    // A successful request next to it, so "no row" is not an empty store by accident.
    let res = invoice(&app, "ada@example.com", 12_000).await;
    assert_eq!(res.status(), StatusCode::CREATED);

    wait_idle(&app).await;
    // Both after-response tasks ran; the failed request's one pushed nothing.
    assert_eq!(app.handle.stats().completed, 2);
    let rows = rows_by_key(&app).await;
    let keys: Vec<&String> = rows.keys().collect();
    assert_eq!(keys, ["invoice-2"]);
    assert_eq!(rows["invoice-2"].status, "Pending"); // no worker in this app
    assert_eq!(ledger.booked(), [2]);

    shutdown(app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_cancelled_by_a_timeout_enqueues_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        ledger: Ledger::default().stalling("slow@example.com"),
        request_timeout: Duration::from_millis(500),
        worker: false,
        ..Config::default()
    };
    let app = start(&dir.path().join("jobs.sqlite"), config)
        .await
        .unwrap();

    // The handler stages the job, then hangs until the timeout drops it.
    let res = invoice(&app, "slow@example.com", 1_500).await;
    assert_eq!(res.status(), StatusCode::REQUEST_TIMEOUT);
    let res = invoice(&app, "ada@example.com", 12_000).await;
    assert_eq!(res.status(), StatusCode::CREATED);

    wait_idle(&app).await;
    let stats = app.handle.stats();
    assert_eq!((stats.completed, stats.discarded), (1, 1), "{stats:?}");
    let rows = rows_by_key(&app).await;
    let keys: Vec<&String> = rows.keys().collect();
    assert_eq!(keys, ["invoice-2"]);

    shutdown(app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_job_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("jobs.sqlite");

    // First process: no worker, the job waits in the store.
    let app = start(
        &db,
        Config {
            worker: false,
            ..Config::default()
        },
    )
    .await
    .unwrap();
    let res = invoice(&app, "ada@example.com", 12_000).await;
    assert_eq!(res.status(), StatusCode::CREATED);
    wait_idle(&app).await;
    shutdown(app).await;

    // Second process on the same file: its worker sends the invoice.
    let mailer = Mailer::default();
    let app = start(
        &db,
        Config {
            mailer: mailer.clone(),
            ..Config::default()
        },
    )
    .await
    .unwrap();
    let rows = finished_rows(&app).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (
            rows["invoice-1"].status.as_str(),
            rows["invoice-1"].attempts
        ),
        ("Done", 1)
    );
    assert_eq!(
        mailer.outbox(),
        [mail("ada@example.com", "Invoice #1: 120.00 EUR")]
    );

    shutdown(app).await;
}

fn mail(to: &str, subject: &str) -> Mail {
    Mail {
        to: to.into(),
        subject: subject.into(),
    }
}
