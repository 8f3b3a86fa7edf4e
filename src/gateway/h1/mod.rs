//! The gateway's own HTTP/1.1 client to instances, over plain TCP (`protocol: http1`, the
//! common case) or TLS (`protocol: https`, [`stream`]): one exchange at a time per
//! connection, written and read in the request's own task.
//!
//! Why not hyper's `client::conn::http1`: each connection there runs in a task of its own,
//! and a request reaches it through a channel, its answer comes back through another, and
//! its body through a third, each hop a task wake-up. callgrind put that connection task at
//! 31% of the gateway's user-space instructions per proxied GET (17,000 of 54,000, thin LTO),
//! of which parsing and encoding are about 7,000. Here the request's task writes the head
//! (from the client's parts, no second `HeaderMap`; the parts go back to the gateway, for a
//! retry and then their thread's stash), reads the answer's head with httparse (its lines
//! handed on as they arrived), and the answer's body reads the socket itself while the
//! client's connection polls it; no task, no channel, no lock. Idle connections wait in the
//! per-worker [`pool`].
//!
//! What it keeps from hyper's client: the framing rules of RFC 9112 §6.3 ([`codec`]); 1xx
//! answers skipped (101 kept for upgrades); an answer that arrives while the request body is
//! still going out stops the upload (and the connection is not reused); a reused connection
//! that the instance had closed, found before a byte of the answer, is retried once on
//! another connection when the request can be sent again (Go's transport does the same).

pub mod body;
pub mod codec;
pub mod pool;
pub mod stream;

use std::error::Error;
use std::future::Future;
use std::io;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Either};
use hyper::body::Body;
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::http::request::Parts;
use hyper::http::uri::Authority;
use hyper::{Method, Response};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::body::UpstreamBody;
use super::headers::Forwarded;
use super::retry::is_idempotent;
use body::ResponseBody;
use codec::{Framing, RequestFraming, ResponseHead};
pub use pool::PoolSettings;
use pool::{Checkout, Connection};
use stream::{Stream, TlsOrigin};

/// Bytes read per `read` call once the buffer runs low; most answers fit in one.
const READ_SIZE: usize = 16 * 1024;
/// Below this much free room, the read buffer grows by [`READ_SIZE`] before a read.
const MIN_READ_ROOM: usize = 2 * 1024;
/// A body of a known length up to this size goes out in the head's write.
const INLINE_BODY: usize = 16 * 1024;

