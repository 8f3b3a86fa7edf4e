//! A small HTTP/1.1 client for Consul's GETs over plain TCP: the blocking queries of the
//! watches, catalog mode and tag routes, and the agent's `/v1/agent/self`.
//!
//! Why not reqwest for these: a pooled hyper connection holds, while its long-poll waits, a
//! read buffer grown to the last answer (16 KB for a service of 10 instances), an 8 KB write
//! buffer, the 9 KB first block of its request channel, and the pooled client's boxed
//! futures: ~35 KB per connection, 35 MB of the 59 MB heap at 1,000 per-service watches
//! (heaptrack, 1,002 connections). Here a connection waiting on a long-poll holds its socket
//! and nothing else: the answer's buffer is allocated when the socket becomes readable, and
//! dropped with the answer.
//!
//! What it keeps of reqwest's behaviour: idle connections reused (at most `max_idle`, for
//! 90 s), a reused connection that Consul had closed, found before a byte of the answer, is
//! retried once on a new one (a GET can be sent again), a 2 s connect timeout, `TCP_NODELAY`,
//! the framing of RFC 9112 §6.3 (length, chunked, or to the end of the connection). `https://`
//! addresses and an `HTTP_PROXY`/`ALL_PROXY` in the environment stay with reqwest
//! ([`LightClient::serves`]).

use std::sync::Mutex;

use bytes::{Buf, Bytes, BytesMut};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::StatusCode;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{RawAnswer, CONNECT_TIMEOUT, IDLE_TIMEOUT};
use crate::wire::chunked::{Chunked, Decoded};

/// The largest answer head accepted (Consul's are ~400 bytes).
const MAX_HEAD: usize = 64 * 1024;
/// Most header lines in an answer head (Consul sends ~10).
const MAX_HEADERS: usize = 64;
/// Bytes read at a time once the answer arrives.
const READ_CHUNK: usize = 16 * 1024;

