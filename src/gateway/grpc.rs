//! gRPC over the gateway: how a gRPC request is recognised, its `grpc-timeout`, and the
//! gateway's own answers as gRPC statuses (HTTP 200, trailers-only, `grpc-status` and
//! `grpc-message`), so a client sees `UNAVAILABLE` rather than `UNKNOWN` from an HTTP 503.
//!
//! The status of each answer follows gRPC's HTTP-to-gRPC mapping (404 → UNIMPLEMENTED,
//! 429/502/503/504 → UNAVAILABLE, 400 → INTERNAL) except where the cause says more: a deadline
//! is DEADLINE_EXCEEDED, a body over the limit RESOURCE_EXHAUSTED.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::Response;

use super::{GatewayError, ProxyBody, ERROR_HEADER};

static GRPC_TIMEOUT: header::HeaderName = header::HeaderName::from_static("grpc-timeout");

/// gRPC status codes the gateway answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum GrpcStatus {
    DeadlineExceeded = 4,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
}

/// `content-type: application/grpc` or `application/grpc+proto` etc.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The `grpc-timeout` header: up to 8 digits and a unit (H M S m u n).
pub fn timeout(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(&GRPC_TIMEOUT)?.as_bytes();
    let (unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let amount: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(amount * 3600),
        b'M' => Duration::from_secs(amount * 60),
        b'S' => Duration::from_secs(amount),
        b'm' => Duration::from_millis(amount),
        b'u' => Duration::from_micros(amount),
        b'n' => Duration::from_nanos(amount),
        _ => return None,
    })
}

impl GatewayError {
    /// The gRPC status of this answer.
    pub fn grpc_status(self) -> GrpcStatus {
        match self {
            GatewayError::NoRoute => GrpcStatus::Unimplemented,
            GatewayError::NoHealthyInstance
            | GatewayError::BadGateway
            | GatewayError::UpstreamSaturated
            | GatewayError::TooManyResets => GrpcStatus::Unavailable,
            GatewayError::DeadlineExceeded | GatewayError::RequestBodyTimeout => {
                GrpcStatus::DeadlineExceeded
            }
            GatewayError::PayloadTooLarge => GrpcStatus::ResourceExhausted,
            GatewayError::Forbidden => GrpcStatus::PermissionDenied,
            GatewayError::BadRequestBody
            | GatewayError::BadHost
            | GatewayError::MethodNotAllowed
            | GatewayError::UnsupportedTransferCoding => GrpcStatus::Internal,
        }
    }

    /// This answer for a gRPC client: HTTP 200, trailers-only.
    pub fn into_grpc_response(self) -> Response<ProxyBody> {
        let mut response = Response::new(Either::Right(Full::new(Bytes::new())));
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        let code = self.grpc_status() as u16;
        headers.insert("grpc-status", HeaderValue::from(code));
        // The message is plain ASCII without '%', so it needs no percent-encoding.
        if let Ok(message) = HeaderValue::from_str(&format!("switchyard: {self}")) {
            headers.insert("grpc-message", message);
        }
        headers.insert(ERROR_HEADER, HeaderValue::from_static(self.cause()));
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_units() {
        let parse = |text: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(&GRPC_TIMEOUT, HeaderValue::from_static(text));
            timeout(&headers)
        };
        assert_eq!(parse("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse("5000u"), Some(Duration::from_millis(5)));
        assert_eq!(parse("123456789m"), None, "at most 8 digits");
        assert_eq!(parse("m"), None);
        assert_eq!(parse("10x"), None);
    }

    #[test]
    fn gateway_answers_map_to_the_design_table() {
        for (error, code) in [
            (GatewayError::NoRoute, 12),
            (GatewayError::NoHealthyInstance, 14),
            (GatewayError::BadGateway, 14),
            (GatewayError::DeadlineExceeded, 4),
            (GatewayError::PayloadTooLarge, 8),
        ] {
            let response = error.into_grpc_response();
            assert_eq!(response.status(), 200);
            assert_eq!(response.headers()["grpc-status"], code.to_string().as_str());
            assert_eq!(response.headers()["content-type"], "application/grpc");
        }
    }
}
