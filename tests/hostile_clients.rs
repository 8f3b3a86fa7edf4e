//! Hostile clients, each probe sent as the exact bytes a hostile client would send (issue:
//! "six defects found by a probe of the running gateway"), against a real Consul and
//! raw-socket backends that record what reached them.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use common::raw::{header_values, RawBackend};
use common::Consul;

const SECOND_CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));

/// Sends raw bytes and returns the answer: up to its end by Content-Length, or to EOF.
fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = stream.write_all(request);
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    while !is_complete(&answer) {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&chunk[..n]),
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

/// Whether `answer` holds a whole response head and its Content-Length of body.
fn is_complete(answer: &[u8]) -> bool {
    let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&answer[..end]);
    let length: usize = header_values(&head, "content-length")
        .first()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    answer.len() >= end + 4 + length
}

async fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let request = request.to_vec();
    tokio::task::spawn_blocking(move || exchange(addr, &request))
        .await
        .unwrap()
}

/// Sends the start of a request, waits until it reached an instance, then closes.
async fn abandon(addr: SocketAddr, request: &[u8], instances: &[&RawBackend]) {
    use tokio::io::AsyncWriteExt;
    let heads = || instances.iter().map(|i| i.heads().len()).sum::<usize>();
    let before = heads();
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let reached = common::wait_until(Duration::from_secs(5), || async { heads() > before }).await;
    assert!(reached.is_some(), "the request never reached an instance");
}