/// A failed exchange with Consul.
#[derive(Debug, thiserror::Error)]
pub enum Http1Error {
    #[error("connecting to {0}: {1}")]
    Connect(String, #[source] std::io::Error),
    #[error("connecting to {0} took longer than {CONNECT_TIMEOUT:?}")]
    ConnectTimeout(String),
    #[error("reading or writing the connection: {0}")]
    Io(#[source] std::io::Error),
    #[error("connection closed before the answer was complete")]
    Closed,
    #[error("malformed answer: {0}")]
    Malformed(&'static str),
}

/// An idle connection and the address it goes to.
struct Idle {
    authority: String,
    stream: TcpStream,
    since: Instant,
}

/// The plain-TCP client: request headers (the token) and the idle connections.
pub struct LightClient {
    headers: HeaderMap,
    idle: Mutex<Vec<Idle>>,
    max_idle: usize,
    /// A proxy is set in the environment (read once, as reqwest does when it is built).
    proxied: bool,
}

impl LightClient {
    pub fn new(headers: HeaderMap, max_idle: usize) -> Self {
        let proxied = ["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"]
            .iter()
            .any(|var| std::env::var_os(var).is_some_and(|v| !v.is_empty()));
        Self {
            headers,
            idle: Mutex::new(Vec::new()),
            max_idle,
            proxied,
        }
    }

    /// The headers every request carries (the token).
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// Whether this client takes `url`: `http://`, with no proxy configured in the
    /// environment (reqwest honours one; this client does not).
    pub fn serves(&self, url: &reqwest::Url) -> bool {
        url.scheme() == "http" && !self.proxied
    }

    /// A GET of `url`: status, headers and whole body, whatever the status.
    pub async fn get(&self, url: &reqwest::Url) -> Result<RawAnswer, Http1Error> {
        let host = url.host_str().ok_or(Http1Error::Malformed("no host"))?;
        let port = url.port_or_known_default().unwrap_or(80);
        let authority = format!("{host}:{port}");
        let head = self.request_head(url, &authority);
        if let Some(stream) = self.checkout(&authority) {
            match exchange(stream, &head).await {
                Ok((answer, stream)) => return Ok(self.checkin(authority, answer, stream)),
                // Closed by Consul while idle: nothing of an answer came, send it again.
                Err(Failure::BeforeAnswer(_)) => {}
                Err(Failure::During(error)) => return Err(error),
            }
        }
        let stream = connect(&authority).await?;
        match exchange(stream, &head).await {
            Ok((answer, stream)) => Ok(self.checkin(authority, answer, stream)),
            Err(Failure::BeforeAnswer(error) | Failure::During(error)) => Err(error),
        }
    }

    fn request_head(&self, url: &reqwest::Url, authority: &str) -> Vec<u8> {
        let mut head = Vec::with_capacity(256);
        head.extend_from_slice(b"GET ");
        head.extend_from_slice(url.path().as_bytes());
        if let Some(query) = url.query() {
            head.push(b'?');
            head.extend_from_slice(query.as_bytes());
        }
        head.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        head.extend_from_slice(authority.as_bytes());
        head.extend_from_slice(b"\r\naccept: */*\r\n");
        for (name, value) in &self.headers {
            head.extend_from_slice(name.as_str().as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        head.extend_from_slice(b"\r\n");
        head
    }

    /// The most recently used idle connection to `authority` that is not too old.
    fn checkout(&self, authority: &str) -> Option<TcpStream> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.retain(|c| c.since.elapsed() < IDLE_TIMEOUT);
        let at = idle.iter().rposition(|c| c.authority == authority)?;
        Some(idle.swap_remove(at).stream)
    }

    /// Keeps `stream` for reuse when the answer left it reusable and there is room.
    fn checkin(
        &self,
        authority: String,
        answer: RawAnswer,
        stream: Option<TcpStream>,
    ) -> RawAnswer {
        if let Some(stream) = stream {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            if idle.len() < self.max_idle {
                idle.push(Idle {
                    authority,
                    stream,
                    since: Instant::now(),
                });
            }
        }
        answer
    }
}

/// Where an exchange failed: before any byte of the answer (a reused connection may just
/// have been closed by Consul) or during it.
enum Failure {
    BeforeAnswer(Http1Error),
    During(Http1Error),
}

async fn connect(authority: &str) -> Result<TcpStream, Http1Error> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(authority))
        .await
        .map_err(|_| Http1Error::ConnectTimeout(authority.to_owned()))?
        .map_err(|e| Http1Error::Connect(authority.to_owned(), e))?;
    stream.set_nodelay(true).map_err(Http1Error::Io)?;
    Ok(stream)
}

/// Sends `head` on `stream` and reads the answer; the stream comes back when it can be
/// reused.
async fn exchange(
    mut stream: TcpStream,
    head: &[u8],
) -> Result<(RawAnswer, Option<TcpStream>), Failure> {
    stream
        .write_all(head)
        .await
        .map_err(|e| Failure::BeforeAnswer(Http1Error::Io(e)))?;
    // No buffer while the long-poll waits: it is allocated once the answer arrives.
    let mut buf = BytesMut::new();
    let parsed = loop {
        let before = buf.len();
        let read = read_some(&stream, &mut buf).await;
        match read {
            Ok(0) if before == 0 => return Err(Failure::BeforeAnswer(Http1Error::Closed)),
            Err(e) if before == 0 => return Err(Failure::BeforeAnswer(Http1Error::Io(e))),
            Ok(0) => return Err(Failure::During(Http1Error::Closed)),
            Err(e) => return Err(Failure::During(Http1Error::Io(e))),
            Ok(_) => {}
        }
        if let Some(parsed) = parse_head(&mut buf).map_err(Failure::During)? {
            break parsed;
        }
    };
    let (status, headers, framing) = parsed;
    let body = read_body(&stream, &mut buf, framing)
        .await
        .map_err(Failure::During)?;
    let reusable = framing != Framing::UntilClose && !closes(&headers) && buf.is_empty();
    Ok(((status, headers, body), reusable.then_some(stream)))
}

/// Reads what the socket has into `buf` (waiting for it first, with no buffer held).
async fn read_some(stream: &TcpStream, buf: &mut BytesMut) -> std::io::Result<usize> {
    loop {
        stream.readable().await?;
        if buf.capacity() - buf.len() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        match stream.try_read_buf(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // A reused connection is still marked readable from the last answer, so the
                // first wait of a long-poll returns at once: drop the empty buffer before the
                // real wait (kept, it was 16 MB at 1,000 watches, heaptrack).
                if buf.is_empty() {
                    *buf = BytesMut::new();
                }
            }
            result => return result,
        }
    }
}

fn closes(headers: &HeaderMap) -> bool {
    headers
        .get_all(reqwest::header::CONNECTION)
        .iter()
        .any(|v| v.as_bytes().eq_ignore_ascii_case(b"close"))
}

/// How the answer's body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(usize),
    Chunked,
    UntilClose,
}

type Head = (StatusCode, HeaderMap, Framing);

/// Parses the answer's head from the front of `buf` (removed from it); `None` until the
/// whole head is there.
fn parse_head(buf: &mut BytesMut) -> Result<Option<Head>, Http1Error> {
    let mut lines = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut lines);
    let length = match response.parse(buf) {
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Err(Http1Error::Malformed("head too large"))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(Http1Error::Malformed("invalid head")),
    };
    let code = response.code.unwrap_or(0);
    let status = StatusCode::from_u16(code).map_err(|_| Http1Error::Malformed("status"))?;
    if status.is_informational() {
        return Err(Http1Error::Malformed("1xx answer"));
    }
    let mut headers = HeaderMap::with_capacity(response.headers.len());
    for line in response.headers.iter() {
        let name = HeaderName::from_bytes(line.name.as_bytes())
            .map_err(|_| Http1Error::Malformed("header name"))?;
        let value = HeaderValue::from_bytes(line.value)
            .map_err(|_| Http1Error::Malformed("header value"))?;
        headers.append(name, value);
    }
    let framing = framing(status, &headers)?;
    buf.advance(length);
    Ok(Some((status, headers, framing)))
}

