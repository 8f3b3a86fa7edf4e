//! Header hygiene between a client and an instance: hop-by-hop removal (but `TE: trailers`,
//! which gRPC needs), one valid `Host`, the `X-Forwarded-*` family, and HTTP/2 cookie joining.
//!
//! The forwarded headers follow Traefik's `forwardedHeaders.trustedIPs` model: from a peer
//! listed in `server.trusted_proxies`, `X-Forwarded-For` is kept (every line, in order) and the
//! peer's address appended, and `X-Forwarded-Proto`/`-Host`, `X-Real-IP` and `Forwarded` are
//! kept; from any other peer they are all dropped and set afresh, so an instance can trust
//! that the first `X-Forwarded-For` entry is the address that reached the gateway's trusted
//! edge and that the last one is always the gateway's own peer.

use bytes::BytesMut;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::request::Parts;
use hyper::{Request, Version};

use super::GatewayError;

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus the
/// non-standard ones proxies are known to leak, and `Upgrade`. Never forwarded in either
/// direction (an upgrade request's are put back by `upgrade::restore_headers`).
/// `Connection` comes first: [`remove_hop_by_hop`] reads it before the rest.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
/// What an untrusted peer sent of these is dropped (`X-Forwarded-For` is set afresh).
static FORWARDED_FAMILY: [HeaderName; 4] = [
    HeaderName::from_static("x-forwarded-proto"),
    HeaderName::from_static("x-forwarded-host"),
    HeaderName::from_static("x-real-ip"),
    HeaderName::from_static("forwarded"),
];

/// Where `name` is in [`HOP_BY_HOP`] (0–8), or 9 + where it is in [`FORWARDED_FAMILY`], or 13
/// for `X-Forwarded-For`: one `match` on the name's text, which compiles to a switch on its
/// length and a compare or two.
/// Comparing each of a message's names with the 13 listed `HeaderName`s instead cost ~1,000
/// instructions per request (callgrind, `present` in `remove_hop_by_hop`, once per direction).
fn listed(name: &HeaderName) -> Option<u32> {
    listed_lowercase(name.as_str().as_bytes())
}

/// [`listed`] for a name's lowercase bytes.
fn listed_lowercase(name: &[u8]) -> Option<u32> {
    Some(match name {
        b"connection" => 0,
        b"keep-alive" => 1,
        b"proxy-connection" => 2,
        b"proxy-authenticate" => 3,
        b"proxy-authorization" => 4,
        b"te" => 5,
        b"trailer" => 6,
        b"transfer-encoding" => 7,
        b"upgrade" => 8,
        b"x-forwarded-proto" => 9,
        b"x-forwarded-host" => 10,
        b"x-real-ip" => 11,
        b"forwarded" => 12,
        b"x-forwarded-for" => 13,
        _ => return None,
    })
}

/// Whether `name`, as it arrived (any case), is hop-by-hop by itself (the static list,
/// without the names a `Connection` header lists).
pub fn is_hop_by_hop_name(name: &[u8]) -> bool {
    let mut lower = [0u8; 19]; // the longest listed name, "proxy-authorization"
    let Some(lower) = lower.get_mut(..name.len()) else {
        return false;
    };
    lower.copy_from_slice(name);
    lower.make_ascii_lowercase();
    listed_lowercase(lower).is_some_and(|i| i < FAMILY_SHIFT)
}

/// Bit `listed(name)` of every listed name `headers` carries: one pass over the message's
/// names instead of a hashed lookup per listed name (most messages carry none of them).
fn present(headers: &HeaderMap) -> u32 {
    headers
        .keys()
        .filter_map(listed)
        .fold(0, |found, i| found | 1 << i)
}

const CONNECTION_BIT: u32 = 1;
const TE_BIT: u32 = 1 << 5;
/// The bits of [`FORWARDED_FAMILY`] in [`present`]'s set.
const FAMILY_SHIFT: u32 = HOP_BY_HOP.len() as u32;
/// `X-Forwarded-For`'s bit, after the family's.
const FORWARDED_FOR_BIT: u32 = 1 << (FAMILY_SHIFT + FORWARDED_FAMILY.len() as u32);

