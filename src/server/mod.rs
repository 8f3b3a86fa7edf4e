//! The accept loop shared by the gateway and admin listeners: serves HTTP/1.1 and HTTP/2 on
//! each connection, holds every connection to its deadlines, and on shutdown stops accepting
//! at once, lets in-flight requests finish, and cuts what is left when the grace period ends.
//!
//! Deadlines, one rule for both protocols (hyper's own HTTP/1 header timeout starts only once
//! the protocol is known, and HTTP/2 has no idle timeout):
//! - a connection must start its first request within `first_request_timeout`, or it is cut
//!   (a silent socket, a lone `P`, an HTTP/2 preface and nothing else);
//! - a connection with nothing in flight and no new request for `idle_timeout` is closed
//!   gracefully (HTTP/2: GOAWAY), and cut if the peer does not close within
//!   `first_request_timeout` more.
//!
//! Per client address: at most `max_connections` connections, and a budget of abandoned
//! requests ([`clients`]).
//!
//! Every connection starts on the server's own HTTP/1.1 path for plain requests ([`h1`]);
//! at the first request that path leaves (a body, an upgrade, HTTP/2, anything malformed),
//! hyper's HTTP/1.1 + HTTP/2 server takes the connection for the rest of its life. The
//! deadlines above hold on both.
//!
//! Plain and TLS listeners share this path; a [`Transport`] says what happens between accept
//! and HTTP. For TLS: a handshake bounded by the first-request deadline (a slow or never
//! finished handshake is cut and counted), and the connection marked `secure` for the
//! handler. The first request must still arrive within the deadline counted from accept.

pub mod body;
pub mod clients;
pub mod connection;
pub mod h1;
mod on_wake;
pub mod timer;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::{Body, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::config::ServerConfig;
use crate::metrics::ConnectionMetrics;
use crate::tls::TlsTerminator;
use crate::wire::HeadLines;
pub use body::RequestBody;
use clients::ClientSlot;
pub use clients::{Client, ClientLimits, Clients};
pub use connection::ClientConnection;
use connection::{Pending, Tracked};
use on_wake::OnWake;

/// How often [`timer_heartbeat`] wakes its runtime's timer: well under the request deadlines
/// (`retry.timeout`, 5 s by default) it keeps from waking the driver.
const TIMER_HEARTBEAT: Duration = Duration::from_millis(500);

/// Keeps this runtime's timer wheel holding a deadline at most [`TIMER_HEARTBEAT`] away,
/// until `shutdown`.
///
/// Why: tokio's time driver, asked for a deadline earlier than the one it is set to wake for,
/// wakes the I/O driver through its eventfd, even when the asking task runs on the driver's
/// own thread. With nothing else due sooner, every request's `retry.timeout` deadline did
/// that: one `write(2)` per proxied request, a seventh system call beside the two reads, two
/// writes and two `epoll_wait`s (strace, `workers: 1`; nginx makes 7 too). With a deadline
/// never more than half a second away, a later request deadline needs no wake-up; this costs
/// two timer wake-ups a second per runtime. Deadlines shorter than the heartbeat still wake the
/// driver, as they must.
pub async fn timer_heartbeat(shutdown: CancellationToken) {
    let mut beat = tokio::time::interval(TIMER_HEARTBEAT);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = beat.tick() => {}
        }
    }
}

/// Pause after a failed `accept` (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// How one listener serves its connections.
#[derive(Debug, Clone, Copy)]
pub struct ServeSettings {
    /// Names the listener in logs and metrics.
    pub name: &'static str,
    /// Connections served at once; more wait in the kernel's backlog.
    pub max_connections: usize,
    pub clients: ClientLimits,
    /// A connection must start its first request within this (`server.header_read_timeout`),
    /// and a later head, once started, must be complete within it.
    pub first_request_timeout: Duration,
    /// A connection with nothing in flight for this long is closed.
    pub idle_timeout: Duration,
    /// Longest request head; hyper answers 431 beyond.
    pub max_head_bytes: usize,
    /// How long in-flight requests may finish after shutdown starts.
    pub grace: Duration,
}

