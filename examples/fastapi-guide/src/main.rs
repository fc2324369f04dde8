//! FastAPI's "Background Tasks" guide as an axum server (HTTP/1.1, and
//! HTTP/2 without TLS for clients such as `h2load`); stop it with Ctrl-C,
//! which drains the background tasks.
//!
//! ```text
//! cargo run -p fastapi-guide                      # tutorial002 (Dependency Injection)
//! TUTORIAL=001 cargo run -p fastapi-guide         # tutorial001 (Using BackgroundTasks)
//!
//! curl -X POST 'http://127.0.0.1:3000/send-notification/ada@example.com?q=rust'
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
//! | `PORT` | `3000` | the port on 127.0.0.1 (`0`: any free port) |
//! | `TUTORIAL` | `002` | the guide's app behind `POST /send-notification/{email}`: `001` or `002` |
//! | `DATA_DIR` | a temporary directory | `log.txt`, the other logs, reports and the SQLite database |
//! | `MAIL_URL` | a mail sink the example starts on 127.0.0.1 | where welcome emails are POSTed as JSON |
//! | `REDIS_URL` | unset: an in-process cache (moka) | the Redis server for `POST /posts` |
//! | `DATABASE_PATH` | `DATA_DIR/guide.db` | the SQLite database file |
//! | `DB_POOL_SIZE` | `4` | the SQLite pool's connections, and the background tasks that run at once |
//! | `MAX_PENDING_TASKS` | `1024` | pending background tasks at which requests are answered `503` |
//! | `RUST_LOG` | `info,tower_background=debug` | log levels per target |

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use fastapi_guide::{app, start_mail_sink, App, BoxError, Config};
use tower_background::Stats;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let filter: tracing_subscriber::filter::Targets = std::env::var("RUST_LOG")
        .ok()
        .filter(|filter| !filter.is_empty())
        .unwrap_or_else(|| "info,tower_background=debug".to_owned())
        .parse()?;
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(std::io::stdout().is_terminal())
        .finish()
        .with(filter)
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
    let config = Config::from_env(&data_dir, mail_url)?;
    println!("guide app:      {} (TUTORIAL=001 or 002)", config.tutorial);
    println!("guide log:      {}", config.guide_log().display());
    println!("data directory: {}", config.data_dir.display());
    println!("database:       {}", config.database_path.display());
    println!("mail endpoint:  {}", config.mail_url);
    match &config.redis_url {
        Some(url) => println!("post cache:     Redis at {url}"),
        None => println!("post cache:     in-process (set REDIS_URL to use Redis)"),
    }

    let limits = config.limits;
    println!(
        "background:     {} tasks at once (the SQLite pool's size), 503 when {} are \
         pending, {} per request, {} s timeout",
        limits.db_pool_size,
        limits.max_pending_tasks,
        limits.max_tasks_per_request,
        limits.task_timeout.as_secs(),
    );

    let App {
        router,
        handle,
        shed,
    } = app(config).await?;
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
        "shut down: {} finished during the grace period, {} cancelled",
        tasks(report.completed),
        report.cancelled
    );
    println!("background tasks: {}", describe(&handle.stats()));
    println!(
        "shed: {} answered 503 because the background queue was full",
        requests(shed.count())
    );
    Ok(())
}

/// `1 task` / `2 tasks`.
fn tasks(n: u64) -> String {
    if n == 1 {
        "1 task".to_owned()
    } else {
        format!("{n} tasks")
    }
}

/// `1 request` / `2 requests`.
fn requests(n: u64) -> String {
    if n == 1 {
        "1 request".to_owned()
    } else {
        format!("{n} requests")
    }
}

/// The layer's counters in words.
fn describe(stats: &Stats) -> String {
    format!(
        "{} in all: {} completed, {} failed, {} panicked, {} timed out, {} discarded, \
         {} cancelled, {} skipped (error responses), {} refused (over the per-request cap), \
         {} replaced, {} still pending or running",
        tasks(stats.total()),
        stats.completed,
        stats.failed,
        stats.panicked,
        stats.timed_out,
        stats.discarded,
        stats.cancelled,
        stats.skipped,
        stats.refused,
        stats.replaced,
        stats.pending + stats.running,
    )
}
