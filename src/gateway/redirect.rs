//! `tls.redirect_http`: the plain listener's answer to every request, a 308 to the same
//! URL over https, without routing (nginx's `return 308 https://$host$request_uri`).

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode, Uri};

use super::{strip_port, GatewayError, ProxyBody};

/// A 308 to `https://<host>[:<https_port> unless 443]<path?query>`. `authority` is the
/// request's, already screened (a valid `Host` or target authority); without one (HTTP/1.0
/// without `Host`) there is nowhere to send the client: 400 `bad-host`.
pub fn to_https(
    authority: Option<&HeaderValue>,
    uri: &Uri,
    https_port: u16,
) -> Response<ProxyBody> {
    let Some(host) = authority.and_then(|a| a.to_str().ok()).map(strip_port) else {
        return GatewayError::BadHost.into_response();
    };
    let path = uri
        .path_and_query()
        .map(|p| p.as_str())
        .filter(|p| p.starts_with('/'))
        .unwrap_or("/");
    let location = if https_port == 443 {
        format!("https://{host}{path}")
    } else {
        format!("https://{host}:{https_port}{path}")
    };
    let Ok(location) = HeaderValue::from_str(&location) else {
        return GatewayError::BadHost.into_response();
    };
    let mut response = Response::new(Either::Right(Full::new(Bytes::new())));
    *response.status_mut() = StatusCode::PERMANENT_REDIRECT;
    response.headers_mut().insert(header::LOCATION, location);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn location(host: Option<&'static str>, target: &str, port: u16) -> (u16, Option<String>) {
        let host = host.map(HeaderValue::from_static);
        let response = to_https(host.as_ref(), &target.parse().unwrap(), port);
        let location = response.headers().get(header::LOCATION);
        let location = location.map(|l| l.to_str().unwrap().to_owned());
        (response.status().as_u16(), location)
    }

    #[test]
    fn keeps_host_path_and_query_and_names_the_port_unless_443() {
        assert_eq!(
            location(Some("gw.example:8080"), "/a/b?x=1&y", 8443),
            (308, Some("https://gw.example:8443/a/b?x=1&y".into()))
        );
        assert_eq!(
            location(Some("gw.example"), "/", 443),
            (308, Some("https://gw.example/".into()))
        );
        assert_eq!(
            location(Some("[::1]:80"), "/v6", 8443),
            (308, Some("https://[::1]:8443/v6".into()))
        );
        assert_eq!(location(None, "/", 443).0, 400);
    }
}
