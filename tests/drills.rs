//! Reliability drills: each runs a real failure under load and prints its figures
//! (failed / total, p99). All traffic stays on 127.0.0.1.

mod common;

use std::time::{Duration, Instant};

use common::{Backend, Behavior, Consul, ConsulCluster, Gateway, Load};

const LOAD_CONCURRENCY: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_backend_crash_under_load() {
    let consul = Consul::start().await;
    let mut backends = common::backends("web", 3).await;
    for b in &backends {
        consul.register_with_ttl("web", &b.id, b.port).await;
    }
    let gateway = Gateway::start(&consul, "services:\n  - name: web\n").await;
    assert!(gateway
        .wait_for_instances("web", &["web-1", "web-2", "web-3"], Duration::from_secs(10))
        .await
        .is_some());

    // 20 clients: enough that several requests are in flight on the instance when it dies
    // (the load test found 7 of them failing once a concurrency-based retry budget refused
    // their retries).
    let load = Load::start(gateway.url("/web"), 20);
    tokio::time::sleep(Duration::from_secs(3)).await;
    backends[2].kill(); // its Consul check still says passing
    let killed = Instant::now();
    let ejected = common::wait_until(Duration::from_secs(3), || async {
        gateway
            .instance_entries("web")
            .await
            .iter()
            .any(|i| i["id"] == "web-3" && i["ejected_for_seconds"].is_number())
    })
    .await;
    println!(
        "crash -> ejected after {:?}",
        ejected.map(|_| killed.elapsed())
    );
    assert!(ejected.is_some(), "the crashed instance was not ejected");
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Consul's check catches up: the instance leaves the table.
    consul.fail_check("web-3").await;
    assert!(gateway
        .wait_for_instances("web", &["web-1", "web-2"], Duration::from_secs(5))
        .await
        .is_some());
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut stats = load.finish().await;
    stats.expect_no_failures("drill backend crash");
    assert!(stats.total() > 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_rolling_deploy_under_load() {
    let consul = Consul::start().await;
    let mut backends = common::backends("web", 3).await;
    for b in &backends {
        consul.register("web", &b.id, b.port, &[]).await;
    }
    let gateway = Gateway::start(&consul, "services:\n  - name: web\n").await;
    let all = ["web-1", "web-2", "web-3"];
    assert!(gateway
        .wait_for_instances("web", &all, Duration::from_secs(10))
        .await
        .is_some());

    let load = Load::start(gateway.url("/web"), LOAD_CONCURRENCY);
    for backend in backends.iter_mut() {
        let id = backend.id.clone();
        let others: Vec<&str> = all.iter().copied().filter(|other| *other != id).collect();
        // 1. Deregister, and wait until the gateway stops sending new requests.
        consul.deregister(&id).await;
        assert!(gateway
            .wait_for_instances("web", &others, Duration::from_secs(5))
            .await
            .is_some());
        // 2. Stop once in-flight requests are done; 3. start the new version.
        backend.stop_gracefully().await;
        backend.restart().await;
        // 4. Register again and wait until it is back in rotation.
        consul.register("web", &id, backend.port, &[]).await;
        assert!(gateway
            .wait_for_instances("web", &all, Duration::from_secs(5))
            .await
            .is_some());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut stats = load.finish().await;
    stats.expect_no_failures("drill rolling deploy");
    assert!(
        backends.iter().all(|b| b.hits() > 0),
        "every restarted instance served again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_consul_leader_killed_under_load() {
    let mut cluster = ConsulCluster::start(3).await;
    let backends = common::backends("web", 3).await;
    for b in &backends[..2] {
        cluster.register("web", &b.id, b.port).await;
    }
    let gateway = Gateway::start_with(&cluster.urls(), "", "services:\n  - name: web\n").await;
    assert!(gateway
        .wait_for_instances("web", &["web-1", "web-2"], Duration::from_secs(15))
        .await
        .is_some());

    let load = Load::start(gateway.url("/web"), LOAD_CONCURRENCY);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let leader = cluster.leader().await.expect("a leader");
    cluster.kill(leader);
    let killed = Instant::now();
    let new_leader = cluster
        .wait_for_leader(Duration::from_secs(30))
        .await
        .expect("a new leader");
    println!(
        "leader {leader} killed; server {new_leader} elected after {:?}",
        killed.elapsed()
    );
    assert_ne!(leader, new_leader);

    // A change made after the election reaches the gateway within 5 s.
    cluster.register("web", "web-3", backends[2].port).await;
    let registered = Instant::now();
    let applied = gateway
        .wait_for_instances("web", &["web-1", "web-2", "web-3"], Duration::from_secs(5))
        .await
        .map(|_| registered.elapsed());
    println!("change after election applied in {applied:?}");
    assert!(applied.is_some());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut stats = load.finish().await;
    stats.expect_no_failures("drill consul leader kill");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_consul_restart_and_long_outage() {
    let mut cluster = ConsulCluster::start(1).await;
    let backends = common::backends("web", 3).await;
    for b in &backends {
        cluster.register("web", &b.id, b.port).await;
    }
    let gateway = Gateway::start_with(
        &cluster.urls(),
        "  stale_after: 3s\n",
        "services:\n  - name: web\n",
    )
    .await;
    let all = ["web-1", "web-2", "web-3"];
    assert!(gateway
        .wait_for_instances("web", &all, Duration::from_secs(15))
        .await
        .is_some());
    let client = common::http_client();
    let readyz = || async {
        client
            .get(gateway.admin_url("/readyz"))
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    };
    assert_eq!(readyz().await, 200);

    let load = Load::start(gateway.url("/web"), LOAD_CONCURRENCY);
    // Taken before the kill: the gateway may see the connection drop before kill() returns.
    let down = Instant::now();
    cluster.kill(0);
    let unready = common::wait_until(Duration::from_secs(10), || async { readyz().await == 503 })
        .await
        .map(|_| down.elapsed());
    println!("Consul down -> /readyz 503 after {unready:?} (stale_after 3s)");
    // Not before the limit (less the clock's millisecond rounding), and not long after it.
    assert!(
        unready.is_some_and(|d| d >= Duration::from_millis(2990) && d < Duration::from_secs(6)),
        "{unready:?}"
    );
    let outage = Duration::from_secs(30);
    tokio::time::sleep(outage.saturating_sub(down.elapsed())).await;
    assert_eq!(
        gateway.instances("web").await.len(),
        3,
        "the table survives the outage"
    );

    cluster.restart(0);
    let back = Instant::now();
    let ready =
        common::wait_until(Duration::from_secs(30), || async { readyz().await == 200 }).await;
    println!(
        "Consul back -> /readyz 200 after {:?}",
        ready.map(|_| back.elapsed())
    );
    assert!(ready.is_some());
    let mut stats = load.finish().await;
    stats.expect_no_failures("drill consul 30 s outage");
    assert_eq!(stats.by_instance.len(), 3);
}

/// The real binary, real signal: SIGTERM while slow requests are in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_sigterm_drains_in_flight_requests() {
    let consul = Consul::start().await;
    let slow = Backend::start("slow-1", Behavior::Delay(Duration::from_secs(1))).await;
    consul.register("slow", "slow-1", slow.port, &[]).await;
    let (port, admin) = (common::free_port(), common::free_port());
    let dir = std::env::temp_dir().join(format!("switchyard-drill-sigterm-{port}"));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("gateway.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:{port}\nadmin_listen: 127.0.0.1:{admin}\nconsul:\n  address: {}\nserver:\n  shutdown_grace: 5s\nservices:\n  - name: slow\n",
            consul.url()
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .arg("--config")
        .arg(&config)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("starting switchyard");
    let client = common::http_client();
    let ready = common::wait_until(Duration::from_secs(10), || async {
        let routes = client
            .get(format!("http://127.0.0.1:{admin}/routes"))
            .send()
            .await;
        match routes {
            Ok(r) => r.text().await.unwrap_or_default().contains("slow-1"),
            Err(_) => false,
        }
    })
    .await;
    assert!(ready.is_some(), "gateway did not come up");

    let url = format!("http://127.0.0.1:{port}/slow");
    let in_flight: Vec<_> = (0..20)
        .map(|_| tokio::spawn(client.get(&url).send()))
        .collect();
    let arrived = common::wait_until(Duration::from_secs(5), || async { slow.hits() == 20 }).await;
    assert!(arrived.is_some());
    let term = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let signalled = Instant::now();
    // New connections are refused once the listener is closed.
    let refused = common::wait_until(Duration::from_millis(900), || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
    })
    .await;
    let mut completed = 0;
    for request in in_flight {
        let response = request.await.unwrap().expect("in-flight request completes");
        assert_eq!(response.status(), 200);
        completed += 1;
    }
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    let exited = signalled.elapsed();
    println!(
        "drill SIGTERM: {completed}/20 in-flight completed, 0 failed; new connections refused after {refused:?}; exit {status} after {exited:?} (grace 5s)"
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        refused.is_some(),
        "new connections still accepted while draining"
    );
    assert!(status.success());
    assert!(exited < Duration::from_secs(5));
}

/// 200 connections trickle their headers; normal clients are still served; the trickling
/// ones are cut at header_read_timeout; oversize heads and bodies get 431 / 413.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_slowloris_and_oversize() {
    let consul = Consul::start().await;
    let backend = Backend::start("web-1", Behavior::Ok).await;
    consul.register("web", "web-1", backend.port, &[]).await;
    let gateway = Gateway::start_config(
        switchyard::Config::from_yaml(
            &format!(
                "consul:\n  address: {}\nserver:\n  header_read_timeout: 2s\n  max_body_bytes: 1048576\n  shutdown_grace: 1s\nservices:\n  - name: web\n",
                consul.url()
            ),
            &Default::default(),
        )
        .unwrap(),
    )
    .await;
    assert!(gateway
        .wait_for_instances("web", &["web-1"], Duration::from_secs(10))
        .await
        .is_some());

    let addr = gateway.addr;
    let mut trickles = Vec::new();
    for _ in 0..200 {
        trickles.push(tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            stream
                .write_all(b"GET /web HTTP/1.1\r\nHost: x\r\n")
                .await
                .unwrap();
            let opened = Instant::now();
            // One header byte every 100 ms until the server gives up on us.
            let mut buf = [0u8; 256];
            loop {
                if stream.write_all(b"X").await.is_err() {
                    break;
                }
                match tokio::time::timeout(Duration::from_millis(100), stream.read(&mut buf)).await
                {
                    Ok(Ok(0)) | Ok(Err(_)) => break,
                    Ok(Ok(_)) => break, // an answer (408) also ends it
                    Err(_) => {}
                }
                if opened.elapsed() > Duration::from_secs(10) {
                    return None;
                }
            }
            Some(opened.elapsed())
        }));
    }
    let load = Load::start(gateway.url("/web"), LOAD_CONCURRENCY);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut stats = load.finish().await;
    let mut cut_after = Vec::new();
    for trickle in trickles {
        cut_after.push(
            trickle
                .await
                .unwrap()
                .expect("a trickling connection was never cut"),
        );
    }
    cut_after.sort();
    println!(
        "drill slowloris: normal clients {}; 200 trickling connections cut after {:?}..{:?}",
        stats.summary(),
        cut_after[0],
        cut_after[cut_after.len() - 1]
    );
    assert!(stats.failures.is_empty());
    assert!(stats.ok > 100);
    assert!(cut_after[0] >= Duration::from_millis(1900));

    // Raw sockets: the gateway answers 413 before reading the body, and an HTTP client
    // library may report the broken pipe of its unfinished upload instead of the answer.
    let addr = gateway.addr;
    let (declared, chunked) = tokio::task::spawn_blocking(move || {
        (
            oversize_post(addr, 2 * 1024 * 1024, false),
            oversize_post(addr, 2 * 1024 * 1024, true),
        )
    })
    .await
    .unwrap();
    println!("drill oversize: 2 MiB declared -> {declared}, 2 MiB chunked -> {chunked}");
    assert!(
        declared.contains(" 413 "),
        "declared length over max_body_bytes: {declared:?}"
    );
    assert!(
        chunked.contains(" 413 "),
        "streamed body over max_body_bytes: {chunked:?}"
    );
    assert_eq!(gateway.get("/web").await.status(), 200);
}

/// POSTs `size` bytes, declared by Content-Length or chunked; returns the status line.
fn oversize_post(addr: std::net::SocketAddr, size: usize, chunked: bool) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let framing = if chunked {
        "Transfer-Encoding: chunked".to_owned()
    } else {
        format!("Content-Length: {size}")
    };
    let _ =
        stream.write_all(format!("POST /web HTTP/1.1\r\nHost: x\r\n{framing}\r\n\r\n").as_bytes());
    let chunk = vec![b'x'; 64 * 1024];
    for _ in 0..size / chunk.len() {
        // The gateway may answer 413 and stop reading before the end.
        let written = if chunked {
            stream
                .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                .and_then(|()| stream.write_all(&chunk))
                .and_then(|()| stream.write_all(b"\r\n"))
        } else {
            stream.write_all(&chunk)
        };
        if written.is_err() {
            break;
        }
    }
    if chunked {
        let _ = stream.write_all(b"0\r\n\r\n");
    }
    let mut answer = vec![0u8; 4096];
    let n = stream.read(&mut answer).unwrap_or(0);
    String::from_utf8_lossy(&answer[..n])
        .lines()
        .next()
        .unwrap_or("")
        .to_owned()
}