/// Removes hop-by-hop headers: the static list, `Upgrade`, and every header that
/// `Connection` names.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let found = present(headers);
    remove_found_hop_by_hop(headers, found);
}

/// [`remove_hop_by_hop`] with the names [`present`] found.
fn remove_found_hop_by_hop(headers: &mut HeaderMap, mut found: u32) {
    if found & CONNECTION_BIT != 0 {
        remove_connection_named(headers);
        found &= !CONNECTION_BIT;
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if found & (1 << i) != 0 {
            headers.remove(name);
        }
    }
}

/// Removes the headers `Connection` names, and `Connection` itself.
fn remove_connection_named(headers: &mut HeaderMap) {
    let mut connection = headers.get_all(header::CONNECTION).iter();
    if let (Some(_), None) = (connection.next(), connection.next()) {
        // One `Connection` line, the usual case (an instance's `keep-alive`): taken out, its
        // names removed by `&str`, which allocates nothing; collecting `HeaderName`s cost 2
        // allocations per answer (the Vec, and "keep-alive", which is no standard name).
        if let Some(value) = headers.remove(header::CONNECTION) {
            for name in value.to_str().into_iter().flat_map(|v| v.split(',')) {
                headers.remove(name.trim());
            }
        }
        return;
    }
    // Collect first: `Connection` must be read before it is removed.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    headers.remove(header::CONNECTION);
}

/// The host without its port (`[v6]` keeps its brackets).
pub fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // [v6]:port; a client may send a '[' without its ']'.
        return host.find(']').map_or(host, |end| &host[..=end]);
    }
    host.rsplit_once(':').map_or(host, |(name, _)| name)
}

/// The authority a request is for: the request target's (absolute-form in HTTP/1.1, RFC 9112
/// §3.2.2; `:authority` in HTTP/2), else the one `Host` header. `None` only where the
/// protocol allows no host (HTTP/1.0, an HTTP/2 request without either).
///
/// A missing `Host` in HTTP/1.1, two `Host` headers, or one that is not a valid authority
/// (userinfo, a path, spaces, an unclosed `[`, empty) is a `BadHost` (RFC 9112 §3.2: 400).
pub fn request_authority<B>(request: &Request<B>) -> Result<Option<HeaderValue>, GatewayError> {
    let mut hosts = request.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(GatewayError::BadHost);
    }
    if let Some(authority) = request.uri().authority() {
        if authority.as_str().contains('@') {
            return Err(GatewayError::BadHost);
        }
        // HTTP/2 clients usually send no Host: forward the one they meant.
        if let Some(host) = host.filter(|h| h.as_bytes() == authority.as_str().as_bytes()) {
            return Ok(Some(host.clone()));
        }
        return HeaderValue::from_str(authority.as_str())
            .map(Some)
            .map_err(|_| GatewayError::BadHost);
    }
    match host {
        Some(host) if is_valid_authority(host.as_bytes()) => Ok(Some(host.clone())),
        Some(_) => Err(GatewayError::BadHost),
        None if request.version() == Version::HTTP_11 => Err(GatewayError::BadHost),
        None => Ok(None),
    }
}

/// The bytes of an RFC 3986 reg-name: unreserved, pct-encoded's `%`, sub-delims. A table:
/// searching the 17 punctuation bytes for each `.` of a host cost ~300 instructions per
/// request (callgrind).
static REG_NAME: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = (b as u8).is_ascii_alphanumeric();
        b += 1;
    }
    let punctuation = b"-._~%!$&'()*+,;=";
    let mut i = 0;
    while i < punctuation.len() {
        table[punctuation[i] as usize] = true;
        i += 1;
    }
    table
};

