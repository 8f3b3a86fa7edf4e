//! Hot reload through the real binary and a real SIGHUP: services added, changed and removed
//! under load with no failed request and no dropped in-flight request; an invalid file is
//! rejected and the running config stays.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Backend, Behavior, Consul, Load};

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .args([name, &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

/// Kills the gateway process when a test fails, so it does not outlive the test (and keep
/// the test runner's output pipe open).
struct KillOnPanic(u32);

impl Drop for KillOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = Command::new("kill")
                .args(["-KILL", &self.0.to_string()])
                .status();
        }
    }
}

/// Starts the binary on `path`; returns it, its log lines and a guard that kills it if the
/// test fails.
fn start_gateway(path: &Path) -> (Child, std::sync::mpsc::Receiver<String>, KillOnPanic) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .arg("--config")
        .arg(path)
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting switchyard");
    let log = log_lines(&mut child);
    let guard = KillOnPanic(child.id());
    (child, log, guard)
}

/// The status code of a GET, or 0 when the request failed.
fn status_of(client: &reqwest::Client, url: String) -> impl std::future::Future<Output = u16> {
    let request = client.get(url).send();
    async move { request.await.map(|r| r.status().as_u16()).unwrap_or(0) }
}

/// The gateway's log lines, as they come.
fn log_lines(child: &mut Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let stderr = child.stderr.take().expect("piped stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Waits (up to 10 s) for a log line containing `needle`.
async fn wait_log(log: &std::sync::mpsc::Receiver<String>, needle: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match log.recv_timeout(Duration::from_millis(50)) {
            Ok(line) if line.contains(needle) => return line,
            Ok(_) => {}
            Err(_) => tokio::task::yield_now().await,
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no log line with {needle:?}"
        );
    }
}

/// Writes a config; `services` is the YAML after `consul:` (a `services:` list, maybe with
/// other top-level keys before it) — or, without a `services:` key, the list's items.
fn write_config(path: &Path, port: u16, admin: u16, consul: &str, services: &str) {
    let services = if services.contains("services:") {
        services.to_owned()
    } else {
        format!("services:\n{services}")
    };
    let yaml = format!(
        "listen: 127.0.0.1:{port}\nadmin_listen: 127.0.0.1:{admin}\nconsul:\n  address: {consul}\n  wait: 30s\n{services}"
    );
    std::fs::write(path, yaml).expect("writing the config");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adds_changes_and_removes_services_without_dropping_requests() {
    let consul = Consul::start().await;
    let web = Backend::start("web-1", Behavior::Ok).await;
    let api = Backend::start("api-1", Behavior::Ok).await;
    let slow = Backend::start("slow-1", Behavior::Delay(Duration::from_millis(1500))).await;
    consul.register("web", "web-1", web.port, &[]).await;
    consul.register("api", "api-1", api.port, &[]).await;
    consul.register("slow", "slow-1", slow.port, &[]).await;

    let (port, admin) = (common::free_port(), common::free_port());
    let dir = std::env::temp_dir().join(format!("switchyard-reload-{port}"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gateway.yaml");
    write_config(
        &path,
        port,
        admin,
        &consul.url(),
        "  - name: web\n  - name: slow\n",
    );
    let (mut child, log, _kill) = start_gateway(&path);
    let client = common::http_client();
    let url = |p: &str| format!("http://127.0.0.1:{port}{p}");
    let status = |p: &'static str| status_of(&client, url(p));
    assert!(common::wait_until(Duration::from_secs(10), || async {
        status("/web").await == 200
    })
    .await
    .is_some());
    assert_eq!(status("/api").await, 404);

    let load = Load::start(url("/web"), 4);
    let in_flight = tokio::spawn(client.get(url("/slow")).send());
    assert!(
        common::wait_until(Duration::from_secs(5), || async { slow.hits() == 1 })
            .await
            .is_some()
    );

    // Add `api`, change `web` (balance), keep `slow`.
    write_config(
        &path,
        port,
        admin,
        &consul.url(),
        "  - name: web\n    balance: random\n  - name: slow\n  - name: api\n",
    );
    signal(&child, "-HUP");
    let added = common::wait_until(Duration::from_secs(5), || async {
        status("/api").await == 200
    })
    .await;
    println!("SIGHUP -> new service routed after {added:?}");
    assert!(added.is_some());
    let slow_response = in_flight
        .await
        .unwrap()
        .expect("in-flight request survives the reload");
    assert_eq!(slow_response.status(), 200);

    // An invalid file is rejected; everything keeps working.
    std::fs::write(&path, "services:\n  - name: web\n    balanse: random\n").unwrap();
    signal(&child, "-HUP");
    let rejected = wait_log(&log, "config rejected").await;
    println!("invalid config: {}", rejected.trim());
    assert!(
        rejected.contains("balanse"),
        "the log line names the bad key: {rejected}"
    );
    assert_eq!(
        status("/api").await,
        200,
        "rejected config must not replace the running one"
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "the gateway exited on a bad config"
    );

    // Remove `web`.
    write_config(
        &path,
        port,
        admin,
        &consul.url(),
        "  - name: api\n  - name: slow\n",
    );
    let mut stats = load.finish().await;
    println!("load on /web across two reloads: {}", stats.summary());
    assert!(
        stats.failures.is_empty(),
        "{:?}",
        &stats.failures[..stats.failures.len().min(5)]
    );
    signal(&child, "-HUP");
    let removed = common::wait_until(Duration::from_secs(5), || async {
        status("/web").await == 404
    })
    .await;
    assert!(removed.is_some());
    assert_eq!(status("/api").await, 200);
    let routes = client
        .get(format!("http://127.0.0.1:{admin}/routes"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        routes.contains("\"api\"") && !routes.contains("\"web\""),
        "{routes}"
    );

    signal(&child, "-TERM");
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_config_reloads_when_the_file_changes() {
    let consul = Consul::start().await;
    let backends = common::backends("web", 1).await;
    let api = Backend::start("api-1", Behavior::Ok).await;
    consul.register("web", "web-1", backends[0].port, &[]).await;
    consul.register("api", "api-1", api.port, &[]).await;
    let (port, admin) = (common::free_port(), common::free_port());
    let dir = std::env::temp_dir().join(format!("switchyard-watch-{port}"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gateway.yaml");
    let services = "watch_config: 100ms\nservices:\n  - name: web\n";
    write_config(&path, port, admin, &consul.url(), services);
    let (mut child, log, _kill) = start_gateway(&path);
    let client = common::http_client();
    let status = |p: &'static str| status_of(&client, format!("http://127.0.0.1:{port}{p}"));
    assert!(common::wait_until(Duration::from_secs(10), || async {
        status("/web").await == 200
    })
    .await
    .is_some());
    assert_eq!(status("/api").await, 404);

    // No signal: the file changing is enough.
    write_config(
        &path,
        port,
        admin,
        &consul.url(),
        "watch_config: 100ms\nservices:\n  - name: web\n  - name: api\n",
    );
    wait_log(&log, "config reloaded").await;
    assert!(common::wait_until(Duration::from_secs(5), || async {
        status("/api").await == 200
    })
    .await
    .is_some());
    signal(&child, "-TERM");
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_watch_config_and_reports_a_rotated_token() {
    let consul = Consul::start().await;
    let web = Backend::start("web-1", Behavior::Ok).await;
    let api = Backend::start("api-1", Behavior::Ok).await;
    consul.register("web", "web-1", web.port, &[]).await;
    consul.register("api", "api-1", api.port, &[]).await;
    let (port, admin) = (common::free_port(), common::free_port());
    let dir = std::env::temp_dir().join(format!("switchyard-rotate-{port}"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gateway.yaml");
    // The `consul:` section is open when `services` starts: an indented line joins it.
    let write = |extra: &str| write_config(&path, port, admin, &consul.url(), extra);
    write("  token: first-secret\nservices:\n  - name: web\n");
    let (mut child, log, _kill) = start_gateway(&path);
    let client = common::http_client();
    let status = |p: &'static str| status_of(&client, format!("http://127.0.0.1:{port}{p}"));
    assert!(common::wait_until(Duration::from_secs(10), || async {
        status("/web").await == 200
    })
    .await
    .is_some());

    // SIGHUP: a rotated token (restart-only: reported by name, never by value), polling on.
    write("  token: second-secret\nwatch_config: 100ms\nservices:\n  - name: web\n  - name: api\n");
    signal(&child, "-HUP");
    let token = wait_log(&log, "consul.token").await;
    println!("rotated token: {}", token.trim());
    assert!(
        token.contains("restart") && !token.contains("secret"),
        "{token}"
    );
    assert!(common::wait_until(Duration::from_secs(5), || async {
        status("/api").await == 200
    })
    .await
    .is_some());

    // No signal: the poll interval the reload turned on picks up the next change.
    write("  token: second-secret\nwatch_config: 100ms\nservices:\n  - name: web\n");
    let polled = wait_log(&log, "reloading config").await;
    assert!(polled.contains("file changed"), "{polled}");
    assert!(common::wait_until(Duration::from_secs(5), || async {
        status("/api").await == 404
    })
    .await
    .is_some());

    signal(&child, "-TERM");
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success());
    let _ = std::fs::remove_dir_all(&dir);
}

/// `workers: 2` through the real binary: two current-thread runtimes, each with its own
/// SO_REUSEPORT socket on `listen`; the kernel spreads 40 kept-alive connections over both,
/// every request is answered, and SIGTERM stops both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_share_the_port_and_both_serve() {
    use std::io::{BufRead, BufReader, Read, Write};
    let consul = Consul::start().await;
    let backend = Backend::start("web-1", Behavior::Ok).await;
    consul.register("web", "web-1", backend.port, &[]).await;
    let dir = std::env::temp_dir().join(format!("switchyard-workers-{}", common::free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gateway.yaml");
    let (port, admin) = (common::free_port(), common::free_port());
    let services = "workers: 2\nserver: {shutdown_grace: 1s}\nservices:\n  - name: web\n";
    write_config(&path, port, admin, &consul.url(), services);
    let (mut child, log, _guard) = start_gateway(&path);
    wait_log(&log, "switchyard serving").await;
    let client = common::http_client();
    let metrics_url = format!("http://127.0.0.1:{admin}/metrics");
    let gateway = format!("127.0.0.1:{port}");
    let ready = common::wait_until(Duration::from_secs(10), || async {
        status_of(&client, format!("http://{gateway}/web")).await == 200
    })
    .await;
    assert!(ready.is_some());
    // 40 connections, each answered once and held open.
    let held = tokio::task::spawn_blocking(move || {
        (0..40)
            .map(|_| {
                let mut stream = std::net::TcpStream::connect(&gateway).unwrap();
                stream
                    .write_all(b"GET /web HTTP/1.1\r\nHost: gw\r\n\r\n")
                    .unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut status = String::new();
                reader.read_line(&mut status).unwrap();
                assert!(status.contains(" 200 "), "{status}");
                let mut rest = [0u8; 512];
                let _ = reader.read(&mut rest);
                stream
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    let text = client
        .get(&metrics_url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let open = |worker: &str| {
        common::metric(
            &text,
            &format!("switchyard_client_connections{{listener=\"gateway\",worker=\"{worker}\"}}"),
        )
    };
    println!(
        "workers: 2, 40 connections: worker 0 holds {}, worker 1 holds {}",
        open("0"),
        open("1")
    );
    assert!(open("0") >= 1.0 && open("1") >= 1.0, "both workers accept");
    // 40, plus the readiness check's kept-alive connection.
    assert!(open("0") + open("1") >= 40.0);
    drop(held);
    signal(&child, "-TERM");
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap();
    assert!(status.unwrap().success());
    let _ = std::fs::remove_dir_all(&dir);
}
