//! Test harness: a real `consul agent -dev` on free loopback ports, in-process backends that
//! report which instance answered, and an in-process gateway. Everything started here is
//! stopped on drop.
#![allow(dead_code)] // each test binary uses a different part of the harness

use std::collections::HashMap;
use std::future::Future;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use switchyard::config::{Config, ConsulEnv};
use switchyard::Shutdown;

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    StdTcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding an ephemeral port")
}

/// Polls `condition` every 10 ms until it holds or `timeout` passes. Returns the time it
/// took, or `None` on timeout. For waiting on another process, where no event can be awaited.
pub async fn wait_until<F, Fut>(timeout: Duration, mut condition: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if condition().await {
            return Some(start.elapsed());
        }
        if start.elapsed() > timeout {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("building an HTTP client")
}

// ---------------------------------------------------------------------------------------------
// Consul

/// A `consul agent -dev` on free loopback ports; killed on drop.
pub struct Consul {
    child: Option<Child>,
    ports: [u16; 4],
    pub http_port: u16,
    log: PathBuf,
    client: reqwest::Client,
}

impl Consul {
    pub async fn start() -> Consul {
        let ports = [free_port(), free_port(), free_port(), free_port()];
        let http_port = free_port();
        let log = std::env::temp_dir().join(format!("switchyard-test-consul-{http_port}.log"));
        let mut consul = Consul {
            child: None,
            ports,
            http_port,
            log,
            client: http_client(),
        };
        consul.spawn().await;
        consul
    }

    async fn spawn(&mut self) {
        let [serf_lan, serf_wan, server, _] = self.ports;
        let log = std::fs::File::create(&self.log).expect("creating the consul log file");
        let child = Command::new("consul")
            .args([
                "agent",
                "-dev",
                "-bind",
                "127.0.0.1",
                "-client",
                "127.0.0.1",
            ])
            .args(["-http-port", &self.http_port.to_string()])
            .args(["-dns-port", "-1", "-grpc-port", "-1"])
            .args(["-serf-lan-port", &serf_lan.to_string()])
            .args(["-serf-wan-port", &serf_wan.to_string()])
            .args(["-server-port", &server.to_string()])
            .args(["-node", &format!("test-{}", self.http_port)])
            .stdout(Stdio::from(log.try_clone().expect("cloning a file handle")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("starting `consul` (not on PATH? run scripts/install-consul.sh)");
        self.child = Some(child);
        let url = format!("{}/v1/status/leader", self.url());
        let client = self.client.clone();
        let ready = wait_until(Duration::from_secs(30), || {
            let (client, url) = (client.clone(), url.clone());
            async move {
                match client.get(&url).send().await {
                    Ok(r) => r.text().await.map(|t| t.len() > 2).unwrap_or(false),
                    Err(_) => false,
                }
            }
        })
        .await;
        assert!(
            ready.is_some(),
            "consul did not elect a leader; see {}",
            self.log.display()
        );
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// Kills the agent (a crash, not a clean leave).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a fresh dev agent on the same ports (dev agents keep no state).
    pub async fn restart(&mut self) {
        self.stop();
        self.spawn().await;
    }

    pub async fn register(&self, service: &str, id: &str, port: u16, tags: &[&str]) {
        self.register_json(json!({
            "ID": id, "Name": service, "Address": "127.0.0.1", "Port": port, "Tags": tags,
        }))
        .await;
    }

    /// Registers with a TTL check that starts passing; `fail_check` turns it critical.
    pub async fn register_with_ttl(&self, service: &str, id: &str, port: u16) {
        self.register_json(json!({
            "ID": id, "Name": service, "Address": "127.0.0.1", "Port": port,
            "Check": {"CheckID": format!("ttl-{id}"), "TTL": "10m", "Status": "passing"},
        }))
        .await;
    }

    async fn register_json(&self, body: Value) {
        let response = self
            .client
            .put(format!("{}/v1/agent/service/register", self.url()))
            .json(&body)
            .send()
            .await
            .expect("registering in consul");
        assert!(
            response.status().is_success(),
            "register: {}",
            response.status()
        );
    }

    pub async fn deregister(&self, id: &str) {
        let response = self
            .client
            .put(format!("{}/v1/agent/service/deregister/{id}", self.url()))
            .send()
            .await
            .expect("deregistering in consul");
        assert!(
            response.status().is_success(),
            "deregister: {}",
            response.status()
        );
    }

    pub async fn fail_check(&self, id: &str) {
        let response = self
            .client
            .put(format!("{}/v1/agent/check/fail/ttl-{id}", self.url()))
            .send()
            .await
            .expect("failing a check");
        assert!(
            response.status().is_success(),
            "check fail: {}",
            response.status()
        );
    }
}

impl Drop for Consul {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(&self.log);
    }
}

// ---------------------------------------------------------------------------------------------
// Backends

/// How a test backend answers.
#[derive(Debug, Clone, Copy)]
pub enum Behavior {
    /// 200 with its ID in `x-instance` and the body.
    Ok,
    /// The given status, after reading the request.
    Status(u16),
    /// Reads the request head, then closes the connection without answering.
    DropAfterRead,
    /// 200 after the given delay.
    Delay(Duration),
}

/// An in-process HTTP backend that counts requests; stopped on drop.
pub struct Backend {
    pub id: String,
    pub port: u16,
    pub hits: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Backend {
    pub async fn start(id: &str, behavior: Behavior) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding a backend");
        let port = listener.local_addr().expect("backend address").port();
        let hits = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(serve_backend(
            listener,
            id.to_owned(),
            behavior,
            hits.clone(),
        ));
        Backend {
            id: id.to_owned(),
            port,
            hits,
            task,
        }
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_backend(
    listener: TcpListener,
    id: String,
    behavior: Behavior,
    hits: Arc<AtomicUsize>,
) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let (id, hits) = (id.clone(), hits.clone());
        tokio::spawn(async move {
            if let Behavior::DropAfterRead = behavior {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                hits.fetch_add(1, Ordering::SeqCst);
                return; // dropping the stream closes it unanswered
            }
            let service = service_fn(move |request: Request<Incoming>| {
                let (id, hits) = (id.clone(), hits.clone());
                async move {
                    hits.fetch_add(1, Ordering::SeqCst);
                    let echo = format!(
                        "{} {} host={} xff={}",
                        request.method(),
                        request.uri(),
                        header(&request, "host"),
                        header(&request, "x-forwarded-for"),
                    );
                    let _ = request.into_body().collect().await;
                    let status = match behavior {
                        Behavior::Status(code) => {
                            StatusCode::from_u16(code).unwrap_or(StatusCode::OK)
                        }
                        Behavior::Delay(delay) => {
                            tokio::time::sleep(delay).await;
                            StatusCode::OK
                        }
                        _ => StatusCode::OK,
                    };
                    let response = Response::builder()
                        .status(status)
                        .header("x-instance", id.as_str())
                        .header("x-echo", echo)
                        .body(Full::new(Bytes::from(id)))
                        .expect("a valid response");
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            let _ = Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn header(request: &Request<Incoming>, name: &str) -> String {
    request
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned()
}

// ---------------------------------------------------------------------------------------------
// Gateway

/// switchyard running in this process on free ports; shut down on drop.
pub struct Gateway {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub shutdown: Shutdown,
    pub task: Option<JoinHandle<()>>,
    client: reqwest::Client,
}

impl Gateway {
    /// Starts a gateway from YAML pointing at `consul` (the YAML's `consul.address` is set).
    pub async fn start(consul: &Consul, services_yaml: &str) -> Gateway {
        let yaml = format!(
            "consul:\n  address: {}\n  wait: 30s\n  backoff_base: 50ms\n  backoff_max: 500ms\nserver:\n  shutdown_grace: 5s\n{services_yaml}",
            consul.url()
        );
        Self::start_config(
            Config::from_yaml(&yaml, &ConsulEnv::default()).expect("valid test config"),
        )
        .await
    }

    pub async fn start_config(mut config: Config) -> Gateway {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the gateway");
        let admin_listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding admin");
        config.listen = listener.local_addr().expect("gateway address");
        config.admin_listen = admin_listener.local_addr().expect("admin address");
        let (addr, admin) = (config.listen, config.admin_listen);
        let shutdown = Shutdown::new();
        let task = tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                switchyard::run(config, listener, admin_listener, shutdown)
                    .await
                    .expect("gateway run");
            }
        });
        Gateway {
            addr,
            admin,
            shutdown,
            task: Some(task),
            client: http_client(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .send()
            .await
            .expect("GET through the gateway")
    }

    /// The instance IDs in `service`'s current table, from `/routes`.
    pub async fn instances(&self, service: &str) -> Vec<String> {
        let routes: Value = self
            .client
            .get(self.admin_url("/routes"))
            .send()
            .await
            .expect("GET /routes")
            .json()
            .await
            .expect("/routes is JSON");
        routes["services"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["service"] == service)
            .flat_map(|s| s["instances"].as_array().cloned().unwrap_or_default())
            .filter_map(|i| i["id"].as_str().map(str::to_owned))
            .collect()
    }

    /// Waits until `service`'s table holds exactly `ids` (in any order); returns how long.
    pub async fn wait_for_instances(
        &self,
        service: &str,
        ids: &[&str],
        timeout: Duration,
    ) -> Option<Duration> {
        let mut want: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
        want.sort();
        wait_until(timeout, || {
            let want = want.clone();
            async move {
                let mut have = self.instances(service).await;
                have.sort();
                have == want
            }
        })
        .await
    }

    /// Sends `count` GETs to `path`; returns hits per `x-instance` and the non-2xx statuses.
    pub async fn spread(&self, path: &str, count: usize) -> (HashMap<String, usize>, Vec<u16>) {
        let mut hits = HashMap::new();
        let mut failures = Vec::new();
        for _ in 0..count {
            let response = self.get(path).await;
            if !response.status().is_success() {
                failures.push(response.status().as_u16());
                continue;
            }
            let instance = response
                .headers()
                .get("x-instance")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("?")
                .to_owned();
            *hits.entry(instance).or_insert(0) += 1;
        }
        (hits, failures)
    }

    /// Cancels and waits for `run` to return.
    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