/// Where a listener's connections come from: the socket, what happens between accept and
/// HTTP, and the per-client-address state — shared by the plain and TLS listeners of the
/// gateway, so one address holds its share across both.
pub struct Source {
    pub listener: TcpListener,
    pub transport: Transport,
    pub clients: Arc<Clients>,
}

impl Source {
    /// Plain HTTP on `listener`, with per-client state of its own.
    pub fn plain(listener: TcpListener, limits: ClientLimits) -> Self {
        Self {
            listener,
            transport: Transport::Plain,
            clients: Clients::new(limits),
        }
    }
}

/// What a listener does between accept and HTTP.
#[derive(Clone)]
pub enum Transport {
    /// HTTP straight on the TCP stream.
    Plain,
    /// A TLS handshake first (under its own timeout), then HTTP over TLS.
    Tls(Arc<TlsTerminator>),
}

/// HTTP/2 keep-alive: a PING after this much silence on a connection with streams open...
const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
/// ...and the connection is closed if the PING is not answered within this.
const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

impl ServeSettings {
    /// The client-facing limits of `server.*`.
    pub fn from_server(name: &'static str, server: &ServerConfig) -> Self {
        Self {
            name,
            max_connections: server.max_connections,
            clients: ClientLimits {
                max_connections: server.max_connections_per_client,
                reset_rate: server.client_reset_rate,
            },
            first_request_timeout: server.header_read_timeout,
            idle_timeout: server.idle_timeout,
            max_head_bytes: server.max_header_bytes,
            grace: server.shutdown_grace,
        }
    }
}

/// The HTTP/1.1 + HTTP/2 connection builder for client-facing listeners.
pub fn http_builder(server: &ServerConfig) -> Builder<TokioExecutor> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(server.header_read_timeout)
        .max_buf_size(server.max_header_bytes);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(H2_KEEPALIVE_INTERVAL)
        .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT)
        .max_header_list_size(u32::try_from(server.max_header_bytes).unwrap_or(u32::MAX));
    builder
}

/// [`http_builder`] for the TLS listener: HTTP/1.1 answers are written as one buffer (the
/// head and a small body copied together) instead of a vectored write, which rustls turns
/// into one record only after collecting the slices into a `Vec` (an allocation per write);
/// hyper's own advice for TLS transports. A body's copy costs far less than encrypting it.
pub fn tls_http_builder(server: &ServerConfig) -> Builder<TokioExecutor> {
    let mut builder = http_builder(server);
    builder.http1().writev(false);
    builder
}

/// What every connection task of one listener shares.
struct Shared<H> {
    settings: ServeSettings,
    builder: Builder<TokioExecutor>,
    handler: H,
    clients: Arc<Clients>,
    metrics: ConnectionMetrics,
    /// Cancelled when shutdown starts: connections finish what is in flight, then close.
    draining: CancellationToken,
    /// Cancelled when the grace period ends, to cut connections still open.
    cut: CancellationToken,
}

/// Serves plain HTTP on `listener` until `shutdown`, then drains for at most
/// `settings.grace`.
///
/// `handler` answers each request; it gets the connection and never fails (errors become
/// responses).
pub async fn serve<H, F, B>(
    listener: TcpListener,
    builder: Builder<TokioExecutor>,
    handler: H,
    settings: ServeSettings,
    metrics: ConnectionMetrics,
    shutdown: CancellationToken,
) where
    H: Fn(Arc<ClientConnection>, Request<RequestBody>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: Body + HeadLines + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let source = Source::plain(listener, settings.clients);
    serve_on(source, builder, handler, settings, metrics, shutdown).await;
}

