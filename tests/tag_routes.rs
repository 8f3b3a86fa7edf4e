//! Routes from Consul tags in fabio's grammar (fabio's quickstart tags verbatim), shared
//! routes with weights, fabio's KV commands, and the file's routes winning; through the
//! gateway, against a real Consul.

mod common;

use std::time::{Duration, Instant};

use common::{header_or, wait_until, Backend, Behavior, Consul, Gateway};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(10);

/// GET `path` with `Host: host`: the status and the instance that answered.
async fn get(gateway: &Gateway, host: &str, path: &str) -> (u16, String, String) {
    get_with(&common::http_client(), gateway, host, path).await
}

/// [`get`] through `client` (its connections kept: many requests in a row).
async fn get_with(
    client: &reqwest::Client,
    gateway: &Gateway,
    host: &str,
    path: &str,
) -> (u16, String, String) {
    let response = client
        .get(gateway.url(path))
        .header("host", host)
        .send()
        .await
        .expect("a gateway answer");
    let status = response.status().as_u16();
    let instance = header_or(response.headers(), "x-instance", "");
    let echo = header_or(response.headers(), "x-echo", "");
    (status, instance, echo)
}

async fn routes(gateway: &Gateway) -> Value {
    serde_json::from_str(&gateway.admin_get("/routes").await).expect("/routes is JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fabio_quickstart_tags_route_as_fabio_would() {
    let consul = Consul::start().await;
    // fabio's quickstart tags, verbatim, one service each.
    let tagged = [
        ("svc-a", "urlprefix-/css"),
        ("svc-b", "urlprefix-i.com/static"),
        ("svc-c", "urlprefix-mysite.com/"),
        ("svc-d", "urlprefix-/foo/bar strip=/foo"),
        ("svc-e", "urlprefix-/foo/bar proto=https"),
        ("svc-f", "urlprefix-/foo/bar proto=https tlsskipverify=true"),
        ("svc-g", "urlprefix-:3306 proto=tcp"),
        ("svc-h", "urlprefix-/file"),
    ];
    let mut backends = Vec::new();
    for (service, tag) in tagged {
        let backend = Backend::start(service, Behavior::Ok).await;
        consul
            .register(service, service, backend.port, &[tag, "v1"])
            .await;
        backends.push(backend);
    }
    let file = Backend::start("file-1", Behavior::Ok).await;
    consul.register("file", "file-1", file.port, &[]).await;
    let gateway = Gateway::start(
        &consul,
        "tag_routes:\n  enabled: true\nservices:\n  - name: file\n    route: {path_prefix: /file}\n",
    )
    .await;
    let ready = wait_until(WAIT, || async { get(&gateway, "x", "/css").await.0 == 200 }).await;
    assert!(ready.is_some(), "{}", routes(&gateway).await);

    assert_eq!(get(&gateway, "x", "/css/site.css").await.1, "svc-a");
    assert_eq!(get(&gateway, "i.com", "/static/x.png").await.1, "svc-b");
    assert_eq!(get(&gateway, "other.org", "/static/x.png").await.0, 404);
    assert_eq!(get(&gateway, "mysite.com", "/anything").await.1, "svc-c");
    // /foo/bar is shared, as in fabio, by svc-d (strip=/foo) and the https services svc-e
    // and svc-f (whose plain-HTTP test instances fail the TLS handshake: 502).
    let mut stripped = None;
    for _ in 0..60 {
        let (status, instance, echo) = get(&gateway, "x", "/foo/bar/baz?q=1").await;
        assert!(status == 200 || status == 502, "{status}");
        if instance == "svc-d" {
            stripped = Some(echo);
            break;
        }
    }
    let echo = stripped.expect("svc-d answered one of 60");
    assert!(echo.starts_with("GET /bar/baz?q=1 "), "strip=/foo: {echo}");
    // The file's route wins over svc-h's tag for the same path.
    let file_ready = wait_until(WAIT, || async {
        get(&gateway, "x", "/file").await.1 == "file-1"
    });
    assert!(file_ready.await.is_some());

    let routes = routes(&gateway).await;
    let skipped = routes["skipped"].as_array().expect("skipped routes");
    let reasons: Vec<String> = skipped
        .iter()
        .map(|s| format!("{} | {} | {}", s["origin"], s["text"], s["reason"]))
        .collect();
    println!("skipped:\n{}", reasons.join("\n"));
    assert_eq!(skipped.len(), 1, "{reasons:?}");
    assert!(reasons[0].contains("svc-g") && reasons[0].contains("TCP"));
    let service = |name: &str| -> Value {
        let services = routes["services"].as_array().unwrap();
        services
            .iter()
            .find(|s| s["service"] == name)
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(service("svc-e")["protocol"], "https");
    assert_eq!(service("svc-e")["tls_insecure_skip_verify"], false);
    assert_eq!(service("svc-f")["tls_insecure_skip_verify"], true);
    assert_eq!(service("svc-f")["routes"][0]["path_prefix"], "/foo/bar");
    let origin_of = |service: &str| -> Vec<String> {
        routes["services"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["service"] == service)
            .flat_map(|s| s["routes"].as_array().cloned().unwrap_or_default())
            .map(|r| r["origin"].as_str().unwrap_or("").to_owned())
            .collect()
    };
    assert_eq!(origin_of("svc-a"), ["tag of service svc-a: urlprefix-/css"]);
    assert_eq!(origin_of("file"), ["file"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_added_and_removed_propagate_and_kv_commands_override() {
    let consul = Consul::start().await;
    let v1 = Backend::start("v1", Behavior::Ok).await;
    let v2 = Backend::start("v2", Behavior::Ok).await;
    consul
        .register("web-v1", "v1", v1.port, &["urlprefix-/web"])
        .await;
    consul
        .register("web-v2", "v2", v2.port, &["urlprefix-/web weight=0.2"])
        .await;
    let gateway = Gateway::start(
        &consul,
        "tag_routes:\n  enabled: true\nservices:\n  - name: other\n",
    )
    .await;
    let both = wait_until(WAIT, || async {
        let r = routes(&gateway).await;
        let synced = |name: &str| {
            r["services"].as_array().unwrap().iter().any(|s| {
                s["service"] == name && s["instances"].as_array().is_some_and(|i| !i.is_empty())
            })
        };
        synced("web-v1") && synced("web-v2")
    });
    assert!(both.await.is_some());
    // weight=0.2: web-v2 gets a fifth of /web.
    let mut to_v2 = 0;
    let client = common::http_client();
    for _ in 0..2000 {
        if get_with(&client, &gateway, "x", "/web").await.1 == "v2" {
            to_v2 += 1;
        }
    }
    println!("weight=0.2: web-v2 got {to_v2} of 2,000");
    assert!((340..=460).contains(&to_v2), "{to_v2}");

    // A tag added: routed as fast as an instance change propagates; removed: gone again.
    let v1b = Backend::start("v1b", Behavior::Ok).await;
    let started = Instant::now();
    consul
        .register("web-v1", "v1b", v1b.port, &["urlprefix-/web"])
        .await;
    let instance = gateway
        .wait_for_instances("web-v1", &["v1", "v1b"], WAIT)
        .await;
    let instance_change = started.elapsed();
    assert!(instance.is_some());
    let started = Instant::now();
    consul
        .register(
            "web-v1",
            "v1",
            v1.port,
            &["urlprefix-/web", "urlprefix-/new"],
        )
        .await;
    let added = wait_until(WAIT, || async { get(&gateway, "x", "/new").await.0 == 200 }).await;
    let tag_change = started.elapsed();
    println!("instance added -> in the table in {instance_change:?}; tag added -> routed in {tag_change:?}");
    assert!(added.is_some());
    assert!(["v1", "v1b"].contains(&get(&gateway, "x", "/new").await.1.as_str()));
    consul
        .register("web-v1", "v1", v1.port, &["urlprefix-/web"])
        .await;
    let removed = wait_until(WAIT, || async { get(&gateway, "x", "/new").await.0 == 404 }).await;
    assert!(removed.is_some());

    // KV: `route del web-v2` takes it off /web; the tags stay as they are. Written to a
    // sub-key: fabio reads the key and its sub-keys, concatenated.
    consul.kv_put("fabio/config", "# routes by team\n").await;
    consul
        .kv_put("fabio/config/canary", "route del web-v2\n")
        .await;
    let gone = wait_until(WAIT, || async {
        let r = routes(&gateway).await;
        !r["services"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["service"] == "web-v2")
    });
    assert!(gone.await.is_some());
    for _ in 0..50 {
        assert!(["v1", "v1b"].contains(&get(&gateway, "x", "/web").await.1.as_str()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_lists_and_redirects_from_tags() {
    let consul = Consul::start().await;
    let backend = Backend::start("p", Behavior::Ok).await;
    let tags = [
        "urlprefix-/private allow=ip:10.0.0.0/8",
        "urlprefix-/public deny=ip:10.0.0.0/8",
        "urlprefix-/old redirect=301,https://example.com$path",
    ];
    consul.register("p", "p", backend.port, &tags).await;
    let gateway = Gateway::start(
        &consul,
        "tag_routes:\n  enabled: true\nservices:\n  - name: other\n",
    )
    .await;
    let ready = wait_until(WAIT, || async {
        get(&gateway, "x", "/public").await.0 == 200
    })
    .await;
    assert!(ready.is_some());
    let response = common::http_client()
        .get(gateway.url("/private"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    assert_eq!(
        header_or(response.headers(), "x-switchyard-error", ""),
        "forbidden"
    );
    let client = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let response = client
        .get(gateway.url("/old/page?x=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 301);
    assert_eq!(
        header_or(response.headers(), "location", ""),
        "https://example.com/old/page?x=1"
    );
}

/// A service routed only by its tags counts for `/readyz` as a file service does: with Consul
/// gone past `stale_after`, the answer names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_only_services_count_for_readiness() {
    let mut consul = Consul::start().await;
    let tagged = Backend::start("t1", Behavior::Ok).await;
    consul
        .register("tagged", "t1", tagged.port, &["urlprefix-/t"])
        .await;
    let file = Backend::start("f1", Behavior::Ok).await;
    consul.register("file", "f1", file.port, &[]).await;
    let gateway = Gateway::start_with(
        &[consul.url()],
        "  stale_after: 1s\n",
        "tag_routes:\n  enabled: true\nservices:\n  - name: file\n",
    )
    .await;
    let routed = wait_until(WAIT, || async { get(&gateway, "x", "/t").await.0 == 200 }).await;
    assert!(routed.is_some());
    let ready = wait_until(WAIT, || async {
        let response = common::http_client()
            .get(gateway.admin_url("/readyz"))
            .send()
            .await;
        response.is_ok_and(|r| r.status() == 200)
    });
    assert!(ready.await.is_some());
    consul.stop();
    let names_it = wait_until(WAIT, || async {
        let response = common::http_client()
            .get(gateway.admin_url("/readyz"))
            .send()
            .await
            .expect("an admin answer");
        let status = response.status().as_u16();
        let body = response.text().await.unwrap_or_default();
        status == 503 && body.contains("tagged:")
    });
    assert!(
        names_it.await.is_some(),
        "/readyz does not name the tag-only service"
    );
    // The table keeps serving while Consul is away.
    assert_eq!(get(&gateway, "x", "/t").await.0, 200);
}
