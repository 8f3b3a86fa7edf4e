//! The HTTP/1.1 wire format of the upstream client: the request head written from the
//! gateway's parts, the response head parsed with httparse (its kept lines handed on as
//! they arrived, or as hyper's types where they cannot be), and the
//! response body's framing (RFC 9112 §6.3); its chunked decoder is [`wire::chunked`]'s.
//!
//! Pure functions over buffers: no I/O here, so every rule is unit-tested on bytes.

use std::mem::MaybeUninit;

use bytes::{Bytes, BytesMut};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::response;
use hyper::{Method, Response, StatusCode, Version};

use super::super::headers::is_hop_by_hop_name;
use super::H1Error;
pub use crate::wire::chunked::{Chunked, Decoded};
use crate::wire::{self, RawLines, RunsBuilder, Span};

/// Largest response head accepted (nginx's `proxy_buffer_size` is 4–8 KiB; hyper's limit
/// ~400 KiB). A longer one is a bad answer: 502.
pub const MAX_HEAD: usize = 64 * 1024;
/// Most header lines in a response head (hyper's default).
const MAX_HEADERS: usize = 100;

/// How the request body goes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestFraming {
    /// No body (and no `Content-Length` line unless the method expects a body).
    Empty,
    /// `Content-Length` bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`: a streamed body of unknown length.
    Chunked,
}

impl RequestFraming {
    /// The framing of a body with `length` known (`None`: streamed), given the head's own
    /// `Content-Length`, which wins when present (the client's, checked by the server side).
    pub fn of(headers: &HeaderMap, length: Option<u64>) -> Result<Self, H1Error> {
        match headers.get(header::CONTENT_LENGTH) {
            Some(value) => parse_length(value.as_bytes()).map(RequestFraming::Length),
            None => Ok(match length {
                Some(0) => RequestFraming::Empty,
                Some(n) => RequestFraming::Length(n),
                None => RequestFraming::Chunked,
            }),
        }
    }
}

/// Writes the request head: `path` is the origin-form target, `lines` the header lines. A
/// `Content-Length` or `Transfer-Encoding` line is added for the framing when the lines have
/// no `Content-Length`.
pub fn encode_head<'a>(
    buf: &mut Vec<u8>,
    method: &Method,
    path: &str,
    lines: impl Iterator<Item = (&'a HeaderName, &'a HeaderValue)>,
    framing: RequestFraming,
) {
    buf.extend_from_slice(method.as_str().as_bytes());
    buf.push(b' ');
    buf.extend_from_slice(if path.is_empty() {
        b"/"
    } else {
        path.as_bytes()
    });
    buf.extend_from_slice(b" HTTP/1.1\r\n");
    let mut has_length = false;
    for (name, value) in lines {
        has_length |= name == header::CONTENT_LENGTH;
        buf.extend_from_slice(name.as_str().as_bytes());
        buf.extend_from_slice(b": ");
        buf.extend_from_slice(value.as_bytes());
        buf.extend_from_slice(b"\r\n");
    }
    match framing {
        RequestFraming::Length(n) if !has_length => {
            buf.extend_from_slice(b"content-length: ");
            wire::push_decimal(buf, n);
            buf.extend_from_slice(b"\r\n");
        }
        // RFC 9110 §8.6: a request whose method expects content says its length, even 0.
        RequestFraming::Empty if !has_length && expects_body(method) => {
            buf.extend_from_slice(b"content-length: 0\r\n");
        }
        RequestFraming::Chunked => buf.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        _ => {}
    }
    buf.extend_from_slice(b"\r\n");
}

fn expects_body(method: &Method) -> bool {
    matches!(*method, Method::POST | Method::PUT | Method::PATCH)
}

/// Writes a chunk's size line (`{hex}\r\n`) into `buf`.
pub fn chunk_size_line(buf: &mut Vec<u8>, size: usize) {
    buf.clear();
    wire::push_chunk_size(buf, size);
}

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// Read until the instance closes (no length, no chunked): never reused.
    UntilClose,
    /// A 101: the connection now carries the upgraded protocol.
    Upgrade,
}

/// A parsed response head.
#[derive(Debug)]
pub struct ResponseHead {
    /// Status and version; the header map holds the lines only when `lines` is `None`.
    pub parts: response::Parts,
    /// The kept lines as they arrived (the usual case: see [`RawLines`]).
    pub lines: Option<RawLines>,
    pub framing: Framing,
    /// Whether the connection may carry another exchange after this one.
    pub keep_alive: bool,
    /// Whether the head holds no hop-by-hop line: the static list is left out while parsing
    /// (but for a 101, whose `Upgrade` goes on), unless `Connection` names other headers.
    pub hop_free: bool,
}

