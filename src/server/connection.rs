//! One client connection as the request handler sees it, and the accounting of its requests:
//! how many started, how many are in flight (until the response body is done), and which
//! ones the client abandoned before their answer.
//!
//! The accept loop reads these counters to close idle connections; the handler reads the
//! peer, whether the connection is TLS, and its client's throttle.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use hyper::body::{Body, Frame, SizeHint};
use hyper::header::HeaderValue;
use prometheus::IntCounter;

use super::clients::Client;
use super::timer::TimerSlot;

/// What the handler learns about the connection a request came on.
pub struct ClientConnection {
    /// The peer's address.
    pub peer: SocketAddr,
    /// Whether the connection is TLS (`X-Forwarded-Proto: https`).
    pub secure: bool,
    /// State shared by every connection from the peer's address.
    pub client: Arc<Client>,
    /// Requests started on this connection.
    started: AtomicU64,
    /// Requests whose response body is not done yet.
    in_flight: AtomicUsize,
    /// Counts requests abandoned by the client.
    resets: IntCounter,
    /// The peer's IP as a header value, built on first use: every request on the connection
    /// shares it (`X-Forwarded-For`, `X-Real-IP`) instead of formatting it anew.
    peer_ip: OnceLock<HeaderValue>,
    /// The deadline timer its requests reuse ([`TimerSlot`]).
    timer: TimerSlot,
}

impl ClientConnection {
    pub fn new(peer: SocketAddr, secure: bool, client: Arc<Client>, resets: IntCounter) -> Self {
        Self {
            peer,
            secure,
            client,
            started: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            resets,
            peer_ip: OnceLock::new(),
            timer: TimerSlot::default(),
        }
    }

    /// The timer a request on this connection borrows for its deadline.
    pub fn deadline_timer(&self) -> &TimerSlot {
        &self.timer
    }

    /// The peer's IP address as a header value (one allocation per connection).
    pub fn peer_ip_header(&self) -> &HeaderValue {
        self.peer_ip.get_or_init(|| {
            HeaderValue::from_str(&self.peer.ip().to_string())
                .unwrap_or_else(|_| HeaderValue::from_static("unknown"))
        })
    }

    /// Requests started so far.
    pub fn started(&self) -> u64 {
        self.started.load(Ordering::Relaxed)
    }

    /// Requests not yet answered in full.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// A request between its head and its answer. Dropped before [`Pending::answered`] (the
/// client reset the stream or closed the connection), it counts as abandoned.
pub struct Pending {
    connection: Option<Arc<ClientConnection>>,
}

impl Pending {
    pub fn start(connection: &Arc<ClientConnection>) -> Self {
        connection.started.fetch_add(1, Ordering::Relaxed);
        connection.in_flight.fetch_add(1, Ordering::Relaxed);
        Self {
            connection: Some(connection.clone()),
        }
    }

    /// The response head is ready; the request stays in flight until its body is done.
    pub fn answered(mut self) -> InFlight {
        InFlight {
            connection: self.connection.take(),
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(connection) = self.connection.take() {
            connection.in_flight.fetch_sub(1, Ordering::Relaxed);
            connection.resets.inc();
            connection.client.record_reset();
        }
    }
}

/// Held by a response body until it is done or dropped.
pub struct InFlight {
    connection: Option<Arc<ClientConnection>>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(connection) = self.connection.take() {
            connection.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A response body that keeps its request counted as in flight until it ends.
pub struct Tracked<B> {
    inner: B,
    in_flight: Option<InFlight>,
}

impl<B> Tracked<B> {
    pub fn new(inner: B, in_flight: InFlight) -> Self {
        Self {
            inner,
            in_flight: Some(in_flight),
        }
    }
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) {
            self.in_flight = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
