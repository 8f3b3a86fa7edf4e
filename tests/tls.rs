//! TLS termination end to end with real clients: curl (HTTPS over HTTP/1.1 and HTTP/2, the
//! 308 redirect), `openssl s_client` (which certificate SNI picks), raw sockets (plaintext,
//! garbage and a stalled handshake on the TLS port), certificate rotation on reload under
//! load, and bad certificates at start (exit 2) and on reload (old ones kept). Certificates
//! are made here with rcgen under one test CA; everything runs on 127.0.0.1.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::process::Command;

use common::pki::Pki;
use common::{Backend, Behavior, Consul, Gateway};
use switchyard::config::{CertificateConfig, Config, ConsulEnv};

/// The YAML of a `tls` block for `certificates`.
fn tls_yaml(certificates: &[CertificateConfig], redirect_http: bool) -> String {
    let mut yaml = format!("tls:\n  redirect_http: {redirect_http}\n  certificates:\n");
    for c in certificates {
        yaml.push_str(&format!(
            "    - {{cert_file: {:?}, key_file: {:?}}}\n",
            c.cert_file, c.key_file
        ));
    }
    yaml
}

/// A config for a gateway watching `consul`, routing `/web` (plus `extra_services`).
fn config(consul: &Consul, tls: &str, extra_services: &str) -> Config {
    let yaml = format!(
        "consul:\n  address: {}\n  wait: 30s\nserver:\n  shutdown_grace: 5s\n{tls}services:\n  - name: web\n{extra_services}",
        consul.url()
    );
    Config::from_yaml(&yaml, &ConsulEnv::default()).expect("valid test config")
}

/// Consul, one backend `web-1` and a gateway with `config`, ready.
async fn start(consul: &Consul, config: Config) -> (Backend, Gateway) {
    let backend = Backend::start("web-1", Behavior::Ok).await;
    consul.register("web", "web-1", backend.port, &[]).await;
    let gateway = Gateway::start_config(config).await;
    assert!(gateway
        .wait_for_instances("web", &["web-1"], Duration::from_secs(10))
        .await
        .is_some());
    (backend, gateway)
}

/// Sends `config` as a reload and waits until it is applied: its extra service `marker`
/// shows in `/routes` (certificates are re-read before routes change).
async fn reload_and_wait(gateway: &Gateway, config: Config, marker: &str) {
    gateway.reload.send(config).await.expect("sending a reload");
    let seen = common::wait_until(Duration::from_secs(10), || async {
        gateway
            .admin_get("/routes")
            .await
            .contains(&format!("\"{marker}\""))
    })
    .await;
    assert!(seen.is_some(), "reload with {marker} not applied");
}

fn marker(name: &str) -> String {
    format!("  - name: {name}\n")
}

/// Runs curl with `args`; returns (exit code, stdout).
async fn curl(args: &[&str]) -> (i32, String) {
    let output = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .await
        .expect("running curl");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

/// An HTTPS GET of `path` on the TLS listener as `name`, verified against the test CA:
/// returns (status and HTTP version, `x-echo` of the instance).
async fn https_get(pki: &Pki, tls: SocketAddr, name: &str, version: &str) -> (String, String) {
    let port = tls.port();
    let resolve = format!("{name}:{port}:127.0.0.1");
    let url = format!("https://{name}:{port}/web/x?y=1");
    let ca = pki.ca_file.to_string_lossy().into_owned();
    let (code, out) = curl(&[
        version,
        "--cacert",
        &ca,
        "--resolve",
        &resolve,
        "-D",
        "-",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{http_version}",
        &url,
    ])
    .await;
    assert_eq!(code, 0, "curl {url}: {out}");
    let echo = out
        .lines()
        .find_map(|l| l.strip_prefix("x-echo: "))
        .unwrap_or("")
        .trim()
        .to_owned();
    let status = out.lines().last().unwrap_or("").to_owned();
    (status, echo)
}

/// The subject of the certificate the TLS listener presents for `sni` (None: no SNI).
async fn served_subject(tls: SocketAddr, sni: Option<&str>) -> String {
    let args = match sni {
        Some(name) => vec!["-servername", name],
        None => vec!["-noservername"],
    };
    let stdout = s_client(tls, &args).await;
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("subject="))
        .unwrap_or_else(|| panic!("no subject from s_client: {stdout}"))
        .trim()
        .to_owned()
}

