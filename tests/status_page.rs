//! The admin status page (`/`) in a real headless Chromium, driven over WebDriver by Debian's
//! `chromedriver`: it lists each service with its route and healthy instances, turns traffic
//! into requests/s, 5xx share and p99, drops a deregistered instance by itself (it polls),
//! raises no script error or console error on the way, and says so when the gateway is gone.
//! A screenshot is checked to be a real PNG; with `SWITCHYARD_STATUS_SCREENSHOT=<path>` it is
//! also written there (that is how `docs/status-page.png` was made).

mod common;

use std::cell::RefCell;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};

use common::{free_port, http_client, wait_until, Backend, Behavior, Consul, Gateway};

const SERVICES: &str = "services:
  - name: web
    route: {path_prefix: /web}
  - name: idle
    route: {path_prefix: /idle}
    balance: random
";

/// The page polls every 2 s; this leaves room for a slow, shared machine.
const PAGE_DEADLINE: Duration = Duration::from_secs(20);

/// Headless Chromium under `chromedriver` on a free loopback port, with a fresh profile.
/// Dropping it ends the WebDriver session (closing Chromium) and kills chromedriver.
struct Browser {
    driver: Child,
    port: u16,
    session: String,
    profile: PathBuf,
    client: reqwest::Client,
}

impl Browser {
    async fn start() -> Browser {
        let port = free_port();
        let profile = std::env::temp_dir().join(format!("switchyard-test-chromium-{port}"));
        let _ = std::fs::remove_dir_all(&profile);
        std::fs::create_dir_all(&profile).expect("creating the chromium profile directory");
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting `chromedriver` (Debian packages chromium and chromium-driver; scripts/test.sh installs them)");
        let mut browser = Browser {
            driver,
            port,
            session: String::new(),
            profile,
            client: http_client(),
        };
        let status = browser.url("/status");
        let ready = wait_until(Duration::from_secs(20), || {
            let request = browser.client.get(&status).send();
            async move {
                match request.await {
                    Ok(r) => r
                        .json::<Value>()
                        .await
                        .is_ok_and(|v| v["value"]["ready"] == true),
                    Err(_) => false,
                }
            }
        })
        .await;
        assert!(ready.is_some(), "chromedriver did not become ready");

        let args = [
            "--headless",
            // Root in a container-like sandbox-less machine: Chromium's sandbox cannot start.
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            // Nothing but the page under test touches the network.
            "--no-proxy-server",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1200,800",
            &format!("--user-data-dir={}", browser.profile.display()),
        ];
        let created = browser
            .command(
                reqwest::Method::POST,
                "/session",
                json!({"capabilities": {"alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {"binary": "/usr/bin/chromium", "args": args},
                    "goog:loggingPrefs": {"browser": "ALL"},
                }}}),
            )
            .await;
        browser.session = created["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {created}"))
            .to_owned();
        browser
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// One WebDriver command (`body` null: none); its `value`. Panics on a WebDriver error.
    async fn command(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let mut request = self.client.request(method, self.url(path));
        // chromedriver rejects a body on GET, and requires one (if only `{}`) on POST.
        if !body.is_null() {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("WebDriver {path}: {e}"));
        let status = response.status();
        let answer: Value = response.json().await.expect("WebDriver answers JSON");
        assert!(status.is_success(), "WebDriver {path}: {status} {answer}");
        answer["value"].clone()
    }

    async fn session_command(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        self.command(method, &format!("/session/{}{path}", self.session), body)
            .await
    }

    async fn open(&self, url: &str) {
        self.session_command(reqwest::Method::POST, "/url", json!({ "url": url }))
            .await;
    }

    /// Runs `script` in the page; what it returns.
    async fn run(&self, script: &str) -> Value {
        self.session_command(
            reqwest::Method::POST,
            "/execute/sync",
            json!({"script": script, "args": []}),
        )
        .await
    }

    async fn screenshot(&self) -> Vec<u8> {
        let encoded = self
            .session_command(reqwest::Method::GET, "/screenshot", Value::Null)
            .await;
        base64::engine::general_purpose::STANDARD
            .decode(encoded.as_str().expect("a base64 screenshot"))
            .expect("valid base64")
    }

    /// The console messages so far (chromedriver's log extension).
    async fn console(&self) -> Vec<Value> {
        self.session_command(reqwest::Method::POST, "/se/log", json!({"type": "browser"}))
            .await
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Drop cannot await: end the session with one blocking request, so chromedriver
        // closes Chromium before it is killed itself.
        if !self.session.is_empty() {
            if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                let _ = write!(
                    stream,
                    "DELETE /session/{} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
                    self.session
                );
                let _ = stream.read_to_end(&mut Vec::new());
            }
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// What the page shows, read from its DOM: per service its fields and instances, and the
/// text of the page's script-error box.
const READ_PAGE: &str = r#"
return {
  errors: document.getElementById("js-errors").textContent,
  banner: document.getElementById("banner").hidden ? "" : document.getElementById("banner").textContent,
  services: Object.fromEntries([...document.querySelectorAll("[data-service]")].map((s) => [
    s.dataset.service,
    {
      fields: Object.fromEntries([...s.querySelectorAll("[data-field]")].map((f) => [f.dataset.field, f.textContent])),
      instances: [...s.querySelectorAll("[data-instance]")].map((r) => [r.dataset.instance, r.querySelector(".addr").textContent]),
      text: s.innerText,
    },
  ])),
};
"#;

/// Polls the page's DOM until `condition` holds; the page as last read either way.
async fn wait_for_page(browser: &Browser, what: &str, condition: impl Fn(&Value) -> bool) -> Value {
    let last = RefCell::new(Value::Null);
    let reached = wait_until(PAGE_DEADLINE, || async {
        let page = browser.run(READ_PAGE).await;
        let holds = condition(&page);
        *last.borrow_mut() = page;
        holds
    })
    .await;
    let page = last.into_inner();
    assert!(reached.is_some(), "the page never showed {what}: {page:#}");
    assert_eq!(page["errors"], "", "script errors on the page");
    page
}

fn field<'a>(page: &'a Value, service: &str, name: &str) -> &'a str {
    page["services"][service]["fields"][name]
        .as_str()
        .unwrap_or("")
}