/// What the head's lines said about framing and the connection.
#[derive(Default)]
struct Seen {
    length: Option<u64>,
    chunked: Option<bool>,
    close: bool,
    keep_alive: bool,
    /// `Connection` names a header besides `close`, `keep-alive` and `upgrade`.
    names_others: bool,
    date: bool,
}

/// Parses a response head off the front of `buf`: `None` until it is complete. 1xx
/// answers other than 101 are the caller's to skip (their framing is `Empty`).
pub fn parse_head(buf: &mut BytesMut, method: &Method) -> Result<Option<ResponseHead>, H1Error> {
    // Uninitialised: filling 100 empty lines first cost ~400 instructions per answer.
    let mut lines = [const { MaybeUninit::<httparse::Header>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut []);
    let config = httparse::ParserConfig::default();
    let len = match config.parse_response_with_uninit_headers(&mut parsed, buf, &mut lines) {
        Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD => len,
        Ok(httparse::Status::Complete(_)) => return Err(H1Error::HeadTooLarge),
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
            return Err(H1Error::HeadTooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(error) => return Err(H1Error::Parse(error)),
    };
    let status = StatusCode::from_u16(parsed.code.unwrap_or(0)).map_err(|_| H1Error::Status)?;
    let version = match parsed.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let mut spans: [Span; MAX_HEADERS] = [(0, 0, 0, 0); MAX_HEADERS];
    let count = wire::spans_of(buf, parsed.headers, &mut spans);
    let keep_hop_by_hop = status == StatusCode::SWITCHING_PROTOCOLS;
    let head = buf.split_to(len).freeze();
    let spans = &spans[..count];
    let (seen, lines) = scan(&head, spans, keep_hop_by_hop)?;
    let (mut parts, ()) = Response::new(()).into_parts();
    parts.status = status;
    parts.version = version;
    if lines.is_none() {
        parts.headers = header_map(&head, spans, keep_hop_by_hop)?;
    }
    let framing = framing(status, method, &seen);
    let keep_alive = !seen.close
        && (version == Version::HTTP_11 || seen.keep_alive)
        && !matches!(framing, Framing::UntilClose)
        // Both lengths: a smuggling shape (RFC 9112 §6.3 item 3); read by chunks, then close.
        && !(seen.length.is_some() && seen.chunked.is_some());
    Ok(Some(ResponseHead {
        parts,
        lines,
        framing,
        keep_alive,
        hop_free: !keep_hop_by_hop && !seen.names_others,
    }))
}

/// What the lines at `spans` in `head` say about framing, and the runs of those kept (the
/// static hop-by-hop lines left out), unless a map must be built: for a 101 (its hop-by-hop
/// lines go on), when `Connection` names other lines, or when the runs are too many.
fn scan(
    head: &Bytes,
    spans: &[Span],
    keep_hop_by_hop: bool,
) -> Result<(Seen, Option<RawLines>), H1Error> {
    let mut seen = Seen::default();
    let mut runs = RunsBuilder::default();
    for &(name, name_len, value, value_len) in spans {
        let name_bytes = &head[name as usize..(name + name_len) as usize];
        seen.note(
            name_bytes,
            &head[value as usize..(value + value_len) as usize],
        )?;
        if !is_hop_by_hop_name(name_bytes) {
            runs.keep(head, name, value + value_len);
        }
    }
    let lines = (!keep_hop_by_hop && !seen.names_others)
        .then(|| runs.finish(head.clone(), seen.length.is_some(), seen.date))
        .flatten();
    Ok((seen, lines))
}

/// The header map of the lines at `spans` in `head` (values share it); the static
/// hop-by-hop lines are left out unless `keep_hop_by_hop`.
fn header_map(head: &Bytes, spans: &[Span], keep_hop_by_hop: bool) -> Result<HeaderMap, H1Error> {
    // Room for the lines the way back adds (the server side grows a full map otherwise).
    let mut headers = HeaderMap::with_capacity(spans.len() + 4);
    for &(name, name_len, value, value_len) in spans {
        let name = &head[name as usize..(name + name_len) as usize];
        if !keep_hop_by_hop && is_hop_by_hop_name(name) {
            continue;
        }
        let name = HeaderName::from_bytes(name).map_err(|_| H1Error::HeaderName)?;
        let value = head.slice(value as usize..(value + value_len) as usize);
        let value = HeaderValue::from_maybe_shared(value).map_err(|_| H1Error::HeaderValue)?;
        headers.append(name, value);
    }
    Ok(headers)
}

impl Seen {
    fn note(&mut self, name: &[u8], value: &[u8]) -> Result<(), H1Error> {
        if name.eq_ignore_ascii_case(b"content-length") {
            let length = parse_length(value)?;
            if self.length.is_some_and(|seen| seen != length) {
                return Err(H1Error::Length);
            }
            self.length = Some(length);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            // The last coding decides: chunked last is chunked, anything else reads to close.
            let last = value.rsplit(|&b| b == b',').next().unwrap_or(b"");
            self.chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                let close = token.eq_ignore_ascii_case(b"close");
                let keep_alive = token.eq_ignore_ascii_case(b"keep-alive");
                self.close |= close;
                self.keep_alive |= keep_alive;
                self.names_others |= !(close
                    || keep_alive
                    || token.is_empty()
                    || token.eq_ignore_ascii_case(b"upgrade"));
            }
        } else if name.eq_ignore_ascii_case(b"date") {
            self.date = true;
        }
        Ok(())
    }
}

/// RFC 9112 §6.3, in its order.
fn framing(status: StatusCode, method: &Method, seen: &Seen) -> Framing {
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Framing::Upgrade;
    }
    if *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Framing::Empty;
    }
    match (seen.chunked, seen.length) {
        (Some(true), _) => Framing::Chunked,
        (Some(false), _) => Framing::UntilClose,
        (None, Some(0)) => Framing::Empty,
        (None, Some(n)) => Framing::Length(n),
        (None, None) => Framing::UntilClose,
    }
}