/// `host [":" port]` of RFC 3986: a reg-name or a bracketed IP literal, then digits.
fn is_valid_authority(bytes: &[u8]) -> bool {
    let (host, port) = if bytes.first() == Some(&b'[') {
        let Some(end) = bytes.iter().position(|&b| b == b']') else {
            return false;
        };
        let literal = &bytes[1..end];
        let valid = !literal.is_empty()
            && literal
                .iter()
                .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.');
        if !valid {
            return false;
        }
        (&bytes[..=end], &bytes[end + 1..])
    } else {
        let end = bytes.iter().position(|&b| b == b':').unwrap_or(bytes.len());
        (&bytes[..end], &bytes[end..])
    };
    let host_ok =
        !host.is_empty() && (host[0] == b'[' || host.iter().all(|&b| REG_NAME[usize::from(b)]));
    let port_ok = match port.split_first() {
        None => true,
        Some((b':', digits)) => digits.len() <= 5 && digits.iter().all(u8::is_ascii_digit),
        Some(_) => false,
    };
    host_ok && port_ok
}

/// How this hop sees the request it forwards.
pub struct Hop {
    /// The peer's address, as a header value.
    pub client: HeaderValue,
    /// The peer is a trusted proxy: its forwarded headers are kept.
    pub trusted: bool,
    /// The client connection is TLS.
    pub secure: bool,
}

/// The forwarded family this hop sets, kept out of the header map: the HTTP/1.1 client writes
/// them after the client's lines, the other clients insert them ([`Forwarded::apply`]).
/// Inserting them, names the map must hash and place, cost ~2,700 instructions per proxied
/// GET (callgrind, `forward_headers`); writing four lines costs a few dozen.
#[derive(Clone, Debug, Default)]
pub struct Forwarded {
    /// `X-Real-IP`, `X-Forwarded-For`, `X-Forwarded-Proto`, `X-Forwarded-Host`; `None`: not set
    /// by this hop (a trusted peer's line stays in the map).
    values: [Option<HeaderValue>; 4],
}

static FORWARDED_NAMES: [&HeaderName; 4] = [
    &X_REAL_IP,
    &X_FORWARDED_FOR,
    &X_FORWARDED_PROTO,
    &X_FORWARDED_HOST,
];

impl Forwarded {
    /// The lines this hop adds, in order.
    pub fn lines(&self) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
        FORWARDED_NAMES
            .iter()
            .zip(&self.values)
            .filter_map(|(name, value)| Some((*name, value.as_ref()?)))
    }

    /// Adds the lines to `headers`, for the clients that take a header map.
    pub fn apply(self, headers: &mut HeaderMap) {
        for (name, value) in FORWARDED_NAMES.iter().zip(self.values) {
            if let Some(value) = value {
                headers.insert(*name, value);
            }
        }
    }
}