fn instance_ids(page: &Value, service: &str) -> Vec<String> {
    page["services"][service]["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i[0].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_shows_services_follows_consul_and_raises_no_errors() {
    let consul = Consul::start().await;
    let web1 = Backend::start("web-1", Behavior::Ok).await;
    let web2 = Backend::start("web-2", Behavior::Ok).await;
    consul.register("web", "web-1", web1.port, &["v1"]).await;
    consul.register("web", "web-2", web2.port, &["v1"]).await;
    let mut gateway = Gateway::start(&consul, SERVICES).await;
    assert!(gateway
        .wait_for_instances("web", &["web-1", "web-2"], Duration::from_secs(10))
        .await
        .is_some());

    // The page is one self-contained HTML document with a CSP that forbids outside loads.
    let page = http_client()
        .get(gateway.admin_url("/"))
        .send()
        .await
        .expect("GET /");
    assert_eq!(page.status(), 200);
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap_or("");
    assert!(csp.contains("default-src 'none'"), "{csp}");

    let browser = Browser::start().await;
    browser.open(&gateway.admin_url("/")).await;

    // Both services, their routes, the instances with address:port and ID.
    let page = wait_for_page(&browser, "web's two instances", |page| {
        instance_ids(page, "web").len() == 2 && page["services"]["idle"].is_object()
    })
    .await;
    let mut instances = page["services"]["web"]["instances"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    instances.sort_by_key(|i| i[0].as_str().map(str::to_owned));
    assert_eq!(
        instances,
        vec![
            json!(["web-1", format!("127.0.0.1:{}", web1.port)]),
            json!(["web-2", format!("127.0.0.1:{}", web2.port)]),
        ]
    );
    assert_eq!(field(&page, "web", "route"), "*/web");
    assert_eq!(field(&page, "web", "balance"), "round_robin");
    assert_eq!(field(&page, "idle", "balance"), "random");
    assert!(
        field(&page, "web", "index").parse::<u64>().unwrap_or(0) > 0,
        "{page:#}"
    );
    assert!(field(&page, "web", "sync").ends_with(" s ago"), "{page:#}");
    let idle_text = page["services"]["idle"]["text"].as_str().unwrap_or("");
    assert!(idle_text.contains("No healthy instance"), "{idle_text}");
    assert!(instance_ids(&page, "idle").is_empty());

    // Traffic becomes rates: 5xx share (idle answers 503 to all) and p99 from the histogram.
    let (_, failures) = gateway.spread("/web", 200).await;
    assert!(failures.is_empty(), "{failures:?}");
    for _ in 0..10 {
        assert_eq!(gateway.get("/idle").await.status(), 503);
    }
    let page = wait_for_page(&browser, "rates for the traffic sent", |page| {
        field(page, "web", "rps").parse::<f64>().unwrap_or(0.0) > 0.0
            && field(page, "web", "p99").ends_with(" ms")
            && field(page, "idle", "errors") == "100.0 %"
    })
    .await;
    assert_eq!(field(&page, "web", "errors"), "0.0 %", "{page:#}");

    let png = browser.screenshot().await;
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    let width = u32::from_be_bytes([png[16], png[17], png[18], png[19]]);
    let height = u32::from_be_bytes([png[20], png[21], png[22], png[23]]);
    assert!(width >= 800 && height >= 400, "screenshot {width}x{height}");
    if let Some(path) = std::env::var_os("SWITCHYARD_STATUS_SCREENSHOT") {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
        std::fs::write(&path, &png).expect("writing the screenshot");
        println!(
            "screenshot ({width}x{height}) written to {}",
            path.display()
        );
    }

    // The page follows Consul by itself: no reload, its own polling.
    consul.deregister("web-2").await;
    let page = wait_for_page(&browser, "web-2 gone", |page| {
        instance_ids(page, "web") == ["web-1"]
    })
    .await;
    assert_eq!(page["banner"], "");

    // Passive health shows too: an instance Consul calls healthy but nothing answers at is
    // ejected after its failed tries, and the page marks it.
    consul
        .register("web", "web-dead", common::free_port(), &["v1"])
        .await;
    assert!(gateway
        .wait_for_instances("web", &["web-1", "web-dead"], Duration::from_secs(5))
        .await
        .is_some());
    for _ in 0..12 {
        assert_eq!(gateway.get("/web").await.status(), 200);
    }
    let page = wait_for_page(&browser, "web-dead ejected", |page| {
        field(page, "web", "ejected") == "1 ejected"
    })
    .await;
    assert!(
        page["services"]["web"]["text"]
            .as_str()
            .unwrap_or("")
            .contains("ejected ("),
        "{page:#}"
    );
    consul.deregister("web-dead").await;
    wait_for_page(&browser, "web-dead gone", |page| {
        instance_ids(page, "web") == ["web-1"]
    })
    .await;

    // Nothing went wrong in the console either (a failed load, a CSP violation, an error).
    // A console error of our own first proves the log is read at all.
    browser
        .run(r#"console.error("status-page-test-probe"); return null;"#)
        .await;
    let console = browser.console().await;
    let (probes, severe): (Vec<&Value>, Vec<&Value>) = console
        .iter()
        .filter(|entry| entry["level"] == "SEVERE")
        .partition(|entry| {
            entry["message"]
                .as_str()
                .is_some_and(|m| m.contains("status-page-test-probe"))
        });
    assert_eq!(
        probes.len(),
        1,
        "the console log is not being read: {console:#?}"
    );
    assert!(severe.is_empty(), "console errors: {severe:#?}");

    // The gateway goes away: the page says so and keeps the last picture. (After the console
    // check: the failed fetches are console errors of their own.)
    gateway.stop().await;
    let page = wait_for_page(&browser, "the unreachable banner", |page| {
        page["banner"]
            .as_str()
            .is_some_and(|b| b.starts_with("Cannot reach the admin listener"))
    })
    .await;
    assert_eq!(
        instance_ids(&page, "web"),
        ["web-1"],
        "the last picture stays"
    );

    // And the page's own error box, asserted empty above, does catch an uncaught error
    // (thrown by a script of the page's origin, as the page's own code would be).
    browser
        .run(
            r#"const script = document.createElement("script");
               script.textContent = 'throw new Error("status-page-test-uncaught")';
               document.body.append(script);
               return null;"#,
        )
        .await;
    let page = browser.run(READ_PAGE).await;
    assert!(
        page["errors"]
            .as_str()
            .is_some_and(|e| e.contains("status-page-test-uncaught")),
        "an uncaught error did not reach #js-errors: {:?}",
        page["errors"]
    );
}
