//! Retry rules through the gateway, with a real Consul: dead instances are retried around,
//! requests that may have reached an instance are retried only when idempotent.

mod common;

use std::time::Duration;

use common::{free_port, Backend, Behavior, Consul, Gateway};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_instance_costs_no_failed_request() {
    let consul = Consul::start().await;
    let live = common::backends("web", 3).await;
    for b in &live {
        consul.register("web", &b.id, b.port, &[]).await;
    }
    // Registered, passing (no check), but nothing listens there.
    consul.register("web", "web-dead", free_port(), &[]).await;
    let gateway = Gateway::start(&consul, "services:\n  - name: web\n").await;
    assert!(gateway
        .wait_for_instances(
            "web",
            &["web-1", "web-2", "web-3", "web-dead"],
            Duration::from_secs(10)
        )
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
        .find(|i| i["id"] == "web-dead")
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
        .put(gateway.url("/flaky"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(total_hits(&backends), 1 + 3, "PUT is idempotent: retried");
}
