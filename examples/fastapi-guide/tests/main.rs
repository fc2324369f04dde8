//! `cargo run -p fastapi-guide` as a user runs it with its output redirected:
//! it serves, a request's task runs, Ctrl-C (SIGINT) drains and the counts
//! are printed in words, with no `Debug` dump and no colour codes.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::Command;
use tokio::time::timeout;

/// The failure guard of every wait.
const WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn the_server_prints_its_settings_and_its_shutdown_in_words() {
    let data_dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_fastapi-guide"))
        .env("PORT", "0")
        .env("DATA_DIR", data_dir.path())
        .env_remove("REDIS_URL")
        .env_remove("MAIL_URL")
        .env_remove("TUTORIAL")
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());

    // Read up to the "listening on" line (at most 50 lines, within WAIT).
    let mut printed = String::new();
    let addr = timeout(WAIT, async {
        for _ in 0..50 {
            let mut line = String::new();
            if stdout.read_line(&mut line).await.unwrap() == 0 {
                break;
            }
            printed.push_str(&line);
            if let Some(rest) = line.strip_prefix("listening on http://") {
                return rest.split_whitespace().next().map(str::to_owned);
            }
        }
        None
    })
    .await
    .expect("the server did not start within 20 s")
    .unwrap_or_else(|| panic!("no \"listening on\" line in:\n{printed}"));
    assert!(
        printed.contains("guide app:      tutorial002 (Dependency Injection)"),
        "{printed}"
    );

    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(WAIT)
        .build()
        .unwrap();
    let res = client
        .post(format!(
            "http://{addr}/send-notification/ada@example.com?q=rust"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 200);
    assert_eq!(res.text().await.unwrap(), r#"{"message":"Message sent"}"#);
    drop(client);

    // Ctrl-C: graceful shutdown, then the drain and the report.
    let pid = child.id().unwrap().to_string();
    let kill = Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .await
        .unwrap();
    assert!(kill.success());
    let status = timeout(WAIT, child.wait())
        .await
        .expect("the server did not stop within 20 s of SIGINT")
        .unwrap();
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).await.unwrap();
    printed.push_str(&rest);
    assert!(status.success(), "{status}\n{printed}");

    assert!(
        printed.contains(
            "background tasks: 2 tasks in all: 2 completed, 0 failed, 0 panicked, \
             0 timed out, 0 discarded, 0 cancelled, 0 skipped (error responses), \
             0 refused (over the per-request cap), 0 replaced, 0 still pending or running"
        ),
        "{printed}"
    );
    assert!(
        printed.contains("shed: 0 requests answered 503 because the background queue was full"),
        "{printed}"
    );
    assert!(
        printed.contains(
            "background:     4 tasks at once (the SQLite pool's size), 503 when 1024 are \
             pending, 4 per request, 30 s timeout"
        ),
        "{printed}"
    );
    // The tasks may still be running when SIGINT arrives: the drain then
    // finishes them, so this count is 0, 1 or 2, and none is cancelled.
    let shut_down = printed
        .lines()
        .find(|line| line.starts_with("shut down: "))
        .unwrap_or_else(|| panic!("no \"shut down\" line in:\n{printed}"));
    assert!(
        ["0 tasks", "1 task", "2 tasks"].iter().any(|n| shut_down
            == format!("shut down: {n} finished during the grace period, 0 cancelled")),
        "{shut_down}"
    );
    assert!(!printed.contains('\u{1b}'), "colour codes:\n{printed}");
    assert!(!printed.contains("Stats {"), "a Debug dump:\n{printed}");
    assert_eq!(
        std::fs::read_to_string(data_dir.path().join("log.txt")).unwrap(),
        "found query: rust\nmessage to ada@example.com\n"
    );
}

/// `DB_POOL_SIZE` and `MAX_PENDING_TASKS` set the controls the server
/// prints; 0 or a non-number stops it at once with an error naming the
/// variable and the fix.
#[tokio::test]
async fn the_controls_come_from_the_environment_and_bad_values_are_refused() {
    for (pool, pending, expected) in [
        (
            "2",
            "7",
            Ok("background:     2 tasks at once (the SQLite pool's size), 503 when 7 are pending"),
        ),
        (
            "0",
            "7",
            Err("DB_POOL_SIZE=\\\"0\\\": use a whole number of at least 1"),
        ),
        (
            "2",
            "many",
            Err("MAX_PENDING_TASKS=\\\"many\\\": use a whole number of at least 1"),
        ),
    ] {
        let data_dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_fastapi-guide"))
            .env("PORT", "0")
            .env("DATA_DIR", data_dir.path())
            .env("DB_POOL_SIZE", pool)
            .env("MAX_PENDING_TASKS", pending)
            .env_remove("REDIS_URL")
            .env_remove("MAIL_URL")
            .env_remove("TUTORIAL")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        match expected {
            Ok(line) => {
                let mut stdout = BufReader::new(child.stdout.take().unwrap());
                let mut printed = String::new();
                timeout(WAIT, async {
                    for _ in 0..50 {
                        let mut next = String::new();
                        if stdout.read_line(&mut next).await.unwrap() == 0 {
                            break;
                        }
                        printed.push_str(&next);
                        if next.starts_with("listening on") {
                            break;
                        }
                    }
                })
                .await
                .expect("the server did not start within 20 s");
                assert!(printed.contains(line), "{printed}");
                assert!(printed.contains("listening on"), "{printed}");
                child.kill().await.unwrap();
            }
            Err(message) => {
                let output = timeout(WAIT, child.wait_with_output())
                    .await
                    .expect("the server did not stop within 20 s")
                    .unwrap();
                let stderr = String::from_utf8_lossy(&output.stderr);
                assert!(!output.status.success(), "{stderr}");
                assert!(stderr.contains(message), "{stderr}");
            }
        }
    }
}
