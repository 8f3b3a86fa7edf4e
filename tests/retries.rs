//! Retry rules through the gateway (with a real Consul, or a static list where no registry is
//! needed): dead instances are retried around, requests that may have reached an instance are
//! retried only when idempotent, `retry.timeout` bounds all tries with a 504; and the path an
//! instance gets (`strip_prefix`).

mod common;

use std::time::{Duration, Instant};

use common::{free_port, Backend, Behavior, Consul, Gateway};

/// No registry needed: the instances are a static list (`source: static`), and Consul's
/// address points nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_instance_costs_no_failed_request() {
    let live = common::backends("web", 3).await;
    // Listed, but nothing listens there.
    let dead = format!("127.0.0.1:{}", free_port());
    let mut instances: Vec<String> = live
        .iter()
        .map(|b| format!("127.0.0.1:{}", b.port))
        .collect();
    instances.push(dead.clone());
    let services = format!(
        "services:\n  - name: web\n    source: static\n    instances: [{}]\n",
        instances.join(", ")
    );
    let gateway = common::sources::gateway_without_consul(&services).await;
    let ids: Vec<&str> = instances.iter().map(String::as_str).collect();
    assert!(gateway
        .wait_for_instances("web", &ids, Duration::from_secs(10))
        .await
        .is_some());

    let (hits, failures) = gateway.spread("/web", 300).await;
    println!("300 GETs with one dead instance of 4: {hits:?}, failures {failures:?}");
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(hits.values().sum::<usize>(), 300);
    // The dead instance's turns are spread over the others, not dumped on its neighbour.
    assert!(hits.values().all(|&h| (85..=115).contains(&h)), "{hits:?}");

    // Connect failures are retried for any method: nothing was sent.
    let client = common::http_client();
    for _ in 0..8 {
        let response = client
            .post(gateway.url("/web"))
            .body("payload")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let metrics = gateway.admin_get("/metrics").await;
    let value = |series: &str| common::metric(&metrics, series);
    let retries = value("switchyard_retries_total{service=\"web\"}");
    println!("retries: {retries}");
    // Passive outlier detection ejects the dead instance after 5 failed tries in a row, so
    // it costs a handful of retries, not one in four requests.
    assert!((5.0..20.0).contains(&retries), "{retries}");
    assert_eq!(value("switchyard_ejections_total{service=\"web\"}"), 1.0);
    assert_eq!(value("switchyard_ejected_instances{service=\"web\"}"), 1.0);
    let dead = gateway
        .instance_entries("web")
        .await
        .into_iter()
        .find(|i| i["id"] == dead.as_str())
        .expect("the dead instance is still listed");
    assert!(
        dead["ejected_for_seconds"]
            .as_f64()
            .is_some_and(|s| s > 0.0),
        "{dead}"
    );
}

async fn flaky_setup(consul: &Consul, behavior: Behavior) -> (Vec<Backend>, Gateway) {
    let backends = vec![
        Backend::start("flaky-1", behavior).await,
        Backend::start("flaky-2", behavior).await,
    ];
    for b in &backends {
        consul.register("flaky", &b.id, b.port, &[]).await;
    }
    let gateway = Gateway::start(
        consul,
        "services:\n  - name: flaky\n    retry: {attempts: 3, timeout: 5s}\n",
    )
    .await;
    assert!(gateway
        .wait_for_instances("flaky", &["flaky-1", "flaky-2"], Duration::from_secs(10))
        .await
        .is_some());
    (backends, gateway)
}

