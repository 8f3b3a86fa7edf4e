//! The optional access log: one JSON object per line for every answered request (time, client,
//! method, path, service, instance, status, duration, tries), off unless `access_log.path` is
//! set.
//!
//! The request path never writes: it hands an [`Entry`] to a bounded channel with `try_send`
//! and moves on. A writer task of its own encodes and writes entries in batches. When the
//! writer falls behind (a slow disk, a blocked stdout), entries are dropped and counted in
//! `switchyard_access_log_dropped_total` rather than slowing requests or growing memory.
//! This module imports only the config.

use std::io;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hyper::http::uri::Authority;
use hyper::Method;
use prometheus::IntCounter;
use serde::Serialize;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::config::{AccessLogConfig, AccessLogTarget};

/// Write once this much is encoded, even if more entries are queued.
const BATCH_BYTES: usize = 64 * 1024;

/// The access log could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("access log {path}: {source}")]
pub struct AccessLogError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// One answered request.
#[derive(Debug, Clone)]
pub struct Entry {
    /// When the request was received.
    pub time: SystemTime,
    pub client: IpAddr,
    pub method: Method,
    /// The path without the query string: queries often carry tokens.
    pub path: String,
    /// `None` when no route matched.
    pub service: Option<Arc<str>>,
    /// The instance of the last try; `None` when none was tried.
    pub instance: Option<Authority>,
    pub status: u16,
    /// From request received to response head ready, all tries included (as the histogram).
    pub duration: Duration,
    pub tries: u32,
}

/// One line of the log, as written.
#[derive(Serialize)]
struct Line<'a> {
    time: String,
    client: IpAddr,
    method: &'a str,
    path: &'a str,
    service: Option<&'a str>,
    instance: Option<&'a str>,
    status: u16,
    /// Seconds, like the Prometheus histogram.
    duration: f64,
    tries: u32,
}

impl Entry {
    /// Appends the entry as one JSON line to `out`.
    fn encode(&self, out: &mut Vec<u8>) {
        let line = Line {
            time: humantime::format_rfc3339_millis(self.time).to_string(),
            client: self.client,
            method: self.method.as_str(),
            path: &self.path,
            service: self.service.as_deref(),
            instance: self.instance.as_ref().map(Authority::as_str),
            status: self.status,
            duration: self.duration.as_secs_f64(),
            tries: self.tries,
        };
        // Serializing strings and numbers into a Vec cannot fail.
        if serde_json::to_writer(&mut *out, &line).is_ok() {
            out.push(b'\n');
        }
    }
}

/// The request path's handle: queues entries for the writer task.
#[derive(Clone)]
pub struct AccessLog {
    sender: mpsc::Sender<Entry>,
    dropped: IntCounter,
}

impl AccessLog {
    /// A log queueing up to `buffer` entries, and the receiving end for [`spawn_writer`].
    pub fn channel(buffer: usize, dropped: IntCounter) -> (AccessLog, mpsc::Receiver<Entry>) {
        let (sender, receiver) = mpsc::channel(buffer.max(1));
        (AccessLog { sender, dropped }, receiver)
    }

    /// Queues `entry`; drops and counts it when the queue is full. Never waits.
    pub fn record(&self, entry: Entry) {
        if self.sender.try_send(entry).is_err() {
            self.dropped.inc();
        }
    }
}

/// Opens the configured target and starts its writer; `None` when the log is off. The writer
/// ends once `stop` is cancelled and what was queued by then is written.
pub async fn start(
    config: &AccessLogConfig,
    dropped: IntCounter,
    stop: CancellationToken,
) -> Result<Option<(AccessLog, JoinHandle<()>)>, AccessLogError> {
    let out: Box<dyn AsyncWrite + Send + Unpin> = match &config.target {
        AccessLogTarget::Off => return Ok(None),
        AccessLogTarget::Stdout => Box::new(tokio::io::stdout()),
        AccessLogTarget::File(path) => Box::new(
            tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .await
                .map_err(|source| AccessLogError {
                    path: path.clone(),
                    source,
                })?,
        ),
    };
    let (log, receiver) = AccessLog::channel(config.buffer, dropped);
    Ok(Some((log, spawn_writer(receiver, out, stop))))
}

