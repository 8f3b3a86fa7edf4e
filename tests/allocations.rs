//! Heap allocations per proxied request, counted by a global allocator: requests through the
//! gateway minus the same requests sent straight to the backend (the client's allocations are
//! in both). The backend is a blocking loop over a fixed buffer that allocates nothing per
//! request, so the difference is the gateway's alone. Keeps the hot path's allocation count
//! from creeping up.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Sends `count` keep-alive GETs on one connection; returns the allocations they caused.
fn allocations_for(addr: SocketAddr, path: &str, count: usize) -> u64 {
    let stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    let request = format!("GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n").into_bytes();
    let mut line = String::with_capacity(256);
    let mut body = vec![0u8; 4096];
    let mut exchange = |reader: &mut BufReader<TcpStream>| {
        writer.write_all(&request).unwrap();
        let mut length = 0usize;
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = value.trim().parse().unwrap();
            }
        }
        reader.read_exact(&mut body[..length]).unwrap();
    };
    for _ in 0..50 {
        exchange(&mut reader); // warm up pools and buffers
    }
    let before = ALLOCATIONS.load(Ordering::SeqCst);
    for _ in 0..count {
        exchange(&mut reader);
    }
    ALLOCATIONS.load(Ordering::SeqCst) - before
}

/// The answer of [`plain_backend`]: fixed, so nothing is formatted per request.
const ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 23\r\n\r\nhello from the backend\n";

/// A keep-alive HTTP/1.1 backend on its own threads that answers every request head (GETs,
/// no bodies) with [`ANSWER`], reading into a fixed buffer: no allocation per request, unlike
/// the hyper backend of the other tests, whose parsing of the gateway's `X-Forwarded-*` names
/// (no standard names) cost 4 allocations per request and hid in the gateway's share.
fn plain_backend() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || answer_heads(stream));
        }
    });
    port
}

/// Answers each complete request head on `stream` until the peer closes.
fn answer_heads(mut stream: TcpStream) {
    let mut buffer = [0u8; 16 * 1024];
    let mut filled = 0;
    loop {
        match stream.read(&mut buffer[filled..]) {
            Ok(0) | Err(_) => return,
            Ok(read) => filled += read,
        }
        while let Some(end) = buffer[..filled].windows(4).position(|w| w == b"\r\n\r\n") {
            if stream.write_all(ANSWER).is_err() {
                return;
            }
            buffer.copy_within(end + 4..filled, 0);
            filled -= end + 4;
        }
        if filled == buffer.len() {
            return; // a head larger than the buffer: not a request of this test
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxied_request_allocations_stay_low() {
    let consul = common::Consul::start().await;
    let backend_port = plain_backend();
    consul.register("web", "web-1", backend_port, &[]).await;
    let gateway = common::Gateway::start(&consul, "services:\n  - name: web\n").await;
    assert!(gateway
        .wait_for_instances("web", &["web-1"], Duration::from_secs(10))
        .await
        .is_some());
    let (gateway_addr, backend_addr) = (
        gateway.addr,
        SocketAddr::from(([127, 0, 0, 1], backend_port)),
    );
    let count = 2000;
    let (through, direct) = tokio::task::spawn_blocking(move || {
        (
            allocations_for(gateway_addr, "/web", count),
            allocations_for(backend_addr, "/web", count),
        )
    })
    .await
    .unwrap();
    let per_request = (through.saturating_sub(direct)) as f64 / count as f64;
    println!(
        "allocations per request: through the gateway {:.1}, direct {:.1}, the gateway's share {per_request:.1}",
        through as f64 / count as f64,
        direct as f64 / count as f64
    );
    // Measured 2.0 when this bound was set (debug build, `workers: 0`): 4.0 before request
    // header maps were reused on their thread (wire::spare), 6.0 with a
    // `HeaderMap` built for each instance's answer, before its lines went on as they arrived
    // (wire::RawLines); 6.8 on hyper's HTTP/1.1 server before the server's own path for plain requests (server/h1), 8.8 on
    // hyper's HTTP/1.1 client before the gateway's own (gateway/h1), 10.8 before the header maps of
    // retryable requests' copies came from a per-thread stash (gateway/head.rs); the 17.0 of
    // an older bound counted 4 allocations of the hyper backend this test used to run. Lower
    // it as the hot path sheds allocations, raise it only with a reason in the commit.
    assert!(
        per_request <= 2.5,
        "{per_request:.1} allocations per proxied request"
    );
}
