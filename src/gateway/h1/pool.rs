//! The idle connections of the HTTP/1.1 client, one pool per worker (`workers: N`, each a
//! current-thread runtime).
//!
//! Why not hyper-util's pooled client: its checkout takes a mutex, races a connect against
//! the idle list, boxes several futures, and spawns a task per request to put the connection
//! back; callgrind put it at a large share of the gateway's user-space instructions. Here a
//! checkout is a pop from the worker's own `Vec` keyed by the instance's authority, and a
//! connection goes back when its answer's body is read (no task, no lock, no channel). Under
//! `workers: 0` (one work-stealing runtime) a request's tasks move between threads, so a
//! thread-local pool would fill on the thread that finishes bodies and stay empty on the one
//! that checks out (tests/hostile_clients.rs saw 163 connections for 20 requests in flight):
//! there the pool is one map behind a mutex, one per runtime.
//!
//! Connections are pooled by instance authority and by how they are reached: plain TCP, or
//! one [`TlsOrigin`]'s TLS settings (each its own pool: a client certificate or a verified
//! name is part of what a connection is).
//!
//! An idle connection has no task: one the instance closed (or wrote to) is found at checkout
//! from its socket's readiness, without a system call while nothing happened; one idle for a
//! whole `upstream.pool_idle_timeout` is dropped at checkout, and by a sweep that runs every
//! `pool_idle_timeout` on each pool. A connection that is upgraded (101) never comes back.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{LazyLock, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use hyper::http::uri::Authority;
use tokio::runtime::{self, Handle, RuntimeFlavor};
use tracing::debug;

use super::stream::{Stream, TlsOrigin};
use super::H1Error;

/// Keep-alive probes on idle upstream sockets (hyper-util's connector had the same).
pub const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// How the pool connects and how long it keeps connections (from `upstream.*`).
#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    /// Most idle connections kept per instance and worker.
    pub max_idle: usize,
}

/// A connection to an instance, with the buffers its exchanges reuse.
pub struct Connection {
    pub(super) stream: Stream,
    pub(super) read_buf: BytesMut,
    pub(super) write_buf: Vec<u8>,
    key: Authority,
    /// Its [`TlsOrigin`]'s id, 0 for plain TCP.
    origin: u64,
    max_idle: usize,
    idle_timeout: Duration,
    /// When it last went back to the pool.
    idle_since: Instant,
}

/// A connection taken for one exchange.
pub struct Checkout {
    pub connection: Box<Connection>,
    /// It served an earlier exchange (and the instance may have closed it since).
    pub reused: bool,
}

/// Idle connections by instance authority (looked up as `&str`); the newest last.
type ByAuthority = HashMap<String, Vec<Box<Connection>>, BuildHasherDefault<WordHash>>;

/// One worker's idle connections: plain TCP ones apart (one lookup, the common case), TLS
/// ones by their [`TlsOrigin`]'s id.
#[derive(Default)]
struct IdleMap {
    plain: ByAuthority,
    tls: HashMap<u64, ByAuthority, BuildHasherDefault<WordHash>>,
}

impl IdleMap {
    /// The connections of `origin` (0: plain TCP), if any went idle.
    fn get_mut(&mut self, origin: u64) -> Option<&mut ByAuthority> {
        match origin {
            0 => Some(&mut self.plain),
            id => self.tls.get_mut(&id),
        }
    }

    /// The connections of `origin`, made room for.
    fn entry(&mut self, origin: u64) -> &mut ByAuthority {
        match origin {
            0 => &mut self.plain,
            id => self.tls.entry(id).or_default(),
        }
    }

    fn maps(&mut self) -> impl Iterator<Item = &mut ByAuthority> {
        std::iter::once(&mut self.plain).chain(self.tls.values_mut())
    }
}

