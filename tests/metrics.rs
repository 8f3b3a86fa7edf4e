//! `/metrics` through a real gateway: valid exposition format (checked by Prometheus's own
//! `promtool`) and a request counter that matches the traffic sent, as do `/routes`' totals.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::metric;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_count_every_request() {
    let (_consul, _backend, gateway) = common::single_backend_gateway().await;

    let (ok, unrouted) = (137, 11);
    let (_, failures) = gateway.spread("/web", ok).await;
    assert!(failures.is_empty());
    for _ in 0..unrouted {
        assert_eq!(gateway.get("/elsewhere").await.status(), 404);
    }

    let client = common::http_client();
    let metrics = gateway.admin_get("/metrics").await;
    assert_eq!(
        metric(
            &metrics,
            r#"switchyard_requests_total{code="200",service="web"}"#
        ),
        ok as f64,
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            r#"switchyard_requests_total{code="404",service="unrouted"}"#
        ),
        unrouted as f64
    );
    assert_eq!(
        metric(
            &metrics,
            r#"switchyard_request_duration_seconds_count{service="web"}"#
        ),
        ok as f64
    );
    assert_eq!(
        metric(&metrics, r#"switchyard_upstream_instances{service="web"}"#),
        1.0
    );
    assert!(metric(&metrics, r#"switchyard_table_updates_total{service="web"}"#) >= 1.0);
    assert!(
        metric(
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