/// [`serve`] for any [`Transport`]: the TLS listener serves HTTPS through here.
pub async fn serve_on<H, F, B>(
    source: Source,
    builder: Builder<TokioExecutor>,
    handler: H,
    settings: ServeSettings,
    metrics: ConnectionMetrics,
    shutdown: CancellationToken,
) where
    H: Fn(Arc<ClientConnection>, Request<RequestBody>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: Body + HeadLines + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let Source {
        listener,
        transport,
        clients,
    } = source;
    let shared = Arc::new(Shared {
        settings,
        builder,
        handler,
        clients,
        metrics,
        draining: CancellationToken::new(),
        cut: CancellationToken::new(),
    });
    let tracker = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(settings.max_connections));
    loop {
        let (stream, peer, client, slot) =
            match admit_next(&listener, &slots, &shared, &shutdown).await {
                Next::Stop => break,
                Next::Refused => continue,
                Next::Admitted(stream, peer, client, slot) => (stream, peer, client, slot),
            };
        let accepted = Instant::now();
        let shared = shared.clone();
        let transport = transport.clone();
        tracker.spawn(async move {
            let _slot = slot;
            let secure = matches!(transport, Transport::Tls(_));
            let connection = Arc::new(ClientConnection::new(
                peer,
                secure,
                client.client.clone(),
                shared.metrics.resets.clone(),
            ));
            match transport {
                Transport::Plain => shared.serve_connection(stream, connection, accepted).await,
                Transport::Tls(tls) => {
                    let handshake = tokio::select! {
                        stream = tls.accept(stream) => stream,
                        _ = shared.cut.cancelled() => None,
                    };
                    if let Some(stream) = handshake {
                        shared.serve_connection(stream, connection, accepted).await;
                    }
                }
            }
            drop(client);
        });
    }
    drop(listener);
    drain(&shared, &tracker).await;
}

/// What the accept loop does next.
enum Next {
    /// Shutdown started.
    Stop,
    /// The accept failed, or the client's address holds its share already.
    Refused,
    /// A connection, its client address's share and its listener slot.
    Admitted(
        TcpStream,
        std::net::SocketAddr,
        ClientSlot,
        OwnedSemaphorePermit,
    ),
}

/// Waits for a free connection slot, accepts a connection and admits its client address.
async fn admit_next<H>(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
    shared: &Shared<H>,
    shutdown: &CancellationToken,
) -> Next {
    let name = shared.settings.name;
    let slot = tokio::select! {
        _ = shutdown.cancelled() => return Next::Stop,
        slot = slots.clone().acquire_owned() => match slot {
            Ok(slot) => slot,
            Err(_) => return Next::Stop, // the semaphore is never closed
        },
    };
    let accepted = tokio::select! {
        _ = shutdown.cancelled() => return Next::Stop,
        accepted = accept(listener, name) => accepted,
    };
    let Some((stream, peer)) = accepted else {
        return Next::Refused;
    };
    let Some(client) = shared.clients.admit(peer.ip()) else {
        shared.metrics.per_client_limit.inc();
        debug!(listener = name, %peer, "connection refused: per-client limit");
        return Next::Refused;
    };
    Next::Admitted(stream, peer, client, slot)
}

/// Accepts one connection; `None` after a failed accept (logged, paused).
async fn accept(
    listener: &TcpListener,
    name: &'static str,
) -> Option<(TcpStream, std::net::SocketAddr)> {
    match listener.accept().await {
        Ok((stream, peer)) => {
            if let Err(error) = stream.set_nodelay(true) {
                debug!(listener = name, %error, "could not set TCP_NODELAY");
            }
            Some((stream, peer))
        }
        Err(error) => {
            warn!(listener = name, %error, "accept failed");
            tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
            None
        }
    }
}

/// Lets open connections finish what is in flight, for at most the grace period.
async fn drain<H>(shared: &Shared<H>, tracker: &TaskTracker) {
    let name = shared.settings.name;
    shared.draining.cancel();
    tracker.close();
    if !tracker.is_empty() {
        info!(listener = name, connections = tracker.len(), grace = ?shared.settings.grace, "draining");
    }
    tokio::select! {
        _ = tracker.wait() => debug!(listener = name, "drained"),
        _ = tokio::time::sleep(shared.settings.grace) => {
            warn!(listener = name, "grace period over; cutting remaining connections");
            shared.cut.cancel();
            tracker.wait().await;
        }
    }
}

