//! The example's server over a real socket: the standard gRPC health probe
//! (`grpc.health.v1.Health/Check`, as Kubernetes' gRPC probes, grpc-health-probe
//! and load balancers send it) answers SERVING next to `demo.Greeter`, and
//! `--demo` prints its story in words.

use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_server::greeter::{GreeterClient, HelloRequest, SERVICE};
use tonic_server::{spawn_server, DemoGreeter, EMAIL_DELAY};
use tower_background::BackgroundLayer;

/// The failure guard around every wait.
const LIMIT: Duration = Duration::from_secs(10);

async fn within<F: std::future::Future>(what: &str, fut: F) -> F::Output {
    tokio::time::timeout(LIMIT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

async fn check(client: &mut HealthClient<Channel>, service: &str) -> Result<i32, tonic::Status> {
    let request = HealthCheckRequest {
        service: service.to_owned(),
    };
    within("Health/Check", client.check(request))
        .await
        .map(|res| res.into_inner().status)
}

#[tokio::test]
async fn health_check_answers_serving_for_the_server_and_the_greeter() {
    let layer = BackgroundLayer::new();
    let handle = layer.handle();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = spawn_server(listener, layer, DemoGreeter::new(Instant::now()), async {
        let _ = stopped.await;
    })
    .await;

    let channel = within(
        "connect",
        Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect(),
    )
    .await
    .unwrap();
    let mut health = HealthClient::new(channel.clone());
    assert_eq!(
        check(&mut health, "").await.unwrap(),
        ServingStatus::Serving as i32,
        "the server as a whole"
    );
    assert_eq!(
        check(&mut health, SERVICE).await.unwrap(),
        ServingStatus::Serving as i32,
        "demo.Greeter by name"
    );
    let unknown = check(&mut health, "no.Such").await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");

    // Probes queue no background work; the greeter on the same connection does.
    within("wait_idle", handle.wait_idle()).await;
    assert_eq!(handle.stats().total(), 0, "{:?}", handle.stats());
    let mut greeter = within("connect", GreeterClient::connect(addr))
        .await
        .unwrap();
    let reply = within(
        "SayHello",
        greeter.say_hello(HelloRequest {
            name: "Ferris".into(),
        }),
    )
    .await
    .unwrap();
    assert_eq!(reply.into_inner().message, "Hello Ferris!");
    within("the welcome email", handle.wait_idle()).await;
    assert_eq!(handle.stats().completed, 1, "{:?}", handle.stats());

    stop.send(()).unwrap();
    within("the server to shut down", server)
        .await
        .unwrap()
        .unwrap();
}

/// `cargo run -p tonic-server -- --demo`, as a user runs it with its output
/// redirected: counts in words, no `Debug` dumps, no colour codes.
#[tokio::test]
async fn demo_mode_prints_its_story_in_words() {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_tonic-server"));
    command.arg("--demo").kill_on_drop(true);
    let output = within("the demo to exit", command.output()).await.unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(
        output.status.success(),
        "{}\n{stdout}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].starts_with("gRPC (HTTP/2 without TLS) listening on http://127.0.0.1:"));
    let expected_in_order = [
        "reply: Hello Ferris! (grpc-status 0)",
        "background task: welcome email sent to Ferris",
        "shut down: 0 tasks finished during the grace period, 0 cancelled",
        "background tasks: 1 task in all: 1 completed, 0 failed, 0 panicked, 0 timed out, \
         0 discarded, 0 cancelled, 0 still pending or running",
    ];
    let mut from = 0;
    for expected in expected_in_order {
        let at = lines[from..]
            .iter()
            .position(|line| line.ends_with(expected))
            .unwrap_or_else(|| {
                panic!("no line ending in {expected:?} after line {from}:\n{stdout}")
            });
        from += at + 1;
    }
    assert!(!stdout.contains('\u{1b}'), "colour codes:\n{stdout}");
    assert!(!stdout.contains("Stats {"), "a Debug dump:\n{stdout}");
    // The times are milliseconds since the start: the email took its delay
    // and was printed after the client had its reply.
    let ms = |line: &str| -> u128 {
        let inner = line.trim_start_matches('[').split(" ms]").next().unwrap();
        inner.trim().parse().unwrap()
    };
    let reply = lines.iter().find(|l| l.contains("reply:")).unwrap();
    let email = lines.iter().find(|l| l.contains("welcome email")).unwrap();
    assert!(
        ms(email) >= EMAIL_DELAY.as_millis() && ms(email) >= ms(reply),
        "{reply}\n{email}"
    );
}
