//! Balancers, weights and splits through the gateway, against a real Consul and real
//! instances: least_request against round robin with one slow instance of three (figures),
//! hash affinity (stickiness, an 11th instance, an ejected instance), Consul weights 3:1,
//! and a 5% canary split.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{header_or, Backend, Behavior, Consul, Gateway};

/// A header name and its value for request `n`.
type KeyHeader = (&'static str, Arc<dyn Fn(usize) -> String + Send + Sync>);

/// Sends `total` GETs to `path` over `concurrency` connections; `header(n)` is an optional
/// header for request `n`. Returns, per request, the instance that answered (in order) and
/// its latency.
async fn fire(
    gateway: &Gateway,
    path: &str,
    total: usize,
    concurrency: usize,
    header: Option<KeyHeader>,
) -> Vec<(String, Duration)> {
    let client = common::http_client();
    let url = gateway.url(path);
    let tasks: Vec<_> = (0..concurrency)
        .map(|worker| {
            let (client, url, header) = (client.clone(), url.clone(), header.clone());
            tokio::spawn(async move {
                let mut seen = Vec::new();
                for n in (worker..total).step_by(concurrency) {
                    let mut request = client.get(&url);
                    if let Some((name, value)) = &header {
                        request = request.header(*name, value(n));
                    }
                    let started = Instant::now();
                    let response = request.send().await.expect("a gateway answer");
                    assert!(response.status().is_success(), "{}", response.status());
                    let instance = header_or(response.headers(), "x-instance", "?");
                    let _ = response.bytes().await;
                    seen.push((n, instance, started.elapsed()));
                }
                seen
            })
        })
        .collect();
    let mut all = Vec::with_capacity(total);
    for task in tasks {
        all.extend(task.await.expect("a load task"));
    }
    all.sort_by_key(|(n, _, _)| *n);
    all.into_iter().map(|(_, i, d)| (i, d)).collect()
}

fn counts(seen: &[(String, Duration)]) -> HashMap<String, usize> {
    let mut hits = HashMap::new();
    for (instance, _) in seen {
        *hits.entry(instance.clone()).or_insert(0) += 1;
    }
    hits
}

fn percentile(seen: &[(String, Duration)], percent: usize) -> Duration {
    let mut latencies: Vec<Duration> = seen.iter().map(|(_, d)| *d).collect();
    latencies.sort();
    latencies[latencies.len() * percent / 100]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_request_starves_a_slow_instance_that_round_robin_keeps_feeding() {
    let consul = Consul::start().await;
    let mut backends = Vec::new();
    for (id, delay) in [("fast-1", 20), ("fast-2", 20), ("slow", 200)] {
        let backend = Backend::start(id, Behavior::Delay(Duration::from_millis(delay))).await;
        for service in ["rr", "lr"] {
            // Service IDs are unique per agent: one per service, the same backend.
            let consul_id = format!("{service}-{id}");
            consul
                .register(service, &consul_id, backend.port, &[])
                .await;
        }
        backends.push(backend);
    }
    let gateway = Gateway::start(
        &consul,
        "services:\n  - name: rr\n  - name: lr\n    balance: least_request\n",
    )
    .await;
    for service in ["rr", "lr"] {
        let ids = ["fast-1", "fast-2", "slow"].map(|id| format!("{service}-{id}"));
        let ids = ids.each_ref().map(String::as_str);
        let waited = gateway.wait_for_instances(service, &ids, Duration::from_secs(10));
        assert!(waited.await.is_some(), "{service} never saw its instances");
    }
    let mut figures = Vec::new();
    for service in ["rr", "lr"] {
        let seen = fire(&gateway, &format!("/{service}"), 600, 12, None).await;
        let slow = counts(&seen).get("slow").copied().unwrap_or(0);
        let share = slow as f64 / seen.len() as f64;
        let mean = seen.iter().map(|(_, d)| *d).sum::<Duration>() / seen.len() as u32;
        figures.push((share, mean));
        println!(
            "{service}: slow instance (10x) got {slow} of 600 ({:.1}%), mean {:?}, p90 {:?}, p99 {:?}",
            share * 100.0,
            mean,
            percentile(&seen, 90),
            percentile(&seen, 99),
        );
    }
    let ((rr_share, rr_mean), (lr_share, lr_mean)) = (figures[0], figures[1]);
    assert!((0.32..=0.35).contains(&rr_share), "round robin: {rr_share}");
    assert!(lr_share < rr_share / 2.0, "least_request: {lr_share}");
    // Fewer requests wait on the slow instance: the mean drops by a quarter or more. (The
    // p99 stays the slow one's: balancing requests in flight still leaves it about a tenth.)
    assert!(
        lr_mean * 4 < rr_mean * 3,
        "least_request mean {lr_mean:?} vs {rr_mean:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_keeps_users_on_their_instance_and_moves_few_keys() {
    let consul = Consul::start().await;
    let mut backends = common::backends("web", 11).await;
    for b in &backends[..10] {
        consul.register("web", &b.id, b.port, &[]).await;
    }
    let gateway = Gateway::start(
        &consul,
        "services:\n  - name: web\n    balance: hash\n    hash_on: header:X-User\n    outlier: {consecutive_failures: 1}\n",
    )
    .await;
    let ids: Vec<String> = backends.iter().map(|b| b.id.clone()).collect();
    let ten: Vec<&str> = ids[..10].iter().map(String::as_str).collect();
    let waited = gateway.wait_for_instances("web", &ten, Duration::from_secs(10));
    assert!(waited.await.is_some());
    let user: Arc<dyn Fn(usize) -> String + Send + Sync> = Arc::new(|n| format!("user-{n}"));
    let keys = || Some(("x-user", user.clone()));
    let owners = |seen: Vec<(String, Duration)>| -> Vec<String> {
        seen.into_iter().map(|(i, _)| i).collect()
    };

    let before = owners(fire(&gateway, "/web", 10_000, 16, keys()).await);
    let again = owners(fire(&gateway, "/web", 10_000, 16, keys()).await);
    assert_eq!(before, again, "the same key reached another instance");

    consul
        .register("web", &ids[10], backends[10].port, &[])
        .await;
    let all: Vec<&str> = ids.iter().map(String::as_str).collect();
    assert!(gateway
        .wait_for_instances("web", &all, Duration::from_secs(10))
        .await
        .is_some());
    let eleven = owners(fire(&gateway, "/web", 10_000, 16, keys()).await);
    let moved = before.iter().zip(&eleven).filter(|(a, b)| a != b).count();
    let to_new = eleven.iter().filter(|o| *o == "web-11").count();
    println!("an 11th instance: {moved} of 10,000 keys moved, {to_new} to the new one");
    assert!((700..=1300).contains(&moved), "{moved}");

    // web-3 crashes: the first request to it fails over and ejects it; then its keys go
    // elsewhere and no other key moves.
    backends[2].kill();
    let _ = fire(&gateway, "/web", 10_000, 16, keys()).await;
    let ejected = owners(fire(&gateway, "/web", 10_000, 16, keys()).await);
    let (mut of_dead, mut others_moved) = (0, 0);
    for (was, now) in eleven.iter().zip(&ejected) {
        if was == "web-3" {
            of_dead += 1;
            assert_ne!(now, "web-3");
        } else if was != now {
            others_moved += 1;
        }
    }
    println!("web-3 ejected: its {of_dead} keys moved, {others_moved} others moved");
    assert!(of_dead > 500, "{of_dead}");
    assert_eq!(others_moved, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_weights_three_to_one_give_75_25() {
    let consul = Consul::start().await;
    let backends = common::backends("w", 2).await;
    for service in ["w-rr", "w-random"] {
        // Service IDs are unique per agent: one per service, the same backends.
        let (heavy, light) = (format!("{service}-1"), format!("{service}-2"));
        let port = |n: usize| backends[n].port;
        consul
            .register_weighted(service, &heavy, port(0), &[], 3)
            .await;
        consul
            .register_weighted(service, &light, port(1), &[], 1)
            .await;
    }
    let gateway = Gateway::start(
        &consul,
        "services:\n  - name: w-rr\n  - name: w-random\n    balance: random\n",
    )
    .await;
    for service in ["w-rr", "w-random"] {
        let ids = [format!("{service}-1"), format!("{service}-2")];
        let ids = ids.each_ref().map(String::as_str);
        let waited = gateway.wait_for_instances(service, &ids, Duration::from_secs(10));
        assert!(waited.await.is_some(), "{service} never saw its instances");
        let seen = fire(&gateway, &format!("/{service}"), 4000, 8, None).await;
        let heavy = counts(&seen).get("w-1").copied().unwrap_or(0);
        let share = heavy as f64 / 4000.0;
        println!(
            "{service}: weight 3 got {heavy} of 4,000 ({:.1}%)",
            share * 100.0
        );
        assert!((0.72..=0.78).contains(&share), "{service}: {share}");
        if service == "w-rr" {
            assert_eq!(
                heavy, 3000,
                "smooth weighted round robin is exact over cycles"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_sends_five_percent_to_the_canary() {
    let consul = Consul::start().await;
    let backends = common::backends("app", 4).await;
    for b in &backends[..3] {
        consul.register("app", &b.id, b.port, &["v1"]).await;
    }
    consul
        .register("app", "app-4", backends[3].port, &["canary"])
        .await;
    let gateway = Gateway::start(
        &consul,
        "services:\n  - name: app\n    split:\n      - {tags: [canary], percent: 5}\n",
    )
    .await;
    let ids = ["app-1", "app-2", "app-3", "app-4"];
    assert!(gateway
        .wait_for_instances("app", &ids, Duration::from_secs(10))
        .await
        .is_some());
    let seen = fire(&gateway, "/app", 4000, 8, None).await;
    let canary = counts(&seen).get("app-4").copied().unwrap_or(0);
    let share = canary as f64 / 4000.0;
    println!(
        "split 5%: the canary got {canary} of 4,000 ({:.2}%)",
        share * 100.0
    );
    assert!((0.035..=0.065).contains(&share), "{share}");
    // No canary registered: everything goes to the rest.
    consul.deregister("app-4").await;
    assert!(gateway
        .wait_for_instances("app", &ids[..3], Duration::from_secs(10))
        .await
        .is_some());
    let seen = fire(&gateway, "/app", 300, 4, None).await;
    assert_eq!(counts(&seen).values().sum::<usize>(), 300);
}
