//! `/metrics` through a real gateway: valid exposition format (checked by Prometheus's own
//! `promtool`) and a request counter that matches the traffic sent, as do `/routes`' totals.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Backend, Behavior, Consul, Gateway};

fn counter(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_count_every_request() {
    let consul = Consul::start().await;
    let backend = Backend::start("web-1", Behavior::Ok).await;
    consul.register("web", "web-1", backend.port, &[]).await;
    let gateway = Gateway::start(&consul, "services:\n  - name: web\n").await;
    assert!(gateway
        .wait_for_instances("web", &["web-1"], Duration::from_secs(10))
        .await
        .is_some());

    let (ok, unrouted) = (137, 11);
    let (_, failures) = gateway.spread("/web", ok).await;
    assert!(failures.is_empty());
    for _ in 0..unrouted {
        assert_eq!(gateway.get("/elsewhere").await.status(), 404);
    }

    let client = common::http_client();
    let metrics = client
        .get(gateway.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        counter(
            &metrics,
            r#"switchyard_requests_total{code="200",service="web"}"#
        ),
        ok as f64,
        "{metrics}"
    );
    assert_eq!(
        counter(
            &metrics,
            r#"switchyard_requests_total{code="404",service="unrouted"}"#
        ),
        unrouted as f64
    );
    assert_eq!(
        counter(
            &metrics,
            r#"switchyard_request_duration_seconds_count{service="web"}"#
        ),
        ok as f64
    );
    assert_eq!(
        counter(&metrics, r#"switchyard_upstream_instances{service="web"}"#),
        1.0
    );
    assert!(counter(&metrics, r#"switchyard_table_updates_total{service="web"}"#) >= 1.0);
    assert!(
        counter(
            &metrics,
            r#"switchyard_consul_last_success_timestamp_seconds{service="web"}"#
        ) > 1.0e9
    );
    assert!(metrics.contains("process_resident_memory_bytes"));

    // /routes carries the same totals, for readers without a Prometheus (the status page).
    let routes: serde_json::Value = client
        .get(gateway.admin_url("/routes"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let web = &routes["services"][0];
    assert_eq!(web["service"], "web");
    assert_eq!(web["requests_total"], ok);
    assert_eq!(web["errors_5xx_total"], 0);

    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package `prometheus`) must be installed; .ci/run installs it");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let output = promtool.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    println!(
        "promtool check metrics: exit {:?} {report}",
        output.status.code()
    );
    assert!(
        output.status.success(),
        "promtool rejected /metrics: {report}"
    );
}
