//! Bad input gets a clear error and loses nothing: bad config exits non-zero naming the key
//! before binding; bad requests get a 4xx and the gateway keeps serving.

mod common;

use std::io::{Read, Write};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Backend, Behavior, Consul, Gateway};

fn check_config(yaml: Option<&str>) -> (i32, String) {
    let dir = std::env::temp_dir().join(format!("switchyard-badcfg-{}", common::free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gateway.yaml");
    if let Some(yaml) = yaml {
        std::fs::write(&path, yaml).unwrap();
    }
    let output = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .arg("--config")
        .arg(&path)
        .env_remove("CONSUL_HTTP_ADDR")
        .output()
        .expect("running switchyard");
    let _ = std::fs::remove_dir_all(&dir);
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn bad_config_exits_nonzero_naming_the_problem() {
    // Ports that would be bound if the config were accepted: the process must exit first.
    let cases = [
        (
            Some("services:\n  - name: hello\n    ballance: random\n"),
            "unknown field `ballance`",
        ),
        (
            Some("services:\n  - name: hello\n    balance: fastest\n"),
            "services[0].balance",
        ),
        (
            Some("consul:\n  wait: forever\nservices:\n  - name: hello\n"),
            "consul.wait",
        ),
        (
            Some("listen: nowhere\nservices:\n  - name: hello\n"),
            "listen",
        ),
        (
            Some("services:\n  - name: hello\n    outlier: {base_ejection_time: 1m, max_ejection_time: 30s}\n"),
            "services[0].outlier.max_ejection_time",
        ),
        (
            Some("services:\n  - name: hello\n    source: static\n    instances: [\"10.0.0.1:80\", \"nope\"]\n"),
            "services[0].instances[1]",
        ),
        (None, "not found"),
    ];
    for (yaml, expected) in cases {
        let (code, stderr) = check_config(yaml);
        println!("{expected}: exit {code}: {}", stderr.trim());
        assert_eq!(code, 2, "{stderr}");
        assert!(
            stderr.contains(expected),
            "expected {expected:?} in {stderr:?}"
        );
    }
}

#[test]
fn check_flag_accepts_the_shipped_example() {
    let output = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args([
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/gateway.yaml"),
            "--check",
        ])
        .output()
        .expect("running switchyard");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Sends raw bytes and returns the status line of the answer.
fn raw_exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // The server may answer and close before reading all of an oversized request.
    let _ = stream.write_all(request);
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_4xx_and_the_gateway_keeps_serving() {
    let consul = Consul::start().await;
    let backend = Backend::start("web-1", Behavior::Ok).await;
    consul.register("web", "web-1", backend.port, &[]).await;
    let gateway = Gateway::start(
        &consul,
        "services:\n  - name: web\n  - name: empty\n    retry: {attempts: 3, timeout: 5s}\n",
    )
    .await;
    assert!(gateway
        .wait_for_instances("web", &["web-1"], Duration::from_secs(10))
        .await
        .is_some());
    // Wait for the first answer for `empty` too, so its 503 is the truth, not a cold start.
    let client = common::http_client();
    let ready = common::wait_until(Duration::from_secs(10), || async {
        client
            .get(gateway.admin_url("/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(ready.is_some());

    let response = gateway.get("/no/such/route").await;
    assert_eq!(response.status(), 404);
    assert_eq!(response.headers()["x-switchyard-error"], "no-route");

    let started = Instant::now();
    let response = gateway.get("/empty").await;
    let elapsed = started.elapsed();
    println!(
        "service without instances answered {} in {elapsed:?}",
        response.status()
    );
    assert_eq!(response.status(), 503);
    assert_eq!(
        response.headers()["x-switchyard-error"],
        "no-healthy-instance"
    );
    assert!(
        elapsed < Duration::from_secs(1),
        "503 must not wait for retries: {elapsed:?}"
    );

    let addr = gateway.addr;
    let huge = format!(
        "GET /web HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(200 * 1024)
    );
    let status = tokio::task::spawn_blocking(move || raw_exchange(addr, huge.as_bytes()))
        .await
        .unwrap();
    assert!(status.contains(" 431 "), "200 KB header: {status:?}");

    let status =
        tokio::task::spawn_blocking(move || raw_exchange(addr, b"\x16\x03\x01garbage\r\n\r\n"))
            .await
            .unwrap();
    assert!(status.contains(" 400 "), "garbage: {status:?}");

    let response = gateway.get("/web").await;
    assert_eq!(response.status(), 200, "still serving after bad input");
    assert_eq!(response.headers()["x-instance"], "web-1");
    let echo = response.headers()["x-echo"].to_str().unwrap().to_owned();
    assert!(
        echo.contains(&format!("host={}", gateway.addr)),
        "client's Host kept: {echo}"
    );
    assert!(
        echo.contains("xff=127.0.0.1"),
        "X-Forwarded-For set: {echo}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_in_flight_requests_finish_and_refuses_new_ones() {
    let consul = Consul::start().await;
    let slow = Backend::start("slow-1", Behavior::Delay(Duration::from_millis(700))).await;
    consul.register("slow", "slow-1", slow.port, &[]).await;
    let mut gateway = Gateway::start(&consul, "services:\n  - name: slow\n").await;
    assert!(gateway
        .wait_for_instances("slow", &["slow-1"], Duration::from_secs(10))
        .await
        .is_some());

    let client = common::http_client();
    let in_flight: Vec<_> = (0..5)
        .map(|_| tokio::spawn(client.get(gateway.url("/slow")).send()))
        .collect();
    // Shut down once every request has reached the backend.
    let arrived = common::wait_until(Duration::from_secs(5), || async { slow.hits() == 5 }).await;
    assert!(arrived.is_some());
    let stopping = Instant::now();
    gateway.stop().await;
    println!(
        "run() returned {:?} after shutdown began",
        stopping.elapsed()
    );
    for request in in_flight {
        let response = request.await.unwrap().expect("in-flight request completes");
        assert_eq!(response.status(), 200);
    }
    let refused = std::net::TcpStream::connect(gateway.addr);
    assert!(
        refused.is_err(),
        "new connections are refused after shutdown"
    );
}
