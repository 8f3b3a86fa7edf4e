//! Which request heads the server's own HTTP/1.1 path takes, parsed with httparse into the
//! `Request` a handler gets. It takes the plain case only: HTTP/1.1, an origin-form target,
//! no body (neither `Content-Length` nor `Transfer-Encoding`), no `Upgrade`, no `Expect`.
//! Anything else — including every malformed head — is [`NotSimple::Other`]: hyper gets the
//! connection with the bytes read so far and answers it as it always did (a 400, a 431,
//! a body, an upgrade, HTTP/1.0, an HTTP/2 preface).

use std::mem::MaybeUninit;

use bytes::{Bytes, BytesMut};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Uri, Version};

use crate::server::RequestBody;
use crate::wire::{self, Span};

/// Most header lines the fast path parses; a head with more goes to hyper (which takes 100).
const MAX_HEADERS: usize = 64;

/// A request the fast path serves.
pub struct Simple {
    pub request: Request<RequestBody>,
    /// The client asked to close after this answer (`Connection: close`).
    pub close: bool,
    /// A HEAD request: the answer goes without its body.
    pub head_only: bool,
}

/// Why the bytes at the buffer's start are no simple request (yet).
pub enum NotSimple {
    /// The start of a head: more bytes are needed.
    Partial,
    /// A request the fast path leaves to hyper.
    Other,
}

/// Parses the head at the start of `buf`; a simple request's head is taken out of it.
pub fn parse(buf: &mut BytesMut) -> Result<Simple, NotSimple> {
    let mut lines = [const { MaybeUninit::<httparse::Header>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    let config = httparse::ParserConfig::default();
    let len = match config.parse_request_with_uninit_headers(&mut parsed, buf, &mut lines) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Err(NotSimple::Partial),
        Err(_) => return Err(NotSimple::Other),
    };
    let (Some(1), Some(method), Some(path)) = (parsed.version, parsed.method, parsed.path) else {
        return Err(NotSimple::Other);
    };
    if !path.starts_with('/') {
        return Err(NotSimple::Other); // absolute or authority form, `*`: hyper's rules apply
    }
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Err(NotSimple::Other);
    };
    let base = buf.as_ptr() as usize;
    let target = (path.as_ptr() as usize - base, path.len());
    let mut spans: [Span; MAX_HEADERS] = [(0, 0, 0, 0); MAX_HEADERS];
    let count = wire::spans_of(buf, parsed.headers, &mut spans);
    let head = buf.split_to(len).freeze();
    let uri = Uri::from_maybe_shared(head.slice(target.0..target.0 + target.1));
    let (Ok(uri), Some((headers, close))) = (uri, header_map(&head, &spans[..count])) else {
        give_back(buf, &head);
        return Err(NotSimple::Other);
    };
    let head_only = method == Method::HEAD;
    let mut request = Request::new(RequestBody::Empty);
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = headers;
    Ok(Simple {
        request,
        close,
        head_only,
    })
}

/// Puts a head taken out of `buf` back in front of it (a rare path: a head httparse takes
/// and `http` refuses, for hyper to answer).
fn give_back(buf: &mut BytesMut, head: &[u8]) {
    let mut whole = BytesMut::with_capacity(head.len() + buf.len());
    whole.extend_from_slice(head);
    whole.extend_from_slice(buf);
    *buf = whole;
}

/// The header map of a simple request and whether it asks to close; `None` for a header
/// that makes it one for hyper (a body, an upgrade, an expectation, an invalid line).
fn header_map(head: &Bytes, spans: &[Span]) -> Option<(HeaderMap, bool)> {
    // Room for the lines the way to the instance adds (the forwarded family).
    let mut headers = wire::spare::header_map(spans.len() + 4);
    let mut close = false;
    for &(name, name_len, value, value_len) in spans {
        let name = &head[name as usize..(name + name_len) as usize];
        let name = HeaderName::from_bytes(name).ok()?;
        let value = head.slice(value as usize..(value + value_len) as usize);
        let value = HeaderValue::from_maybe_shared(value).ok()?;
        if name == header::CONTENT_LENGTH
            || name == header::TRANSFER_ENCODING
            || name == header::UPGRADE
            || name == header::EXPECT
        {
            return None;
        }
        if name == header::CONNECTION {
            close |= value
                .as_bytes()
                .split(|&b| b == b',')
                .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"));
        }
        headers.append(name, value);
    }
    Some((headers, close))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(head: &str) -> (Result<Simple, NotSimple>, usize) {
        let mut buf = BytesMut::from(head);
        let parsed = parse(&mut buf);
        (parsed, buf.len())
    }

    #[test]
    fn a_plain_get_is_taken_with_its_headers_and_the_rest_stays() {
        let (parsed, left) =
            parse_str("GET /a?b=c HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nX-A: 2\r\n\r\nGET /next");
        let Ok(simple) = parsed else {
            panic!("not taken");
        };
        assert_eq!(left, "GET /next".len());
        let request = &simple.request;
        assert_eq!(request.method(), Method::GET);
        assert_eq!(request.uri().path_and_query().unwrap().as_str(), "/a?b=c");
        assert_eq!(request.headers()["host"], "x");
        assert_eq!(request.headers().get_all("x-a").iter().count(), 2);
        assert!(!simple.close && !simple.head_only);
    }

    #[test]
    fn close_and_head_are_noted() {
        let (parsed, _) = parse_str("HEAD / HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\n");
        let Ok(simple) = parsed else {
            panic!("not taken");
        };
        assert!(simple.close && simple.head_only);
    }

    #[test]
    fn everything_but_the_plain_case_goes_to_hyper() {
        for head in [
            "POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
            "GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            "PUT / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
            "GET / HTTP/1.0\r\n\r\n",
            "GET http://x/ HTTP/1.1\r\n\r\n",
            "OPTIONS * HTTP/1.1\r\n\r\n",
            "CONNECT x:443 HTTP/1.1\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "\x16\x03\x01garbage\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
            "GET / HTTP/1.1\r\nx-a: \x7f\r\n\r\n",
        ] {
            let (parsed, left) = parse_str(head);
            assert!(matches!(parsed, Err(NotSimple::Other)), "{head:?}");
            assert_eq!(left, head.len(), "nothing taken from {head:?}");
        }
        let many: String = (0..MAX_HEADERS + 1)
            .map(|i| format!("x-{i}: v\r\n"))
            .collect();
        let (parsed, _) = parse_str(&format!("GET / HTTP/1.1\r\n{many}\r\n"));
        assert!(
            matches!(parsed, Err(NotSimple::Other)),
            "more lines than the fast path takes"
        );
    }

    #[test]
    fn a_head_cut_anywhere_is_partial() {
        let head = "GET /path HTTP/1.1\r\nHost: example\r\n\r\n";
        for end in 1..head.len() {
            let (parsed, left) = parse_str(&head[..end]);
            assert!(
                matches!(parsed, Err(NotSimple::Partial)),
                "{:?}",
                &head[..end]
            );
            assert_eq!(left, end);
        }
    }
}