/// Where a connection is in its life, for the deadline checks.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Serving,
    /// A graceful close was asked for (idle or shutdown).
    Closing,
}

/// What a connection's deadline asks for when it comes.
enum Due {
    /// Cut the connection now.
    Cut,
    /// Nothing in flight and no new request for the idle timeout: close it gracefully.
    Idle,
    /// Requests came; the next check is set.
    Wait,
}

/// What the accept loop asks of a connection, apart from its own traffic.
enum Event {
    /// The grace period ended.
    Cut,
    /// Shutdown started.
    Draining,
    /// The connection's deadline came.
    Due,
}

/// A connection's deadlines: the first request from accept, then the idle timeout, then
/// the time a graceful close may take.
struct Deadlines {
    deadline: Instant,
    /// How long a connection may idle between checks.
    idle: Duration,
    /// Requests started at the last check.
    seen: u64,
    phase: Phase,
}

impl Deadlines {
    fn new(accepted: Instant, settings: &ServeSettings, idle: Duration) -> Self {
        Self {
            deadline: accepted + settings.first_request_timeout,
            idle,
            seen: 0,
            phase: Phase::Serving,
        }
    }

    /// A graceful close started: in-flight requests get the grace period.
    fn closing(&mut self, within: Duration) {
        self.phase = Phase::Closing;
        self.deadline = Instant::now() + within;
    }

    /// The deadline came: what to do, counted in `metrics`.
    fn due(
        &mut self,
        connection: &ClientConnection,
        settings: &ServeSettings,
        metrics: &ConnectionMetrics,
    ) -> Due {
        let started = connection.started();
        if self.phase == Phase::Closing {
            return Due::Cut;
        }
        if started == 0 {
            metrics.first_request_timeout.inc();
            debug!(listener = settings.name, peer = %connection.peer, "no request within the header read timeout; cut");
            return Due::Cut;
        }
        if started == self.seen && connection.in_flight() == 0 {
            metrics.idle.inc();
            self.closing(settings.first_request_timeout);
            return Due::Idle;
        }
        self.seen = started;
        self.deadline = Instant::now() + self.idle;
        Due::Wait
    }
}