fn status(answer: &str) -> u16 {
    answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// A gateway over `yaml` services whose instances are registered in `consul` and synced.
async fn gateway_over(
    consul: &Consul,
    extra_yaml: &str,
    services: &[(&str, &str, u16)],
) -> common::Gateway {
    for (service, id, port) in services {
        consul.register(service, id, *port, &[]).await;
    }
    let gateway = common::Gateway::start(consul, extra_yaml).await;
    for (service, _, _) in services {
        let ids: Vec<&str> = services
            .iter()
            .filter(|(s, _, _)| s == service)
            .map(|(_, id, _)| *id)
            .collect();
        let synced = gateway
            .wait_for_instances(service, &ids, Duration::from_secs(10))
            .await;
        assert!(synced.is_some(), "{service} never synced");
    }
    gateway
}

/// Waits until the gateway closes `stream` (EOF or reset); how long that took.
async fn closed_after(mut stream: tokio::net::TcpStream, limit: Duration) -> Option<Duration> {
    use tokio::io::AsyncReadExt;
    let started = Instant::now();
    let mut buffer = [0u8; 1024];
    loop {
        match tokio::time::timeout_at((started + limit).into(), stream.read(&mut buffer)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => {} // e.g. the server's SETTINGS and GOAWAY frames
        }
    }
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const H2_EMPTY_SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];

/// Defect 1: silent connections used to stay open forever, and one client could take every
/// slot. Now: no request within header_read_timeout -> cut; idle -> closed; one address holds
/// at most max_connections_per_client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_idle_and_greedy_connections() {
    use tokio::io::AsyncWriteExt;
    let consul = Consul::start().await;
    let backend = RawBackend::start(Duration::ZERO).await;
    let gateway = gateway_over(
        &consul,
        "  header_read_timeout: 1s\n  idle_timeout: 2s\n  max_connections: 60\n  max_connections_per_client: 40\nservices:\n  - name: web\n",
        &[("web", "web-1", backend.port)],
    )
    .await;
    let addr = gateway.addr;
    let probes: [&[u8]; 4] = [
        b"",
        b"P",
        b"PRI * HTTP/2.0\r\n",
        &[H2_PREFACE, H2_EMPTY_SETTINGS].concat(),
    ];
    let mut waits = Vec::new();
    for probe in probes {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(probe).await.unwrap();
        waits.push(tokio::spawn(closed_after(stream, Duration::from_secs(10))));
    }
    for (probe, wait) in ["nothing", "P", "PRI line", "h2 preface + SETTINGS"]
        .iter()
        .zip(waits)
    {
        let closed = wait.await.unwrap();
        println!("silent probe {probe:?}: closed after {closed:?}");
        let closed = closed.unwrap_or_else(|| panic!("{probe}: never closed"));
        assert!(closed >= Duration::from_millis(900), "{probe}: {closed:?}");
    }

    // An HTTP/2 connection that made one request and then idles gets GOAWAY and is closed.
    let h2_closed = h2_request_then_idle(addr).await;
    println!("h2 connection idle after one request: closed after {h2_closed:?}");
    assert!(h2_closed >= Duration::from_secs(2) && h2_closed < Duration::from_secs(6));

    // One address opens 100 silent connections: 40 are held, the rest closed at once; another
    // client is served meanwhile; the 40 are cut at the header read timeout.
    let mut held = Vec::new();
    for _ in 0..100 {
        held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    let client = common::http_client_builder()
        .local_address(SECOND_CLIENT)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let other = client.get(gateway.url("/web")).send().await;
    assert_eq!(other.map(|r| r.status().as_u16()).ok(), Some(200));
    let closes: Vec<_> = held
        .into_iter()
        .map(|s| tokio::spawn(closed_after(s, Duration::from_secs(5))))
        .collect();
    let mut times = Vec::new();
    for close in closes {
        times.push(
            close
                .await
                .unwrap()
                .expect("every silent connection closes"),
        );
    }
    let at_once = times
        .iter()
        .filter(|t| **t < Duration::from_millis(500))
        .count();
    println!("100 silent connections from one address: {at_once} closed at once, the rest at the header timeout");
    assert_eq!(at_once, 60, "max_connections_per_client: 40");
    let metrics = gateway.admin_get("/metrics").await;
    let refused = common::metric(
        &metrics,
        "switchyard_client_connections_closed_total{listener=\"gateway\",reason=\"per_client_limit\",worker=\"0\"}",
    );
    assert_eq!(refused, 60.0);
    assert_eq!(
        gateway.get("/web").await.status(),
        200,
        "first address served again"
    );
}

/// One h2 request, then silence; how long until the gateway closes the connection.
async fn h2_request_then_idle(addr: SocketAddr) -> Duration {
    use http_body_util::{BodyExt, Empty};
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    let connection = tokio::spawn(connection);
    let request = hyper::Request::get(format!("http://{addr}/web"))
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let _ = response.into_body().collect().await;
    let idle_since = Instant::now();
    let _ = tokio::time::timeout(Duration::from_secs(10), connection).await;
    idle_since.elapsed()
}

/// Defect 2: a client's broken body used to answer 502 and eject healthy instances. Now the
/// client's own errors answer 400 (408 for a stall) and count against no instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_client_bodies_are_the_clients_fault() {
    let consul = Consul::start().await;
    let (a, b) = (
        RawBackend::start(Duration::ZERO).await,
        RawBackend::start(Duration::ZERO).await,
    );
    let gateway = gateway_over(
        &consul,
        "services:\n  - name: web\n    retry: {timeout: 1s}\n",
        &[("web", "web-1", a.port), ("web", "web-2", b.port)],
    )
    .await;
    let addr = gateway.addr;
    let head = "POST /web/a HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n";
    for _ in 0..12 {
        let answer = raw(addr, format!("{head}3\r\nabcdef\r\n0\r\n\r\n").as_bytes()).await;
        assert_eq!(status(&answer), 400, "{answer}");
        assert!(
            answer.contains("x-switchyard-error: bad-request-body"),
            "{answer}"
        );
    }
    for body in [
        "0x3\r\nabc\r\n0\r\n\r\n",
        " 3\r\nabc\r\n0\r\n\r\n",
        "fffffffffffffffffffff\r\nabc\r\n0\r\n\r\n",
        "3\nabc\n0\n\n",
    ] {
        let answer = raw(addr, format!("{head}{body}").as_bytes()).await;
        println!("chunk {body:?} -> {}", answer.lines().next().unwrap_or(""));
        assert_eq!(status(&answer), 400, "{body:?}: {answer}");
    }
    // Uploads the client abandons: mid-chunk, and a large declared length cut short.
    let declared = "POST /web/a HTTP/1.1\r\nHost: gw\r\nContent-Length: 1000000\r\n\r\n";
    for _ in 0..6 {
        abandon(addr, format!("{head}100\r\nabc").as_bytes(), &[&a, &b]).await;
        let cut_short = format!("{declared}{}", "x".repeat(5000));
        abandon(addr, cut_short.as_bytes(), &[&a, &b]).await;
    }
    // A chunked upload that stalls past the deadline: 408, the client's stall.
    let stalled = tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream
            .write_all(format!("{head}1\r\na\r\n").as_bytes())
            .unwrap();
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        String::from_utf8_lossy(&answer).into_owned()
    })
    .await
    .unwrap();
    assert_eq!(status(&stalled), 408, "{stalled}");

    let metrics = gateway.admin_get("/metrics").await;
    let ejections = common::metric(&metrics, "switchyard_ejections_total{service=\"web\"}");
    let bad_gateway = common::metric(
        &metrics,
        "switchyard_requests_total{code=\"502\",service=\"web\"}",
    );
    println!("after 40 broken uploads: ejections {ejections}, 502s {bad_gateway}");
    assert_eq!(ejections, 0.0);
    assert_eq!(bad_gateway, 0.0);
    let (hits, failures) = gateway.spread("/web", 20).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(hits.values().sum::<usize>(), 20);
    assert!(a.heads().len() + b.heads().len() >= 20);
}