thread_local! {
    /// This worker's idle connections (a current-thread runtime's thread).
    static IDLE: RefCell<IdleMap> = RefCell::new(IdleMap::default());
    /// Whether this thread runs a current-thread runtime: decided once per thread.
    static PER_WORKER: Cell<Option<bool>> = const { Cell::new(None) };
    /// Whether this thread's pool has its sweep running.
    static SWEPT: AtomicBool = const { AtomicBool::new(false) };
}

/// The idle connections of work-stealing runtimes' threads, one pool per runtime: a gateway
/// has one such runtime, but a test binary run by `cargo test` has one per test, and a
/// connection (registered with its runtime's I/O driver) and a sweep (a task of its runtime)
/// belong to theirs. One process-wide pool let a test's connections wait for a sweep that
/// had ended with another test's runtime (a CI run saw it once).
static SHARED: LazyLock<Mutex<HashMap<runtime::Id, SharedPool>>> = LazyLock::new(Mutex::default);

/// One work-stealing runtime's idle connections and whether its sweep runs.
#[derive(Default)]
struct SharedPool {
    idle: IdleMap,
    swept: AtomicBool,
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

    fn write_u64(&mut self, word: u64) {
        self.add(word);
    }
}

impl Connection {
    /// Boxed for its life: an answer's body carries it, and moving a pointer instead of the
    /// buffers and socket through the request's futures saved ~2,000 instructions per request
    /// (callgrind, LTO off: 44,042 -> 42,073).
    fn new(stream: Stream, key: &Authority, origin: u64, settings: PoolSettings) -> Box<Self> {
        Box::new(Self {
            stream,
            read_buf: BytesMut::new(),
            write_buf: Vec::new(),
            key: key.clone(),
            origin,
            max_idle: settings.max_idle,
            idle_timeout: settings.idle_timeout,
            idle_since: Instant::now(),
        })
    }

    /// Whether the connection can carry another exchange: not idle too long, and nothing
    /// arrived on it since its last answer (neither the instance's close nor stray bytes).
    /// Costs no system call while its socket had no event: tokio clears read readiness after
    /// a read that did not fill the buffer, which is how every answer's last read ends.
    /// (Over TLS, a byte read here is a record cut: such a connection is dropped anyway.)
    fn is_usable(&self, now: Instant) -> bool {
        if now.duration_since(self.idle_since) >= self.idle_timeout {
            return false;
        }
        let tcp = self.stream.tcp();
        let mut cx = Context::from_waker(Waker::noop());
        match tcp.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            // An event: the instance closed (0), wrote out of turn (data), or nothing after
            // all (the readiness was stale).
            Poll::Ready(Ok(())) => matches!(
                tcp.try_read(&mut [0u8; 1]),
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock
            ),
        }
    }

    /// Gives the connection back to this thread's pool (its exchange is over); dropped,
    /// which closes it, when the instance already has `max_idle` idle ones.
    pub fn release(mut self: Box<Self>) {
        if self.max_idle == 0 {
            return;
        }
        self.idle_since = Instant::now();
        let idle_timeout = self.idle_timeout;
        // During thread teardown the pool is gone; the connection just closes.
        with_idle(|idle, swept| {
            let idle = idle.entry(self.origin);
            let list = match idle.get_mut(self.key.as_str()) {
                Some(list) => list,
                None => idle.entry(self.key.as_str().to_owned()).or_default(),
            };
            if list.len() >= self.max_idle {
                // Full: make room from connections the instance or the clock closed.
                let now = self.idle_since;
                list.retain(|c| c.is_usable(now));
            }
            if list.len() < self.max_idle {
                list.push(self);
            }
            // A plain load and store: the flag is read under the pool's own exclusion (its
            // thread, or the shared pool's lock), so no read-modify-write per request.
            if !swept.load(Ordering::Relaxed) {
                swept.store(true, Ordering::Relaxed);
                spawn_sweep(idle_timeout);
            }
        });
    }
}