impl<H, F, B> Shared<H>
where
    H: Fn(Arc<ClientConnection>, Request<RequestBody>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: Body + HeadLines + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// Serves one connection (plain or TLS) until it ends, is closed for idling or silence,
    /// or is cut at the end of the grace period: on the server's own HTTP/1.1 path, then
    /// (if that path hands it over) on hyper's.
    /// The first request must start within the header read timeout of `accepted` (a TLS
    /// handshake counts against it).
    pub async fn serve_connection<S>(
        self: Arc<Self>,
        stream: S,
        connection: Arc<ClientConnection>,
        accepted: Instant,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        self.metrics.open.inc();
        // Boxed, each phase: its future holds the handler's (kilobytes), and a spawned task's
        // future is moved three times on its way into the task (callgrind, a new connection
        // per request, LTO off: 218,163 -> 59,562 instructions per request, most of it `memcpy`).
        let simple = Box::pin(self.serve_simple(stream, &connection, accepted));
        if let Some(stream) = simple.await {
            Box::pin(self.serve_hyper(TokioIo::new(stream), connection, accepted)).await;
        }
        self.metrics.open.dec();
    }

    /// The connection's plain requests, under its deadlines; the connection back when hyper
    /// is to serve the rest.
    async fn serve_simple<S>(
        &self,
        stream: S,
        connection: &Arc<ClientConnection>,
        accepted: Instant,
    ) -> Option<h1::Rewind<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let settings = &self.settings;
        let heads = h1::Limits {
            max_head: settings.max_head_bytes,
            header_read_timeout: settings.first_request_timeout,
        };
        let served = h1::serve(stream, &self.handler, connection, heads, &self.draining);
        tokio::pin!(served);
        // hyper cuts an HTTP/1.1 connection idle for its header read timeout (its timer runs
        // from the end of an answer); the own path arms no timer per request, so idling is
        // checked here, against the shorter of the two (closed within one to two of it).
        let idle = settings.idle_timeout.min(heads.header_read_timeout);
        let mut deadlines = Deadlines::new(accepted, settings, idle);
        loop {
            let event = match self.until_event(served.as_mut(), &deadlines).await {
                Ok(h1::Served::HandOff(stream)) => return Some(stream),
                Ok(h1::Served::Closed) => return None,
                Err(event) => event,
            };
            match event {
                Event::Cut => return None,
                // Nothing in flight: close now; else the request in flight finishes first
                // (its answer says `Connection: close`).
                Event::Draining if connection.in_flight() == 0 => return None,
                Event::Draining => {
                    deadlines.closing(settings.grace + settings.first_request_timeout)
                }
                Event::Due => match deadlines.due(connection, settings, &self.metrics) {
                    Due::Cut | Due::Idle => return None,
                    Due::Wait => {}
                },
            }
        }
    }

    /// Runs `conn` until it ends (`Ok`) or the accept loop's next event for it comes (`Err`).
    async fn until_event<C: Future>(
        &self,
        conn: Pin<&mut C>,
        deadlines: &Deadlines,
    ) -> Result<C::Output, Event> {
        let events = std::pin::pin!(self.next_event(deadlines));
        let mut events = OnWake::new(events);
        tokio::select! {
            biased;
            output = conn => Ok(output),
            event = &mut events => Err(event),
        }
    }

    /// The next event for a connection with `deadlines` (polled only when it wakes, see
    /// [`OnWake`]).
    async fn next_event(&self, deadlines: &Deadlines) -> Event {
        tokio::select! {
            biased;
            _ = self.cut.cancelled() => Event::Cut,
            _ = self.draining.cancelled(), if deadlines.phase == Phase::Serving => Event::Draining,
            _ = tokio::time::sleep_until(deadlines.deadline) => Event::Due,
        }
    }

    /// Serves the rest of a connection with hyper.
    async fn serve_hyper<I>(
        self: &Arc<Self>,
        io: I,
        connection: Arc<ClientConnection>,
        accepted: Instant,
    ) where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let handler_side = Arc::clone(self);
        let info = connection.clone();
        let service = service_fn(move |request: Request<Incoming>| {
            let pending = Pending::start(&info);
            let request = request.map(RequestBody::Hyper);
            let response = (handler_side.handler)(info.clone(), request);
            async move {
                let mut response = response.await;
                if let Some(lines) = response.body_mut().take_lines() {
                    lines.append_to(response.headers_mut()); // hyper writes from the map
                }
                let in_flight = pending.answered();
                Ok::<_, Infallible>(response.map(|body| Tracked::new(body, in_flight)))
            }
        });
        let conn = self.builder.serve_connection_with_upgrades(io, service);
        tokio::pin!(conn);
        let settings = &self.settings;
        let mut deadlines = Deadlines::new(accepted, settings, settings.idle_timeout);
        loop {
            let event = match self.until_event(conn.as_mut(), &deadlines).await {
                Ok(Ok(())) => return,
                Ok(Err(error)) => {
                    debug!(listener = settings.name, peer = %connection.peer, %error, "connection ended with an error");
                    return;
                }
                Err(event) => event,
            };
            match event {
                Event::Cut => {
                    debug!(listener = settings.name, peer = %connection.peer, "connection cut at end of grace period");
                    return;
                }
                Event::Draining => {
                    conn.as_mut().graceful_shutdown();
                    deadlines.closing(settings.grace + settings.first_request_timeout);
                }
                Event::Due => match deadlines.due(&connection, settings, &self.metrics) {
                    Due::Cut => return,
                    Due::Idle => conn.as_mut().graceful_shutdown(),
                    Due::Wait => {}
                },
            }
        }
    }
}