/// What `openssl s_client` prints for one handshake with the TLS listener.
async fn s_client(tls: SocketAddr, args: &[&str]) -> String {
    let connect = tls.to_string();
    let output = Command::new("openssl")
        .args(["s_client", "-connect", &connect])
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("running openssl s_client");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The TLS 1.3 suite a handshake settled on.
async fn negotiated_suite(tls: SocketAddr, client_suites: &str) -> String {
    let stdout = s_client(tls, &["-tls1_3", "-ciphersuites", client_suites]).await;
    stdout
        .lines()
        .find_map(|l| {
            l.split_once("Cipher is ")
                .map(|(_, suite)| suite.trim().to_owned())
        })
        .unwrap_or_else(|| panic!("no cipher from s_client: {stdout}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_prefers_aes_128_gcm_sha256_whatever_the_client_lists_first() {
    let pki = Pki::new("suites");
    let site = pki.leaf("site", "site.test", &["site.test", "127.0.0.1"]);
    let consul = Consul::start().await;
    let (_backend, gateway) = start(&consul, config(&consul, &tls_yaml(&[site], false), "")).await;
    let tls = gateway.tls.expect("a TLS listener");
    // OpenSSL's own order: AES-256-GCM-SHA384 first (its key schedule hashes with SHA-384).
    let openssl_order =
        "TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256";
    assert_eq!(
        negotiated_suite(tls, openssl_order).await,
        "TLS_AES_128_GCM_SHA256"
    );
    // A client offering only the others still gets one of them.
    assert_eq!(
        negotiated_suite(tls, "TLS_AES_256_GCM_SHA384").await,
        "TLS_AES_256_GCM_SHA384"
    );
    assert_eq!(
        negotiated_suite(tls, "TLS_CHACHA20_POLY1305_SHA256").await,
        "TLS_CHACHA20_POLY1305_SHA256"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_over_h1_and_h2_reaches_the_instance_with_forwarded_proto() {
    let pki = Pki::new("https");
    let site = pki.leaf("site", "site.test", &["site.test", "127.0.0.1"]);
    let consul = Consul::start().await;
    let (_backend, gateway) = start(&consul, config(&consul, &tls_yaml(&[site], false), "")).await;
    let tls = gateway.tls.expect("a TLS listener");

    let (status, echo) = https_get(&pki, tls, "site.test", "--http1.1").await;
    assert_eq!(status, "200 1.1");
    assert!(echo.contains("GET /web/x?y=1"), "{echo}");
    assert!(echo.contains("proto=https"), "{echo}");
    assert!(echo.contains("host=site.test:"), "{echo}");
    let (status, echo) = https_get(&pki, tls, "site.test", "--http2").await;
    assert_eq!(status, "200 2", "ALPN h2 serves HTTP/2");
    assert!(echo.contains("proto=https"), "{echo}");

    // Plain requests keep `http`.
    let plain = gateway.get("/web/plain").await;
    let echo = common::header_or(plain.headers(), "x-echo", "");
    assert!(
        echo.contains("proto=http") && !echo.contains("https"),
        "{echo}"
    );

    let metrics = gateway.admin_get("/metrics").await;
    let ok = common::metric(&metrics, r#"switchyard_tls_handshakes_total{result="ok"}"#);
    assert!(ok >= 2.0, "{metrics}");
    assert!(!metrics.contains("PRIVATE KEY"));
    let routes = gateway.admin_get("/routes").await;
    assert!(
        !routes.contains("PRIVATE KEY") && !routes.contains(".key"),
        "{routes}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_the_certificate_by_name_and_the_first_otherwise() {
    let pki = Pki::new("sni");
    let default = pki.leaf("default", "default.test", &["default.test", "127.0.0.1"]);
    let apps = pki.leaf("apps", "apps.test", &["apps.test", "*.apps.test"]);
    let consul = Consul::start().await;
    let tls = tls_yaml(&[default, apps], false);
    let (_backend, gateway) = start(&consul, config(&consul, &tls, "")).await;
    let tls = gateway.tls.expect("a TLS listener");

    let cases = [
        (Some("apps.test"), "apps.test"),
        (Some("api.apps.test"), "apps.test"),
        (Some("API.Apps.Test"), "apps.test"),
        (Some("deep.api.apps.test"), "default.test"),
        (Some("default.test"), "default.test"),
        (Some("unknown.example"), "default.test"),
        (None, "default.test"),
    ];
    for (sni, expected) in cases {
        let subject = served_subject(tls, sni).await;
        assert!(subject.ends_with(expected), "SNI {sni:?}: got {subject:?}");
    }
    // A client hello without SNI is served, not refused: curl to the bare IP sends none.
    let (status, _) = https_get(&pki, tls, "127.0.0.1", "--http1.1").await;
    assert_eq!(status, "200 1.1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_on_reload_under_load_without_a_failed_request() {
    let pki = Pki::new("rotate");
    let site = pki.leaf("site", "old.site.test", &["site.test"]);
    let consul = Consul::start().await;
    let tls = tls_yaml(std::slice::from_ref(&site), false);
    let (_backend, gateway) = start(&consul, config(&consul, &tls, "")).await;
    let addr = gateway.tls.expect("a TLS listener");
    assert!(served_subject(addr, Some("site.test"))
        .await
        .ends_with("old.site.test"));

    // Four clients, each a curl of 20 requests on one kept-alive connection, again and again.
    let stop = tokio_util::sync::CancellationToken::new();
    let (done_tx, mut done) = tokio::sync::watch::channel(0usize);
    let done_tx = Arc::new(done_tx);
    let ca = pki.ca_file.to_string_lossy().into_owned();
    let loads: Vec<_> = (0..4)
        .map(|_| {
            let (stop, done_tx, ca) = (stop.clone(), done_tx.clone(), ca.clone());
            tokio::spawn(async move {
                let resolve = format!("site.test:{}:127.0.0.1", addr.port());
                let url = format!("https://site.test:{}/web/load", addr.port());
                let mut args = vec![
                    "--cacert",
                    &ca,
                    "--resolve",
                    &resolve,
                    "-w",
                    "\n%{http_code}\n",
                ];
                args.extend(std::iter::repeat_n(url.as_str(), 20));
                let (mut ok, mut failures) = (0, Vec::new());
                while !stop.is_cancelled() {
                    let (code, out) = curl(&args).await;
                    let codes: Vec<&str> = out.lines().filter(|l| l.len() == 3).collect();
                    ok += codes.iter().filter(|c| **c == "200").count();
                    if code != 0 || codes.len() != 20 || codes.iter().any(|c| *c != "200") {
                        failures.push(format!("exit {code}: {out}"));
                    }
                    done_tx.send_modify(|n| *n += 1);
                }
                (ok, failures)
            })
        })
        .collect();
    done.wait_for(|n| *n >= 4).await.expect("load running");

    pki.leaf("site", "new.site.test", &["site.test"]);
    let before = *done.borrow();
    reload_and_wait(
        &gateway,
        config(&consul, &tls, &marker("rotated")),
        "rotated",
    )
    .await;
    assert!(
        served_subject(addr, Some("site.test"))
            .await
            .ends_with("new.site.test"),
        "new handshakes get the new certificate"
    );
    done.wait_for(|n| *n >= before + 8)
        .await
        .expect("load still running");
    stop.cancel();
    let (mut ok, mut failures) = (0, Vec::new());
    for load in loads {
        let (n, f) = load.await.expect("load task");
        ok += n;
        failures.extend(f);
    }
    println!(
        "rotation under load: {ok} requests over TLS, {} failed",
        failures.len()
    );
    assert!(failures.is_empty(), "{failures:?}");
    assert!(ok >= 12 * 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_certificates_on_reload_keep_the_running_ones() {
    let pki = Pki::new("reload-bad");
    let site = pki.leaf("site", "good.site.test", &["site.test"]);
    let consul = Consul::start().await;
    let tls = tls_yaml(std::slice::from_ref(&site), false);
    let (_backend, gateway) = start(&consul, config(&consul, &tls, "")).await;
    let addr = gateway.tls.expect("a TLS listener");

    // Expired: refused, the running certificate stays.
    pki.expired("site", "expired.site.test");
    reload_and_wait(&gateway, config(&consul, &tls, &marker("one")), "one").await;
    assert!(served_subject(addr, Some("site.test"))
        .await
        .ends_with("good.site.test"));
    // A key of another certificate: refused too.
    pki.leaf("site", "mismatch.site.test", &["site.test"]);
    let other = pki.leaf("other", "other.test", &["other.test"]);
    std::fs::copy(&other.key_file, &site.key_file).expect("copying a key");
    reload_and_wait(&gateway, config(&consul, &tls, &marker("two")), "two").await;
    assert!(served_subject(addr, Some("site.test"))
        .await
        .ends_with("good.site.test"));
    let (status, _) = https_get(&pki, addr, "site.test", "--http2").await;
    assert_eq!(status, "200 2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_http_answers_308_to_the_https_port() {
    let pki = Pki::new("redirect");
    let site = pki.leaf("site", "site.test", &["site.test"]);
    let consul = Consul::start().await;
    let (_backend, gateway) = start(&consul, config(&consul, &tls_yaml(&[site], true), "")).await;
    let tls = gateway.tls.expect("a TLS listener").port();
    let plain = gateway.addr.port();

    let url = format!("http://site.test:{plain}/web/x?y=1");
    let resolve_plain = format!("site.test:{plain}:127.0.0.1");
    let (code, out) = curl(&[
        "--resolve",
        &resolve_plain,
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{redirect_url}",
        &url,
    ])
    .await;
    assert_eq!(code, 0);
    assert_eq!(out, format!("308 https://site.test:{tls}/web/x?y=1"));
    // Followed by curl, it ends at the instance over TLS.
    let resolve_tls = format!("site.test:{tls}:127.0.0.1");
    let ca = pki.ca_file.to_string_lossy().into_owned();
    let (code, out) = curl(&[
        "-L",
        "--resolve",
        &resolve_plain,
        "--resolve",
        &resolve_tls,
        "--cacert",
        &ca,
        "-D",
        "-",
        "-o",
        "/dev/null",
        &url,
    ])
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("proto=https"), "{out}");
    // No routing on the plain listener: a path no service has is redirected too.
    let (_, out) = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("http://127.0.0.1:{plain}/anything"),
    ])
    .await;
    assert_eq!(out, "308");
}

/// Writes `bytes` to `addr` and reads until the server closes; returns what came back and
/// how long the server took to close.
fn send_and_wait_for_close(addr: SocketAddr, bytes: &[u8]) -> (Vec<u8>, Duration) {
    let mut stream = std::net::TcpStream::connect(addr).expect("connecting");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    let started = Instant::now();
    let _ = stream.write_all(bytes);
    let mut answer = Vec::new();
    let closed = stream.read_to_end(&mut answer);
    assert!(
        closed.is_ok() || answer.is_empty(),
        "not closed by the server: {closed:?}"
    );
    (answer, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_garbage_and_stalled_handshakes_are_cut_and_others_served() {
    let pki = Pki::new("bad-input");
    let site = pki.leaf("site", "site.test", &["site.test"]);
    let consul = Consul::start().await;
    let mut config = config(&consul, &tls_yaml(&[site], false), "");
    config.server.header_read_timeout = Duration::from_secs(1);
    let (_backend, gateway) = start(&consul, config).await;
    let tls = gateway.tls.expect("a TLS listener");

    let (answer, _) = tokio::task::spawn_blocking(move || {
        send_and_wait_for_close(tls, b"GET /web HTTP/1.1\r\nHost: site.test\r\n\r\n")
    })
    .await
    .unwrap();
    assert!(
        !answer.starts_with(b"HTTP/"),
        "plaintext got an HTTP answer"
    );
    let garbage: Vec<u8> = (0..512u32).map(|i| (i * 7919 % 251) as u8).collect();
    tokio::task::spawn_blocking(move || send_and_wait_for_close(tls, &garbage))
        .await
        .unwrap();
    // The start of a ClientHello record, then nothing: cut at header_read_timeout.
    let (_, took) = tokio::task::spawn_blocking(move || {
        send_and_wait_for_close(tls, &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
    })
    .await
    .unwrap();
    println!("stalled handshake cut after {took:?}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );

    // Everyone else keeps being served, over TLS and plain.
    let (status, _) = https_get(&pki, tls, "site.test", "--http2").await;
    assert_eq!(status, "200 2");
    assert_eq!(gateway.get("/web/x").await.status(), 200);
    let metrics = gateway.admin_get("/metrics").await;
    let count = |result: &str| {
        common::metric(
            &metrics,
            &format!("switchyard_tls_handshakes_total{{result=\"{result}\"}}"),
        )
    };
    assert_eq!(count("error"), 2.0, "{metrics}");
    assert_eq!(count("timeout"), 1.0, "{metrics}");
    assert!(count("ok") >= 1.0);
}

/// Runs the binary on a config with `certificates` and returns (exit code, stderr).
fn start_binary(pki: &Pki, certificates: &[CertificateConfig]) -> (i32, String) {
    let path = pki.dir.join("gateway.yaml");
    let yaml = format!(
        "listen: 127.0.0.1:{}\nadmin_listen: 127.0.0.1:{}\n{}services:\n  - name: web\n",
        common::free_port(),
        common::free_port(),
        tls_yaml(certificates, false)
    );
    std::fs::write(&path, yaml).expect("writing the config");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .arg("--config")
        .arg(&path)
        .env_remove("CONSUL_HTTP_ADDR")
        .output()
        .expect("running switchyard");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn expired_or_mismatched_certificates_at_start_exit_2_naming_the_key() {
    let pki = Pki::new("start");
    let good = pki.leaf("good", "good.test", &["good.test"]);
    let expired = pki.expired("expired", "expired.test");
    let (code, stderr) = start_binary(&pki, &[expired]);
    println!("expired: exit {code}: {}", stderr.trim());
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("invalid `tls.certificates[0].cert_file`: expired"),
        "{stderr}"
    );

    let other = pki.leaf("other", "other.test", &["other.test"]);
    let crossed = CertificateConfig {
        cert_file: good.cert_file.clone(),
        key_file: other.key_file.clone(),
    };
    let (code, stderr) = start_binary(&pki, &[good.clone(), crossed]);
    println!("mismatch: exit {code}: {}", stderr.trim());
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("invalid `tls.certificates[1].key_file`: does not match"),
        "{stderr}"
    );

    let missing = CertificateConfig {
        cert_file: pki.dir.join("missing.pem"),
        key_file: good.key_file.clone(),
    };
    let (code, stderr) = start_binary(&pki, &[missing]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("tls.certificates[0].cert_file"), "{stderr}");
}

/// One client address holds `server.max_connections_per_client` across the plain and the TLS
/// listener together: with 2 silent plain connections open, its TLS connection is refused at
/// accept, while another address completes a handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_client_cap_spans_plain_and_tls() {
    let pki = Pki::new("per-client");
    let leaf = pki.leaf("site", "site.test", &["site.test"]);
    let consul = Consul::start().await;
    let tls = format!(
        "{}server:\n  max_connections_per_client: 2\n",
        tls_yaml(&[leaf], false)
    );
    let yaml = format!(
        "consul:\n  address: {}\n  wait: 30s\n{tls}services:\n  - name: web\n",
        consul.url()
    );
    let config = Config::from_yaml(&yaml, &ConsulEnv::default()).expect("valid test config");
    let (_backend, gateway) = start(&consul, config).await;
    let tls_addr = gateway.tls.expect("a TLS listener");
    let _held: Vec<_> = (0..2)
        .map(|_| std::net::TcpStream::connect(gateway.addr).expect("connecting"))
        .collect();
    // Wait until the gateway has admitted both (its gauge counts them).
    let admitted = common::wait_until(Duration::from_secs(5), || async {
        let metrics = gateway.admin_get("/metrics").await;
        common::metric(
            &metrics,
            "switchyard_client_connections{listener=\"gateway\",worker=\"0\"}",
        ) == 2.0
    })
    .await;
    assert!(admitted.is_some());
    let (answer, closed_after) = tokio::task::spawn_blocking(move || {
        send_and_wait_for_close(tls_addr, b"\x16\x03\x01\x00\x05hello")
    })
    .await
    .unwrap();
    assert!(answer.is_empty(), "refused before any TLS byte");
    assert!(closed_after < Duration::from_secs(1), "{closed_after:?}");
    let metrics = gateway.admin_get("/metrics").await;
    let refused = common::metric(
        &metrics,
        "switchyard_client_connections_closed_total{listener=\"tls\",reason=\"per_client_limit\",worker=\"0\"}",
    );
    assert_eq!(refused, 1.0);
}
