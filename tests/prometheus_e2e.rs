//! The shipped monitoring files against a real Prometheus (Debian's `prometheus` binary):
//! it scrapes a real gateway with `deploy/prometheus.yml` (target and intervals swapped for
//! the test's), the request count read back through its query API matches the traffic sent,
//! the rules of `deploy/alerts.yml` load and evaluate (an empty service's alert goes pending,
//! the healthy service's does not), and every query of `deploy/grafana-dashboard.json` is
//! valid PromQL that returns data.

mod common;

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use common::{free_port, http_client, wait_until, Backend, Behavior, Consul, Gateway};

/// How long Prometheus gets to start, scrape and evaluate (it scrapes every second here).
const DEADLINE: Duration = Duration::from_secs(60);

fn deploy_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(name)
}

/// A Prometheus server on a free loopback port with its own storage directory; killed, and
/// its directory removed, on drop.
struct Prometheus {
    child: Child,
    port: u16,
    dir: PathBuf,
    client: reqwest::Client,
}

impl Prometheus {
    /// Starts Prometheus with `deploy/prometheus.yml`, scraping `target` every second.
    async fn start(target: &str) -> Prometheus {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("switchyard-test-prometheus-{port}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("data")).expect("creating the prometheus directory");

        // The shipped config, not a test-only copy, so a broken deploy file fails here.
        let shipped = std::fs::read_to_string(deploy_file("prometheus.yml"))
            .expect("reading deploy/prometheus.yml");
        let mut config = shipped.clone();
        for (from, to) in [
            ("scrape_interval: 15s", "scrape_interval: 1s"),
            ("evaluation_interval: 15s", "evaluation_interval: 1s"),
            ("\"127.0.0.1:8081\"", &format!("\"{target}\"")),
        ] {
            assert!(
                config.contains(from),
                "deploy/prometheus.yml no longer contains {from:?}; update this test"
            );
            config = config.replace(from, to);
        }
        std::fs::write(dir.join("prometheus.yml"), config).expect("writing prometheus.yml");
        // `rule_files: [alerts.yml]` is relative to the config file.
        std::fs::copy(deploy_file("alerts.yml"), dir.join("alerts.yml"))
            .expect("copying deploy/alerts.yml");

        let log = std::fs::File::create(dir.join("prometheus.log")).expect("creating the log");
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::from(log.try_clone().expect("cloning a file handle")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect(
                "starting `prometheus` (Debian package `prometheus`; scripts/test.sh installs it)",
            );
        let prometheus = Prometheus {
            child,
            port,
            dir,
            client: http_client(),
        };
        let ready_url = prometheus.url("/-/ready");
        let ready = wait_until(DEADLINE, || {
            let request = prometheus.client.get(&ready_url).send();
            async move { request.await.is_ok_and(|r| r.status().is_success()) }
        })
        .await;
        assert!(
            ready.is_some(),
            "prometheus not ready:\n{}",
            prometheus.log()
        );
        prometheus
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// `GET /api/v1/<path>` with query parameters; the `data` of a successful answer, or the
    /// error Prometheus gave.
    async fn api(&self, path: &str, params: &[(&str, &str)]) -> Result<Value, String> {
        let url = reqwest::Url::parse_with_params(&self.url(&format!("/api/v1/{path}")), params)
            .map_err(|e| e.to_string())?;
        let response = self
            .client
            .get(url)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let body: Value = response.json().await.map_err(|e| e.to_string())?;
        if body["status"] == "success" {
            Ok(body["data"].clone())
        } else {
            Err(format!("{}: {}", body["errorType"], body["error"]))
        }
    }

    /// An instant query's result vector.
    async fn query(&self, promql: &str) -> Result<Vec<Value>, String> {
        let data = self.api("query", &[("query", promql)]).await?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }

    /// The value of a query that yields one series, if it yields exactly one.
    async fn scalar(&self, promql: &str) -> Option<f64> {
        match self.query(promql).await.ok()?.as_slice() {
            [one] => one["value"][1].as_str()?.parse().ok(),
            _ => None,
        }
    }

    /// Polls `promql` until it yields `want`; the last value seen otherwise.
    async fn wait_for_value(&self, promql: &str, want: f64) -> Result<(), Option<f64>> {
        let last = RefCell::new(None);
        let reached = wait_until(DEADLINE, || async {
            let value = self.scalar(promql).await;
            *last.borrow_mut() = value;
            value == Some(want)
        })
        .await;
        reached.map(|_| ()).ok_or(last.into_inner())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Every PromQL expression of the dashboard, with Grafana's variables given test values.
fn dashboard_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(deploy_file("grafana-dashboard.json"))
        .expect("reading deploy/grafana-dashboard.json");
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("dashboard panels");
    let queries: Vec<(String, String)> = panels
        .iter()
        .flat_map(|panel| {
            let title = panel["title"].as_str().unwrap_or("?").to_owned();
            panel["targets"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter_map(move |target| {
                    let expr = target["expr"].as_str()?;
                    let expr = expr
                        .replace("$__rate_interval", "1m")
                        .replace("$job", ".*")
                        .replace("$service", ".*");
                    Some((title.clone(), expr))
                })
        })
        .collect();
    assert!(queries.len() >= 6, "too few dashboard queries: {queries:?}");
    queries
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_counts_alerts_and_answers_dashboard_queries() {
    let consul = Consul::start().await;
    let backend = Backend::start("web-1", Behavior::Ok).await;
    consul.register("web", "web-1", backend.port, &[]).await;
    // "idle" has no instance registered: its requests get 503 and its alert must go pending.
    let gateway = Gateway::start(&consul, "services:\n  - name: web\n  - name: idle\n").await;
    assert!(gateway
        .wait_for_instances("web", &["web-1"], Duration::from_secs(10))
        .await
        .is_some());
    let prometheus = Prometheus::start(&gateway.admin.to_string()).await;

    let (ok, unavailable) = (137, 5);
    let (_, failures) = gateway.spread("/web", ok).await;
    assert!(failures.is_empty(), "{failures:?}");
    for _ in 0..unavailable {
        assert_eq!(gateway.get("/idle").await.status(), 503);
    }

    // The counts, read back from Prometheus's storage.
    let web = r#"sum(switchyard_requests_total{service="web"})"#;
    if let Err(last) = prometheus.wait_for_value(web, ok as f64).await {
        panic!(
            "{web} never reached {ok} (last {last:?}):\n{}",
            prometheus.log()
        );
    }
    let idle = r#"sum(switchyard_requests_total{service="idle",code="503"})"#;
    if let Err(last) = prometheus.wait_for_value(idle, unavailable as f64).await {
        panic!("{idle} never reached {unavailable} (last {last:?})");
    }
    assert_eq!(
        prometheus
            .scalar(r#"switchyard_upstream_instances{service="web"}"#)
            .await,
        Some(1.0)
    );

    // The rules loaded, evaluate without error, and the empty service's alert is pending
    // (firing needs `for: 1m`) while the healthy one has none.
    let alerts = RefCell::new(Vec::new());
    let pending = wait_until(DEADLINE, || async {
        let answer = prometheus.api("alerts", &[]).await;
        let now: Vec<Value> = answer
            .ok()
            .and_then(|data| data["alerts"].as_array().cloned())
            .unwrap_or_default();
        let found = now.iter().any(|a| {
            a["labels"]["alertname"] == "SwitchyardNoHealthyInstances"
                && a["labels"]["service"] == "idle"
        });
        *alerts.borrow_mut() = now;
        found
    })
    .await;
    let alerts = alerts.into_inner();
    assert!(
        pending.is_some(),
        "no alert for the empty service: {alerts:?}"
    );
    assert!(
        !alerts.iter().any(|a| a["labels"]["service"] == "web"),
        "unexpected alert for a healthy service: {alerts:?}"
    );
    let rules = prometheus
        .api("rules", &[])
        .await
        .expect("GET /api/v1/rules");
    let rules: Vec<&Value> = rules["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .collect();
    assert_eq!(rules.len(), 4, "{rules:?}");
    for rule in rules {
        assert_ne!(rule["health"], "err", "rule failed to evaluate: {rule}");
    }

    // Every dashboard query parses and, once two scrapes make rates computable, has data.
    for (panel, expr) in dashboard_queries() {
        let last = RefCell::new(Err(String::new()));
        let answered = wait_until(DEADLINE, || async {
            let answer = prometheus.query(&expr).await;
            let has_data = answer.as_ref().is_ok_and(|series| !series.is_empty());
            *last.borrow_mut() = answer;
            has_data
        })
        .await;
        let last = last.into_inner();
        assert!(
            answered.is_some(),
            "dashboard panel {panel:?}: {expr} gave {last:?}"
        );
    }
}
