//! A raw-socket HTTP/1.1 backend that records the exact bytes of every request head it
//! receives and counts the connections it accepts: what a hostile client's bytes became by the
//! time they reached an instance.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Records request heads; answers each request `200 ok` after `delay`.
pub struct RawBackend {
    pub port: u16,
    heads: Arc<Mutex<Vec<String>>>,
    connections: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl RawBackend {
    pub async fn start(delay: Duration) -> RawBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding");
        let port = listener.local_addr().expect("address").port();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn({
            let (heads, connections) = (heads.clone(), connections.clone());
            async move {
                while let Ok((stream, _)) = listener.accept().await {
                    connections.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(serve(stream, heads.clone(), delay));
                }
            }
        });
        RawBackend {
            port,
            heads,
            connections,
            task,
        }
    }

    /// Every request head received so far (latin-1 decoded, so any byte shows).
    pub fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }

    /// The lines of the last head whose name is `name` (case-insensitive), values only.
    pub fn last_values(&self, name: &str) -> Vec<String> {
        let heads = self.heads();
        let Some(head) = heads.last() else {
            return Vec::new();
        };
        header_values(head, name)
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The values of every `name:` line of `head`.
pub fn header_values(head: &str, name: &str) -> Vec<String> {
    head.split("\r\n")
        .skip(1)
        .filter_map(|line| line.split_once(':'))
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim().to_owned())
        .collect()
}

fn latin1(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| b as char).collect()
}

async fn serve(mut stream: TcpStream, heads: Arc<Mutex<Vec<String>>>, delay: Duration) {
    let mut buffer = Vec::new();
    loop {
        let Some(end) = read_until(&mut stream, &mut buffer, b"\r\n\r\n").await else {
            return;
        };
        let head = latin1(&buffer[..end]);
        buffer.drain(..end + 4);
        let length: usize = header_values(&head, "content-length")
            .first()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let chunked = header_values(&head, "transfer-encoding")
            .iter()
            .any(|v| v.eq_ignore_ascii_case("chunked"));
        heads.lock().unwrap().push(head);
        if chunked {
            // Good enough for these tests: the body ends with the last-chunk line.
            let Some(end) = read_until(&mut stream, &mut buffer, b"0\r\n\r\n").await else {
                return;
            };
            buffer.drain(..end + 5);
        } else {
            while buffer.len() < length {
                let mut chunk = [0u8; 4096];
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                }
            }
            buffer.drain(..length);
        }
        tokio::time::sleep(delay).await;
        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-instance: raw\r\n\r\nok";
        if stream.write_all(answer).await.is_err() {
            return;
        }
    }
}

/// Reads until `buffer` holds `marker`; its position, or `None` at EOF.
async fn read_until(stream: &mut TcpStream, buffer: &mut Vec<u8>, marker: &[u8]) -> Option<usize> {
    loop {
        if let Some(at) = buffer.windows(marker.len()).position(|w| w == marker) {
            return Some(at);
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
        }
    }
}
