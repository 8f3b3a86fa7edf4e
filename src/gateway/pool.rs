//! The pool of HTTP/1.1 connections to plain instances (`protocol: http1`, the common case),
//! one per worker (`workers: N`, each a current-thread runtime), on
//! `hyper::client::conn::http1`.
//!
//! Why not hyper-util's pooled client: its checkout takes a mutex, races a connect against
//! the idle list, boxes several futures, and spawns a task per request to put the connection
//! back; callgrind put it at a large share of the gateway's user-space instructions. Here a
//! checkout is a pop from the worker's own `Vec` keyed by the instance's authority, and a
//! connection goes back when its answer's body is read (no task, no lock, no channel besides
//! hyper's own to the connection's task). Under `workers: 0` (one work-stealing runtime) a
//! request's tasks move between threads, so a thread-local pool would fill on the thread that
//! finishes bodies and stay empty on the one that checks out (tests/hostile_clients.rs saw 163
//! connections for 20 requests in flight): there the pool is one map behind a mutex.
//!
//! Each connection runs in a task of its own, which also closes it once it has stayed idle
//! for a whole `upstream.pool_idle_timeout`. A connection that is upgraded (101) never comes
//! back; one that closed while idle is dropped at checkout; a request that a reused
//! connection closed before sending is sent again on a new one, as hyper-util's client does.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::hash::{BuildHasherDefault, Hasher};
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::http::uri::Authority;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;
use tokio::runtime::{Handle, RuntimeFlavor};
use tracing::debug;

use super::body::UpstreamBody;

/// Keep-alive probes on idle upstream sockets (hyper-util's connector had the same).
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// How the pool connects and how long it keeps connections (from `upstream.*`).
#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    /// Most idle connections kept per instance and worker.
    pub max_idle: usize,
}

/// Why a pooled try failed.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("connecting to the instance: {0}")]
    Connect(#[source] std::io::Error),
    #[error("connecting to the instance timed out")]
    ConnectTimeout,
    #[error("HTTP/1.1 handshake with the instance: {0}")]
    Handshake(#[source] hyper::Error),
    #[error(transparent)]
    Send(hyper::Error),
}

impl PoolError {
    /// Nothing reached the instance: the try may go to another one, whatever its method.
    pub fn is_connect(&self) -> bool {
        !matches!(self, PoolError::Send(_))
    }
}

/// A connection of the pool, checked out for one exchange.
pub struct PooledConnection {
    sender: SendRequest<UpstreamBody>,
    key: Authority,
    max_idle: usize,
    /// Checkouts plus returns: even while idle. The connection's task reads it to tell a
    /// connection idle for a whole period from one in use.
    uses: Arc<AtomicU64>,
}

/// Idle connections by instance authority (looked up as `&str`); the newest last.
type IdleMap = HashMap<String, Vec<PooledConnection>, BuildHasherDefault<WordHash>>;

thread_local! {
    /// This worker's idle connections (a current-thread runtime's thread).
    static IDLE: RefCell<IdleMap> = RefCell::new(IdleMap::default());
    /// Whether this thread runs a current-thread runtime: decided once per thread.
    static PER_WORKER: Cell<Option<bool>> = const { Cell::new(None) };
}

/// The idle connections of a work-stealing runtime's threads.
static SHARED: LazyLock<Mutex<IdleMap>> = LazyLock::new(Mutex::default);

/// Runs `f` on the idle connections this thread checks out from and gives back to; `None`
/// during thread teardown.
fn with_idle<R>(f: impl FnOnce(&mut IdleMap) -> R) -> Option<R> {
    let per_worker = PER_WORKER
        .try_with(|cell| {
            *cell.get().get_or_insert_with(|| {
                Handle::try_current()
                    .is_ok_and(|h| h.runtime_flavor() == RuntimeFlavor::CurrentThread)
            })
        })
        .ok()?;
    if per_worker {
        IDLE.try_with(|idle| f(&mut idle.borrow_mut())).ok()
    } else {
        Some(f(&mut SHARED
            .lock()
            .unwrap_or_else(PoisonError::into_inner)))
    }
}

/// FxHash's word-at-a-time mix (rustc's): `Authority`'s own `Hash` feeds SipHash one byte at a
/// time, ~1,000 instructions per lookup in hyper-util's pool map (callgrind), and ~500 still
/// with FNV over those bytes; a `&str` key hashed 8 bytes at a time costs a fraction of that.
/// The keys are instance addresses from discovery, not chosen by clients, so a
/// flooding-resistant hash buys nothing here.
#[derive(Debug, Default)]
pub struct WordHash(u64);

impl WordHash {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

impl Hasher for WordHash {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(word));
        }
    }

    fn write_u8(&mut self, byte: u8) {
        self.add(u64::from(byte));
    }
}

