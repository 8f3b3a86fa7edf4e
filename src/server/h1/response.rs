//! An answer's head on the fast path, as hyper's server would write it: the status line, the
//! handler's header lines (and an instance's, copied as they arrived when its body carries
//! them: [`RawLines`]), `date` when neither set one, and the body's framing —
//! its `content-length` when known, else `transfer-encoding: chunked`; no body after a HEAD
//! request or a 1xx, 204 or 304 answer.

use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

use hyper::header::{self, HeaderValue};
use hyper::http::response::Parts;
use hyper::StatusCode;

use crate::wire::{self, RawLines};

/// How the body follows the head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body is written.
    None,
    /// Exactly the declared length.
    Length,
    Chunked,
}

/// The answer's head, and what it means for the connection.
pub struct Encoded {
    pub framing: Framing,
    /// The connection closes after this answer (the handler's `Connection: close`, or `close`
    /// asked for by the caller).
    pub close: bool,
}

/// Writes the head of an answer with `parts` (and the instance's `lines` as they arrived)
/// into `out`; `exact` is the body's length when known, `head_only` a HEAD request's answer,
/// `close` a connection closing after it.
pub fn encode_head(
    out: &mut Vec<u8>,
    parts: &Parts,
    lines: Option<&RawLines>,
    exact: Option<u64>,
    head_only: bool,
    mut close: bool,
) -> Encoded {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(parts.status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let (mut has_length, mut has_date, mut has_connection) = (false, false, false);
    for (name, value) in &parts.headers {
        if name == header::TRANSFER_ENCODING {
            continue; // the framing is this hop's
        }
        if name == header::CONNECTION {
            has_connection = true;
            close |= names_close(value);
        }
        has_length |= name == header::CONTENT_LENGTH;
        has_date |= name == header::DATE;
        line(out, name.as_str().as_bytes(), value.as_bytes());
    }
    if let Some(lines) = lines {
        // No hop-by-hop line among them: `Connection` and `Transfer-Encoding` were left out.
        lines.write_to(out);
        has_length |= lines.has_length;
        has_date |= lines.has_date;
    }
    if !has_date {
        DATE.with_borrow_mut(|date| line(out, b"date", date.now()));
    }
    if close && !has_connection {
        line(out, b"connection", b"close");
    }
    let framing = framing(parts.status, exact, head_only, has_length);
    match (framing, has_length, exact) {
        (Framing::Length, false, Some(n)) => {
            out.extend_from_slice(b"content-length: ");
            wire::push_decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
        (Framing::Chunked, ..) => line(out, b"transfer-encoding", b"chunked"),
        _ => {}
    }
    out.extend_from_slice(b"\r\n");
    Encoded { framing, close }
}

/// The framing of a body: none after HEAD and for statuses without one, the declared or
/// known length, else chunked.
fn framing(status: StatusCode, exact: Option<u64>, head_only: bool, has_length: bool) -> Framing {
    let bodiless = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    match (head_only || bodiless, has_length || exact.is_some()) {
        (true, _) => Framing::None,
        (false, true) => Framing::Length,
        (false, false) => Framing::Chunked,
    }
}

/// Whether a `Connection` value names `close`.
fn names_close(value: &HeaderValue) -> bool {
    value
        .as_bytes()
        .split(|&b| b == b',')
        .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"))
}

fn line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The `date` value, formatted once a second per thread (as hyper caches it).
struct CachedDate {
    second: u64,
    value: Vec<u8>,
}

impl CachedDate {
    fn now(&mut self) -> &[u8] {
        let now = SystemTime::now();
        let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if second != self.second || self.value.is_empty() {
            self.second = second;
            self.value = httpdate::fmt_http_date(now).into_bytes();
        }
        &self.value
    }
}

thread_local! {
    static DATE: RefCell<CachedDate> = const {
        RefCell::new(CachedDate { second: 0, value: Vec::new() })
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::Response;

    fn encode(
        status: u16,
        headers: &[(&str, &str)],
        exact: Option<u64>,
        head_only: bool,
        close: bool,
    ) -> (String, Encoded) {
        let mut builder = Response::builder().status(status);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let (parts, ()) = builder.body(()).unwrap().into_parts();
        let mut out = Vec::new();
        let encoded = encode_head(&mut out, &parts, None, exact, head_only, close);
        (String::from_utf8(out).unwrap(), encoded)
    }

    #[test]
    fn heads_carry_the_framing_hyper_would_pick() {
        let (head, encoded) = encode(200, &[("x-a", "1")], Some(5), false, false);
        assert!(
            head.starts_with("HTTP/1.1 200 OK\r\nx-a: 1\r\ndate: "),
            "{head}"
        );
        assert!(
            head.ends_with(" GMT\r\ncontent-length: 5\r\n\r\n"),
            "{head}"
        );
        assert_eq!((encoded.framing, encoded.close), (Framing::Length, false));

        let (head, encoded) = encode(200, &[("content-length", "9")], None, false, false);
        assert_eq!(head.matches("content-length").count(), 1, "{head}");
        assert_eq!(encoded.framing, Framing::Length);

        let (head, encoded) = encode(502, &[("transfer-encoding", "gzip")], None, false, true);
        assert!(head.starts_with("HTTP/1.1 502 Bad Gateway\r\n"), "{head}");
        assert!(!head.contains("gzip"), "{head}");
        assert!(head.contains("connection: close\r\ntransfer-encoding: chunked\r\n"));
        assert_eq!((encoded.framing, encoded.close), (Framing::Chunked, true));
    }

    #[test]
    fn no_body_after_head_requests_and_bodiless_statuses() {
        for (status, head_only) in [(200, true), (204, false), (304, false), (103, false)] {
            let (head, encoded) = encode(status, &[], None, head_only, false);
            assert_eq!(encoded.framing, Framing::None, "{status}");
            assert!(!head.contains("content-length") && !head.contains("chunked"));
        }
    }

    #[test]
    fn the_handlers_connection_close_closes() {
        let (head, encoded) = encode(200, &[("connection", "close")], Some(0), false, false);
        assert!(encoded.close);
        assert_eq!(head.matches("connection").count(), 1, "{head}");
    }
}
