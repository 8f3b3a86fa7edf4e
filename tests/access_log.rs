//! The access log through a real gateway: one JSON line per answered request, in order, with
//! the route's service, the instance of the last try, the status, the number of tries and no
//! query string; every line written by the time `run` returns; an unopenable path fails the
//! start.

mod common;

use std::time::{Duration, SystemTime};

use serde_json::Value;
use tokio::net::TcpListener;

use common::{free_port, http_client, Backend, Behavior, Consul, Gateway};
use switchyard::config::{Config, ConsulEnv};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_has_one_line_per_request_with_its_outcome() {
    let consul = Consul::start().await;
    let backend = Backend::start("web-1", Behavior::Ok).await;
    consul.register("web", "web-1", backend.port, &[]).await;
    // Sorted before web-1 and listened on by nothing: round robin tries it first for every
    // request here (each try advances the cursor), so each request takes two tries.
    consul.register("web", "web-0", free_port(), &[]).await;
    let dir = std::env::temp_dir().join(format!("switchyard-test-access-log-{}", free_port()));
    std::fs::create_dir_all(&dir).expect("creating the log directory");
    let path = dir.join("access.jsonl");
    let yaml = format!(
        "access_log:\n  path: {}\nservices:\n  - name: web\n  - name: idle\n",
        path.display()
    );
    let mut gateway = Gateway::start(&consul, &yaml).await;
    assert!(gateway
        .wait_for_instances("web", &["web-0", "web-1"], Duration::from_secs(10))
        .await
        .is_some());

    let client = http_client();
    let before = SystemTime::now();
    assert_eq!(gateway.get("/web/a?token=secret").await.status(), 200);
    let post = client
        .post(gateway.url("/web/b"))
        .body("payload")
        .send()
        .await
        .expect("POST through the gateway");
    assert_eq!(post.status(), 200);
    assert_eq!(gateway.get("/idle").await.status(), 503);
    assert_eq!(gateway.get("/nowhere").await.status(), 404);
    let metrics = client
        .get(gateway.admin_url("/metrics"))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics text");
    assert!(
        metrics.contains("switchyard_access_log_dropped_total 0"),
        "{metrics}"
    );

    // `run` returns only after the writer wrote everything queued.
    gateway.stop().await;
    let text = std::fs::read_to_string(&path).expect("reading the access log");
    let _ = std::fs::remove_dir_all(&dir);
    let lines: Vec<Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}")))
        .collect();
    assert_eq!(lines.len(), 4, "{text}");

    let instance = format!("127.0.0.1:{}", backend.port);
    let expected = [
        (
            "GET",
            "/web/a",
            Some("web"),
            Some(instance.as_str()),
            200,
            2,
        ),
        (
            "POST",
            "/web/b",
            Some("web"),
            Some(instance.as_str()),
            200,
            2,
        ),
        ("GET", "/idle", Some("idle"), None, 503, 0),
        ("GET", "/nowhere", None, None, 404, 0),
    ];
    for (line, (method, path, service, instance, status, tries)) in lines.iter().zip(expected) {
        assert_eq!(line["method"], method, "{line}");
        assert_eq!(
            line["path"], path,
            "the query string must not be logged: {line}"
        );
        assert_eq!(line["service"].as_str(), service, "{line}");
        assert_eq!(line["instance"].as_str(), instance, "{line}");
        assert_eq!(line["status"], status, "{line}");
        assert_eq!(line["tries"], tries, "{line}");
        assert_eq!(line["client"], "127.0.0.1", "{line}");
        let duration = line["duration"].as_f64().expect("duration in seconds");
        assert!((0.0..30.0).contains(&duration), "{line}");
        let time = humantime::parse_rfc3339(line["time"].as_str().expect("time"))
            .expect("an RFC 3339 time");
        // Millisecond precision: the entry may read a millisecond before `before`.
        assert!(time + Duration::from_millis(1) >= before, "{line}");
        assert!(time <= SystemTime::now(), "{line}");
    }
    assert!(!text.contains("secret"));
}

#[tokio::test]
async fn an_access_log_that_cannot_be_opened_fails_the_start() {
    let missing = std::env::temp_dir()
        .join(format!("switchyard-test-no-such-dir-{}", free_port()))
        .join("access.jsonl");
    let yaml = format!(
        "access_log:\n  path: {}\nservices:\n  - name: web\n",
        missing.display()
    );
    let config = Config::from_yaml(&yaml, &ConsulEnv::default()).expect("valid config");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding");
    let admin = TcpListener::bind("127.0.0.1:0").await.expect("binding");
    let error = switchyard::run(config, listener, admin, switchyard::Shutdown::new())
        .await
        .expect_err("the start must fail");
    let message = error.to_string();
    assert!(
        message.contains("access log") && message.contains(&missing.display().to_string()),
        "{message}"
    );
}