impl PooledConnection {
    /// Gives the connection back to this thread's pool (its exchange is over); dropped,
    /// which closes it, when it is closed already or the instance has `max_idle` idle.
    pub fn release(self) {
        if self.max_idle == 0 || self.sender.is_closed() {
            return;
        }
        self.uses.fetch_add(1, Ordering::Relaxed);
        // During thread teardown the pool is gone; the connection just closes.
        with_idle(|idle| {
            let Some(list) = idle.get_mut(self.key.as_str()) else {
                idle.insert(self.key.as_str().to_owned(), vec![self]);
                return;
            };
            if list.len() >= self.max_idle {
                // Full: make room from connections the instance or the idle timer closed.
                list.retain(|c| !c.sender.is_closed());
            }
            if list.len() < self.max_idle {
                list.push(self);
            }
        });
    }
}

/// The newest idle connection to `key` on this thread, if any.
fn take_idle(key: &Authority) -> Option<PooledConnection> {
    with_idle(|idle| idle.get_mut(key.as_str()).and_then(Vec::pop)).flatten()
}

/// Sends `request` to the instance at `key` over a pooled connection (a new one if none is
/// idle); the answer comes with its connection, to [`PooledConnection::release`] once the
/// answer's body is read.
pub async fn send(
    settings: PoolSettings,
    key: Authority,
    mut request: Request<UpstreamBody>,
) -> Result<(Response<Incoming>, PooledConnection), PoolError> {
    loop {
        let (mut connection, reused) = match take_idle(&key) {
            Some(connection) => (connection, true),
            None => (connect(settings, &key).await?, false),
        };
        // An idle connection the instance closed meanwhile fails here: try the next one.
        if reused && connection.sender.ready().await.is_err() {
            continue;
        }
        connection.uses.fetch_add(1, Ordering::Relaxed);
        match connection.sender.try_send_request(request).await {
            Ok(response) => return Ok((response, connection)),
            Err(mut error) => match error.take_message() {
                // Closed before the request went out: nothing reached the instance.
                Some(unsent) if reused => request = unsent,
                _ => return Err(PoolError::Send(error.into_error())),
            },
        }
    }
}

/// A new connection to `key`, its task spawned.
async fn connect(settings: PoolSettings, key: &Authority) -> Result<PooledConnection, PoolError> {
    let stream = tokio::time::timeout(settings.connect_timeout, TcpStream::connect(key.as_str()))
        .await
        .map_err(|_| PoolError::ConnectTimeout)?
        .map_err(PoolError::Connect)?;
    // Best effort, as hyper-util's connector: a socket without them still works.
    let _ = stream.set_nodelay(true);
    let _ = SockRef::from(&stream).set_tcp_keepalive(&TcpKeepalive::new().with_time(TCP_KEEPALIVE));
    let (sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(PoolError::Handshake)?;
    let uses = Arc::new(AtomicU64::new(0));
    tokio::spawn(drive(
        connection.with_upgrades(),
        uses.clone(),
        settings.idle_timeout,
    ));
    Ok(PooledConnection {
        sender,
        key: key.clone(),
        max_idle: settings.max_idle,
        uses,
    })
}

/// Runs one connection until it closes, is upgraded, or stays idle a whole `idle_timeout`.
async fn drive(
    connection: impl Future<Output = hyper::Result<()>>,
    uses: Arc<AtomicU64>,
    idle_timeout: Duration,
) {
    let mut connection = pin!(connection);
    let mut timer = pin!(tokio::time::sleep(idle_timeout));
    let mut seen = u64::MAX;
    loop {
        tokio::select! {
            biased;
            ended = &mut connection => {
                if let Err(error) = ended {
                    debug!(%error, "upstream connection ended with an error");
                }
                return;
            }
            () = &mut timer => {
                let now = uses.load(Ordering::Relaxed);
                if now.is_multiple_of(2) && now == seen {
                    debug!("upstream connection idle for pool_idle_timeout: closed");
                    return;
                }
                seen = now;
                timer.as_mut().reset(tokio::time::Instant::now() + idle_timeout);
            }
        }
    }
}