/// Defects 3-5 and the hardening choices: forwarded headers, Host, absolute-form targets,
/// methods, transfer codings, path normalisation and HTTP/2 cookies, as instances see them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_hosts_and_paths_reach_instances_sanitised() {
    let consul = Consul::start().await;
    let backend = RawBackend::start(Duration::ZERO).await;
    let port = backend.port;
    let services = "services:
  - name: web
  - name: other
  - name: strip
    route: {path_prefix: /strip, strip_prefix: true}
  - name: routed
    route: {path_prefix: /, host: routed.example}
";
    let registered = [
        ("web", "web-1", port),
        ("other", "other-1", port),
        ("strip", "strip-1", port),
        ("routed", "routed-1", port),
    ];
    let gateway = gateway_over(&consul, services, &registered).await;
    let trusting = gateway_over(
        &consul,
        &format!("  trusted_proxies: [127.0.0.0/8]\n{services}"),
        &registered,
    )
    .await;
    let last_line = |backend: &RawBackend| {
        let heads = backend.heads();
        heads
            .last()
            .map(|h| h.lines().next().unwrap_or("").to_owned())
    };

    // Defects 3 and 4: the gateway's entry is always last; untrusted chains are replaced.
    let long = [
        b"GET /web HTTP/1.1\r\nHost: gw\r\nX-Forwarded-For: ".as_slice(),
        "10.0.0.1, ".repeat(52).as_bytes(),
        b"\xff, 6.6.6.6\r\nForwarded: for=6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\n\r\n",
    ]
    .concat();
    let two = b"GET /web HTTP/1.1\r\nHost: gw\r\nX-Forwarded-For: 1.1.1.1\r\nX-Forwarded-For: 2.2.2.2\r\n\r\n";
    let answer = raw(gateway.addr, &long).await;
    assert_eq!(status(&answer), 200, "{answer}");
    assert_eq!(backend.last_values("x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(backend.last_values("x-real-ip"), ["127.0.0.1"]);
    assert!(backend.last_values("forwarded").is_empty());
    assert_eq!(status(&raw(gateway.addr, two).await), 200);
    assert_eq!(backend.last_values("x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(status(&raw(trusting.addr, &long).await), 200);
    let chain = backend.last_values("x-forwarded-for");
    assert_eq!(chain.len(), 1);
    assert!(chain[0].starts_with("10.0.0.1, 10.0.0.1, "), "{chain:?}");
    assert!(
        chain[0].ends_with("\u{ff}, 6.6.6.6, 127.0.0.1"),
        "{chain:?}"
    );
    assert_eq!(backend.last_values("forwarded"), ["for=6.6.6.6"]);
    assert_eq!(status(&raw(trusting.addr, two).await), 200);
    assert_eq!(
        backend.last_values("x-forwarded-for"),
        ["1.1.1.1, 2.2.2.2, 127.0.0.1"]
    );

    // Defect 5: one valid Host, or 400; the instance never sees the request.
    let before = backend.heads().len();
    for (what, request) in [
        (
            "two Hosts",
            "GET /web HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n",
        ),
        ("no Host", "GET /web HTTP/1.1\r\n\r\n"),
        ("userinfo", "GET /web HTTP/1.1\r\nHost: a@b\r\n\r\n"),
        ("a path", "GET /web HTTP/1.1\r\nHost: a/b\r\n\r\n"),
        ("a space", "GET /web HTTP/1.1\r\nHost: a b\r\n\r\n"),
        ("unclosed [", "GET /web HTTP/1.1\r\nHost: [::1\r\n\r\n"),
        ("empty", "GET /web HTTP/1.1\r\nHost: \r\n\r\n"),
    ] {
        let answer = raw(gateway.addr, request.as_bytes()).await;
        assert_eq!(status(&answer), 400, "{what}: {answer}");
        assert!(
            answer.contains("x-switchyard-error: bad-host"),
            "{what}: {answer}"
        );
    }
    assert_eq!(
        backend.heads().len(),
        before,
        "no bad Host reached the instance"
    );
    let answer = raw(gateway.addr, b"GET /web HTTP/1.0\r\n\r\n").await;
    assert_eq!(status(&answer), 200, "HTTP/1.0 needs no Host: {answer}");

    // Absolute-form: routed and forwarded by the target's authority (RFC 9112 §3.2.2).
    let answer = raw(
        gateway.addr,
        b"GET http://routed.example/x HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert_eq!(status(&answer), 200, "{answer}");
    assert_eq!(backend.last_values("host"), ["routed.example"]);
    assert_eq!(last_line(&backend).as_deref(), Some("GET /x HTTP/1.1"));

    // Methods and transfer codings the gateway refuses.
    for (request, code) in [
        ("CONNECT web:80 HTTP/1.1\r\nHost: web:80\r\n\r\n", 405),
        ("TRACE /web HTTP/1.1\r\nHost: gw\r\n\r\n", 405),
        (
            "POST /web HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            501,
        ),
    ] {
        let answer = raw(gateway.addr, request.as_bytes()).await;
        assert_eq!(status(&answer), code, "{request:?}: {answer}");
    }
    assert_eq!(backend.heads().len(), before + 2);

    // Paths: dot segments (plain or encoded) and repeated slashes resolved before routing.
    for (path, forwarded) in [
        ("/web/../other/x", "GET /other/x HTTP/1.1"),
        ("/web/%2e%2e/other", "GET /other HTTP/1.1"),
        ("/strip//x?q=1", "GET /x?q=1 HTTP/1.1"),
    ] {
        let request = format!("GET {path} HTTP/1.1\r\nHost: gw\r\n\r\n");
        let answer = raw(gateway.addr, request.as_bytes()).await;
        assert_eq!(status(&answer), 200, "{path}: {answer}");
        assert_eq!(last_line(&backend).as_deref(), Some(forwarded), "{path}");
    }

    // HTTP/2 cookies split over fields reach an HTTP/1.1 instance as one line.
    h2_get_with_cookies(gateway.addr).await;
    assert_eq!(backend.last_values("cookie"), ["a=1; b=2"]);
    let head = backend.heads().last().cloned().unwrap_or_default();
    assert_eq!(header_values(&head, "host"), [gateway.addr.to_string()]);
}

async fn h2_get_with_cookies(addr: SocketAddr) {
    use http_body_util::Empty;
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let request = hyper::Request::get(format!("http://{addr}/web"))
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
}

/// Defect 6: a client that sends 19 HEADERS+RST_STREAM per connection and reconnects used to
/// make the gateway open a new upstream connection per reset (45,000 in 12.5 s) and slowed
/// every other client. Now a reset exchange is finished on its pooled connection, requests
/// per instance are capped, and a client that keeps abandoning requests gets 429s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_with_reconnects_costs_no_upstream_connections() {
    let consul = Consul::start().await;
    let backend = RawBackend::start(Duration::from_millis(20)).await;
    let gateway = gateway_over(
        &consul,
        "upstream:\n  max_connections_per_instance: 20\nservices:\n  - name: web\n",
        &[("web", "web-1", backend.port)],
    )
    .await;
    let attacker = tokio::process::Command::new("/usr/bin/python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/scripts/rapid_reset.py"
        ))
        .args([
            "127.0.0.1",
            &gateway.addr.port().to_string(),
            "/web",
            "3",
            "19",
        ])
        .output();
    let bystander = async {
        let client = common::http_client_builder()
            .local_address(SECOND_CLIENT)
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let (mut latencies, mut failures) = (Vec::new(), Vec::new());
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(3) {
            let sent = Instant::now();
            match client.get(gateway.url("/web")).send().await {
                Ok(r) if r.status() == 200 => latencies.push(sent.elapsed()),
                other => failures.push(format!("{other:?}")),
            }
        }
        latencies.sort();
        (latencies, failures)
    };
    let (attack, (latencies, failures)) = tokio::join!(attacker, bystander);
    let attack = attack.expect("running /usr/bin/python3 (Debian python3-h2)");
    assert!(
        attack.status.success(),
        "{}",
        String::from_utf8_lossy(&attack.stderr)
    );
    let metrics = gateway.admin_get("/metrics").await;
    let resets = common::metric(
        &metrics,
        "switchyard_client_resets_total{listener=\"gateway\",worker=\"0\"}",
    );
    let throttled = common::metric(
        &metrics,
        "switchyard_requests_total{code=\"429\",service=\"unrouted\"}",
    );
    println!(
        "rapid reset: attacker {}; gateway saw {resets} resets, answered {throttled} with 429; \
         upstream connections opened: {}; bystander {} requests, median {:?}, failures {}",
        String::from_utf8_lossy(&attack.stdout).trim(),
        backend.connections(),
        latencies.len(),
        latencies.get(latencies.len() / 2),
        failures.len()
    );
    assert!(failures.is_empty(), "{failures:?}");
    assert!(resets > 100.0, "the attack reached the gateway: {resets}");
    assert!(
        backend.connections() <= 20,
        "upstream connections: {}",
        backend.connections()
    );
}

/// HTTP/2 abuse on one connection: a HEADERS+RST_STREAM flood gets GOAWAY, an oversized
/// frame a FRAME_SIZE_ERROR, an oversized header list is refused; every time, a client on
/// another connection keeps being served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_floods_and_oversized_frames_are_refused() {
    let consul = Consul::start().await;
    let backend = RawBackend::start(Duration::ZERO).await;
    let gateway = gateway_over(
        &consul,
        "services:\n  - name: web\n",
        &[("web", "web-1", backend.port)],
    )
    .await;
    let port = gateway.addr.port().to_string();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/scripts/h2_abuse.py");
    for (args, expect) in [
        (
            vec!["flood", "127.0.0.1", &port, "/web", "5000"],
            "goaway 11",
        ),
        (vec!["bigframe", "127.0.0.1", &port], "goaway 6"),
        (vec!["bigheaders", "127.0.0.1", &port, "/web", "100000"], ""),
    ] {
        let output = tokio::process::Command::new("/usr/bin/python3")
            .arg(script)
            .args(&args)
            .output()
            .await
            .expect("running /usr/bin/python3 (Debian python3-h2)");
        let said = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        println!("h2 {}: {said}", args[0]);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        if expect.is_empty() {
            assert!(
                said == "status 431" || said.starts_with("reset") || said.starts_with("goaway"),
                "an oversized header list is refused: {said}"
            );
        } else {
            assert_eq!(said, expect, "{}", args[0]);
        }
        assert_eq!(
            gateway.get("/web").await.status(),
            200,
            "others still served"
        );
    }
}

/// Reads `count` answers from `stream`; `bodiless[i]`: answer i has no body whatever its
/// `content-length` (the answer to a HEAD request). Each comes back as head + body.
async fn read_answers(
    stream: &mut tokio::net::TcpStream,
    count: usize,
    bodiless: &[usize],
) -> Vec<String> {
    use tokio::io::AsyncReadExt;
    let mut buffer = Vec::new();
    let mut answers = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while answers.len() < count {
        let head_end = buffer.windows(4).position(|w| w == b"\r\n\r\n");
        if let Some(end) = head_end {
            let head = String::from_utf8_lossy(&buffer[..end]).into_owned();
            let length: usize = match bodiless.contains(&answers.len()) {
                true => 0,
                false => header_values(&head, "content-length")
                    .first()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
            };
            if buffer.len() >= end + 4 + length {
                let answer = String::from_utf8_lossy(&buffer[..end + 4 + length]).into_owned();
                buffer.drain(..end + 4 + length);
                answers.push(answer);
                continue;
            }
        }
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buffer.extend_from_slice(&chunk[..n]),
            other => panic!("after {} answers: {other:?}", answers.len()),
        }
    }
    answers
}

