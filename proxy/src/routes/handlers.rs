//! What each route answers once the chain let the request through. Public
//! handlers take no principal; protected ones take the [`Principal`] only the
//! auth steps can build.

use bytes::Bytes;
use uuid::Uuid;

use super::RouteId;
use crate::auth::Principal;
use crate::error::{render, ApiError};
use crate::http::{Body, HeaderValue, Request, Response};
use crate::upstream::{ForwardCtx, Upstream, UpstreamError, UpstreamRoute};

fn json(status: u16, body: impl Into<Bytes>) -> Response {
    Response {
        status,
        headers: vec![("Content-Type", HeaderValue::Static("application/json"))],
        body: Body::Full(body.into()),
        close: false,
    }
}

/// `GET /health`: the process serves.
pub fn health() -> Response {
    json(200, Bytes::from_static(br#"{"status":"ok"}"#))
}

/// `GET /ready`: authd (its invalidation feed is live) and Redis answer.
pub fn ready(authd_up: bool, redis_up: bool, request_id: &str) -> Response {
    let down = match (authd_up, redis_up) {
        (true, true) => return json(200, Bytes::from_static(br#"{"status":"ready"}"#)),
        (false, true) => "not ready: authd is unavailable",
        (true, false) => "not ready: redis is unavailable",
        (false, false) => "not ready: authd and redis are unavailable",
    };
    render(ApiError::NotReady(down), request_id)
}

/// `GET /metrics`: Prometheus text exposition.
pub fn metrics(text: String) -> Response {
    Response {
        status: 200,
        headers: vec![(
            "Content-Type",
            HeaderValue::Static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        body: Body::Full(Bytes::from(text)),
        close: false,
    }
}

/// `GET /v1/internal/auth-probe`: who the proxy thinks the caller is.
pub fn auth_probe(p: &Principal) -> Response {
    // Every field is a UUID or an integer: nothing to escape. Written by
    // hand (no `fmt`): this is the route the hot-path figures are taken on.
    let mut out = Vec::with_capacity(160);
    let mut uuid = [0u8; uuid::fmt::Hyphenated::LENGTH];
    for (key, id) in [
        (&br#"{"org_id":""#[..], p.org()),
        (br#"","agent_id":""#, p.agent()),
        (br#"","token_id":""#, p.token_id()),
    ] {
        out.extend_from_slice(key);
        out.extend_from_slice(id.hyphenated().encode_lower(&mut uuid).as_bytes());
    }
    out.extend_from_slice(br#"","permissions":"#);
    let mut digits = [0u8; 20];
    let mut n = p.permissions();
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
    out.push(b'}');
    json(200, out)
}

/// `GET /v1/orgs/{org_id}/auth-probe`: the path's org must be the token's.
/// Another org, or something that is not an org id at all, is 403 — never
/// 404, so the answer says nothing about what exists.
pub fn org_auth_probe(p: &Principal, org_segment: &[u8]) -> Result<Response, ApiError> {
    match Uuid::try_parse_ascii(org_segment) {
        Ok(org) if org == p.org() => Ok(auth_probe(p)),
        _ => Err(ApiError::PermissionDenied),
    }
}

/// `GET /v1/models`, `POST /v1/chat/completions`: to the configured upstream
/// with the client's `Authorization` and `X-IBEX-*` headers removed.
pub async fn forward(
    upstream: Option<&Upstream>,
    mut req: Request,
    route: RouteId,
    p: &Principal,
    request_id: &str,
) -> Result<Response, ApiError> {
    let Some(upstream) = upstream else {
        return Err(ApiError::ProviderNotConfigured);
    };
    let target = match route {
        RouteId::Chat => UpstreamRoute::ChatCompletions,
        _ => UpstreamRoute::Models,
    };
    strip_client_credentials(&mut req);
    let org = p.org();
    let ctx = ForwardCtx {
        request_id,
        org_id: &org,
    };
    upstream
        .forward(&req, target, ctx)
        .await
        .map_err(upstream_error)
}

pub fn upstream_error(e: UpstreamError) -> ApiError {
    match e {
        UpstreamError::Unavailable => ApiError::UpstreamUnavailable,
        UpstreamError::Timeout => ApiError::UpstreamTimeout,
    }
}

/// SPEC §3: the client's `Authorization` and every `X-IBEX-*` header never
/// leave the proxy.
pub fn strip_client_credentials(req: &mut Request) {
    req.headers.0.retain(|h| {
        !(h.name.eq_ignore_ascii_case(b"authorization")
            || h.name.len() >= 7 && h.name[..7].eq_ignore_ascii_case(b"x-ibex-"))
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{Header, Headers, Method, Version};

    #[test]
    fn credentials_are_stripped_before_forwarding() {
        let h = |n: &'static str| Header {
            name: Bytes::from_static(n.as_bytes()),
            value: Bytes::from_static(b"v"),
        };
        let mut req = Request {
            method: Method::Post,
            path: Bytes::from_static(b"/v1/chat/completions"),
            query: None,
            version: Version::Http11,
            headers: Headers(vec![
                h("Authorization"),
                h("X-IBEX-Agent-ID"),
                h("x-ibex-anything"),
                h("Content-Type"),
                h("X-Request-ID"),
            ]),
            body: Bytes::new(),
            keep_alive: true,
        };
        strip_client_credentials(&mut req);
        let left: Vec<_> = req.headers.iter().map(|h| h.name.clone()).collect();
        assert_eq!(
            left,
            vec![
                Bytes::from_static(b"Content-Type"),
                Bytes::from_static(b"X-Request-ID")
            ]
        );
    }

    #[test]
    fn upstream_errors_map_to_502_and_504() {
        assert_eq!(upstream_error(UpstreamError::Unavailable).status(), 502);
        assert_eq!(upstream_error(UpstreamError::Timeout).status(), 504);
    }

    #[test]
    fn ready_names_what_is_down() {
        assert_eq!(ready(true, true, "r").status, 200);
        for (a, r, word) in [
            (false, true, "authd"),
            (true, false, "redis"),
            (false, false, "authd and redis"),
        ] {
            let resp = ready(a, r, "r");
            assert_eq!(resp.status, 503);
            let Body::Full(b) = resp.body else { panic!() };
            let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
            assert!(v["error"]["message"].as_str().unwrap().contains(word));
        }
    }
}