fn framing(status: StatusCode, headers: &HeaderMap) -> Result<Framing, Http1Error> {
    if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok(Framing::Length(0));
    }
    if let Some(coding) = headers.get(reqwest::header::TRANSFER_ENCODING) {
        return match coding.as_bytes().eq_ignore_ascii_case(b"chunked") {
            true => Ok(Framing::Chunked),
            false => Err(Http1Error::Malformed("transfer-encoding")),
        };
    }
    match headers.get(reqwest::header::CONTENT_LENGTH) {
        Some(length) => std::str::from_utf8(length.as_bytes())
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .map(Framing::Length)
            .ok_or(Http1Error::Malformed("content-length")),
        None => Ok(Framing::UntilClose),
    }
}

/// Reads the body after the head (its start already in `buf`); what is left in `buf` after
/// it was not part of this answer.
async fn read_body(
    stream: &TcpStream,
    buf: &mut BytesMut,
    framing: Framing,
) -> Result<Bytes, Http1Error> {
    let mut chunked = Chunked::Size;
    let mut body = BytesMut::new();
    loop {
        match framing {
            Framing::Length(length) if buf.len() >= length => {
                return Ok(buf.split_to(length).freeze())
            }
            Framing::Chunked => loop {
                match chunked
                    .decode(buf)
                    .map_err(|_| Http1Error::Malformed("chunked body"))?
                {
                    Decoded::Data(data) => body.extend_from_slice(&data),
                    Decoded::End => return Ok(body.freeze()),
                    Decoded::More => break,
                }
            },
            _ => {}
        }
        match read_some(stream, buf).await.map_err(Http1Error::Io)? {
            0 if framing == Framing::UntilClose => return Ok(buf.split().freeze()),
            0 => return Err(Http1Error::Closed),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    fn head_of(text: &str) -> (Head, BytesMut) {
        let mut buf = BytesMut::from(text);
        let head = parse_head(&mut buf).unwrap().unwrap();
        (head, buf)
    }

    #[test]
    fn heads_give_status_headers_and_framing() {
        let ((status, headers, framing), rest) =
            head_of("HTTP/1.1 200 OK\r\nX-Consul-Index: 42\r\nContent-Length: 2\r\n\r\n[]");
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["x-consul-index"], "42");
        assert_eq!(framing, Framing::Length(2));
        assert_eq!(&rest[..], b"[]");
        let ((_, _, framing), _) = head_of("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(framing, Framing::Chunked);
        let ((_, _, framing), _) = head_of("HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!(framing, Framing::UntilClose);
        let mut partial = BytesMut::from("HTTP/1.1 200 OK\r\nX-Consul");
        assert!(parse_head(&mut partial).unwrap().is_none());
        let mut bad = BytesMut::from("HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n");
        assert!(parse_head(&mut bad).is_err());
    }

    /// A server that answers each request on a connection with the next of `answers`,
    /// closing the connection after the ones marked so; counts its connections.
    async fn serve(
        answers: Vec<(&'static str, bool)>,
    ) -> (reqwest::Url, tokio::task::JoinHandle<usize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/v1/health/service/web?index=1",
            listener.local_addr().unwrap()
        );
        let task = tokio::spawn(async move {
            let mut answers = answers.into_iter();
            let mut connections = 0;
            while let Some(mut next) = answers.next() {
                let (mut socket, _) = listener.accept().await.unwrap();
                connections += 1;
                loop {
                    let mut request = Vec::new();
                    while !request.ends_with(b"\r\n\r\n") {
                        let mut byte = [0u8; 1];
                        if socket.read(&mut byte).await.unwrap() == 0 {
                            break;
                        }
                        request.push(byte[0]);
                    }
                    assert!(request.starts_with(b"GET /v1/health/service/web?index=1 HTTP/1.1\r\n"));
                    socket.write_all(next.0.as_bytes()).await.unwrap();
                    if next.1 {
                        break;
                    }
                    match answers.next() {
                        Some(answer) => next = answer,
                        None => return connections,
                    }
                }
            }
            connections
        });
        (url.parse().unwrap(), task)
    }

    #[tokio::test]
    async fn answers_are_read_and_connections_reused_or_replaced() {
        let chunked = "HTTP/1.1 200 OK\r\nX-Consul-Index: 7\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n[]\r\n0\r\n\r\n";
        let sized = "HTTP/1.1 200 OK\r\nX-Consul-Index: 8\r\nContent-Length: 4\r\n\r\n[{}]";
        let (url, server) = serve(vec![(chunked, false), (sized, true), (sized, false)]).await;
        let client = LightClient::new(HeaderMap::new(), 2);
        let (status, headers, body) = client.get(&url).await.unwrap();
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"[]"[..]));
        assert_eq!(headers["x-consul-index"], "7");
        // The same connection, which the server then closes while it is idle...
        assert_eq!(&client.get(&url).await.unwrap().2[..], b"[{}]");
        // ...so the next one is sent again on a new connection.
        assert_eq!(&client.get(&url).await.unwrap().2[..], b"[{}]");
        assert_eq!(server.await.unwrap(), 2);
    }
}
