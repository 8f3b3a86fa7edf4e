//! Heap allocations per proxied request, counted by a global allocator: requests through the
//! gateway minus the same requests sent straight to the backend (whose own allocations, and
//! the client's, are in both). Keeps the hot path's allocation count from creeping up.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxied_request_allocations_stay_low() {
    let (_consul, backend, gateway) = common::single_backend_gateway().await;
    let (gateway_addr, backend_addr) = (
        gateway.addr,
        SocketAddr::from(([127, 0, 0, 1], backend.port)),
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
    // Measured 17.0 when this bound was set (21.0 before the per-worker HTTP/1.1 pool; 4 of
    // the 17 are this test's hyper backend parsing the 4 X-Forwarded-*/X-Real-IP names the
    // gateway adds, which are no standard names); lower it as the hot path sheds
    // allocations, raise it only with a reason in the commit.
    assert!(
        per_request <= 18.0,
        "{per_request:.1} allocations per proxied request"
    );
}