/// A `Content-Length` value: digits only (no sign, no spaces inside), at most 19 of them.
fn parse_length(value: &[u8]) -> Result<u64, H1Error> {
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return Err(H1Error::Length);
    }
    Ok(value
        .iter()
        .fold(0u64, |n, &d| n * 10 + u64::from(d - b'0')))
}

/// Takes up to `left` bytes of a `Content-Length` body off `buf`.
pub fn take_length(buf: &mut BytesMut, left: &mut u64) -> Option<Bytes> {
    if buf.is_empty() || *left == 0 {
        return None;
    }
    let n = (*left).min(buf.len() as u64) as usize;
    *left -= n as u64;
    Some(buf.split_to(n).freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, method: &Method) -> Result<Option<ResponseHead>, H1Error> {
        parse_head(&mut BytesMut::from(text), method)
    }

    fn head(text: &str) -> ResponseHead {
        parse(text, &Method::GET).unwrap().unwrap()
    }

    /// The lines handed on, from the map or the raw runs.
    fn lines_of(head: &ResponseHead) -> HeaderMap {
        let mut headers = head.parts.headers.clone();
        if let Some(lines) = &head.lines {
            assert!(head.parts.headers.is_empty(), "lines in one place");
            lines.append_to(&mut headers);
        }
        headers
    }

    #[test]
    fn the_request_head_carries_method_target_lines_and_framing() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("web"));
        headers.append("x-a", HeaderValue::from_static("1"));
        headers.append("x-a", HeaderValue::from_static("2"));
        let mut buf = Vec::new();
        encode_head(
            &mut buf,
            &Method::POST,
            "/p?q=1",
            headers.iter(),
            RequestFraming::Length(12),
        );
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            "POST /p?q=1 HTTP/1.1\r\nhost: web\r\nx-a: 1\r\nx-a: 2\r\ncontent-length: 12\r\n\r\n"
        );
        let mut buf = Vec::new();
        encode_head(
            &mut buf,
            &Method::PUT,
            "",
            HeaderMap::new().iter(),
            RequestFraming::Empty,
        );
        assert_eq!(buf, b"PUT / HTTP/1.1\r\ncontent-length: 0\r\n\r\n");
        let mut buf = Vec::new();
        encode_head(
            &mut buf,
            &Method::GET,
            "/",
            HeaderMap::new().iter(),
            RequestFraming::Empty,
        );
        assert_eq!(buf, b"GET / HTTP/1.1\r\n\r\n");
        let mut buf = Vec::new();
        encode_head(
            &mut buf,
            &Method::POST,
            "/",
            HeaderMap::new().iter(),
            RequestFraming::Chunked,
        );
        assert_eq!(
            buf,
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n"
        );
    }

    #[test]
    fn the_request_framing_follows_the_clients_length() {
        let mut headers = HeaderMap::new();
        assert_eq!(
            RequestFraming::of(&headers, Some(0)).unwrap(),
            RequestFraming::Empty
        );
        assert_eq!(
            RequestFraming::of(&headers, Some(5)).unwrap(),
            RequestFraming::Length(5)
        );
        assert_eq!(
            RequestFraming::of(&headers, None).unwrap(),
            RequestFraming::Chunked
        );
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("70000"));
        assert_eq!(
            RequestFraming::of(&headers, None).unwrap(),
            RequestFraming::Length(70000)
        );
    }

    #[test]
    fn chunk_size_lines_are_hex() {
        let mut buf = Vec::new();
        chunk_size_line(&mut buf, 0x1a2f);
        assert_eq!(buf, b"1a2f\r\n");
        chunk_size_line(&mut buf, 0);
        assert_eq!(buf, b"0\r\n");
    }

    #[test]
    fn a_head_is_parsed_off_the_buffer_and_its_body_stays() {
        let mut buf = BytesMut::from("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello");
        let head = parse_head(&mut buf, &Method::GET).unwrap().unwrap();
        assert_eq!(head.parts.status, StatusCode::OK);
        assert_eq!(lines_of(&head)["x-a"], "b");
        assert!(head.lines.is_some(), "handed on as they arrived");
        assert_eq!(head.framing, Framing::Length(5));
        assert!(head.keep_alive);
        assert_eq!(&buf[..], b"hello");
    }

    #[test]
    fn hop_by_hop_lines_are_left_out_unless_a_101_or_connection_names_others() {
        let plain = head(concat!(
            "HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n",
            "Transfer-Encoding: chunked\r\nX-A: 1\r\n\r\n"
        ));
        assert!(plain.hop_free);
        let lines = lines_of(&plain);
        let names: Vec<_> = lines.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["x-a"]);
        let named = head(
            "HTTP/1.1 200 OK\r\nConnection: x-secret\r\nX-Secret: 1\r\nContent-Length: 0\r\n\r\n",
        );
        assert!(
            !named.hop_free,
            "the names Connection lists are removed later"
        );
        assert_eq!(named.parts.headers["x-secret"], "1");
        assert!(named.lines.is_none(), "a map, for the removal");
        let switching = head(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
        );
        assert!(!switching.hop_free);
        assert_eq!(switching.parts.headers["upgrade"], "websocket");
        assert!(switching.lines.is_none());
    }

    #[test]
    fn a_partial_head_waits_and_a_huge_one_fails() {
        assert!(parse("HTTP/1.1 200 OK\r\nContent-Le", &Method::GET)
            .unwrap()
            .is_none());
        let huge = format!("HTTP/1.1 200 OK\r\nX: {}", "a".repeat(MAX_HEAD));
        assert!(matches!(
            parse(&huge, &Method::GET),
            Err(H1Error::HeadTooLarge)
        ));
        assert!(matches!(
            parse("HTTP/1.1 2x0 OK\r\n\r\n", &Method::GET),
            Err(H1Error::Parse(_))
        ));
    }

    #[test]
    fn framing_follows_rfc_9112_section_6_3() {
        let chunked = "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n";
        assert_eq!(head(chunked).framing, Framing::Chunked);
        let gzip = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n";
        assert_eq!(head(gzip).framing, Framing::UntilClose);
        assert!(!head(gzip).keep_alive);
        let both = "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(head(both).framing, Framing::Chunked);
        assert!(!head(both).keep_alive);
        let none = "HTTP/1.1 200 OK\r\n\r\n";
        assert_eq!(head(none).framing, Framing::UntilClose);
        let no_content = "HTTP/1.1 204 No Content\r\nContent-Length: 3\r\n\r\n";
        assert_eq!(head(no_content).framing, Framing::Empty);
        let to_head = parse(
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n",
            &Method::HEAD,
        );
        assert_eq!(to_head.unwrap().unwrap().framing, Framing::Empty);
        let switching = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n";
        assert_eq!(head(switching).framing, Framing::Upgrade);
        let early = "HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n";
        assert_eq!(head(early).framing, Framing::Empty);
    }

    #[test]
    fn lengths_must_be_digits_and_agree() {
        for bad in ["-1", "1 2", "0x10", "", "99999999999999999999"] {
            let text = format!("HTTP/1.1 200 OK\r\nContent-Length: {bad}\r\n\r\n");
            assert!(
                matches!(parse(&text, &Method::GET), Err(H1Error::Length)),
                "{bad}"
            );
        }
        let twice = "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n";
        assert!(matches!(parse(twice, &Method::GET), Err(H1Error::Length)));
        let same = "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n";
        assert_eq!(head(same).framing, Framing::Length(3));
    }

    #[test]
    fn connection_close_and_http_1_0_end_the_connection() {
        assert!(
            !head("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n").keep_alive
        );
        assert!(!head("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n").keep_alive);
        assert!(
            head("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n")
                .keep_alive
        );
    }
}
