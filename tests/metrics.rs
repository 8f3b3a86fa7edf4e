//! `/metrics` through a real gateway: valid exposition format (checked by Prometheus's own
//! `promtool`) and a request counter that matches the traffic sent, as do `/routes`' totals.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

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

/// A reload that drops a service drops every series labelled with it (a frozen
/// `consul_last_success_timestamp_seconds` would keep `SwitchyardConsulSyncStale` firing);
/// the other services' series, including one the reload changed, stay and keep counting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn series_of_a_removed_service_go_with_it() {
    let consul = common::Consul::start().await;
    let web = common::Backend::start("web-1", common::Behavior::Ok).await;
    let api = common::Backend::start("api-1", common::Behavior::Ok).await;
    consul.register("web", "web-1", web.port, &[]).await;
    consul.register("api", "api-1", api.port, &[]).await;
    let gateway = common::Gateway::start(
        &consul,
        "services:\n  - name: web\n  - name: api\n    balance: random\n",
    )
    .await;
    for (service, id) in [("web", "web-1"), ("api", "api-1")] {
        let synced = gateway
            .wait_for_instances(service, &[id], Duration::from_secs(10))
            .await;
        assert!(synced.is_some(), "{service} never synced");
    }
    for path in ["/web", "/api"] {
        let (_, failures) = gateway.spread(path, 5).await;
        assert!(failures.is_empty(), "{path}: {failures:?}");
    }
    let series = |text: &str, service: &str| -> Vec<String> {
        let label = format!("service=\"{service}\"");
        text.lines()
            .filter(|l| !l.starts_with('#') && l.contains(&label))
            .map(str::to_owned)
            .collect()
    };
    let before = gateway.admin_get("/metrics").await;
    let web_series = series(&before, "web");
    println!("web has {} series before the reload", web_series.len());
    for family in [
        "switchyard_requests_total",
        "switchyard_request_duration_seconds_count",
        "switchyard_upstream_instances",
        "switchyard_table_updates_total",
        "switchyard_consul_last_success_timestamp_seconds",
        "switchyard_ejected_instances",
    ] {
        assert!(
            web_series.iter().any(|l| l.starts_with(family)),
            "{family} for web missing before the reload:\n{before}"
        );
    }
    let api_count = series(&before, "api").len();

    // Reload: `web` removed, `api` changed (a rebuilt upstream under the same label).
    let mut next = gateway.config.clone();
    next.services.retain(|s| s.name != "web");
    next.services[0].balance = switchyard::config::Balance::RoundRobin;
    gateway.reload.send(next).await.unwrap();
    let gone = common::wait_until(Duration::from_secs(5), || async {
        series(&gateway.admin_get("/metrics").await, "web").is_empty()
    })
    .await;
    let after = gateway.admin_get("/metrics").await;
    assert!(
        gone.is_some(),
        "web's series outlived it:\n{}",
        series(&after, "web").join("\n")
    );
    println!("web's series gone {gone:?} after the reload");
    assert_eq!(series(&after, "api").len(), api_count, "{after}");
    let api_ok = r#"switchyard_requests_total{code="200",service="api"}"#;
    assert_eq!(metric(&after, api_ok), 5.0, "{after}");
    assert!(
        metric(
            &after,
            r#"switchyard_consul_last_success_timestamp_seconds{service="api"}"#
        ) > 1.0e9
    );

    // Still counting, through the rebuilt upstream; `/web` is now unrouted, not web's.
    let (_, failures) = gateway.spread("/api", 3).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(gateway.get("/web").await.status(), 404);
    let last = gateway.admin_get("/metrics").await;
    assert_eq!(metric(&last, api_ok), 8.0, "{last}");
    assert!(series(&last, "web").is_empty(), "{last}");
}
