//! Edge protocols end to end with real clients and servers the project did not write:
//! WebSocket (Debian's python3-websockets) through the gateway's upgrade path.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use common::{Backend, Behavior, Consul};

const WS_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/scripts/ws_echo.py");

/// Starts a Debian python3 script; killed on drop.
fn python(args: &[&str]) -> Child {
    Command::new("/usr/bin/python3")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("running /usr/bin/python3")
}

/// The next line the child prints (what there is at EOF or after 30 s). Byte by byte, so
/// nothing past the line is buffered away.
async fn next_line(child: &mut Child) -> String {
    let stdout = child.stdout.as_mut().expect("piped stdout");
    let mut line = Vec::new();
    let read = async {
        while let Ok(byte) = stdout.read_u8().await {
            if byte == b'\n' {
                break;
            }
            line.push(byte);
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(30), read).await;
    String::from_utf8_lossy(&line).trim().to_owned()
}

async fn upgraded(gateway: &common::Gateway, service: &str) -> f64 {
    let metrics = gateway.admin_get("/metrics").await;
    common::metric(
        &metrics,
        &format!("switchyard_upgraded_connections{{service=\"{service}\"}}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_through_the_gateway() {
    let consul = Consul::start().await;
    let port = common::free_port();
    let mut server = python(&[WS_SCRIPT, "server", &port.to_string()]);
    assert_eq!(next_line(&mut server).await, "listening");
    consul.register("ws", "ws-1", port, &[]).await;
    let plain = Backend::start("plain-1", Behavior::Ok).await;
    consul.register("plain", "plain-1", plain.port, &[]).await;
    let yaml = format!(
        "consul: {{address: \"{}\"}}\nserver: {{shutdown_grace: 1s}}\nservices:\n  - name: ws\n  - name: plain\n",
        consul.url()
    );
    let config = switchyard::Config::from_yaml(&yaml, &Default::default()).unwrap();
    let mut gateway = common::Gateway::start_config(config).await;
    for (service, id) in [("ws", "ws-1"), ("plain", "plain-1")] {
        let synced = gateway
            .wait_for_instances(service, &[id], Duration::from_secs(10))
            .await;
        assert!(synced.is_some());
    }
    let url = format!("ws://{}/ws", gateway.addr);

    // 1,000 messages echoed; the spliced connection shows in the gauge while open.
    let mut client = python(&[WS_SCRIPT, "client", &url, "1000"]);
    assert_eq!(next_line(&mut client).await, "echoed 1000");
    assert_eq!(upgraded(&gateway, "ws").await, 1.0);
    let stdin = client.stdin.as_mut().expect("piped stdin");
    stdin.write_all(b"\n").await.unwrap();
    assert!(client.wait().await.unwrap().success());
    let closed = common::wait_until(Duration::from_secs(5), || async {
        upgraded(&gateway, "ws").await == 0.0
    })
    .await;
    assert!(
        closed.is_some(),
        "the gauge returns to 0 once the client closes"
    );

    // An instance that does not switch protocols: its answer passes through as it is.
    let response = common::http_client()
        .get(gateway.url("/plain"))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-instance"], "plain-1");

    // Shutdown: an open upgraded connection gets the grace period, then is cut.
    let mut held = python(&[WS_SCRIPT, "client", &url, "1"]);
    assert_eq!(next_line(&mut held).await, "echoed 1");
    let stopping = Instant::now();
    gateway.stop().await;
    let stopped = stopping.elapsed();
    let ended = tokio::time::timeout(Duration::from_secs(5), held.wait()).await;
    println!("websocket: 1,000 echoes; shutdown with one open: run() returned after {stopped:?}");
    assert!(stopped >= Duration::from_millis(900), "{stopped:?}");
    assert!(ended.is_ok(), "the client saw its connection closed");
}

const GRPC_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/scripts/grpc_echo.py");

/// gRPC over h2c through the gateway with Debian's python3-grpcio as server and client:
/// unary calls spread exactly over 2 instances, server and bidirectional streaming, an
/// instance's error status and message passed through, the gateway's own answers as gRPC
/// statuses, and `grpc-timeout` honoured as the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_h2c_through_the_gateway() {
    let consul = Consul::start().await;
    let mut servers = Vec::new();
    for id in ["grpc-1", "grpc-2"] {
        let port = common::free_port();
        let mut server = python(&[GRPC_SCRIPT, "server", &port.to_string(), id]);
        assert_eq!(next_line(&mut server).await, "listening");
        consul.register("grpc", id, port, &[]).await;
        servers.push(server);
    }
    // An instance that knows nothing of grpc-timeout: only the gateway can enforce it.
    let slow = Backend::start("slow-1", Behavior::Delay(Duration::from_secs(3))).await;
    consul.register("slow", "slow-1", slow.port, &[]).await;
    let gateway = common::Gateway::start(
        &consul,
        "services:
  - name: grpc
    protocol: h2c
    route: {path_prefix: /echo.Echo/}
  - name: empty
    protocol: h2c
    route: {path_prefix: /empty.Empty/}
  - name: slow
    route: {path_prefix: /slow.Slow/}
",
    )
    .await;
    let synced = gateway
        .wait_for_instances("slow", &["slow-1"], Duration::from_secs(10))
        .await;
    assert!(synced.is_some());
    let synced = gateway
        .wait_for_instances("grpc", &["grpc-1", "grpc-2"], Duration::from_secs(10))
        .await;
    assert!(synced.is_some());

    let mut client = python(&[GRPC_SCRIPT, "client", &gateway.addr.to_string()]);
    let line = next_line(&mut client).await;
    println!("grpc through the gateway: {line}");
    let result: serde_json::Value = serde_json::from_str(&line).expect("the client's JSON line");
    assert_eq!(result["spread"]["grpc-1"], 50, "{result}");
    assert_eq!(result["spread"]["grpc-2"], 50, "{result}");
    let streamed: Vec<String> = (0..10).map(|i| i.to_string()).collect();
    assert_eq!(result["server_stream"], serde_json::json!(streamed));
    let bidi: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
    assert_eq!(result["bidi"], serde_json::json!(bidi));
    assert_eq!(
        result["fail"],
        serde_json::json!(["INVALID_ARGUMENT", "bad thing"])
    );
    assert_eq!(result["no_instance"][0], "UNAVAILABLE");
    assert!(result["no_instance"][1]
        .as_str()
        .is_some_and(|m| m.contains("no healthy instance")));
    assert_eq!(result["no_route"][0], "UNIMPLEMENTED");

    // grpc-timeout shorter than retry.timeout (5 s) is the deadline: the gateway answers
    // DEADLINE_EXCEEDED before the instance's 3 s answer, to a client (curl) that keeps no
    // deadline of its own, from an instance that keeps none either.
    let started = Instant::now();
    let output = Command::new("curl")
        .args(["-s", "-i", "--http2-prior-knowledge", "--max-time", "10"])
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
        .args(["-H", "grpc-timeout: 300m", "--data-binary", "@-"])
        .arg(gateway.url("/slow.Slow/Call"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map(|mut curl| {
            let mut stdin = curl.stdin.take().expect("piped stdin");
            tokio::spawn(async move { stdin.write_all(b"\0\0\0\0\x01x").await });
            curl
        })
        .expect("running curl")
        .wait_with_output()
        .await
        .unwrap();
    let elapsed = started.elapsed();
    let text = String::from_utf8_lossy(&output.stdout).to_lowercase();
    println!("grpc-timeout 300m on a 3 s method: answered in {elapsed:?}");
    assert!(text.contains("grpc-status: 4"), "{text}");
    assert!(
        text.contains("x-switchyard-error: deadline-exceeded"),
        "{text}"
    );
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
}

/// HTTP/2 with prior knowledge (h2c) from h2load: many streams per connection, all served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_clients_are_served_with_many_streams() {
    let consul = Consul::start().await;
    let backends = common::backends("web", 2).await;
    for backend in &backends {
        consul.register("web", &backend.id, backend.port, &[]).await;
    }
    let gateway = common::Gateway::start(&consul, "services:\n  - name: web\n").await;
    let synced = gateway
        .wait_for_instances("web", &["web-1", "web-2"], Duration::from_secs(10))
        .await;
    assert!(synced.is_some());
    let output = Command::new("h2load")
        .args(["-n", "2000", "-c", "10", "-m", "10"])
        .arg(gateway.url("/web"))
        .output()
        .await
        .expect("running h2load (Debian nghttp2-client)");
    let text = String::from_utf8_lossy(&output.stdout);
    let summary = text
        .lines()
        .find(|l| l.starts_with("requests:"))
        .unwrap_or("")
        .to_owned();
    println!("h2load -n 2000 -c 10 -m 10 over h2c: {summary}");
    assert!(
        summary.contains("2000 succeeded, 0 failed, 0 errored"),
        "{text}"
    );
    let status = text.lines().find(|l| l.starts_with("status codes:"));
    assert!(status.is_some_and(|l| l.contains("2000 2xx")), "{text}");
    let hits: usize = backends.iter().map(Backend::hits).sum();
    assert_eq!(hits, 2000);
}