/// Prepares the client's headers for an instance: hop-by-hop removed, HTTP/2 cookies
/// joined, `Host` set to the request's authority; returns the forwarded family this hop sets
/// (the client's `X-Forwarded-For` lines are taken out of the map, into the chain when the
/// peer is trusted).
pub fn forward_headers(parts: &mut Parts, authority: Option<HeaderValue>, hop: &Hop) -> Forwarded {
    let found = present(&parts.headers);
    // `TE: trailers` is the one TE an HTTP/2 hop may carry, and gRPC needs it end to end.
    let te_trailers = found & TE_BIT != 0
        && parts
            .headers
            .get(header::TE)
            .is_some_and(|te| te.as_bytes().eq_ignore_ascii_case(b"trailers"));
    remove_found_hop_by_hop(&mut parts.headers, found);
    if te_trailers {
        parts
            .headers
            .insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if parts.version == Version::HTTP_2 {
        join_cookies(&mut parts.headers);
    }
    let headers = &mut parts.headers;
    if !hop.trusted {
        // A name `Connection` listed may be gone already; removing it again is a no-op.
        for (i, name) in FORWARDED_FAMILY.iter().enumerate() {
            if found & (1 << (FAMILY_SHIFT + i as u32)) != 0 {
                headers.remove(name);
            }
        }
    }
    let chain = if hop.trusted && found & FORWARDED_FOR_BIT != 0 {
        forwarded_for_chain(headers, hop.client.as_bytes())
    } else {
        None
    };
    if found & FORWARDED_FOR_BIT != 0 {
        headers.remove(&X_FORWARDED_FOR);
    }
    // A trusted peer's own line of the family stays (and this hop sets none).
    let kept = |name: &HeaderName| hop.trusted && headers.contains_key(name);
    let proto = if hop.secure { "https" } else { "http" };
    let mut forwarded = Forwarded::default();
    forwarded.values[0] = (!kept(&X_REAL_IP)).then(|| hop.client.clone());
    forwarded.values[1] = Some(chain.unwrap_or_else(|| hop.client.clone()));
    forwarded.values[2] = (!kept(&X_FORWARDED_PROTO)).then(|| HeaderValue::from_static(proto));
    if let Some(host) = authority {
        forwarded.values[3] = (!kept(&X_FORWARDED_HOST)).then(|| host.clone());
        headers.insert(header::HOST, host);
    }
    forwarded
}

/// Every `X-Forwarded-For` line, in order, then `client`; `None` when there were none.
fn forwarded_for_chain(headers: &HeaderMap, client: &[u8]) -> Option<HeaderValue> {
    let mut lines = headers.get_all(&X_FORWARDED_FOR).iter().peekable();
    lines.peek()?;
    let mut chain = BytesMut::new();
    for line in lines {
        chain.extend_from_slice(line.as_bytes());
        chain.extend_from_slice(b", ");
    }
    chain.extend_from_slice(client);
    // Each line was a valid header value, and so is their join.
    HeaderValue::from_maybe_shared(chain.freeze()).ok()
}

/// HTTP/2 may split `cookie` over several fields; an HTTP/1.1 instance must get one, joined
/// with "; " (RFC 9113 §8.2.3).
fn join_cookies(headers: &mut HeaderMap) {
    let mut cookies = headers.get_all(header::COOKIE).iter();
    let (Some(first), Some(_)) = (cookies.next(), cookies.next()) else {
        return;
    };
    let mut joined = BytesMut::from(first.as_bytes());
    for cookie in headers.get_all(header::COOKIE).iter().skip(1) {
        joined.extend_from_slice(b"; ");
        joined.extend_from_slice(cookie.as_bytes());
    }
    if let Ok(value) = HeaderValue::from_maybe_shared(joined.freeze()) {
        headers.insert(header::COOKIE, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(builder: hyper::http::request::Builder) -> Parts {
        builder.body(()).unwrap().into_parts().0
    }

    /// What an instance sees: the map with this hop's lines added.
    fn forward_and_apply(parts: &mut Parts, authority: Option<HeaderValue>, hop: &Hop) {
        let lines = forward_headers(parts, authority, hop);
        lines.apply(&mut parts.headers);
    }

    fn hop(trusted: bool) -> Hop {
        Hop {
            client: HeaderValue::from_static("10.1.2.3"),
            trusted,
            secure: false,
        }
    }

    #[test]
    fn listed_knows_every_name_of_both_lists_by_position() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(listed(name), Some(i as u32), "{name}");
        }
        for (i, name) in FORWARDED_FAMILY.iter().enumerate() {
            assert_eq!(listed(name), Some(FAMILY_SHIFT + i as u32), "{name}");
        }
        assert_eq!(listed(&header::HOST), None);
        let forwarded_for = listed(&HeaderName::from_static("x-forwarded-for"));
        assert_eq!(forwarded_for.map(|i| 1 << i), Some(FORWARDED_FOR_BIT));
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret-hop"),
        );
        headers.insert("x-secret-hop", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(
            header::PROXY_AUTHORIZATION,
            HeaderValue::from_static("Basic x"),
        );
        headers.insert("x-end-to-end", HeaderValue::from_static("kept"));
        headers.insert(header::HOST, HeaderValue::from_static("example.com"));
        remove_hop_by_hop(&mut headers);
        let left: Vec<_> = headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(headers.contains_key("x-end-to-end") && headers.contains_key(header::HOST));
    }

    #[test]
    fn untrusted_peers_get_their_forwarded_headers_replaced() {
        let mut p = parts(
            Request::builder()
                .uri("/x")
                .header("x-forwarded-for", "6.6.6.6")
                .header("x-forwarded-proto", "https")
                .header("x-real-ip", "6.6.6.6")
                .header("forwarded", "for=6.6.6.6"),
        );
        forward_and_apply(
            &mut p,
            Some(HeaderValue::from_static("gw.example")),
            &hop(false),
        );
        assert_eq!(p.headers[&X_FORWARDED_FOR], "10.1.2.3");
        assert_eq!(p.headers[&X_REAL_IP], "10.1.2.3");
        assert_eq!(p.headers[&X_FORWARDED_PROTO], "http");
        assert_eq!(p.headers[&X_FORWARDED_HOST], "gw.example");
        assert_eq!(p.headers[header::HOST], "gw.example");
        assert!(!p.headers.contains_key("forwarded"));
    }

    #[test]
    fn trusted_peers_chain_every_line_in_order_whatever_the_bytes() {
        let mut p = parts(
            Request::builder()
                .uri("/x")
                .header("x-forwarded-for", "1.1.1.1")
                .header("x-forwarded-for", "2.2.2.2")
                .header("forwarded", "for=1.1.1.1"),
        );
        forward_and_apply(&mut p, None, &hop(true));
        assert_eq!(p.headers[&X_FORWARDED_FOR], "1.1.1.1, 2.2.2.2, 10.1.2.3");
        assert_eq!(p.headers["forwarded"], "for=1.1.1.1");
        let long = format!("{}\u{ff}, 6.6.6.6", "10.0.0.1, ".repeat(52));
        let value = HeaderValue::from_bytes(&latin1(&long)).unwrap();
        let mut p = parts(
            Request::builder()
                .uri("/x")
                .header("x-forwarded-for", value),
        );
        forward_and_apply(&mut p, None, &hop(true));
        let chain = p.headers[&X_FORWARDED_FOR].as_bytes();
        assert!(chain.ends_with(b", 6.6.6.6, 10.1.2.3"), "{chain:?}");
    }

    fn latin1(text: &str) -> Vec<u8> {
        text.chars().map(|c| c as u32 as u8).collect()
    }

    #[test]
    fn h2_cookies_are_joined() {
        let mut p = parts(
            Request::builder()
                .version(Version::HTTP_2)
                .uri("http://gw/x")
                .header("cookie", "a=1")
                .header("cookie", "b=2"),
        );
        forward_and_apply(&mut p, None, &hop(false));
        let cookies: Vec<_> = p.headers.get_all(header::COOKIE).iter().collect();
        assert_eq!(cookies, ["a=1; b=2"]);
    }

    #[test]
    fn host_must_be_one_valid_authority() {
        let request = |host: &[&str], uri: &str, version: Version| {
            let mut builder = Request::builder().uri(uri).version(version);
            for h in host {
                builder = builder.header("host", *h);
            }
            request_authority(&builder.body(()).unwrap())
        };
        let ok = |v: Result<Option<HeaderValue>, GatewayError>| v.unwrap().unwrap();
        assert_eq!(
            ok(request(&["a.example:8080"], "/", Version::HTTP_11)),
            "a.example:8080"
        );
        assert_eq!(
            ok(request(&["[::1]:80"], "/", Version::HTTP_11)),
            "[::1]:80"
        );
        assert_eq!(
            ok(request(&["x"], "http://evil/x", Version::HTTP_11)),
            "evil"
        );
        assert_eq!(
            ok(request(&[], "https://h2.example/x", Version::HTTP_2)),
            "h2.example"
        );
        assert_eq!(request(&[], "/", Version::HTTP_10), Ok(None));
        for bad in [
            &["a.example", "b.example"][..],
            &[],
            &["u@evil"],
            &["a/b"],
            &["a b"],
            &["[::1"],
            &[""],
            &["a:8x"],
        ] {
            assert_eq!(
                request(bad, "/", Version::HTTP_11),
                Err(GatewayError::BadHost),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn strip_port_handles_names_and_ipv6() {
        assert_eq!(strip_port("example.com:8080"), "example.com");
        assert_eq!(strip_port("example.com"), "example.com");
        assert_eq!(strip_port("[::1]:8080"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
        assert_eq!(
            strip_port("[u0k."),
            "[u0k.",
            "found by tests/fuzz.rs: once a panic"
        );
    }
}
