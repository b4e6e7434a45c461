//! Every refusal the proxy answers, and the one function that renders it as
//! the SPEC §3 envelope. Messages are fixed per code: identical failures must
//! give identical answers, and nothing here may echo client input.

use bytes::Bytes;

use crate::http::{Body, HeaderValue, Response};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiError {
    MissingAgentId,
    InvalidAgentId,
    BadRequest,
    MissingToken,
    InvalidToken,
    TokenRevoked,
    TokenExpired,
    AgentNotAuthorized,
    AgentSuspended,
    InsufficientPermissions,
    PermissionDenied,
    NotFound,
    MethodNotAllowed,
    RequestTimeout,
    PayloadTooLarge,
    HeadersTooLarge,
    RateLimited,
    ProviderNotConfigured,
    UpstreamUnavailable,
    AuthUnavailable,
    UpstreamTimeout,
    /// `/ready` when a dependency is down; the message names it.
    NotReady(&'static str),
}

impl ApiError {
    pub fn status(self) -> u16 {
        use ApiError::*;
        match self {
            MissingAgentId | InvalidAgentId | BadRequest => 400,
            MissingToken | InvalidToken | TokenRevoked | TokenExpired => 401,
            AgentNotAuthorized | AgentSuspended | InsufficientPermissions | PermissionDenied => 403,
            NotFound => 404,
            MethodNotAllowed => 405,
            RequestTimeout => 408,
            PayloadTooLarge => 413,
            RateLimited => 429,
            HeadersTooLarge => 431,
            ProviderNotConfigured => 501,
            UpstreamUnavailable => 502,
            AuthUnavailable | NotReady(_) => 503,
            UpstreamTimeout => 504,
        }
    }

    pub fn code(self) -> &'static str {
        use ApiError::*;
        match self {
            MissingAgentId => "MISSING_AGENT_ID",
            InvalidAgentId => "INVALID_AGENT_ID",
            BadRequest => "BAD_REQUEST",
            MissingToken => "MISSING_TOKEN",
            InvalidToken => "INVALID_TOKEN",
            TokenRevoked => "TOKEN_REVOKED",
            TokenExpired => "TOKEN_EXPIRED",
            AgentNotAuthorized => "AGENT_NOT_AUTHORIZED",
            AgentSuspended => "AGENT_SUSPENDED",
            InsufficientPermissions => "INSUFFICIENT_PERMISSIONS",
            PermissionDenied => "PERMISSION_DENIED",
            NotFound => "NOT_FOUND",
            MethodNotAllowed => "METHOD_NOT_ALLOWED",
            RequestTimeout => "REQUEST_TIMEOUT",
            PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            HeadersTooLarge => "HEADERS_TOO_LARGE",
            RateLimited => "RATE_LIMITED",
            ProviderNotConfigured => "PROVIDER_NOT_CONFIGURED",
            UpstreamUnavailable => "UPSTREAM_UNAVAILABLE",
            AuthUnavailable => "AUTH_UNAVAILABLE",
            UpstreamTimeout => "UPSTREAM_TIMEOUT",
            NotReady(_) => "NOT_READY",
        }
    }

    pub fn message(self) -> &'static str {
        use ApiError::*;
        match self {
            MissingAgentId => "X-IBEX-Agent-ID header is required",
            InvalidAgentId => "X-IBEX-Agent-ID must be a UUID",
            BadRequest => "malformed request",
            MissingToken => "Authorization: Bearer <token> is required",
            InvalidToken => "invalid token",
            TokenRevoked => "token has been revoked",
            TokenExpired => "token has expired",
            AgentNotAuthorized => "agent is not authorized for this token",
            AgentSuspended => "agent is not active",
            InsufficientPermissions => "token lacks the permission this route requires",
            PermissionDenied => "access to this resource is denied",
            NotFound => "no such route",
            MethodNotAllowed => "method not allowed on this route",
            RequestTimeout => "request was not received in time",
            PayloadTooLarge => "request body is too large",
            HeadersTooLarge => "request headers are too large",
            RateLimited => "rate limit exceeded",
            ProviderNotConfigured => "no upstream provider is configured",
            UpstreamUnavailable => "upstream provider is unavailable",
            AuthUnavailable => "authentication service is unavailable",
            UpstreamTimeout => "upstream provider timed out",
            NotReady(what) => what,
        }
    }

    /// Errors after which the connection cannot be trusted to be in sync
    /// (malformed framing, timeouts, oversized input) close it.
    pub fn closes_connection(self) -> bool {
        use ApiError::*;
        matches!(
            self,
            BadRequest | RequestTimeout | PayloadTooLarge | HeadersTooLarge
        )
    }
}

/// Renders `err` as the envelope. `request_id` must already be validated or
/// freshly generated (it is echoed verbatim); the caller adds `X-Request-ID`
/// and any other headers (rate-limit figures) to the returned response.
pub fn render(err: ApiError, request_id: &str) -> Response {
    let body = serde_json::json!({
        "error": {
            "code": err.code(),
            "message": err.message(),
            "request_id": request_id,
        }
    });
    Response {
        status: err.status(),
        headers: vec![("Content-Type", HeaderValue::Static("application/json"))],
        body: Body::Full(Bytes::from(body.to_string())),
        close: err.closes_connection(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_shape() {
        let r = render(ApiError::RateLimited, "abc");
        assert_eq!(r.status, 429);
        let Body::Full(b) = r.body else {
            panic!("full body")
        };
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["error"]["code"], "RATE_LIMITED");
        assert_eq!(v["error"]["request_id"], "abc");
    }
}
