//! The server's own path for plain HTTP/1.1 requests: no body, an origin-form target, no
//! upgrade ([`head`]). Every connection starts here; at the first request it does not take,
//! hyper gets the connection, with the bytes read so far ([`Rewind`]), for the rest of its
//! life. So bodies, `Expect`, upgrades (WebSocket, h2c), HTTP/1.0, HTTP/2 and every
//! malformed head are served and refused exactly as before, by hyper.
//!
//! Why: after the gateway's own client to instances, hyper's server side was most of what
//! the gateway spent above nginx per proxied GET (callgrind, LTO off, of 42,100
//! instructions: ~6,700 reading the head into a `HeaderMap`, ~1,000 arming its header-read
//! timer for every head, the dispatcher's moves of the request future, its encoder). Here
//! a head that arrives whole in one read (the common case) arms no timer; the head is parsed
//! with httparse, the answer's head and the start of its body go out in one write: 42,106 ->
//! 38,108 instructions per proxied GET, mallocs 6 -> 5 (the parse into a `HeaderMap` costs
//! what hyper's did, ~5,600: the map is what the handler takes).
//!
//! What it keeps from hyper's server: a client closing its side while its request is in
//! flight abandons it (the handler is dropped, the request counted as reset); pipelined
//! requests are read while an answer is pending and served in order; a head not complete
//! within `server.header_read_timeout` of its first byte closes the connection; `date` on
//! every answer; chunked answers when the length is unknown; `Connection: close` honoured
//! both ways. Closing idle connections and draining on shutdown stay with the accept loop.

pub mod head;
pub mod response;

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use hyper::body::{Body, Frame};
use hyper::{Request, Response};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::connection::Pending;
use super::{ClientConnection, RequestBody};
pub use crate::wire::Rewind;
use crate::wire::{self, HeadLines};
use head::NotSimple;
use response::Framing;

/// Bytes read per `read` once the buffer runs low (hyper's first read buffer is as big).
const READ_SIZE: usize = 8 * 1024;
/// Below this much free room, the buffer grows by [`READ_SIZE`] before a read.
const MIN_READ_ROOM: usize = 1024;
/// Body data up to this size is copied after the head (one write); larger goes on its own.
const COPY_LIMIT: usize = 16 * 1024;

/// A connection's limits on request heads (from `server.*`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A head longer than this goes to hyper, which answers 431.
    pub max_head: usize,
    /// A head must be complete within this of its first byte.
    pub header_read_timeout: Duration,
}

/// How the fast path left a connection.
pub enum Served<S> {
    /// Closed (by either side, or for a broken exchange).
    Closed,
    /// Hyper serves the rest, starting with the bytes already read.
    HandOff(Rewind<S>),
}

/// Why the fast path serves no more requests on a connection.
enum Leave {
    /// A request for hyper is next.
    Other,
    Closed,
}

/// Serves the plain requests on `stream` with `handler` until one it leaves to hyper, the
/// end of the connection, or (once `draining`) the end of the request in flight.
pub async fn serve<S, H, F, B>(
    mut stream: S,
    handler: &H,
    connection: &Arc<ClientConnection>,
    limits: Limits,
    draining: &CancellationToken,
) -> Served<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
    H: Fn(Arc<ClientConnection>, Request<RequestBody>) -> F,
    F: Future<Output = Response<B>>,
    B: Body + HeadLines + Unpin,
{
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    loop {
        let simple = match read_head(&mut stream, &mut buf, limits).await {
            Ok(simple) => simple,
            Err(Leave::Other) => return Served::HandOff(Rewind::new(stream, buf.freeze())),
            Err(Leave::Closed) => return Served::Closed,
        };
        let pending = Pending::start(connection);
        // Pinned where it is made, and lent: moved into `answer_watching`, the handler's
        // future would take room twice in this future (rustc keeps a moved-from local's).
        let answer = std::pin::pin!(handler(connection.clone(), simple.request));
        let Some(response) = answer_watching(&mut stream, &mut buf, answer, limits).await else {
            return Served::Closed; // the client left: `pending` counts the request abandoned
        };
        let in_flight = pending.answered();
        let close = simple.close || draining.is_cancelled();
        let written = write_response(&mut stream, &mut out, response, simple.head_only, close);
        let keep = matches!(written.await, Ok(false));
        drop(in_flight);
        if !keep {
            let _ = stream.shutdown().await;
            return Served::Closed;
        }
    }
}

/// Reads until the buffer starts with a whole head (or one for hyper). A head that does not
/// arrive in one read must be complete within the header read timeout of its first byte.
async fn read_head<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    limits: Limits,
) -> Result<head::Simple, Leave> {
    let mut deadline = None;
    loop {
        if !buf.is_empty() {
            match head::parse(buf) {
                Ok(simple) => return Ok(simple),
                Err(NotSimple::Other) => return Err(Leave::Other),
                // Too long: hyper reads it up to its own limit and answers 431.
                Err(NotSimple::Partial) if buf.len() >= limits.max_head => {
                    return Err(Leave::Other)
                }
                Err(NotSimple::Partial) => {}
            }
        }
        reserve(buf);
        let read = if buf.is_empty() {
            stream.read_buf(buf).await
        } else {
            let deadline =
                *deadline.get_or_insert_with(|| Instant::now() + limits.header_read_timeout);
            match tokio::time::timeout_at(deadline, stream.read_buf(buf)).await {
                Ok(read) => read,
                Err(_) => return Err(Leave::Closed),
            }
        };
        if !matches!(read, Ok(n) if n > 0) {
            return Err(Leave::Closed);
        }
    }
}

