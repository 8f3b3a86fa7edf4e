//! The retry rules: which failed tries may be sent again, to another instance.
//!
//! A try that reached no instance may always be retried; one that may have reached it only
//! for idempotent methods; a body that cannot be replayed is never sent twice.

use hyper::{Method, StatusCode};

/// How a try failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TryFailure {
    /// Nothing reached the instance (connection refused, reset or timed out while connecting).
    BeforeSend,
    /// The request may have reached the instance (connection lost after sending).
    AfterSend,
    /// The instance answered 502, 503 or 504.
    BadGatewayStatus,
}

/// Methods that may be sent twice without changing the outcome (RFC 9110 §9.2.2).
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Whether a try that failed this way may be tried again on another instance.
/// `replayable`: the request body can be sent again (empty or buffered).
pub fn may_retry(method: &Method, failure: TryFailure, replayable: bool) -> bool {
    replayable
        && match failure {
            TryFailure::BeforeSend => true,
            TryFailure::AfterSend | TryFailure::BadGatewayStatus => is_idempotent(method),
        }
}

pub fn is_bad_gateway_status(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_rules_per_method_and_failure() {
        let idempotent = [
            Method::GET,
            Method::HEAD,
            Method::OPTIONS,
            Method::TRACE,
            Method::PUT,
            Method::DELETE,
        ];
        let unsafe_methods = [Method::POST, Method::PATCH, Method::CONNECT];
        for method in &idempotent {
            assert!(may_retry(method, TryFailure::BeforeSend, true));
            assert!(may_retry(method, TryFailure::AfterSend, true));
            assert!(may_retry(method, TryFailure::BadGatewayStatus, true));
            // A streamed body cannot be sent twice, whatever the method.
            assert!(!may_retry(method, TryFailure::BeforeSend, false));
        }
        for method in &unsafe_methods {
            assert!(
                may_retry(method, TryFailure::BeforeSend, true),
                "{method}: nothing was sent"
            );
            assert!(!may_retry(method, TryFailure::AfterSend, true), "{method}");
            assert!(
                !may_retry(method, TryFailure::BadGatewayStatus, true),
                "{method}"
            );
        }
    }
}