fn total_hits(backends: &[Backend]) -> usize {
    backends.iter().map(Backend::hits).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_lost_after_sending_is_retried_only_when_idempotent() {
    let consul = Consul::start().await;
    let (backends, gateway) = flaky_setup(&consul, Behavior::DropAfterRead).await;
    let client = common::http_client();

    let response = client
        .post(gateway.url("/flaky"))
        .body("pay once")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 502);
    assert_eq!(
        response.headers()["x-switchyard-error"],
        "upstream-unreachable"
    );
    assert_eq!(
        total_hits(&backends),
        1,
        "a POST that reached an instance must not be replayed"
    );

    let response = client.get(gateway.url("/flaky")).send().await.unwrap();
    assert_eq!(response.status(), 502);
    assert_eq!(
        total_hits(&backends),
        1 + 3,
        "a GET is tried `attempts` times"
    );
    assert!(
        backends.iter().all(|b| b.hits() >= 2),
        "retries moved to the other instance"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_gateway_statuses_are_retried_only_when_idempotent() {
    let consul = Consul::start().await;
    let (backends, gateway) = flaky_setup(&consul, Behavior::Status(503)).await;
    let client = common::http_client();

    let response = client
        .post(gateway.url("/flaky"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert!(
        response.headers().get("x-instance").is_some(),
        "the instance's own answer passes through"
    );
    assert_eq!(total_hits(&backends), 1);

    let response = client
        .put(gateway.url("/flaky?q=1"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(total_hits(&backends), 1 + 3, "PUT is idempotent: retried");
    // The last try's head is rebuilt from the lines kept after the first went out
    // (gateway/head.rs): the same method, target, Host and forwarded headers.
    let echo = common::header_or(response.headers(), "x-echo", "");
    let host = gateway.url("").trim_start_matches("http://").to_owned();
    let expected = format!("PUT /flaky?q=1 host={host} xff=127.0.0.1 proto=http");
    assert_eq!(echo, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_timeout_answers_504_without_waiting_for_the_instance() {
    let consul = Consul::start().await;
    let slow = Backend::start("slow-1", Behavior::Delay(Duration::from_secs(3))).await;
    consul.register("slow", "slow-1", slow.port, &[]).await;
    let gateway = Gateway::start(
        &consul,
        "services:\n  - name: slow\n    retry: {attempts: 3, timeout: 300ms}\n",
    )
    .await;
    assert!(gateway
        .wait_for_instances("slow", &["slow-1"], Duration::from_secs(10))
        .await
        .is_some());

    let started = Instant::now();
    let response = gateway.get("/slow").await;
    let elapsed = started.elapsed();
    println!(
        "instance 3 s slow, retry.timeout 300ms: {} after {elapsed:?}",
        response.status()
    );
    assert_eq!(response.status(), 504);
    assert_eq!(
        response.headers()["x-switchyard-error"],
        "deadline-exceeded"
    );
    assert!(
        elapsed >= Duration::from_millis(300) && elapsed < Duration::from_secs(2),
        "answered at the deadline, not the instance's pace: {elapsed:?}"
    );
    assert_eq!(
        slow.hits(),
        1,
        "the deadline covers every try: no retry after it"
    );
    let metrics = gateway.admin_get("/metrics").await;
    assert_eq!(
        common::metric(
            &metrics,
            r#"switchyard_requests_total{code="504",service="slow"}"#
        ),
        1.0,
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strip_prefix_forwards_the_rest_of_the_path_and_the_query() {
    let consul = Consul::start().await;
    let backend = Backend::start("echo-1", Behavior::Ok).await;
    // One instance behind both services (Consul IDs are unique per agent).
    consul.register("api", "api-1", backend.port, &[]).await;
    consul.register("keep", "keep-1", backend.port, &[]).await;
    let gateway = Gateway::start(
        &consul,
        "services:\n  - name: api\n    route: {path_prefix: /api, strip_prefix: true}\n  - name: keep\n",
    )
    .await;
    for (service, id) in [("api", "api-1"), ("keep", "keep-1")] {
        assert!(gateway
            .wait_for_instances(service, &[id], Duration::from_secs(10))
            .await
            .is_some());
    }
    // (sent, what the instance's request line must start with)
    let cases = [
        ("/api/users/7?fields=name", "GET /users/7?fields=name "),
        ("/api/", "GET / "),
        ("/api", "GET / "),
        ("/api?page=2", "GET /?page=2 "),
        ("/keep/users/7?x=1", "GET /keep/users/7?x=1 "),
    ];
    for (sent, expected) in cases {
        let response = gateway.get(sent).await;
        assert_eq!(response.status(), 200, "{sent}");
        let echo = common::header_or(response.headers(), "x-echo", "");
        println!("{sent} -> {echo}");
        assert!(echo.starts_with(expected), "{sent}: instance saw {echo:?}");
    }
}
