//! TLS as a client: to instances (`protocol: https | h2`, `services[].tls`: CA, server name,
//! client certificate for mTLS, `insecure_skip_verify`) and to a real Consul agent serving
//! HTTPS with `verify_incoming_https`. Certificates come from a test CA (tests/common/pki.rs).

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;

use common::pki::Pki;
use common::Consul;
use switchyard::config::CertificateConfig;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The rustls config of an HTTPS instance; with `client_ca`, client certificates it signed
/// are required (mTLS).
fn server_tls(cert: &CertificateConfig, client_ca: Option<&Path>) -> ServerConfig {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert.cert_file)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(&cert.key_file).unwrap();
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca).unwrap() {
                roots.add(c.unwrap()).unwrap();
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider())
                .build()
                .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key).unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config
}

/// An HTTPS instance answering with its id and the HTTP version it was asked in; it counts
/// its completed handshakes and can close its connections on demand.
struct TlsInstance {
    port: u16,
    handshakes: Arc<AtomicUsize>,
    connections: TaskTracker,
    close: watch::Sender<u64>,
    _accept: JoinHandle<()>,
}

impl TlsInstance {
    async fn start(id: &'static str, tls: ServerConfig) -> TlsInstance {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let handshakes = Arc::new(AtomicUsize::new(0));
        let connections = TaskTracker::new();
        let (close, closing) = watch::channel(0);
        let (counted, tracker) = (handshakes.clone(), connections.clone());
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (acceptor, counted) = (acceptor.clone(), counted.clone());
                let mut closing = closing.clone();
                closing.mark_unchanged(); // only a close asked for after this connection
                tracker.spawn(async move {
                    let Ok(stream) = acceptor.accept(stream).await else {
                        return; // a refused handshake (no or wrong client certificate)
                    };
                    counted.fetch_add(1, Ordering::SeqCst);
                    let service = service_fn(move |request: Request<Incoming>| async move {
                        let version = format!("{:?}", request.version());
                        let response = Response::builder()
                            .header("x-instance", id)
                            .header("x-version", version)
                            .body(Full::new(Bytes::from(id)))
                            .unwrap();
                        Ok::<_, std::convert::Infallible>(response)
                    });
                    let builder = Builder::new(TokioExecutor::new());
                    let conn = builder.serve_connection(TokioIo::new(stream), service);
                    tokio::pin!(conn);
                    tokio::select! {
                        _ = conn.as_mut() => return,
                        _ = closing.changed() => conn.as_mut().graceful_shutdown(),
                    }
                    let _ = conn.await;
                });
            }
        });
        TlsInstance {
            port,
            handshakes,
            connections,
            close,
            _accept: accept,
        }
    }

    /// Closes every open connection (idle ones at once: TLS close_notify, then FIN) and
    /// returns once all are closed.
    async fn close_connections(&self) {
        self.close.send_modify(|generation| *generation += 1);
        self.connections.close();
        self.connections.wait().await;
        self.connections.reopen();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_over_tls_h1_h2_mtls_server_name_and_skip_verify() {
    let pki = Pki::new("upstream");
    let other = Pki::new("upstream-other");
    let server = pki.leaf("backend", "backend.test", &["backend.test"]);
    let client = pki.leaf("client", "switchyard", &["switchyard.test"]);
    let untrusted = other.leaf("untrusted", "untrusted.test", &["untrusted.test"]);
    let mtls = TlsInstance::start("mtls-1", server_tls(&server, Some(&pki.ca_file))).await;
    let plain = TlsInstance::start("untrusted-1", server_tls(&untrusted, None)).await;
    let (mtls_port, plain_port) = (mtls.port, plain.port);

    let consul = Consul::start().await;
    let tls = |extra: &str| {
        format!(
            "{{ca_file: {:?}, cert_file: {:?}, key_file: {:?}{extra}}}",
            pki.ca_file, client.cert_file, client.key_file
        )
    };
    let services = [
        (
            "secure",
            "https",
            mtls_port,
            tls(", server_name: backend.test"),
        ),
        (
            "secure2",
            "h2",
            mtls_port,
            tls(", server_name: backend.test"),
        ),
        (
            "nocert",
            "https",
            mtls_port,
            format!("{{ca_file: {:?}, server_name: backend.test}}", pki.ca_file),
        ),
        (
            "wrongname",
            "https",
            mtls_port,
            tls(", server_name: other.test"),
        ),
        (
            "skip",
            "https",
            plain_port,
            "{insecure_skip_verify: true}".to_owned(),
        ),
    ];
    let mut yaml = String::from("services:\n");
    for (name, protocol, port, tls) in &services {
        consul
            .register(name, &format!("{name}-1"), *port, &[])
            .await;
        yaml.push_str(&format!(
            "  - {{name: {name}, protocol: {protocol}, tls: {tls}}}\n"
        ));
    }
    let gateway = common::Gateway::start(&consul, &yaml).await;
    for (name, ..) in &services {
        let id = format!("{name}-1");
        let synced = gateway
            .wait_for_instances(name, &[&id], Duration::from_secs(10))
            .await;
        assert!(synced.is_some(), "{name}");
    }
    let get = |path: &'static str| gateway.get(path);
    let secure = get("/secure").await;
    assert_eq!(secure.status(), 200);
    assert_eq!(secure.headers()["x-instance"], "mtls-1");
    assert_eq!(secure.headers()["x-version"], "HTTP/1.1");
    let secure2 = get("/secure2").await;
    assert_eq!(secure2.status(), 200);
    assert_eq!(
        secure2.headers()["x-version"],
        "HTTP/2.0",
        "protocol: h2 speaks h2"
    );
    for refused in ["/nocert", "/wrongname"] {
        let response = get(refused).await;
        assert_eq!(response.status(), 502, "{refused}");
        assert_eq!(
            response.headers()["x-switchyard-error"],
            "upstream-unreachable"
        );
    }
    let skip = get("/skip").await;
    assert_eq!(skip.status(), 200);
    assert_eq!(skip.headers()["x-instance"], "untrusted-1");
}

/// `https` instances go through the gateway's own HTTP/1.1 client: one TLS connection
/// carries request after request, and an instance closing it while idle costs no request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_connections_are_reused_and_an_idle_close_costs_no_request() {
    let pki = Pki::new("upstream-reuse");
    let server = pki.leaf("backend", "backend.test", &["backend.test"]);
    let instance = TlsInstance::start("reuse-1", server_tls(&server, None)).await;
    let consul = Consul::start().await;
    consul
        .register("reuse", "reuse-1", instance.port, &[])
        .await;
    let yaml = format!(
        "services:\n  - {{name: reuse, protocol: https, tls: {{ca_file: {:?}, server_name: backend.test}}}}\n",
        pki.ca_file
    );
    let gateway = common::Gateway::start(&consul, &yaml).await;
    let synced = gateway
        .wait_for_instances("reuse", &["reuse-1"], Duration::from_secs(10))
        .await;
    assert!(synced.is_some());
    for _ in 0..5 {
        let response = gateway.get("/reuse").await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.text().await.unwrap(), "reuse-1");
    }
    assert_eq!(
        instance.handshakes.load(Ordering::SeqCst),
        1,
        "five requests over one TLS connection"
    );
    instance.close_connections().await;
    for _ in 0..3 {
        let response = gateway.get("/reuse").await;
        assert_eq!(response.status(), 200, "the closed connection is not used");
    }
    assert_eq!(instance.handshakes.load(Ordering::SeqCst), 2);
}

