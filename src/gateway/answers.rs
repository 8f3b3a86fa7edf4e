//! The answers the gateway gives itself: one error type, each variant mapped to a status and
//! an `x-switchyard-error` cause, so a client can tell a gateway answer from an instance's.

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};

use super::ProxyBody;

/// The header on every answer the gateway makes itself, naming the cause.
pub const ERROR_HEADER: &str = "x-switchyard-error";

/// Why the gateway answered a request itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    #[error("no route matches this request")]
    NoRoute,
    #[error("the service has no healthy instance")]
    NoHealthyInstance,
    #[error("no instance could be reached")]
    BadGateway,
    #[error("every instance tried is at its connection limit")]
    UpstreamSaturated,
    #[error("the deadline for this request passed")]
    DeadlineExceeded,
    #[error("the request body could not be read")]
    BadRequestBody,
    #[error("the request body stalled")]
    RequestBodyTimeout,
    #[error("the request body is larger than this gateway accepts")]
    PayloadTooLarge,
    #[error("the Host header is missing, repeated or not a valid authority")]
    BadHost,
    #[error("this method is not forwarded")]
    MethodNotAllowed,
    #[error("only the chunked transfer coding is supported")]
    UnsupportedTransferCoding,
    #[error("too many abandoned requests from this client; slow down")]
    TooManyResets,
    #[error("the route does not admit this client address")]
    Forbidden,
}

impl GatewayError {
    /// The value of the `x-switchyard-error` header.
    pub fn cause(self) -> &'static str {
        match self {
            GatewayError::NoRoute => "no-route",
            GatewayError::NoHealthyInstance => "no-healthy-instance",
            GatewayError::BadGateway => "upstream-unreachable",
            GatewayError::UpstreamSaturated => "upstream-saturated",
            GatewayError::DeadlineExceeded => "deadline-exceeded",
            GatewayError::BadRequestBody => "bad-request-body",
            GatewayError::RequestBodyTimeout => "request-body-timeout",
            GatewayError::PayloadTooLarge => "body-too-large",
            GatewayError::BadHost => "bad-host",
            GatewayError::MethodNotAllowed => "method-not-allowed",
            GatewayError::UnsupportedTransferCoding => "unsupported-transfer-coding",
            GatewayError::TooManyResets => "too-many-resets",
            GatewayError::Forbidden => "forbidden",
        }
    }

    pub fn into_response(self) -> Response<ProxyBody> {
        let body = format!("switchyard: {self}\n");
        let mut response = Response::new(Either::Right(Full::new(Bytes::from(body))));
        *response.status_mut() = StatusCode::from(self);
        let headers = response.headers_mut();
        headers.insert(ERROR_HEADER, HeaderValue::from_static(self.cause()));
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        match self {
            GatewayError::TooManyResets => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            GatewayError::MethodNotAllowed => {
                headers.insert(
                    header::ALLOW,
                    HeaderValue::from_static("GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS"),
                );
            }
            // A client whose request framing or body went wrong must not reuse the connection.
            GatewayError::BadRequestBody
            | GatewayError::RequestBodyTimeout
            | GatewayError::UnsupportedTransferCoding
            | GatewayError::BadHost => {
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        response
    }
}

impl From<GatewayError> for StatusCode {
    fn from(error: GatewayError) -> Self {
        match error {
            GatewayError::NoRoute => StatusCode::NOT_FOUND,
            GatewayError::NoHealthyInstance | GatewayError::UpstreamSaturated => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            GatewayError::BadGateway => StatusCode::BAD_GATEWAY,
            GatewayError::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::BadRequestBody | GatewayError::BadHost => StatusCode::BAD_REQUEST,
            GatewayError::RequestBodyTimeout => StatusCode::REQUEST_TIMEOUT,
            GatewayError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            GatewayError::UnsupportedTransferCoding => StatusCode::NOT_IMPLEMENTED,
            GatewayError::TooManyResets => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::Forbidden => StatusCode::FORBIDDEN,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_answers_carry_status_and_cause() {
        for (error, status) in [
            (GatewayError::NoRoute, 404),
            (GatewayError::NoHealthyInstance, 503),
            (GatewayError::UpstreamSaturated, 503),
            (GatewayError::BadGateway, 502),
            (GatewayError::DeadlineExceeded, 504),
            (GatewayError::BadRequestBody, 400),
            (GatewayError::RequestBodyTimeout, 408),
            (GatewayError::PayloadTooLarge, 413),
            (GatewayError::BadHost, 400),
            (GatewayError::MethodNotAllowed, 405),
            (GatewayError::UnsupportedTransferCoding, 501),
            (GatewayError::TooManyResets, 429),
        ] {
            let response = error.into_response();
            assert_eq!(response.status().as_u16(), status);
            assert_eq!(response.headers()[ERROR_HEADER], error.cause());
        }
    }
}