/// Why an exchange with an instance failed.
#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    #[error("connecting to the instance: {0}")]
    Connect(#[source] io::Error),
    #[error("connecting to the instance timed out")]
    ConnectTimeout,
    #[error("TLS handshake with the instance: {0}")]
    Tls(#[source] io::Error),
    #[error("the instance's address is no name to verify its certificate for")]
    ServerName,
    #[error("the instance closed the connection before answering")]
    Closed,
    #[error("the instance closed the connection before its answer's end")]
    Incomplete,
    #[error("I/O with the instance: {0}")]
    Io(#[source] io::Error),
    #[error("the instance's answer is not HTTP/1.1: {0}")]
    Parse(httparse::Error),
    #[error("the instance's answer head is longer than 64 KiB")]
    HeadTooLarge,
    #[error("the instance's answer has an invalid status code")]
    Status,
    #[error("the instance's answer has an invalid header name")]
    HeaderName,
    #[error("the instance's answer has an invalid header value")]
    HeaderValue,
    #[error("the instance's answer has an invalid or conflicting Content-Length")]
    Length,
    #[error("the instance's answer has an invalid chunked body")]
    Chunk,
    #[error("the instance answered 101 to a request that asked for no upgrade")]
    UnaskedUpgrade,
    #[error("request body: {0}")]
    Body(#[source] Box<dyn Error + Send + Sync>),
}

/// A chunked body that breaks the coding's rules is the instance's bad answer.
impl From<crate::wire::chunked::ChunkError> for H1Error {
    fn from(_: crate::wire::chunked::ChunkError) -> Self {
        H1Error::Chunk
    }
}

impl H1Error {
    /// Nothing reached the instance: the try may go to another one, whatever its method.
    pub fn is_connect(&self) -> bool {
        matches!(
            self,
            H1Error::Connect(_) | H1Error::ConnectTimeout | H1Error::Tls(_) | H1Error::ServerName
        )
    }

    /// A reused connection that the instance had closed (its idle timeout racing ours).
    fn is_stale(&self) -> bool {
        match self {
            H1Error::Closed => true,
            H1Error::Io(error) => matches!(
                error.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionAborted
            ),
            _ => false,
        }
    }
}

/// What [`send`] gives back: the head it was lent (a retry sends it again, no copy made)
/// and the answer or the failure.
pub type Sent = (Parts, Result<Response<ResponseBody>, H1Error>);

/// Sends `head` (origin-form target) and `body` to the instance at `key` over a pooled
/// connection (a new one if none is idle), through `tls` if given. A head without `Host` (an
/// HTTP/1.0 client's) gets the instance's. The answer's body holds the connection and gives
/// it back to the pool once read to its end.
///
/// An `async` block rather than an `async fn`, whose future would hold the arguments twice
/// (rustc moves them into locals): 520 bytes more in every boxed try (`clients::Sent`).
#[allow(clippy::manual_async_fn)] // on purpose: see the doc above
pub fn send(
    settings: PoolSettings,
    key: Authority,
    tls: Option<Arc<TlsOrigin>>,
    head: Parts,
    mut body: UpstreamBody,
    forwarded: Forwarded,
) -> impl Future<Output = Sent> + Send {
    async move {
        let framing = match RequestFraming::of(&head.headers, body.size_hint().exact()) {
            Ok(framing) => framing,
            Err(error) => return (head, Err(error)),
        };
        let asks_upgrade = head.headers.contains_key(header::UPGRADE);
        let host = match head.headers.contains_key(header::HOST) {
            true => None,
            false => HeaderValue::from_str(key.as_str()).ok(),
        };
        let lines = Lines {
            forwarded: &forwarded,
            host: host.as_ref(),
        };
        loop {
            let Checkout {
                mut connection,
                reused,
            } = match pool::checkout(settings, &key, tls.as_deref()).await {
                Ok(checkout) => checkout,
                Err(error) => return (head, Err(error)),
            };
            // Kept to send again if this reused connection turns out closed (a cheap clone).
            let again = match &body {
                Either::Left(full) if reused && is_idempotent(&head.method) => Some(full.clone()),
                _ => None,
            };
            let exchanged = exchange(&mut connection, &head, lines, body, framing).await;
            match (exchanged, again) {
                (Ok(answer_head), _) => {
                    let answered = answer(connection, answer_head, asks_upgrade);
                    return (head, answered);
                }
                (Err(error), Some(again)) if error.is_stale() => body = Either::Left(again),
                (Err(error), _) => return (head, Err(error)),
            }
        }
    }
}

/// The lines a request goes out with besides its head's own.
#[derive(Clone, Copy)]
struct Lines<'a> {
    forwarded: &'a Forwarded,
    /// `Host`, when the head has none.
    host: Option<&'a HeaderValue>,
}

/// `Host` as a name with a `'static` home, for the added line.
static HOST: HeaderName = header::HOST;

/// The answer to hand on, its body reading from `connection`.
fn answer(
    connection: Box<Connection>,
    mut head: ResponseHead,
    asks_upgrade: bool,
) -> Result<Response<ResponseBody>, H1Error> {
    if head.framing == Framing::Upgrade && !asks_upgrade {
        return Err(H1Error::UnaskedUpgrade);
    }
    let body = ResponseBody::new(connection, &mut head);
    Ok(Response::from_parts(head.parts, body))
}

/// Writes the request and reads the answer's head. An answer that comes before the request
/// is all written ends the upload: the connection is then not reused.
async fn exchange(
    connection: &mut Connection,
    parts: &Parts,
    added: Lines<'_>,
    body: UpstreamBody,
    framing: RequestFraming,
) -> Result<ResponseHead, H1Error> {
    let Connection {
        stream,
        read_buf,
        write_buf,
        ..
    } = connection;
    write_buf.clear();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let host = added.host.map(|value| (&HOST, value));
    let lines = parts
        .headers
        .iter()
        .chain(host)
        .chain(added.forwarded.lines());
    codec::encode_head(write_buf, &parts.method, path, lines, framing);
    let method = &parts.method;
    match stream {
        Stream::Plain(tcp) => {
            let (reader, writer) = tcp.split();
            write_and_read(reader, writer, read_buf, write_buf, method, body, framing).await
        }
        // Boxed: the plain exchange's future stays its own size (an allocation per TLS
        // exchange, beside rustls's own work).
        Stream::Tls(tls) => {
            let (reader, writer) = tokio::io::split(tls.as_mut());
            Box::pin(write_and_read(
                reader, writer, read_buf, write_buf, method, body, framing,
            ))
            .await
        }
    }
}

/// [`exchange`] on one stream's two halves: the write and the read run together.
async fn write_and_read(
    mut reader: impl AsyncRead + Unpin,
    mut writer: impl AsyncWrite + Unpin,
    read_buf: &mut BytesMut,
    write_buf: &mut Vec<u8>,
    method: &Method,
    body: UpstreamBody,
    framing: RequestFraming,
) -> Result<ResponseHead, H1Error> {
    let write = write_request(&mut writer, write_buf, body, framing);
    let read = read_head(&mut reader, read_buf, method);
    tokio::pin!(write, read);
    // Whether the request is all out; a write the instance refused (it may have answered
    // already and closed its side, as for a 413) waits for the answer before failing.
    let mut written: Option<Result<(), H1Error>> = None;
    loop {
        tokio::select! {
            biased;
            head = &mut read => {
                let all_out = matches!(written, Some(Ok(())));
                let mut head = match (head, written) {
                    (Ok(head), _) => head,
                    (Err(_), Some(Err(refused))) => return Err(refused),
                    (Err(error), _) => return Err(error),
                };
                head.keep_alive &= all_out;
                return Ok(head);
            }
            sent = &mut write, if written.is_none() => match sent {
                Err(error @ H1Error::Body(_)) => return Err(error),
                sent => written = Some(sent),
            }
        }
    }
}

/// Writes the head in `buf` and the body after it, then flushes (a no-op on TCP; rustls may
/// hold the last record when the socket was full).
async fn write_request(
    writer: &mut (impl AsyncWrite + Unpin),
    buf: &mut Vec<u8>,
    mut body: UpstreamBody,
    framing: RequestFraming,
) -> Result<(), H1Error> {
    if let (Either::Left(_), RequestFraming::Length(n)) = (&body, framing) {
        if n as usize <= INLINE_BODY {
            if let Some(data) = next_data(&mut body).await? {
                buf.extend_from_slice(&data);
            }
            writer.write_all(buf).await.map_err(H1Error::Io)?;
            return writer.flush().await.map_err(H1Error::Io);
        }
    }
    writer.write_all(buf).await.map_err(H1Error::Io)?;
    while let Some(data) = next_data(&mut body).await? {
        if framing == RequestFraming::Chunked {
            codec::chunk_size_line(buf, data.len());
            writer.write_all(buf).await.map_err(H1Error::Io)?;
            writer.write_all(&data).await.map_err(H1Error::Io)?;
            writer.write_all(b"\r\n").await.map_err(H1Error::Io)?;
        } else {
            writer.write_all(&data).await.map_err(H1Error::Io)?;
        }
    }
    if framing == RequestFraming::Chunked {
        writer.write_all(b"0\r\n\r\n").await.map_err(H1Error::Io)?;
    }
    writer.flush().await.map_err(H1Error::Io)
}

/// The body's next non-empty data (trailers are not sent over HTTP/1.1 to instances).
async fn next_data(body: &mut UpstreamBody) -> Result<Option<Bytes>, H1Error> {
    while let Some(frame) = body.frame().await {
        match frame.map_err(H1Error::Body)?.into_data() {
            Ok(data) if !data.is_empty() => return Ok(Some(data)),
            _ => {}
        }
    }
    Ok(None)
}

/// Reads until a final answer's head is complete (1xx answers but 101 are skipped).
async fn read_head(
    reader: &mut (impl AsyncRead + Unpin),
    buf: &mut BytesMut,
    method: &Method,
) -> Result<ResponseHead, H1Error> {
    loop {
        if !buf.is_empty() {
            if let Some(head) = codec::parse_head(buf, method)? {
                if head.parts.status.is_informational() && head.framing != Framing::Upgrade {
                    continue;
                }
                return Ok(head);
            }
        }
        reserve(buf);
        match reader.read_buf(buf).await {
            Ok(0) if buf.is_empty() => return Err(H1Error::Closed),
            Ok(0) => return Err(H1Error::Incomplete),
            Ok(_) => {}
            Err(error) if buf.is_empty() => return Err(H1Error::Io(error)),
            Err(_) => return Err(H1Error::Incomplete),
        }
    }
}

/// Makes room for a read.
fn reserve(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < MIN_READ_ROOM {
        buf.reserve(READ_SIZE);
    }
}

/// Opens a connection to `key`, with its TLS handshake when `tls` is given: both within
/// `upstream.connect_timeout` (hyper-util's connector bounded only the TCP connect, so an
/// instance that accepted and never answered the handshake held the try to its deadline).
async fn connect(
    settings: PoolSettings,
    key: &Authority,
    tls: Option<&TlsOrigin>,
) -> Result<Stream, H1Error> {
    let connect = async {
        let tcp = TcpStream::connect(key.as_str())
            .await
            .map_err(H1Error::Connect)?;
        // Best effort, as hyper-util's connector: a socket without them still works.
        let _ = tcp.set_nodelay(true);
        let keepalive = socket2::TcpKeepalive::new().with_time(pool::TCP_KEEPALIVE);
        let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive);
        match tls {
            None => Ok(Stream::Plain(tcp)),
            // Boxed: rustls's handshake state would otherwise grow every request's future
            // (callgrind, LTO off: 42,530 -> 42,106 instructions per plain request).
            Some(origin) => Box::pin(origin.handshake(tcp, key)).await,
        }
    };
    tokio::time::timeout(settings.connect_timeout, connect)
        .await
        .map_err(|_| H1Error::ConnectTimeout)?
}