/// Writes entries from `receiver` to `out` until `stop`, then writes what is still queued.
pub fn spawn_writer(
    mut receiver: mpsc::Receiver<Entry>,
    mut out: Box<dyn AsyncWrite + Send + Unpin>,
    stop: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut buffer = Vec::with_capacity(BATCH_BYTES);
        let mut failing = false;
        loop {
            let entry = tokio::select! {
                // Queued entries first: stopping must not lose them.
                biased;
                entry = receiver.recv() => entry,
                _ = stop.cancelled() => None,
            };
            let Some(entry) = entry else { break };
            entry.encode(&mut buffer);
            // Whatever else is queued goes out in the same write.
            while buffer.len() < BATCH_BYTES {
                match receiver.try_recv() {
                    Ok(entry) => entry.encode(&mut buffer),
                    Err(_) => break,
                }
            }
            write(&mut out, &mut buffer, &mut failing).await;
        }
        while let Ok(entry) = receiver.try_recv() {
            entry.encode(&mut buffer);
            if buffer.len() >= BATCH_BYTES {
                write(&mut out, &mut buffer, &mut failing).await;
            }
        }
        write(&mut out, &mut buffer, &mut failing).await;
    })
}

/// Writes and flushes `buffer`, then clears it. A failure is logged once per streak of
/// failures: the log must not flood the process's own log when the disk is full.
async fn write(
    out: &mut (dyn AsyncWrite + Send + Unpin),
    buffer: &mut Vec<u8>,
    failing: &mut bool,
) {
    if buffer.is_empty() {
        return;
    }
    let result = match out.write_all(buffer).await {
        Ok(()) => out.flush().await,
        Err(error) => Err(error),
    };
    match result {
        Ok(()) => *failing = false,
        Err(error) if !*failing => {
            warn!(%error, "access log write failed; entries are lost until it recovers");
            *failing = true;
        }
        Err(_) => {}
    }
    buffer.clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: u16) -> Entry {
        Entry {
            time: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            client: "127.0.0.1".parse().unwrap(),
            method: Method::GET,
            path: format!("/web/{n}"),
            service: Some("web".into()),
            instance: Some(Authority::from_static("127.0.0.1:9001")),
            status: 200,
            duration: Duration::from_micros(1500),
            tries: 2,
        }
    }

    #[test]
    fn an_entry_is_one_json_line() {
        let mut out = Vec::new();
        entry(1).encode(&mut out);
        let mut unrouted = entry(2);
        (unrouted.service, unrouted.instance, unrouted.tries) = (None, None, 0);
        unrouted.status = 404;
        unrouted.encode(&mut out);
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(
            lines[0],
            serde_json::json!({
                "time": "2023-11-14T22:13:20.123Z", "client": "127.0.0.1", "method": "GET",
                "path": "/web/1", "service": "web", "instance": "127.0.0.1:9001",
                "status": 200, "duration": 0.0015, "tries": 2,
            })
        );
        assert_eq!(lines[1]["service"], serde_json::Value::Null);
        assert_eq!(lines[1]["instance"], serde_json::Value::Null);
        assert_eq!(lines[1]["status"], 404);
    }

    #[test]
    fn a_full_queue_drops_and_counts_without_waiting() {
        let dropped = IntCounter::new("dropped", "test").unwrap();
        let (log, mut receiver) = AccessLog::channel(2, dropped.clone());
        for n in 0..5 {
            log.record(entry(n));
        }
        assert_eq!(dropped.get(), 3);
        // The first two were kept, in order.
        assert_eq!(receiver.try_recv().unwrap().path, "/web/0");
        assert_eq!(receiver.try_recv().unwrap().path, "/web/1");
        assert!(receiver.try_recv().is_err());
    }

    #[tokio::test]
    async fn the_writer_writes_everything_queued_before_stop() {
        let dropped = IntCounter::new("dropped", "test").unwrap();
        let (log, receiver) = AccessLog::channel(100, dropped);
        let (ours, theirs) = tokio::io::duplex(1 << 20);
        let stop = CancellationToken::new();
        for n in 0..10 {
            log.record(entry(n));
        }
        stop.cancel();
        spawn_writer(receiver, Box::new(theirs), stop)
            .await
            .unwrap();
        let mut ours = ours;
        let mut text = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut ours, &mut text)
            .await
            .unwrap();
        let paths: Vec<String> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["path"].to_string())
            .collect();
        let want: Vec<String> = (0..10).map(|n| format!("\"/web/{n}\"")).collect();
        assert_eq!(paths, want);
    }
}