/// One connection carrying what the server's own HTTP/1.1 path takes (GET, HEAD) and what it
/// hands to hyper (a body), pipelined in one write: answered in order, each reaching the
/// instance as sent; a head left unfinished after a request is cut at the header read
/// timeout, not the idle timeout; `Connection: close` closes after its answer; an idle
/// keep-alive connection is closed at the header read timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_mixed_requests_slow_heads_and_close_on_one_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let consul = Consul::start().await;
    let backend = RawBackend::start(Duration::ZERO).await;
    let gateway = gateway_over(
        &consul,
        "  header_read_timeout: 1s\n  idle_timeout: 30s\nservices:\n  - name: web\n",
        &[("web", "web-1", backend.port)],
    )
    .await;
    let mut stream = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    let batch = [
        "GET /web/1 HTTP/1.1\r\nhost: a\r\n\r\n",
        "GET /web/2 HTTP/1.1\r\nhost: a\r\n\r\n",
        "HEAD /web/3 HTTP/1.1\r\nhost: a\r\n\r\n",
        "POST /web/4 HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\n\r\nhello",
        "GET /web/5 HTTP/1.1\r\nhost: a\r\n\r\n",
    ]
    .concat();
    stream.write_all(batch.as_bytes()).await.unwrap();
    let answers = read_answers(&mut stream, 5, &[2]).await;
    for (i, answer) in answers.iter().enumerate() {
        assert_eq!(status(answer), 200, "answer {i}: {answer}");
        assert!(answer.contains("x-instance: raw"), "answer {i}: {answer}");
        assert_eq!(answer.ends_with("ok"), i != 2, "answer {i}: {answer}");
    }
    let lines: Vec<String> = backend
        .heads()
        .iter()
        .map(|head| head.lines().next().unwrap_or_default().to_owned())
        .collect();
    let expected = [
        "GET /web/1",
        "GET /web/2",
        "HEAD /web/3",
        "POST /web/4",
        "GET /web/5",
    ];
    assert_eq!(lines.len(), expected.len(), "{lines:?}");
    for (line, expected) in lines.iter().zip(expected) {
        assert!(line.starts_with(expected), "{line} for {expected}");
    }

    // After a request, a head that never ends is cut at the header read timeout (1 s), long
    // before the idle timeout (30 s).
    let mut stream = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    stream
        .write_all(b"GET /web/6 HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    let answer = read_answers(&mut stream, 1, &[]).await;
    assert_eq!(status(&answer[0]), 200);
    stream
        .write_all(b"GET /web/6 HTTP/1.1\r\nho")
        .await
        .unwrap();
    let closed = closed_after(stream, Duration::from_secs(10)).await;
    println!("unfinished second head: closed after {closed:?}");
    let closed = closed.expect("an unfinished head is cut");
    assert!(closed >= Duration::from_millis(900) && closed < Duration::from_secs(5));

    let mut stream = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    stream
        .write_all(b"GET /web/7 HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut answer));
    assert!(read.await.is_ok(), "closed after the answer");
    assert_eq!(status(&answer), 200, "{answer}");
    assert!(answer.contains("connection: close\r\n"), "{answer}");
    assert!(answer.ends_with("ok"), "{answer}");

    // An HTTP/1.1 connection idle after its answer is closed by the header read timeout
    // (1 s, checked every second: within 1-2 s), not the idle timeout (30 s), as hyper did.
    let mut stream = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    stream
        .write_all(b"GET /web/8 HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(status(&read_answers(&mut stream, 1, &[]).await[0]), 200);
    let closed = closed_after(stream, Duration::from_secs(10)).await;
    println!("idle after one answer: closed after {closed:?}");
    let closed = closed.expect("an idle keep-alive connection is closed");
    assert!(closed >= Duration::from_millis(900) && closed < Duration::from_secs(5));
}