/// Runs the handler's `answer` while watching the client's side: bytes that arrive are
/// kept (pipelined requests, up to a head's limit); `None` if the client closes or fails.
async fn answer_watching<S, F>(
    stream: &mut S,
    buf: &mut BytesMut,
    mut answer: Pin<&mut F>,
    limits: Limits,
) -> Option<F::Output>
where
    S: AsyncRead + Unpin,
    F: Future,
{
    loop {
        let reading = buf.len() < limits.max_head;
        if reading {
            reserve(buf);
        }
        tokio::select! {
            biased;
            answered = answer.as_mut() => return Some(answered),
            read = stream.read_buf(buf), if reading => {
                if !matches!(read, Ok(n) if n > 0) {
                    return None;
                }
            }
        }
    }
}

fn reserve(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < MIN_READ_ROOM {
        buf.reserve(READ_SIZE);
    }
}

/// Writes the answer; `Ok(true)` when the connection closes after it.
///
/// An `async` block rather than an `async fn`, whose future would hold the response twice
/// (rustc moves the arguments into locals).
#[allow(clippy::manual_async_fn)] // on purpose: see the doc above
fn write_response<'a, S, B>(
    stream: &'a mut S,
    out: &'a mut Vec<u8>,
    response: Response<B>,
    head_only: bool,
    close: bool,
) -> impl Future<Output = io::Result<bool>> + 'a
where
    S: AsyncWrite + Unpin,
    B: Body + HeadLines + Unpin + 'a,
{
    async move {
        let (parts, mut body) = response.into_parts();
        out.clear();
        let exact = body.size_hint().exact();
        let lines = body.take_lines();
        let encoded = response::encode_head(out, &parts, lines.as_ref(), exact, head_only, close);
        drop(parts);
        if encoded.framing != Framing::None {
            write_body(stream, out, &mut body, encoded.framing).await?;
        }
        if !out.is_empty() {
            stream.write_all(out).await?;
        }
        stream.flush().await?;
        Ok(encoded.close)
    }
}

/// Writes the body after the head in `out`: what the body has at once goes out with the
/// head (an instance's short answer arrives with its head), the rest as it comes.
async fn write_body<S, B>(
    stream: &mut S,
    out: &mut Vec<u8>,
    body: &mut B,
    framing: Framing,
) -> io::Result<()>
where
    S: AsyncWrite + Unpin,
    B: Body + Unpin,
{
    let chunked = framing == Framing::Chunked;
    loop {
        let frame = match poll_now(body).await {
            Some(frame) => frame,
            None => {
                flush_out(stream, out).await?;
                next_frame(body).await
            }
        };
        let data = match frame? {
            None => break,
            Some(frame) => match frame.into_data() {
                Ok(data) => data,
                Err(_) => continue, // trailers: HTTP/1.1 clients get none
            },
        };
        write_data(stream, out, data, chunked).await?;
        if !chunked && body.is_end_stream() {
            return Ok(());
        }
    }
    if chunked {
        out.extend_from_slice(b"0\r\n\r\n");
    }
    Ok(())
}

/// Appends (or, when large, writes) one piece of body data.
async fn write_data<S: AsyncWrite + Unpin>(
    stream: &mut S,
    out: &mut Vec<u8>,
    mut data: impl Buf,
    chunked: bool,
) -> io::Result<()> {
    let len = data.remaining();
    if len == 0 {
        return Ok(());
    }
    if chunked {
        wire::push_chunk_size(out, len);
    }
    if len <= COPY_LIMIT {
        while data.has_remaining() {
            let chunk = data.chunk();
            out.extend_from_slice(chunk);
            let n = chunk.len();
            data.advance(n);
        }
    } else {
        flush_out(stream, out).await?;
        stream.write_all_buf(&mut data).await?;
    }
    if chunked {
        out.extend_from_slice(b"\r\n");
    }
    if out.len() >= COPY_LIMIT {
        flush_out(stream, out).await?;
    }
    Ok(())
}

/// Writes out what is buffered, through TLS too (rustls may hold the last record).
async fn flush_out<S: AsyncWrite + Unpin>(stream: &mut S, out: &mut Vec<u8>) -> io::Result<()> {
    if !out.is_empty() {
        stream.write_all(out).await?;
        out.clear();
        stream.flush().await?;
    }
    Ok(())
}

/// The body's next frame if it is there at once; `None` if it would wait.
async fn poll_now<B: Body + Unpin>(body: &mut B) -> Option<io::Result<Option<Frame<B::Data>>>> {
    std::future::poll_fn(|cx| match Pin::new(&mut *body).poll_frame(cx) {
        Poll::Ready(frame) => Poll::Ready(Some(frame_or_error(frame))),
        Poll::Pending => Poll::Ready(None),
    })
    .await
}

/// The body's next frame.
async fn next_frame<B: Body + Unpin>(body: &mut B) -> io::Result<Option<Frame<B::Data>>> {
    std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx).map(frame_or_error)).await
}

/// A body's error ends the answer (the connection is closed, as hyper does).
fn frame_or_error<D, E>(frame: Option<Result<Frame<D>, E>>) -> io::Result<Option<Frame<D>>> {
    frame
        .transpose()
        .map_err(|_| io::Error::other("the answer's body failed"))
}
