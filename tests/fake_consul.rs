//! What a real Consul cannot produce on demand: an index going backwards (or to 0), 500s, a
//! long-poll that hangs, and a restarted server answering from the log it is still replaying.
//! A scripted fake answers the per-service watcher and, per path, catalog mode; the same code
//! is tested against real agents in `discovery.rs` and `catalog_mode.rs`.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use switchyard::config::{Config, ConsulEnv};
use switchyard::discovery::consul::{watch_service, ConsulClient, WatchPacing};
use switchyard::metrics::Metrics;
use switchyard::upstream::{Upstream, Upstreams};
use switchyard::Shutdown;

#[derive(Debug, Clone)]
enum Step {
    /// 200 with this X-Consul-Index and these instance IDs.
    Answer(u64, &'static [&'static str]),
    Status(u16),
    /// Never answers.
    Hang,
}

/// Starts the fake; every request's `index` parameter is sent on the returned channel.
async fn fake_consul(script: Vec<Step>) -> (String, mpsc::UnboundedReceiver<u64>) {
    let script = Mutex::new(VecDeque::from(script));
    let (seen, rx) = mpsc::unbounded_channel();
    let url = serve_fake(move |request| {
        let index = request
            .uri()
            .query()
            .unwrap_or("")
            .split('&')
            .find_map(|kv| kv.strip_prefix("index="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(u64::MAX);
        let _ = seen.send(index);
        match script.lock().unwrap().pop_front().unwrap_or(Step::Hang) {
            Step::Answer(index, ids) => Scripted::Json(index, instances_json(ids)),
            Step::Status(code) => Scripted::Status(code),
            Step::Hang => Scripted::Hang,
        }
    })
    .await;
    (url, rx)
}

/// One answer of a fake: a JSON body at an index, a status, or none.
#[derive(Debug, Clone)]
enum Scripted {
    Json(u64, String),
    Status(u16),
    Hang,
}

/// Serves on a free port, answering each request with what `answer` picks for it.
async fn serve_fake(
    answer: impl Fn(&Request<Incoming>) -> Scripted + Send + Sync + 'static,
) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let answer = answer.clone();
            let service = service_fn(move |request: Request<Incoming>| {
                let step = answer(&request);
                async move { Ok::<_, Infallible>(respond(step).await) }
            });
            tokio::spawn(async move {
                let _ = Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    url
}

async fn respond(step: Scripted) -> Response<Full<Bytes>> {
    match step {
        Scripted::Json(index, body) => Response::builder()
            .header("x-consul-index", index.to_string())
            .header("x-consul-knownleader", "true")
            .body(Full::new(Bytes::from(body)))
            .unwrap(),
        Scripted::Status(code) => Response::builder()
            .status(code)
            .body(Full::new(Bytes::from_static(b"rpc error")))
            .unwrap(),
        Scripted::Hang => std::future::pending().await,
    }
}

/// The body of `/v1/health/service/web` with instances `ids`.
fn instances_json(ids: &[&str]) -> String {
    let entries: Vec<String> = ids
        .iter()
        .enumerate()
        .map(|(n, id)| {
            format!(
                r#"{{"Node":{{"Address":"127.0.0.1"}},"Service":{{"ID":"{id}","Address":"","Port":{},"Tags":[]}}}}"#,
                1000 + n
            )
        })
        .collect();
    format!("[{}]", entries.join(","))
}

struct Watch {
    upstream: Arc<Upstream>,
    metrics: Metrics,
    shutdown: Shutdown,
    task: tokio::task::JoinHandle<()>,
}

fn start_watch(url: &str, hung_after: Option<Duration>) -> Watch {
    let yaml = format!(
        "consul:\n  address: {url}\n  wait: 10s\n  backoff_base: 20ms\n  backoff_max: 100ms\nservices:\n  - name: web\n"
    );
    let config = Config::from_yaml(&yaml, &ConsulEnv::default()).unwrap();
    let metrics = Metrics::new().unwrap();
    let upstream = Upstreams::new(&config.services, &metrics)
        .get("web")
        .unwrap()
        .clone();
    let mut discovery = ConsulClient::new(&config.consul).unwrap();
    if let Some(hung_after) = hung_after {
        discovery = discovery.with_hung_after(hung_after);
    }
    let shutdown = Shutdown::new();
    let task = tokio::spawn(watch_service(
        Arc::new(discovery),
        upstream.clone(),
        WatchPacing::from(&config.consul),
        shutdown.clone(),
    ));
    Watch {
        upstream,
        metrics,
        shutdown,
        task,
    }
}

fn ids(upstream: &Upstream) -> Vec<String> {
    upstream
        .table()
        .instances()
        .iter()
        .map(|i| i.id.clone())
        .collect()
}

async fn next(rx: &mut mpsc::UnboundedReceiver<u64>) -> u64 {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("the watcher sent no further query")
        .expect("fake consul stopped")
}

#[tokio::test]
async fn index_going_backwards_resets_and_zero_is_never_sent_back() {
    let (url, mut queries) = fake_consul(vec![
        Step::Answer(10, &["a", "b"]),
        Step::Answer(5, &["a"]),
        Step::Answer(5, &["a"]),
        Step::Answer(0, &["a", "c"]),
        Step::Answer(0, &["a", "c"]),
        Step::Hang,
    ])
    .await;
    let watch = start_watch(&url, None);
    assert_eq!(next(&mut queries).await, 0, "first query does not block");
    assert_eq!(next(&mut queries).await, 10, "blocks on the answered index");
    assert_eq!(
        next(&mut queries).await,
        0,
        "index went backwards: reset to 0, and asked again to confirm"
    );
    assert_eq!(ids(&watch.upstream), ["a", "b"], "not applied unconfirmed");
    assert_eq!(next(&mut queries).await, 5, "confirmed: blocks on it");
    assert_eq!(ids(&watch.upstream), ["a"]);
    assert_eq!(next(&mut queries).await, 0, "backwards again: confirming");
    assert_eq!(
        next(&mut queries).await,
        1,
        "an answered 0 is sent back as 1"
    );
    assert_eq!(ids(&watch.upstream), ["a", "c"]);
    watch.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), watch.task)
        .await
        .expect("watch stops on shutdown, even mid long-poll")
        .unwrap();
}

#[tokio::test]
async fn consul_errors_keep_the_last_table() {
    let (url, mut queries) = fake_consul(vec![
        Step::Answer(10, &["a", "b"]),
        Step::Status(500),
        Step::Status(500),
        Step::Status(500),
        Step::Answer(11, &["a", "b", "c"]),
        Step::Answer(11, &["a", "b", "c"]),
        Step::Hang,
    ])
    .await;
    let watch = start_watch(&url, None);
    // After each error the watch resyncs with a non-blocking query (index 0), and the first
    // answer after them is confirmed by a second non-blocking query.
    for expected in [0, 10, 0, 0, 0, 0] {
        assert_eq!(next(&mut queries).await, expected);
    }
    // The fifth query arrived, so three 500s were handled; the table survived them.
    let metrics = String::from_utf8(watch.metrics.encode().unwrap()).unwrap();
    assert!(
        metrics.contains(r#"switchyard_consul_errors_total{service="web"} 3"#),
        "{metrics}"
    );
    assert_eq!(next(&mut queries).await, 11);
    assert_eq!(ids(&watch.upstream), ["a", "b", "c"]);
    watch.shutdown.cancel();
}

#[tokio::test]
async fn errors_before_any_answer_leave_the_service_unready() {
    let (url, mut queries) =
        fake_consul(vec![Step::Status(500), Step::Status(503), Step::Hang]).await;
    let watch = start_watch(&url, None);
    for _ in 0..3 {
        assert_eq!(next(&mut queries).await, 0);
    }
    assert!(!watch.upstream.sync.is_synced());
    assert!(ids(&watch.upstream).is_empty());
    watch.shutdown.cancel();
}

#[tokio::test]
async fn hung_long_poll_is_cut_and_retried() {
    let (url, mut queries) = fake_consul(vec![
        Step::Answer(10, &["a"]),
        Step::Hang,
        Step::Answer(11, &["a", "b"]),
        Step::Answer(11, &["a", "b"]),
        Step::Hang,
    ])
    .await;
    let watch = start_watch(&url, Some(Duration::from_millis(300)));
    assert_eq!(next(&mut queries).await, 0);
    assert_eq!(next(&mut queries).await, 10);
    let hung_since = tokio::time::Instant::now();
    assert_eq!(
        next(&mut queries).await,
        0,
        "the hung query is cut and a resync sent"
    );
    // Cut about 300 ms after it was sent (which was a little before we heard of it).
    assert!(hung_since.elapsed() >= Duration::from_millis(250));
    assert_eq!(
        next(&mut queries).await,
        0,
        "the answer after it is confirmed"
    );
    assert_eq!(next(&mut queries).await, 11);
    assert_eq!(ids(&watch.upstream), ["a", "b"]);
    let metrics = String::from_utf8(watch.metrics.encode().unwrap()).unwrap();
    assert!(
        metrics.contains(r#"switchyard_consul_errors_total{service="web"} 1"#),
        "{metrics}"
    );
    watch.shutdown.cancel();
}

/// A fake for catalog mode: each path answers from its own script, whose last step repeats;
/// every request's path is sent on the returned channel.
async fn fake_catalog_consul(
    scripts: Vec<(&'static str, Vec<Scripted>)>,
) -> (String, mpsc::UnboundedReceiver<String>) {
    let scripts: Vec<(&str, VecDeque<Scripted>)> = scripts
        .into_iter()
        .map(|(path, steps)| (path, VecDeque::from(steps)))
        .collect();
    let scripts = Mutex::new(scripts);
    let (seen, rx) = mpsc::unbounded_channel();
    let url = serve_fake(move |request| {
        let path = request.uri().path().to_owned();
        let mut scripts = scripts.lock().unwrap();
        let script = scripts.iter_mut().find(|(p, _)| *p == path);
        let step = match script.map(|(_, steps)| steps) {
            Some(steps) if steps.len() > 1 => steps.pop_front().unwrap(),
            Some(steps) => steps.front().cloned().unwrap_or(Scripted::Hang),
            None => Scripted::Status(404),
        };
        let _ = seen.send(path);
        step
    })
    .await;
    (url, rx)
}

/// Catalog mode after an outage: a restarted server may answer from a log it is still
/// replaying. The recovery sweep's first answer (index 5, no instances) is not applied: a
/// second query answers 20, a third confirms 20, and only that is applied. Without the
/// confirmation the table would hold the replayed, empty set.
#[tokio::test]
async fn catalog_mode_confirms_answers_after_an_outage() {
    use Scripted::{Hang, Json, Status};
    let checks = r#"[{"Node":"n1","CheckID":"service:a","ServiceName":"web","ModifyIndex":3}]"#;
    let services = r#"{"web":[]}"#;
    let (url, mut paths) = fake_catalog_consul(vec![
        (
            "/v1/health/state/any",
            vec![
                Json(10, checks.into()),
                Status(500),
                Json(20, checks.into()),
                Hang,
            ],
        ),
        (
            "/v1/catalog/services",
            vec![
                Json(10, services.into()),
                Status(500),
                Json(20, services.into()),
                Hang,
            ],
        ),
        (
            "/v1/health/service/web",
            vec![
                Json(10, instances_json(&["web-1", "web-2"])),
                Json(5, instances_json(&[])),
                Json(20, instances_json(&["web-1", "web-2"])),
                Json(20, instances_json(&["web-1", "web-2"])),
                Hang,
            ],
        ),
        ("/v1/health/state/critical", vec![Json(20, "[]".into())]),
    ])
    .await;
    let yaml = format!(
        "consul:\n  address: {url}\n  wait: 10s\n  backoff_base: 20ms\n  backoff_max: 100ms\n  watch: catalog\nservices:\n  - name: web\n"
    );
    let config = Config::from_yaml(&yaml, &ConsulEnv::default()).unwrap();
    let metrics = Metrics::new().unwrap();
    let upstreams = Upstreams::new(&config.services, &metrics);
    let upstream = upstreams.get("web").unwrap().clone();
    let shutdown = Shutdown::new();
    let task = tokio::spawn(switchyard::discovery::consul::watch_catalog(
        Arc::new(ConsulClient::new(&config.consul).unwrap()),
        upstreams,
        WatchPacing::from(&config.consul),
        8,
        shutdown.clone(),
    ));
    let mut fetches = 0;
    while fetches < 4 {
        let path = tokio::time::timeout(Duration::from_secs(10), paths.recv())
            .await
            .expect("the confirming fetches never came")
            .unwrap();
        fetches += usize::from(path == "/v1/health/service/web");
    }
    let confirmed = common_wait(|| ids(&upstream) == ["web-1", "web-2"]).await;
    assert!(confirmed, "{:?}", ids(&upstream));
    shutdown.cancel();
    let _ = task.await;
}

/// Polls `condition` for up to 5 s.
async fn common_wait(condition: impl Fn() -> bool) -> bool {
    for _ in 0..500 {
        if condition() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}