#[test]
fn unusable_tls_files_for_instances_or_consul_exit_2_naming_the_key() {
    let dir = std::env::temp_dir().join(format!("switchyard-tlsfiles-{}", common::free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases = [
        (
            "services:\n  - {name: a, protocol: https, tls: {ca_file: /nonexistent/ca.pem}}\n",
            "invalid `services[0].tls.ca_file`",
        ),
        (
            "consul: {address: \"https://127.0.0.1:1\", ca_file: /nonexistent/ca.pem}\nservices:\n  - name: a\n",
            "invalid `consul.ca_file`",
        ),
        (
            "services:\n  - {name: a, tls: {insecure_skip_verify: true}}\n",
            "invalid `services[0].tls`",
        ),
    ];
    for (yaml, expected) in cases {
        let path = dir.join("gateway.yaml");
        std::fs::write(&path, yaml).unwrap();
        let output = Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .arg("--config")
            .arg(&path)
            .arg("--check")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(expected), "{expected}: {stderr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_over_tls_with_a_client_certificate() {
    let pki = Pki::new("consul");
    let server = pki.leaf("consul", "consul.test", &["consul.test"]);
    let client = pki.leaf("client", "switchyard", &["switchyard.test"]);
    let consul = Consul::start_tls(&pki.ca_file, &server).await;
    let backend = common::Backend::start("web-1", common::Behavior::Ok).await;
    consul.register("web", "web-1", backend.port, &[]).await;
    let tls = format!(
        "  ca_file: {:?}\n  cert_file: {:?}\n  key_file: {:?}\n  tls_server_name: consul.test\n",
        pki.ca_file, client.cert_file, client.key_file
    );
    let gateway =
        common::Gateway::start_with(&[consul.https_url()], &tls, "services:\n  - name: web\n")
            .await;
    let synced = gateway
        .wait_for_instances("web", &["web-1"], Duration::from_secs(10))
        .await;
    assert!(
        synced.is_some(),
        "watched over HTTPS with a client certificate"
    );
    assert_eq!(gateway.get("/web").await.status(), 200);

    // Without the client certificate Consul refuses the gateway: nothing syncs.
    let no_cert = format!(
        "  ca_file: {:?}\n  tls_server_name: consul.test\n",
        pki.ca_file
    );
    let refused = common::Gateway::start_with(
        &[consul.https_url()],
        &no_cert,
        "services:\n  - name: web\n",
    )
    .await;
    let metrics_url = refused.admin_url("/metrics");
    let errors = common::wait_until(Duration::from_secs(10), || {
        let url = metrics_url.clone();
        async move {
            let text = common::http_client()
                .get(url)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            common::metric(&text, "switchyard_consul_errors_total{service=\"web\"}") > 0.0
        }
    })
    .await;
    assert!(
        errors.is_some(),
        "a refused TLS client counts Consul errors"
    );
    assert!(refused.instances("web").await.is_empty());
}

/// Established TCP connections to `port` on 127.0.0.1, from any local socket (the gateway's
/// to the agent: nothing else in this test connects to that port).
fn connections_to(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("reading /proc/net/tcp");
    let remote = format!("0100007F:{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.get(2) == Some(&remote.as_str()) && fields.get(3) == Some(&"01")
        })
        .count()
}

/// More services than Consul's 250 streams per connection, each watched with a query of its
/// own (`watch: per_service`) with 8 connections at most, over HTTPS with a client
/// certificate.
const SERVICES: usize = 260;

/// A TLS Consul that allows 12 connections per client, its client certificate settings and
/// `watch` (`consul:` keys) and the backend every instance points at.
async fn limited_tls_consul(pki: &Pki, watch: &str) -> (Consul, String, common::Backend) {
    let server = pki.leaf("consul", "consul.test", &["consul.test"]);
    let client = pki.leaf("client", "switchyard", &["switchyard.test"]);
    let hcl = "limits { http_max_conns_per_client = 12 }";
    let consul = Consul::start_tls_with_hcl(&pki.ca_file, &server, hcl).await;
    let backend = common::Backend::start("any", common::Behavior::Ok).await;
    let keys = format!(
        "  ca_file: {:?}\n  cert_file: {:?}\n  key_file: {:?}\n  tls_server_name: consul.test\n  watch: {watch}\n  max_connections: 8\n",
        pki.ca_file, client.cert_file, client.key_file
    );
    (consul, keys, backend)
}

/// The `services:` of [`SERVICES`] services `s0`, `s1`, ...
fn many_services() -> String {
    let mut services = String::from("services:\n");
    for n in 0..SERVICES {
        services.push_str(&format!("  - name: s{n}\n"));
    }
    services
}

/// Registers instance `s<n>-1` of every service, then waits until every table holds it,
/// read from one `/routes` per look.
async fn register_and_sync(consul: &Consul, gateway: &common::Gateway, port: u16) {
    for n in 0..SERVICES {
        consul
            .register(&format!("s{n}"), &format!("s{n}-1"), port, &[])
            .await;
    }
    let synced = common::wait_until(Duration::from_secs(20), || async {
        let routes: serde_json::Value =
            serde_json::from_str(&gateway.admin_get("/routes").await).expect("/routes is JSON");
        let filled = routes["services"].as_array().into_iter().flatten();
        filled
            .filter(|s| s["instances"].as_array().is_some_and(|i| i.len() == 1))
            .count()
            == SERVICES
    })
    .await;
    assert!(synced.is_some(), "every service watched");
}

/// A second instance for each service in turn, each routed within 5 s: one service at a
/// time, so no other service's change frees a place in a connection's queue.
async fn change_each_in_turn(consul: &Consul, gateway: &common::Gateway, port: u16) {
    for n in 0..SERVICES {
        let (service, late) = (format!("s{n}"), format!("s{n}-2"));
        consul.register(&service, &late, port, &[]).await;
        let routed = gateway
            .wait_for_instances(
                &service,
                &[format!("s{n}-1").as_str(), late.as_str()],
                Duration::from_secs(5),
            )
            .await;
        assert!(
            routed.is_some(),
            "the change to {service} reaches its table"
        );
    }
}

/// Every service synced, over three lanes of at most 100 queries and the connection of the
/// HTTP/2 question, and each service's change routed in turn.
async fn served_over_lanes(consul: &Consul, gateway: &common::Gateway, port: u16) {
    register_and_sync(consul, gateway, port).await;
    let held = connections_to(consul.https_port());
    assert!(
        (3..=4).contains(&held),
        "{held} connections carry {SERVICES} blocking queries"
    );
    change_each_in_turn(consul, gateway, port).await;
}

/// Consul's HTTPS listener speaks HTTP/2, so the gateway's blocking queries share
/// connections: an agent allowing 12 connections per client serves 260 services watched with
/// a query each (over HTTP/1.1 that is 260 connections, and the 12th on are refused). More
/// queries than Consul's 250 streams per connection: on one connection, the ones past 250
/// wait in the connection's queue behind long-polls and miss changes; the gateway spreads
/// them over a few (lanes of at most 100), so a change to any one service is routed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_queries_share_http2_connections_to_consul_over_https() {
    let pki = Pki::new("consul-h2");
    let (consul, keys, backend) = limited_tls_consul(&pki, "per_service").await;
    let gateway = common::Gateway::start_with(&[consul.https_url()], &keys, &many_services()).await;
    served_over_lanes(&consul, &gateway, backend.port).await;
}

/// `switchyard_consul_watched_services{set="file"}`: per-service and catalog.
async fn watched(gateway: &common::Gateway) -> (f64, f64) {
    let text = gateway.admin_get("/metrics").await;
    let series =
        |mode: &str| format!("switchyard_consul_watched_services{{mode=\"{mode}\",set=\"file\"}}");
    (
        common::metric(&text, &series("per_service")),
        common::metric(&text, &series("catalog")),
    )
}

/// A Consul down when the gateway starts cannot be asked whether it speaks HTTP/2: the budget
/// counts a connection per query (8 connections: every one of 260 services in catalog mode)
/// and the queries go out in lanes of at most 100. Once Consul answers over HTTP/2 the
/// gateway re-plans: every service gets a query of its own, and each change is routed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_down_at_startup_is_asked_again_and_the_watches_re_planned() {
    let pki = Pki::new("consul-h2-late");
    let (mut consul, keys, backend) = limited_tls_consul(&pki, "auto").await;
    consul.stop();
    let gateway = common::Gateway::start_with(&[consul.https_url()], &keys, &many_services()).await;
    let all_catalog = common::wait_until(Duration::from_secs(5), || async {
        watched(&gateway).await == (0.0, SERVICES as f64)
    })
    .await;
    assert!(all_catalog.is_some(), "{:?}", watched(&gateway).await);
    consul.restart().await;
    let re_planned = common::wait_until(Duration::from_secs(15), || async {
        watched(&gateway).await == (SERVICES as f64, 0.0)
    })
    .await;
    assert!(re_planned.is_some(), "{:?}", watched(&gateway).await);
    served_over_lanes(&consul, &gateway, backend.port).await;
}
