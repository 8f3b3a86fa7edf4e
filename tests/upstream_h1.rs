//! The gateway's own HTTP/1.1 client (src/gateway/h1) against a scripted instance that
//! answers each path with exact bytes: every framing of RFC 9112 §6.3, 1xx answers, broken
//! and cut answers, an instance closing idle connections, chunked uploads, answers that come
//! before an upload ends, the idle sweep, and an upgrade whose instance speaks first. No
//! registry: the instance is a static one.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{free_port, wait_until, Gateway};
use switchyard::config::{Config, ConsulEnv};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the instance does after an answer.
enum Then {
    KeepOpen,
    Close,
    /// Holds the connection without reading, then closes it.
    HoldAndClose(Duration),
    /// Echoes raw bytes until the peer closes (an upgraded connection).
    Echo,
}

/// The answer to `method path` with request body `body`.
fn script(method: &str, path: &str, body: &[u8]) -> (Vec<u8>, Then) {
    let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec();
    match (method, path) {
        ("HEAD", _) => (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n".to_vec(), Then::KeepOpen),
        (_, "/chunked") => (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n6\r\n world\r\n0\r\nTrailer-A: 1\r\n\r\n".to_vec(),
            Then::KeepOpen,
        ),
        (_, "/until-close") => (b"HTTP/1.1 200 OK\r\n\r\nuntil close".to_vec(), Then::Close),
        (_, "/early-hints") => (
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(),
            Then::KeepOpen,
        ),
        (_, "/garbage") => (b"NOT HTTP AT ALL\r\n\r\n".to_vec(), Then::Close),
        (_, "/cut") => (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort".to_vec(), Then::Close),
        // The instance's own keep-alive timeout, shorter than the gateway's.
        (_, "/closes-when-idle") => (ok, Then::HoldAndClose(Duration::from_millis(50))),
        (_, "/echo") => {
            let mut answer = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
            answer.extend_from_slice(body);
            (answer, Then::KeepOpen)
        }
        (_, "/upgrade") => (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: upgrade\r\n\r\nEARLY".to_vec(),
            Then::Echo,
        ),
        _ => (ok, Then::KeepOpen),
    }
}

/// The scripted instance: counts connections, the closes it saw from the gateway, and keeps
/// every request head.
#[derive(Clone, Default)]
struct Instance {
    connections: Arc<AtomicUsize>,
    closed_by_gateway: Arc<AtomicUsize>,
    closed_by_instance: Arc<AtomicUsize>,
    heads: Arc<Mutex<Vec<String>>>,
}

impl Instance {
    async fn start() -> (Instance, u16) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let instance = Instance::default();
        let serving = instance.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                serving.connections.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serving.clone().serve(stream));
            }
        });
        (instance, port)
    }

    async fn serve(self, mut stream: TcpStream) {
        let mut buf = Vec::new();
        loop {
            let Some(end) = read_until(&mut stream, &mut buf, b"\r\n\r\n").await else {
                self.closed_by_gateway.fetch_add(1, Ordering::SeqCst);
                return;
            };
            let head = String::from_utf8_lossy(&buf[..end + 4]).into_owned();
            buf.drain(..end + 4);
            let mut words = head.split(' ');
            let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
            let (method, path) = (method.to_owned(), path.to_owned());
            self.heads.lock().unwrap().push(head.clone());
            if path == "/upload" {
                // Refuses at once, reads nothing of the body.
                let refusal = b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
                let _ = stream.write_all(refusal).await;
                tokio::time::sleep(Duration::from_secs(60)).await;
                return;
            }
            let Some(body) = read_body(&mut stream, &mut buf, &head).await else {
                return;
            };
            let (answer, then) = script(&method, &path, &body);
            if stream.write_all(&answer).await.is_err() {
                return;
            }
            match then {
                Then::KeepOpen => {}
                Then::Close => return self.close(),
                Then::HoldAndClose(pause) => {
                    tokio::time::sleep(pause).await;
                    return self.close();
                }
                Then::Echo => return echo(stream).await,
            }
        }
    }

    fn close(&self) {
        self.closed_by_instance.fetch_add(1, Ordering::SeqCst);
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// Reads until `pattern`; where it starts, or `None` at the peer's close.
async fn read_until(stream: &mut TcpStream, buf: &mut Vec<u8>, pattern: &[u8]) -> Option<usize> {
    loop {
        if let Some(at) = buf.windows(pattern.len()).position(|w| w == pattern) {
            return Some(at);
        }
        let mut chunk = [0u8; 8192];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// The request body, by `Content-Length` or chunked (decoded).
async fn read_body(stream: &mut TcpStream, buf: &mut Vec<u8>, head: &str) -> Option<Vec<u8>> {
    let lower = head.to_ascii_lowercase();
    if lower.contains("transfer-encoding: chunked") {
        let mut body = Vec::new();
        loop {
            let end = read_until(stream, buf, b"\r\n").await?;
            let size = usize::from_str_radix(std::str::from_utf8(&buf[..end]).ok()?, 16).ok()?;
            buf.drain(..end + 2);
            while buf.len() < size + 2 {
                let mut chunk = [0u8; 8192];
                let n = stream.read(&mut chunk).await.ok().filter(|&n| n > 0)?;
                buf.extend_from_slice(&chunk[..n]);
            }
            body.extend_from_slice(&buf[..size]);
            buf.drain(..size + 2);
            if size == 0 {
                return Some(body);
            }
        }
    }
    let length = lower
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    while buf.len() < length {
        let mut chunk = [0u8; 8192];
        let n = stream.read(&mut chunk).await.ok().filter(|&n| n > 0)?;
        buf.extend_from_slice(&chunk[..n]);
    }
    Some(buf.drain(..length).collect())
}

async fn echo(mut stream: TcpStream) {
    let mut chunk = [0u8; 1024];
    while let Ok(n) = stream.read(&mut chunk).await {
        if n == 0 || stream.write_all(&chunk[..n]).await.is_err() {
            return;
        }
    }
}

/// A gateway in front of `port` alone (a static instance); `extra_yaml` adds top-level keys.
async fn gateway(port: u16, extra_yaml: &str) -> Gateway {
    let yaml = format!(
        "consul:\n  address: [http://127.0.0.1:{}]\n{extra_yaml}services:\n  - name: web\n    source: static\n    instances: [\"127.0.0.1:{port}\"]\n    route: {{path_prefix: /}}\n",
        free_port()
    );
    let config = Config::from_yaml(&yaml, &ConsulEnv::default()).unwrap();
    let gateway = Gateway::start_config(config).await;
    let id = format!("127.0.0.1:{port}");
    assert!(gateway
        .wait_for_instances("web", &[id.as_str()], Duration::from_secs(5))
        .await
        .is_some());
    gateway
}

async fn text(gateway: &Gateway, path: &str) -> (u16, String) {
    let response = gateway.get(path).await;
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_framed_every_way_reach_the_client_and_keep_their_connection() {
    let (instance, port) = Instance::start().await;
    let gateway = gateway(port, "").await;
    assert_eq!(
        text(&gateway, "/chunked").await,
        (200, "hello world".into())
    );
    assert_eq!(text(&gateway, "/early-hints").await, (200, "ok".into()));
    let head = common::http_client()
        .head(gateway.url("/h"))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-length"], "10");
    assert_eq!(text(&gateway, "/").await, (200, "ok".into()));
    assert_eq!(
        instance.connections(),
        1,
        "chunked, 103, HEAD and sized answers reuse one"
    );
    assert_eq!(
        text(&gateway, "/until-close").await,
        (200, "until close".into())
    );
    assert_eq!(text(&gateway, "/").await, (200, "ok".into()));
    assert_eq!(
        instance.connections(),
        2,
        "an answer delimited by close ends its connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_and_cut_answers_fail_alone() {
    let (instance, port) = Instance::start().await;
    let gateway = gateway(port, "").await;
    assert_eq!(text(&gateway, "/garbage").await.0, 502);
    // Cut at 5 of 100 bytes: the client's connection is cut too, before or after the head.
    match common::http_client().get(gateway.url("/cut")).send().await {
        Err(error) => assert!(error.is_request(), "{error}"),
        Ok(cut) => assert!(cut.bytes().await.is_err(), "a cut body arrived whole"),
    }
    assert_eq!(text(&gateway, "/").await, (200, "ok".into()));
    // Each broken answer closed its connection (GETs of /garbage are retried, here on the
    // only instance): one connection per request.
    let heads = instance.heads.lock().unwrap().len();
    assert_eq!(instance.connections(), heads);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_instance_closed_while_idle_costs_no_request() {
    let (instance, port) = Instance::start().await;
    let gateway = gateway(port, "").await;
    assert_eq!(
        text(&gateway, "/closes-when-idle").await,
        (200, "ok".into())
    );
    let closed = || async { instance.closed_by_instance.load(Ordering::SeqCst) == 1 };
    assert!(wait_until(Duration::from_secs(5), closed).await.is_some());
    for _ in 0..20 {
        assert_eq!(text(&gateway, "/").await, (200, "ok".into()));
    }
    assert_eq!(instance.connections(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_uploads_go_out_chunked_and_an_early_answer_ends_an_upload() {
    let (instance, port) = Instance::start().await;
    let gateway = gateway(port, "server:\n  max_body_bytes: 33554432\n").await;
    let mut client = TcpStream::connect(gateway.addr).await.unwrap();
    let upload = b"POST /echo HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n3\r\nefg\r\n0\r\n\r\n";
    client.write_all(upload).await.unwrap();
    let mut answer = Vec::new();
    let end = read_until(&mut client, &mut answer, b"\r\n\r\n")
        .await
        .unwrap();
    let head = String::from_utf8_lossy(&answer[..end + 4]).into_owned();
    answer.drain(..end + 4);
    let body = read_body(&mut client, &mut answer, &head).await.unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, b"abcdefg");
    let sent = instance.heads.lock().unwrap().last().cloned().unwrap();
    assert!(sent.contains("transfer-encoding: chunked"), "{sent}");

    // 24 MiB, streamed (more than the replay buffer) and more than loopback's socket buffers
    // hold: the instance answers 413 at once, reads none of it and holds the connection
    // past the request's deadline, so only an answer read while the upload is blocked gets
    // through.
    // (A raw client: one that stops at its own write error, as hyper's does, may not read
    // the answer once the gateway closes the connection behind it.)
    let (mut from_gateway, mut to_gateway) =
        TcpStream::connect(gateway.addr).await.unwrap().into_split();
    let length = 24 << 20;
    tokio::spawn(async move {
        let head =
            format!("POST /upload HTTP/1.1\r\nHost: web\r\nContent-Length: {length}\r\n\r\n");
        to_gateway.write_all(head.as_bytes()).await?;
        to_gateway.write_all(&vec![b'x'; length]).await
    });
    let mut answer = Vec::new();
    loop {
        let mut chunk = [0u8; 1024];
        let n = from_gateway.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed without an answer");
        answer.extend_from_slice(&chunk[..n]);
        if answer.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    assert!(
        answer.starts_with(b"HTTP/1.1 413"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    assert_eq!(text(&gateway, "/").await, (200, "ok".into()));
    assert_eq!(
        instance.connections(),
        2,
        "the cut upload's connection is not reused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_close_after_pool_idle_timeout() {
    let (instance, port) = Instance::start().await;
    let gateway = gateway(port, "upstream:\n  pool_idle_timeout: 200ms\n").await;
    assert_eq!(text(&gateway, "/").await, (200, "ok".into()));
    let closed = || async { instance.closed_by_gateway.load(Ordering::SeqCst) == 1 };
    let took = wait_until(Duration::from_secs(5), closed).await;
    assert!(took.is_some(), "the idle connection was never closed");
    assert!(took.unwrap() >= Duration::from_millis(150), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_carries_what_the_instance_sent_with_its_101() {
    let (_instance, port) = Instance::start().await;
    let gateway = gateway(port, "").await;
    let mut client = TcpStream::connect(gateway.addr).await.unwrap();
    let ask = b"GET /upgrade HTTP/1.1\r\nHost: web\r\nUpgrade: echo\r\nConnection: upgrade\r\n\r\n";
    client.write_all(ask).await.unwrap();
    let mut got = Vec::new();
    let end = read_until(&mut client, &mut got, b"\r\n\r\n")
        .await
        .unwrap();
    assert!(
        got.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    got.drain(..end + 4);
    while got.len() < 5 {
        let mut chunk = [0u8; 64];
        let n = client.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed before the instance's first bytes");
        got.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(got, b"EARLY");
    client.write_all(b"ping").await.unwrap();
    let mut pong = [0u8; 4];
    client.read_exact(&mut pong).await.unwrap();
    assert_eq!(&pong, b"ping");
}
