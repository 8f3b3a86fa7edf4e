//! Property tests (bounded, run in CI) over what the gateway does with untrusted input:
//! routing on arbitrary hosts and paths, prefix stripping, hop-by-hop header removal; and
//! random request heads thrown at a live gateway, which must keep serving.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::Uri;
use proptest::prelude::*;

use switchyard::config::{Config, ConsulEnv};
use switchyard::gateway::path::normalize;
use switchyard::gateway::{remove_hop_by_hop, strip_port, Router};
use switchyard::metrics::Metrics;
use switchyard::upstream::Upstreams;

const ROUTES: &str = "services:
  - name: root
    route: {path_prefix: /}
  - name: api
    route: {path_prefix: /api, strip_prefix: true}
  - name: api-v2
    route: {path_prefix: /api/v2/, strip_prefix: true}
  - name: hosted
    route: {path_prefix: /api, host: Example.COM}
";

fn router() -> Router {
    let config = Config::from_yaml(ROUTES, &ConsulEnv::default()).unwrap();
    let metrics = Metrics::new().unwrap();
    Router::new(&Upstreams::new(&config.services, &metrics))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn routing_never_panics_and_picks_a_matching_prefix(
        host in proptest::option::of("[a-zA-Z0-9.:\\[\\]-]{0,40}"),
        path in "/[ -~]{0,80}",
    ) {
        let router = router();
        let host = host.as_deref().map(strip_port);
        if let Some(route) = router.find(host, &path) {
            let name = route.upstream.name();
            let prefix = &route.upstream.config.route.path_prefix;
            prop_assert!(path.starts_with(prefix.as_str()), "{name} {prefix} {path}");
            // Longest prefix wins: no other matching route has a longer prefix.
            prop_assert!(!(path.starts_with("/api/v2/") && name == "api"), "{path} went to {name}");
            if let Ok(uri) = path.parse::<Uri>() {
                let forwarded = route.upstream_path(&uri, None);
                prop_assert!(forwarded.as_str().starts_with('/'), "{forwarded}");
            }
        } else {
            prop_assert!(false, "the / route matches every path: {path}");
        }
    }

    #[test]
    fn path_normalisation_is_idempotent_and_leaves_no_dot_segments(
        path in "(/|//|/\\.|/\\.\\.|/%2[eE]|/[a-z.%]{1,4}){0,12}",
    ) {
        let normal = normalize(&path).into_owned();
        prop_assert!(normal.starts_with('/'), "{path} -> {normal}");
        prop_assert!(!normal.contains("//"), "{path} -> {normal}");
        for segment in normal.split('/') {
            prop_assert!(segment != "." && segment != "..", "{path} -> {normal}");
        }
        prop_assert_eq!(normalize(&normal).into_owned(), normal.clone(), "idempotent");
    }

    #[test]
    fn hop_by_hop_removal_never_panics_and_leaves_none(
        connection in "[a-zA-Z0-9 ,_-]{0,60}",
        extra in proptest::collection::vec(("[a-z][a-z0-9-]{0,15}", "[ -~]{0,30}"), 0..12),
    ) {
        let mut headers = HeaderMap::new();
        if let Ok(value) = HeaderValue::from_str(&connection) {
            headers.insert("connection", value);
        }
        for (name, value) in &extra {
            if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value)) {
                headers.append(name, value);
            }
        }
        let named: Vec<String> = connection.split(',').map(|n| n.trim().to_ascii_lowercase()).collect();
        remove_hop_by_hop(&mut headers);
        for hop in ["connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade", "proxy-authorization"] {
            prop_assert!(!headers.contains_key(hop));
        }
        for name in named.iter().filter(|n| !n.is_empty()) {
            prop_assert!(!headers.contains_key(name.as_str()), "{name} named in Connection survived");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_request_heads_do_not_stop_the_gateway() {
    let consul = common::Consul::start().await;
    let backend = common::Backend::start("web-1", common::Behavior::Ok).await;
    consul.register("web", "web-1", backend.port, &[]).await;
    let gateway = common::Gateway::start(&consul, "services:\n  - name: web\n").await;
    assert!(gateway
        .wait_for_instances("web", &["web-1"], Duration::from_secs(10))
        .await
        .is_some());
    let addr = gateway.addr;
    let statuses = tokio::task::spawn_blocking(move || {
        let mut rng = fastrand::Rng::with_seed(0x5157_c4a7);
        let pieces: [&[u8]; 12] = [
            b"GET ",
            b"POST ",
            b"/web",
            b"/",
            b" HTTP/1.1\r\n",
            b"Host: x\r\n",
            b"Content-Length: 5\r\n",
            b"Transfer-Encoding: chunked\r\n",
            b"\r\n",
            b"\x00\xff",
            b"Connection: close, te\r\n",
            b"0\r\n\r\n",
        ];
        let mut statuses = std::collections::BTreeMap::new();
        for _ in 0..300 {
            let mut head = Vec::new();
            for _ in 0..rng.usize(1..10) {
                if rng.bool() {
                    head.extend_from_slice(pieces[rng.usize(..pieces.len())]);
                } else {
                    head.extend((0..rng.usize(1..20)).map(|_| rng.u8(..)));
                }
            }
            head.extend_from_slice(b"\r\n\r\n");
            let mut stream = std::net::TcpStream::connect(addr).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            let _ = stream.write_all(&head);
            let _ = stream.shutdown(std::net::Shutdown::Write);
            let mut answer = Vec::new();
            let _ = stream.read_to_end(&mut answer);
            let status = String::from_utf8_lossy(&answer)
                .split(' ')
                .nth(1)
                .unwrap_or("none")
                .to_owned();
            *statuses.entry(status).or_insert(0) += 1;
        }
        statuses
    })
    .await
    .unwrap();
    println!("random heads: statuses {statuses:?}");
    let response = gateway.get("/web").await;
    assert_eq!(
        response.status(),
        200,
        "still serving after 300 random heads"
    );
}
