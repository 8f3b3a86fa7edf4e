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
use hyper_util::server::graceful::GracefulShutdown;
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use switchyard::config::{CertificateConfig, Config, ConsulEnv};
use switchyard::Shutdown;

pub mod etcd;
pub mod pki;
pub mod raw;
pub mod sources;
pub mod zookeeper;

/// Sends the in-process gateway's log (tracing) to the test's output, which nextest shows
/// when the test fails; `RUST_LOG` filters it (default `switchyard=info`). Once per process.
pub fn log_to_test_output() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("switchyard=info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    StdTcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding an ephemeral port")
}

/// Polls `find` every 50 ms until it finds something (a cluster's leader), or `timeout` passes.
pub async fn poll_some<T, F, Fut>(timeout: Duration, mut find: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    while start.elapsed() < timeout {
        if let Some(found) = find().await {
            return Some(found);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// Kills a test's server process at once (SIGKILL, a crash) and reaps it.
pub fn kill_child(child: &mut Option<Child>) {
    if let Some(mut child) = child.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
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
    http_client_builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("building an HTTP client")
}

/// A reqwest builder without proxies (reqwest's rustls gets the gateway's *aws-lc-rs* provider).
pub fn http_client_builder() -> reqwest::ClientBuilder {
    switchyard::tls::install_default_provider();
    reqwest::Client::builder().no_proxy()
}

/// The value of one series (exactly as written, labels included) in Prometheus text; 0 if absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Starts `count` healthy backends named `<prefix>-1`, `<prefix>-2`, ...
pub async fn backends(prefix: &str, count: usize) -> Vec<Backend> {
    let mut backends = Vec::with_capacity(count);
    for n in 1..=count {
        backends.push(Backend::start(&format!("{prefix}-{n}"), Behavior::Ok).await);
    }
    backends
}

// ---------------------------------------------------------------------------------------------
// Consul

/// A `consul agent -dev` on free loopback ports; killed on drop.
pub struct Consul {
    child: Option<Child>,
    ports: [u16; 4],
    pub http_port: u16,
    /// Consul's DNS interface (UDP and TCP), which answers SRV for `<name>.service.consul`.
    pub dns_port: u16,
    log: PathBuf,
    client: reqwest::Client,
    /// Extra agent configuration (JSON; `{https_port}` is replaced), e.g. TLS.
    extra_config: Option<String>,
    /// Extra agent configuration in HCL, passed as `-hcl` (e.g. raised `limits`).
    hcl: Option<String>,
}

impl Consul {
    /// Starts an agent on free ports. A port picked free can be taken (by another test's
    /// agent or an outgoing connection) before consul binds it; then consul exits at once, and
    /// the start is retried on new ports.
    pub async fn start() -> Consul {
        Self::start_with_config(None, None).await
    }

    /// Starts an agent with extra configuration in HCL (`consul agent -hcl`), e.g.
    /// `limits { http_max_conns_per_client = 4096 }`; an empty `hcl` adds nothing.
    pub async fn start_with_hcl(hcl: &str) -> Consul {
        let hcl = Some(hcl.trim().to_owned()).filter(|h| !h.is_empty());
        Self::start_with_config(None, hcl).await
    }

    /// Starts an agent that also serves HTTPS (at [`Consul::https_url`]) with `cert`, and
    /// there requires client certificates signed by `ca_file` (`verify_incoming_https`).
    pub async fn start_tls(ca_file: &std::path::Path, cert: &CertificateConfig) -> Consul {
        Self::start_tls_with_hcl(ca_file, cert, "").await
    }

    /// [`Consul::start_tls`] with extra configuration in HCL, as [`Consul::start_with_hcl`].
    pub async fn start_tls_with_hcl(
        ca_file: &std::path::Path,
        cert: &CertificateConfig,
        hcl: &str,
    ) -> Consul {
        let config = json!({
            "ports": {"https": "{https_port}"},
            "ca_file": ca_file,
            "cert_file": cert.cert_file,
            "key_file": cert.key_file,
            "verify_incoming_https": true,
        });
        // Consul wants the port as a number.
        let text = config
            .to_string()
            .replace("\"{https_port}\"", "{https_port}");
        let hcl = Some(hcl.trim().to_owned()).filter(|h| !h.is_empty());
        Self::start_with_config(Some(text), hcl).await
    }

    pub fn https_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.https_port())
    }

    /// The HTTPS port (served only by an agent started with TLS).
    pub fn https_port(&self) -> u16 {
        self.ports[3]
    }

    async fn start_with_config(extra_config: Option<String>, hcl: Option<String>) -> Consul {
        let mut last_log = String::new();
        for _ in 0..3 {
            let http_port = free_port();
            let mut consul = Consul {
                child: None,
                ports: [free_port(), free_port(), free_port(), free_port()],
                http_port,
                dns_port: free_port(),
                log: std::env::temp_dir().join(format!("switchyard-test-consul-{http_port}.log")),
                client: http_client(),
                extra_config: extra_config.clone(),
                hcl: hcl.clone(),
            };
            if consul.try_spawn().await {
                return consul;
            }
            last_log = std::fs::read_to_string(&consul.log).unwrap_or_default();
        }
        let tail: Vec<&str> = last_log.lines().rev().take(15).collect();
        panic!(
            "consul did not elect a leader in 3 tries; last log lines:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }

    /// Starts the agent on this instance's ports; panics if it does not come up (a restart
    /// must keep its ports).
    async fn spawn(&mut self) {
        if !self.try_spawn().await {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            panic!("consul did not come back on its ports; its log:\n{log}");
        }
    }

    /// Starts the agent and waits for a leader; false (agent stopped) if it exited or did not
    /// elect one in time.
    async fn try_spawn(&mut self) -> bool {
        let [serf_lan, serf_wan, server, https] = self.ports;
        let log = std::fs::File::create(&self.log).expect("creating the consul log file");
        let mut extra = Vec::new();
        if let Some(config) = &self.extra_config {
            let path = self.log.with_extension("json");
            let text = config.replace("{https_port}", &https.to_string());
            std::fs::write(&path, text).expect("writing the consul config");
            extra = vec!["-config-file".to_owned(), path.display().to_string()];
        }
        if let Some(hcl) = &self.hcl {
            extra.extend(["-hcl".to_owned(), hcl.clone()]);
        }
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
            .args(["-dns-port", &self.dns_port.to_string(), "-grpc-port", "-1"])
            .args(["-serf-lan-port", &serf_lan.to_string()])
            .args(["-serf-wan-port", &serf_wan.to_string()])
            .args(["-server-port", &server.to_string()])
            .args(["-node", &format!("test-{}", self.http_port)])
            .args(&extra)
            .stdout(Stdio::from(log.try_clone().expect("cloning a file handle")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("starting `consul` (not on PATH? run scripts/install-consul.sh)");
        self.child = Some(child);
        let url = format!("{}/v1/status/leader", self.url());
        let client = self.client.clone();
        let child = std::cell::RefCell::new(self.child.take());
        let ready = wait_until(Duration::from_secs(20), || {
            let (client, url) = (client.clone(), url.clone());
            // An agent that exited (a port taken) will never answer: give up at once.
            let exited = child
                .borrow_mut()
                .as_mut()
                .is_none_or(|c| c.try_wait().ok().flatten().is_some());
            async move {
                if exited {
                    return true;
                }
                match client.get(&url).send().await {
                    Ok(r) => r.text().await.map(|t| t.len() > 2).unwrap_or(false),
                    Err(_) => false,
                }
            }
        })
        .await;
        self.child = child.into_inner();
        let exited = self
            .child
            .as_mut()
            .is_none_or(|c| c.try_wait().ok().flatten().is_some());
        if ready.is_some() && !exited {
            return true;
        }
        self.stop();
        false
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// The DNS interface's address, as `dns.servers` takes it.
    pub fn dns_addr(&self) -> String {
        format!("127.0.0.1:{}", self.dns_port)
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

    /// Registers with Consul's `Weights.Passing` set to `weight`.
    pub async fn register_weighted(
        &self,
        service: &str,
        id: &str,
        port: u16,
        tags: &[&str],
        weight: u32,
    ) {
        self.register_json(json!({
            "ID": id, "Name": service, "Address": "127.0.0.1", "Port": port, "Tags": tags,
            "Weights": {"Passing": weight, "Warning": 1},
        }))
        .await;
    }

    /// Writes `value` at `key` in Consul KV.
    pub async fn kv_put(&self, key: &str, value: &str) {
        let url = format!("{}/v1/kv/{}", self.url(), key.trim_start_matches('/'));
        let response = self.client.put(url).body(value.to_owned()).send().await;
        assert!(response
            .expect("calling the consul agent")
            .status()
            .is_success());
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
        self.agent_put("/v1/agent/service/register", Some(body))
            .await;
    }

    pub async fn deregister(&self, id: &str) {
        self.agent_put(&format!("/v1/agent/service/deregister/{id}"), None)
            .await;
    }

    pub async fn fail_check(&self, id: &str) {
        self.agent_put(&format!("/v1/agent/check/fail/ttl-{id}"), None)
            .await;
    }

    /// A PUT on the agent's API that must succeed.
    async fn agent_put(&self, path: &str, body: Option<Value>) {
        let mut request = self.client.put(format!("{}{path}", self.url()));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("calling the consul agent");
        assert!(
            response.status().is_success(),
            "PUT {path}: {}",
            response.status()
        );
    }
}

/// A Consul agent, one backend `web-1` registered as `web`, and a gateway routing `/web` to
/// it, ready (the instance is in the table).
pub async fn single_backend_gateway() -> (Consul, Backend, Gateway) {
    let consul = Consul::start().await;
    let backend = Backend::start("web-1", Behavior::Ok).await;
    consul.register("web", "web-1", backend.port, &[]).await;
    let gateway = Gateway::start(&consul, "services:\n  - name: web\n").await;
    assert!(gateway
        .wait_for_instances("web", &["web-1"], Duration::from_secs(10))
        .await
        .is_some());
    (consul, backend, gateway)
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
    behavior: Behavior,
    /// Stop accepting, let in-flight requests finish.
    stop: CancellationToken,
    /// Drop every connection at once, like a crashed process.
    kill: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Backend {
    pub async fn start(id: &str, behavior: Behavior) -> Backend {
        Self::start_on(id, behavior, 0).await
    }

    /// Starts on `port` (0: any free one), e.g. to come back where a stopped one was.
    pub async fn start_on(id: &str, behavior: Behavior, port: u16) -> Backend {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("binding a backend");
        let port = listener.local_addr().expect("backend address").port();
        let hits = Arc::new(AtomicUsize::new(0));
        let (stop, kill) = (CancellationToken::new(), CancellationToken::new());
        let task = tokio::spawn(serve_backend(
            listener,
            id.to_owned(),
            behavior,
            hits.clone(),
            stop.clone(),
            kill.clone(),
        ));
        Backend {
            id: id.to_owned(),
            port,
            hits,
            behavior,
            stop,
            kill,
            task: Some(task),
        }
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// Crash: the listener and every open connection go away at once.
    pub fn kill(&mut self) {
        self.kill.cancel();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    /// Deploy-style stop: refuse new connections, finish in-flight requests, then return.
    pub async fn stop_gracefully(&mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    /// A new process of the same instance on the same port.
    pub async fn restart(&mut self) {
        let fresh = Backend::start_on(&self.id, self.behavior, self.port).await;
        let old = std::mem::replace(self, fresh);
        drop(old);
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn serve_backend(
    listener: TcpListener,
    id: String,
    behavior: Behavior,
    hits: Arc<AtomicUsize>,
    stop: CancellationToken,
    kill: CancellationToken,
) {
    let graceful = GracefulShutdown::new();
    loop {
        let mut stream = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        let (id, hits, kill) = (id.clone(), hits.clone(), kill.clone());
        if let Behavior::DropAfterRead = behavior {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                hits.fetch_add(1, Ordering::SeqCst);
                // dropping the stream closes it unanswered
            });
            continue;
        }
        let service = service_fn(move |request: Request<Incoming>| {
            let (id, hits) = (id.clone(), hits.clone());
            async move {
                hits.fetch_add(1, Ordering::SeqCst);
                let echo = format!(
                    "{} {} host={} xff={} proto={}",
                    request.method(),
                    request.uri(),
                    header(&request, "host"),
                    header(&request, "x-forwarded-for"),
                    header(&request, "x-forwarded-proto"),
                );
                let _ = request.into_body().collect().await;
                let status = match behavior {
                    Behavior::Status(code) => StatusCode::from_u16(code).unwrap_or(StatusCode::OK),
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
        let connection = Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            tokio::select! {
                _ = connection => {}
                _ = kill.cancelled() => {}
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Load

/// What a load run saw.
#[derive(Debug, Default)]
pub struct LoadStats {
    pub ok: usize,
    pub failures: Vec<String>,
    pub latencies: Vec<Duration>,
    pub by_instance: HashMap<String, usize>,
}

impl LoadStats {
    pub fn total(&self) -> usize {
        self.ok + self.failures.len()
    }

    pub fn p99(&mut self) -> Duration {
        self.latencies.sort();
        let n = self.latencies.len();
        if n == 0 {
            return Duration::ZERO;
        }
        self.latencies[(n * 99 / 100).min(n - 1)]
    }

    /// Prints the figures of the run named `drill` and asserts it had no failure.
    pub fn expect_no_failures(&mut self, drill: &str) {
        println!("{drill}: {} {:?}", self.summary(), self.by_instance);
        assert!(
            self.failures.is_empty(),
            "{drill}: {:?}",
            &self.failures[..self.failures.len().min(10)]
        );
    }

    pub fn summary(&mut self) -> String {
        let p99 = self.p99();
        format!(
            "{} failed / {} total, p99 {:?}",
            self.failures.len(),
            self.total(),
            p99
        )
    }
}

/// `concurrency` loops of GETs against `url` until `finish`.
pub struct Load {
    stop: CancellationToken,
    tasks: Vec<JoinHandle<LoadStats>>,
}

impl Load {
    pub fn start(url: String, concurrency: usize) -> Load {
        let stop = CancellationToken::new();
        let client = http_client();
        let tasks = (0..concurrency)
            .map(|_| {
                let (stop, client, url) = (stop.clone(), client.clone(), url.clone());
                tokio::spawn(async move {
                    let mut stats = LoadStats::default();
                    while !stop.is_cancelled() {
                        let started = Instant::now();
                        match client.get(&url).send().await {
                            Ok(response) if response.status().is_success() => {
                                let instance = header_or(response.headers(), "x-instance", "?");
                                let _ = response.bytes().await;
                                stats.ok += 1;
                                *stats.by_instance.entry(instance).or_insert(0) += 1;
                            }
                            Ok(response) => {
                                let cause = header_or(response.headers(), "x-switchyard-error", "");
                                stats
                                    .failures
                                    .push(format!("{} {cause}", response.status()));
                            }
                            Err(error) => stats.failures.push(format!("transport: {error}")),
                        }
                        stats.latencies.push(started.elapsed());
                    }
                    stats
                })
            })
            .collect();
        Load { stop, tasks }
    }

    pub async fn finish(self) -> LoadStats {
        self.stop.cancel();
        let mut total = LoadStats::default();
        for task in self.tasks {
            let stats = task.await.expect("load task");
            total.ok += stats.ok;
            total.failures.extend(stats.failures);
            total.latencies.extend(stats.latencies);
            for (instance, n) in stats.by_instance {
                *total.by_instance.entry(instance).or_insert(0) += n;
            }
        }
        total
    }
}

fn header(request: &Request<Incoming>, name: &str) -> String {
    header_or(request.headers(), name, "-")
}

/// A header's text, or `default` when it is missing or not text.
pub fn header_or(headers: &hyper::HeaderMap, name: &str, default: &str) -> String {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or(default)
        .to_owned()
}

// ---------------------------------------------------------------------------------------------
// Gateway

/// switchyard running in this process on free ports; shut down on drop.
pub struct Gateway {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    /// The TLS listener, when the config has `tls`.
    pub tls: Option<SocketAddr>,
    pub shutdown: Shutdown,
    pub task: Option<JoinHandle<()>>,
    /// Sends a new config, as SIGHUP does in the binary.
    pub reload: tokio::sync::mpsc::Sender<Config>,
    /// The config it started with (its listen addresses are the real ones).
    pub config: Config,
    client: reqwest::Client,
}

impl Gateway {
    /// Starts a gateway from YAML pointing at `consul` (the YAML's `consul.address` is set).
    pub async fn start(consul: &Consul, services_yaml: &str) -> Gateway {
        Self::start_with(&[consul.url()], "", services_yaml).await
    }

    /// Starts a gateway watching `addresses`; `consul_extra` adds indented `consul:` keys and
    /// `rest_yaml` the top-level keys (`services:` at least).
    pub async fn start_with(addresses: &[String], consul_extra: &str, rest_yaml: &str) -> Gateway {
        let yaml = format!(
            "consul:\n  address: [{}]\n  wait: 30s\n  backoff_base: 50ms\n  backoff_max: 500ms\n{consul_extra}server:\n  shutdown_grace: 5s\n{rest_yaml}",
            addresses.join(", ")
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
        let tls_listener = match config.tls.as_mut() {
            Some(tls) => {
                let listener = TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("binding the TLS listener");
                tls.listen = listener.local_addr().expect("TLS address");
                Some(listener)
            }
            None => None,
        };
        let (addr, admin) = (config.listen, config.admin_listen);
        let tls = config.tls.as_ref().map(|tls| tls.listen);
        let shutdown = Shutdown::new();
        let (reload, reloads) = tokio::sync::mpsc::channel(4);
        let started_with = config.clone();
        let task = tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                let listeners = switchyard::Listeners {
                    gateway: listener,
                    admin: admin_listener,
                    tls: tls_listener,
                    workers: Vec::new(),
                };
                switchyard::run_listeners(config, listeners, shutdown, reloads)
                    .await
                    .expect("gateway run");
            }
        });
        Gateway {
            addr,
            admin,
            tls,
            shutdown,
            task: Some(task),
            reload,
            config: started_with,
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
        self.instance_entries(service)
            .await
            .iter()
            .filter_map(|i| i["id"].as_str().map(str::to_owned))
            .collect()
    }

    /// `service`'s instances as `/routes` shows them (id, address, ejection, ...).
    pub async fn instance_entries(&self, service: &str) -> Vec<Value> {
        let routes: Value =
            serde_json::from_str(&self.admin_get("/routes").await).expect("/routes is JSON");
        routes["services"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["service"] == service)
            .flat_map(|s| s["instances"].as_array().cloned().unwrap_or_default())
            .collect()
    }

    /// The body of an admin endpoint.
    pub async fn admin_get(&self, path: &str) -> String {
        self.client
            .get(self.admin_url(path))
            .send()
            .await
            .expect("GET on the admin listener")
            .text()
            .await
            .expect("an admin answer")
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
            let instance = header_or(response.headers(), "x-instance", "?");
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

// ---------------------------------------------------------------------------------------------
// A Consul cluster of real server agents with data directories (state survives restarts).

/// One `consul agent -server` of a [`ConsulCluster`].
pub struct ConsulServer {
    child: Option<Child>,
    pub node: String,
    pub http_port: u16,
    serf_lan: u16,
    serf_wan: u16,
    pub server_port: u16,
    data_dir: PathBuf,
}

impl ConsulServer {
    /// Server `i` of a cluster, on ports free now.
    fn on_free_ports(i: usize) -> ConsulServer {
        let http_port = free_port();
        ConsulServer {
            child: None,
            node: format!("server-{i}-{http_port}"),
            http_port,
            serf_lan: free_port(),
            serf_wan: free_port(),
            server_port: free_port(),
            data_dir: std::env::temp_dir().join(format!("switchyard-test-consul-data-{http_port}")),
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

/// `size` Consul servers on loopback ports that form one cluster; killed on drop.
pub struct ConsulCluster {
    pub servers: Vec<ConsulServer>,
    client: reqwest::Client,
}

impl ConsulCluster {
    /// Starts `size` servers and waits for their leader. A port that `free_port` saw free can
    /// be taken (by any process's outgoing connection) before a server binds it; that server
    /// then exits and, with `-bootstrap-expect`, no leader is ever elected (a full CI run saw
    /// it once). So a cluster without a leader after 30 s is stopped and started again on
    /// fresh ports, up to three times.
    pub async fn start(size: usize) -> ConsulCluster {
        for _ in 0..3 {
            let mut cluster = ConsulCluster {
                servers: (0..size).map(ConsulServer::on_free_ports).collect(),
                client: http_client(),
            };
            for i in 0..size {
                cluster.spawn(i);
            }
            if cluster
                .wait_for_leader(Duration::from_secs(30))
                .await
                .is_some()
            {
                return cluster;
            }
            eprintln!("the Consul cluster elected no leader in 30 s; starting it again");
        }
        panic!("the cluster elected no leader in three starts");
    }

    fn spawn(&mut self, i: usize) {
        let joins: Vec<String> = self
            .servers
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.serf_lan))
            .collect();
        let expect = self.servers.len().to_string();
        let server = &mut self.servers[i];
        std::fs::create_dir_all(&server.data_dir).expect("creating a consul data dir");
        let log = std::fs::File::create(server.data_dir.join("consul.log"))
            .expect("creating the consul log");
        let mut command = Command::new("consul");
        command
            .args([
                "agent",
                "-server",
                "-bootstrap-expect",
                &expect,
                "-node",
                &server.node,
            ])
            .args(["-bind", "127.0.0.1", "-client", "127.0.0.1"])
            .arg("-data-dir")
            .arg(&server.data_dir)
            .args(["-http-port", &server.http_port.to_string()])
            .args(["-dns-port", "-1", "-grpc-port", "-1"])
            .args(["-serf-lan-port", &server.serf_lan.to_string()])
            .args(["-serf-wan-port", &server.serf_wan.to_string()])
            .args(["-server-port", &server.server_port.to_string()])
            .args(["-hcl", "performance { raft_multiplier = 1 }"]);
        for join in &joins {
            command.args(["-retry-join", join]);
        }
        let child = command
            .stdout(Stdio::from(log.try_clone().expect("cloning a file handle")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("starting `consul` (not on PATH? run scripts/install-consul.sh)");
        server.child = Some(child);
    }

    /// The HTTP URLs of every server, for `consul.address`.
    pub fn urls(&self) -> Vec<String> {
        self.servers.iter().map(ConsulServer::url).collect()
    }

    fn running(&self) -> impl Iterator<Item = &ConsulServer> {
        self.servers.iter().filter(|s| s.is_running())
    }

    /// The index of the current leader, as the running servers see it.
    pub async fn leader(&self) -> Option<usize> {
        for server in self.running() {
            let Ok(response) = self
                .client
                .get(format!("{}/v1/status/leader", server.url()))
                .send()
                .await
            else {
                continue;
            };
            let text = response.text().await.unwrap_or_default();
            let port = text
                .trim()
                .trim_matches('"')
                .rsplit(':')
                .next()
                .and_then(|p| p.parse::<u16>().ok());
            if let Some(i) = self
                .servers
                .iter()
                .position(|s| Some(s.server_port) == port && s.is_running())
            {
                return Some(i);
            }
        }
        None
    }

    pub async fn wait_for_leader(&self, timeout: Duration) -> Option<usize> {
        poll_some(timeout, || self.leader()).await
    }

    pub fn kill(&mut self, i: usize) {
        kill_child(&mut self.servers[i].child);
    }

    /// Starts server `i` again with its data directory (its state survives).
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
    }

    /// Writes go through the leader: retried through any running server until one accepts.
    async fn catalog_write(&self, path: &str, body: Value) {
        let start = Instant::now();
        loop {
            for server in self.running() {
                let url = format!("{}/v1/catalog/{path}", server.url());
                if let Ok(response) = self.client.put(&url).json(&body).send().await {
                    if response.status().is_success() {
                        return;
                    }
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "catalog {path} kept failing"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Registers an instance on an external node (no agent owns it, so it survives any
    /// server's death; no checks, so it is passing).
    pub async fn register(&self, service: &str, id: &str, port: u16) {
        self.catalog_write(
            "register",
            json!({
                "Node": "external", "Address": "127.0.0.1",
                "Service": {"ID": id, "Service": service, "Address": "127.0.0.1", "Port": port},
            }),
        )
        .await;
    }

    pub async fn deregister(&self, id: &str) {
        self.catalog_write("deregister", json!({"Node": "external", "ServiceID": id}))
            .await;
    }
}

impl Drop for ConsulCluster {
    fn drop(&mut self) {
        for i in 0..self.servers.len() {
            self.kill(i);
            let _ = std::fs::remove_dir_all(&self.servers[i].data_dir);
        }
    }
}
