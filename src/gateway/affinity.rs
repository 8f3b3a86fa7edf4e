//! The per-request key of the `hash` balancer (`hash_on`): a header's value, a cookie's
//! value or the client's IP, hashed where it lies in the request (no copy, no allocation).
//! Only services with `balance: hash` compute one.

use hyper::header::{HeaderMap, COOKIE};

use crate::balance::hash::hash_bytes;
use crate::config::HashOn;

/// The hash of the request's `hash_on` value; `None` when the request has none (the
/// balancer then picks at random). `client` is the peer's address as text (`10.0.0.7`).
pub fn request_key(hash_on: &HashOn, headers: &HeaderMap, client: &[u8]) -> Option<u64> {
    match hash_on {
        HashOn::Header(name) => headers.get(name.as_str()).map(|v| hash_bytes(v.as_bytes())),
        HashOn::Cookie(name) => cookie(headers, name).map(hash_bytes),
        HashOn::ClientIp => Some(hash_bytes(client)),
    }
}

/// The value of cookie `name` in the request's `Cookie` headers (RFC 6265 §5.4: pairs
/// separated by `; `), as bytes.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a [u8]> {
    headers
        .get_all(COOKIE)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&b| b == b';'))
        .find_map(|pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|&b| b == b'=')?;
            (pair[..eq].trim_ascii() == name.as_bytes()).then(|| pair[eq + 1..].trim_ascii())
        })
}

#[cfg(test)]
mod tests {
    use hyper::header::HeaderValue;

    use super::*;

    #[test]
    fn keys_from_header_cookie_and_ip() {
        let ip = b"10.0.0.7".as_slice();
        let mut headers = HeaderMap::new();
        headers.insert("x-user", HeaderValue::from_static("alice"));
        headers.append(COOKIE, HeaderValue::from_static("a=1; session=s-42"));
        let header = HashOn::Header("x-user".into());
        assert_eq!(
            request_key(&header, &headers, ip),
            Some(hash_bytes(b"alice"))
        );
        let session = HashOn::Cookie("session".into());
        assert_eq!(
            request_key(&session, &headers, ip),
            Some(hash_bytes(b"s-42"))
        );
        assert_eq!(
            request_key(&HashOn::Cookie("sess".into()), &headers, ip),
            None
        );
        assert_eq!(
            request_key(&HashOn::Header("x-none".into()), &headers, ip),
            None
        );
        assert_eq!(
            request_key(&HashOn::ClientIp, &headers, ip),
            Some(hash_bytes(b"10.0.0.7"))
        );
    }
}
