//! Every refusal the proxy answers, and the one function that renders it as
//! the SPEC §3 envelope. Messages are fixed per code: identical failures must
//! give identical answers, and nothing here may echo client input.

use bytes::Bytes;

use crate::http::chunked::ChunkedError;
use crate::http::{Body, HeaderValue, ParseError, Response};
use crate::upstream::UpstreamError;

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
    /// The usage spool is full (SPEC §10): a request that would go unmetered is refused.
    UsageUnavailable,
    UpstreamTimeout,
    /// No route serves the model (SPEC §12).
    ModelNotFound,
    /// The token's or the org's model allow-list refuses it (SPEC §12).
    ModelNotAllowed,
    /// The model is routed to a provider of the other API shape (SPEC §12).
    ModelRouteMismatch,
    /// `/ready` when a dependency is down; the message names it.
    NotReady(&'static str),
    /// A token limit or budget refused the request (SPEC §11): 429
    /// `RATE_LIMITED`, the message names the level and tokens.
    TokensLimited(&'static str),
}

impl ApiError {
    /// Every code once (`NotReady` with one of its messages; `TokensLimited`
    /// shares `RateLimited`'s code), for tests and tables that must cover them all.
    pub const ALL: [ApiError; 26] = {
        use ApiError::*;
        [
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
            UsageUnavailable,
            UpstreamTimeout,
            ModelNotFound,
            ModelNotAllowed,
            ModelRouteMismatch,
            NotReady("not ready: authd is unavailable"),
        ]
    };

    pub fn status(self) -> u16 {
        use ApiError::*;
        match self {
            MissingAgentId | InvalidAgentId | BadRequest | ModelRouteMismatch => 400,
            MissingToken | InvalidToken | TokenRevoked | TokenExpired => 401,
            AgentNotAuthorized
            | AgentSuspended
            | InsufficientPermissions
            | PermissionDenied
            | ModelNotAllowed => 403,
            NotFound | ModelNotFound => 404,
            MethodNotAllowed => 405,
            RequestTimeout => 408,
            PayloadTooLarge => 413,
            RateLimited | TokensLimited(_) => 429,
            HeadersTooLarge => 431,
            ProviderNotConfigured => 501,
            UpstreamUnavailable => 502,
            AuthUnavailable | UsageUnavailable | NotReady(_) => 503,
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
            RateLimited | TokensLimited(_) => "RATE_LIMITED",
            ProviderNotConfigured => "PROVIDER_NOT_CONFIGURED",
            UpstreamUnavailable => "UPSTREAM_UNAVAILABLE",
            AuthUnavailable => "AUTH_UNAVAILABLE",
            UsageUnavailable => "USAGE_UNAVAILABLE",
            UpstreamTimeout => "UPSTREAM_TIMEOUT",
            ModelNotFound => "MODEL_NOT_FOUND",
            ModelNotAllowed => "MODEL_NOT_ALLOWED",
            ModelRouteMismatch => "MODEL_ROUTE_MISMATCH",
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
            UsageUnavailable => "usage ledger is full; retry later",
            UpstreamTimeout => "upstream provider timed out",
            ModelNotFound => "no route serves this model",
            ModelNotAllowed => "this model is not allowed for this token or org",
            ModelRouteMismatch => "this model is served by a provider of another API shape",
            NotReady(what) | TokensLimited(what) => what,
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

/// A refused request head: every variant closes the connection.
impl From<ParseError> for ApiError {
    fn from(e: ParseError) -> Self {
        match e {
            ParseError::Malformed => ApiError::BadRequest,
            ParseError::HeadersTooLarge => ApiError::HeadersTooLarge,
            ParseError::BodyTooLarge => ApiError::PayloadTooLarge,
        }
    }
}

/// A refused chunked body.
impl From<ChunkedError> for ApiError {
    fn from(e: ChunkedError) -> Self {
        match e {
            ChunkedError::TrailersTooLarge => ApiError::HeadersTooLarge,
            ChunkedError::Malformed | ChunkedError::ExtensionsTooLong => ApiError::BadRequest,
        }
    }
}

/// The upstream failed after the chain admitted the request: 502 or 504.
impl From<UpstreamError> for ApiError {
    fn from(e: UpstreamError) -> Self {
        match e {
            UpstreamError::Unavailable => ApiError::UpstreamUnavailable,
            UpstreamError::Timeout => ApiError::UpstreamTimeout,
        }
    }
}

/// Renders `err` as the envelope. `request_id` must already be validated or
/// freshly generated (it is echoed verbatim); the caller adds `X-Request-ID`
/// and any other headers (rate-limit figures) to the returned response.
///
/// Written by hand, not through `serde_json`: on a flood of refusals this is
/// most of a 401's cost. Nothing needs escaping — code and message are
/// static, the request id is `[A-Za-z0-9._:-]` or a UUID — and if that ever
/// stops being true the strings go through `serde_json` instead, so the body
/// is valid JSON whatever a future caller passes.
pub fn render(err: ApiError, request_id: &str) -> Response {
    let (code, message) = (err.code(), err.message());
    let body = if [code, message, request_id]
        .iter()
        .all(|s| needs_no_escape(s))
    {
        let mut b =
            Vec::with_capacity(ENVELOPE_FIXED_LEN + code.len() + message.len() + request_id.len());
        b.extend_from_slice(br#"{"error":{"code":""#);
        b.extend_from_slice(code.as_bytes());
        b.extend_from_slice(br#"","message":""#);
        b.extend_from_slice(message.as_bytes());
        b.extend_from_slice(br#"","request_id":""#);
        b.extend_from_slice(request_id.as_bytes());
        b.extend_from_slice(br#""}}"#);
        Bytes::from(b)
    } else {
        let v = serde_json::json!({
            "error": {"code": code, "message": message, "request_id": request_id}
        });
        Bytes::from(v.to_string())
    };
    Response {
        status: err.status(),
        headers: vec![("Content-Type", HeaderValue::Static("application/json"))],
        body: Body::Full(body),
        close: err.closes_connection(),
    }
}

/// Bytes of the envelope around its three strings.
const ENVELOPE_FIXED_LEN: usize = r#"{"error":{"code":"","message":"","request_id":""}}"#.len();

/// True when `s` can sit between JSON quotes as it is (RFC 8259 §7: only
/// `"`, `\` and control characters must be escaped; UTF-8 passes).
fn needs_no_escape(s: &str) -> bool {
    s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\')
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

    fn parsed(err: ApiError, rid: &str) -> serde_json::Value {
        let Body::Full(b) = render(err, rid).body else {
            panic!("full body")
        };
        serde_json::from_slice(&b).unwrap()
    }

    #[test]
    fn every_error_renders_as_the_envelope_serde_would_write() {
        for rid in ["req-1.a:b_C", "6f1c2a9e-3b7d-4e0f-9a51-0c2d8e7f6a10"] {
            for err in ApiError::ALL {
                let want = serde_json::json!({"error": {
                    "code": err.code(), "message": err.message(), "request_id": rid
                }});
                assert_eq!(parsed(err, rid), want, "{err:?}");
                assert!(
                    needs_no_escape(err.message()),
                    "{err:?} message needs escaping"
                );
            }
        }
    }

    #[test]
    fn all_lists_every_code_once() {
        let mut codes: Vec<_> = ApiError::ALL.iter().map(|e| e.code()).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), ApiError::ALL.len());
    }

    #[test]
    fn upstream_errors_map_to_502_and_504() {
        assert_eq!(ApiError::from(UpstreamError::Unavailable).status(), 502);
        assert_eq!(ApiError::from(UpstreamError::Timeout).status(), 504);
    }

    #[test]
    fn anything_needing_escapes_still_makes_valid_json() {
        for rid in ["a\"b", "back\\slash", "tab\there", "ü"] {
            let v = parsed(ApiError::InvalidToken, rid);
            assert_eq!(v["error"]["request_id"], rid);
        }
        let v = parsed(ApiError::NotReady("say \"hi\""), "r");
        assert_eq!(v["error"]["message"], "say \"hi\"");
    }
}