/// The newest usable idle connection to `key` (over `tls`, if given) on this thread, or a
/// new one.
pub async fn checkout(
    settings: PoolSettings,
    key: &Authority,
    tls: Option<&TlsOrigin>,
) -> Result<Checkout, H1Error> {
    let origin = tls.map_or(0, TlsOrigin::id);
    if let Some(connection) = take_idle(origin, key) {
        return Ok(Checkout {
            connection,
            reused: true,
        });
    }
    let stream = super::connect(settings, key, tls).await?;
    Ok(Checkout {
        connection: Connection::new(stream, key, origin, settings),
        reused: false,
    })
}

/// Pops idle connections to `key` until a usable one; the unusable are dropped (closed).
fn take_idle(origin: u64, key: &Authority) -> Option<Box<Connection>> {
    let now = Instant::now();
    with_idle(|idle, _| {
        let list = idle.get_mut(origin)?.get_mut(key.as_str())?;
        while let Some(connection) = list.pop() {
            if connection.is_usable(now) {
                return Some(connection);
            }
        }
        None
    })
    .flatten()
}

/// Runs `f` on the idle connections this thread checks out from and gives back to, with
/// their sweep flag; `None` during thread teardown.
fn with_idle<R>(f: impl FnOnce(&mut IdleMap, &AtomicBool) -> R) -> Option<R> {
    let per_worker = PER_WORKER
        .try_with(|cell| {
            *cell.get().get_or_insert_with(|| {
                Handle::try_current()
                    .is_ok_and(|h| h.runtime_flavor() == RuntimeFlavor::CurrentThread)
            })
        })
        .ok()?;
    if per_worker {
        IDLE.try_with(|idle| {
            SWEPT
                .try_with(|swept| f(&mut idle.borrow_mut(), swept))
                .ok()
        })
        .ok()
        .flatten()
    } else {
        let runtime = Handle::try_current().ok()?.id();
        let mut pools = SHARED.lock().unwrap_or_else(PoisonError::into_inner);
        let pool = pools.entry(runtime).or_default();
        Some(f(&mut pool.idle, &pool.swept))
    }
}

/// Starts the sweep of the calling thread's pool: every `period`, connections idle that long
/// or closed by their instance are dropped. It ends with its runtime, and clears the flag
/// then so that a later runtime on the thread starts its own.
fn spawn_sweep(period: Duration) {
    let Ok(runtime) = Handle::try_current() else {
        return;
    };
    // A work-stealing runtime's pool goes with its sweep (at the runtime's end).
    let shared = (runtime.runtime_flavor() != RuntimeFlavor::CurrentThread).then(|| runtime.id());
    runtime.spawn(async move {
        let _clear = ClearOnDrop { shared };
        let mut tick = tokio::time::interval(period);
        tick.tick().await;
        loop {
            tick.tick().await;
            let now = Instant::now();
            let dropped = with_idle(|idle, _| {
                let mut dropped = 0;
                for by_authority in idle.maps() {
                    by_authority.retain(|_, list| {
                        let before = list.len();
                        list.retain(|c| c.is_usable(now));
                        dropped += before - list.len();
                        !list.is_empty()
                    });
                }
                idle.tls.retain(|_, by_authority| !by_authority.is_empty());
                dropped
            });
            if dropped.is_some_and(|n| n > 0) {
                debug!(dropped, "idle upstream connections closed");
            }
        }
    });
}

/// Ends the pool its sweep served: a worker's pool only clears its flag (a later runtime on
/// the thread starts a sweep of its own); a work-stealing runtime's pool is removed, its
/// idle connections closed.
struct ClearOnDrop {
    shared: Option<runtime::Id>,
}

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        match self.shared {
            Some(runtime) => {
                let pool = SHARED
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&runtime);
                drop(pool); // its connections close outside the lock
            }
            None => {
                let _ = with_idle(|_, swept| swept.store(false, Ordering::Relaxed));
            }
        }
    }
}
