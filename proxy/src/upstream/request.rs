//! The request head sent upstream, and the header hygiene of SPEC §3: the
//! client's credentials, every `X-IBEX-*` header and hop-by-hop headers
//! never leave the proxy; the upstream gets the proxy's own key and the
//! request id.
//!
//! The fixed part of each head (request line, `Host`, `Authorization`,
//! `Accept-Encoding`) is rendered once per route when the [`Upstream`] is
//! built; a request only appends its own headers. The rendered prefix holds
//! the API key, so it is never printed (`HeadPrefix` has no `Debug`).
//!
//! [`Upstream`]: super::Upstream

use crate::http::ascii::{push_decimal, starts_with_ignore_case};
use crate::http::{Header, Request};

/// Headers never forwarded from the client, beyond `X-IBEX-*` and `Proxy-*`.
/// Hop-by-hop (RFC 9110 §7.6.1): connection-level, meaningless past us.
/// `Host` and `Content-Length` are set by the proxy; `Authorization` is the
/// client's PAT; `X-Request-ID` is replaced by the validated one; `Expect`
/// does not apply (the body is already complete); `Cookie` belongs to the
/// proxy's origin, not the provider's; `Accept-Encoding` is replaced by
/// `identity` so usage can always be read from the response.
const DROPPED: &[&str] = &[
    "authorization",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
    "x-request-id",
    "expect",
    "cookie",
    "accept-encoding",
];

/// Request line and fixed headers for one route, rendered once.
pub struct HeadPrefix(Vec<u8>);

impl HeadPrefix {
    /// `api_key` must already be checked for header-safe bytes; an empty key
    /// sends no `Authorization` (local model servers without auth).
    pub fn new(method: &str, path: &str, authority: &str, api_key: &str) -> Self {
        let mut out = Vec::with_capacity(160);
        for part in [method, " ", path, " HTTP/1.1\r\nHost: ", authority, "\r\n"] {
            out.extend_from_slice(part.as_bytes());
        }
        if !api_key.is_empty() {
            out.extend_from_slice(b"Authorization: Bearer ");
            out.extend_from_slice(api_key.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"Accept-Encoding: identity\r\n");
        Self(out)
    }
}

/// True when `name` must not be forwarded (see [`DROPPED`]).
pub fn is_dropped(name: &[u8]) -> bool {
    starts_with_ignore_case(name, b"x-ibex-")
        || starts_with_ignore_case(name, b"proxy-")
        || DROPPED
            .iter()
            .any(|d| name.eq_ignore_ascii_case(d.as_bytes()))
}

/// Headers the client named in `Connection` are hop-by-hop too
/// (RFC 9110 §7.6.1).
fn named_by_connection(name: &[u8], req: &Request) -> bool {
    req.headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case(b"connection"))
        .flat_map(|h| h.value.split(|b| *b == b','))
        .any(|token| token.trim_ascii().eq_ignore_ascii_case(name))
}

/// Renders the full request head into `out` (cleared first). `request_id`
/// is the chain's validated id (or a fresh UUID), so it is header-safe.
/// `content_length` is the body's length when one follows (POST); the body
/// is written after this head unchanged.
pub fn render_head(
    out: &mut Vec<u8>,
    prefix: &HeadPrefix,
    req: &Request,
    request_id: &str,
    content_length: Option<usize>,
) {
    out.clear();
    out.extend_from_slice(&prefix.0);
    out.extend_from_slice(b"X-Request-ID: ");
    out.extend_from_slice(request_id.as_bytes());
    out.extend_from_slice(b"\r\n");
    if let Some(len) = content_length {
        out.extend_from_slice(b"Content-Length: ");
        push_decimal(out, len as u64);
        out.extend_from_slice(b"\r\n");
    }
    let has_connection = req
        .headers
        .iter()
        .any(|h| h.name.eq_ignore_ascii_case(b"connection"));
    for Header { name, value } in req.headers.iter() {
        if is_dropped(name) || (has_connection && named_by_connection(name, req)) {
            continue;
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::http::Method;

    fn req(headers: &[(&str, &str)], body: &'static [u8]) -> Request {
        Request::new(
            Method::Post,
            "/v1/chat/completions",
            headers,
            Bytes::from_static(body),
        )
    }

    #[test]
    fn strips_credentials_ibex_and_hop_by_hop_headers() {
        let prefix = HeadPrefix::new("POST", "/v1/chat/completions", "up.example", "sk-KEY");
        let r = req(
            &[
                ("Authorization", "Bearer ibex_pat_client"),
                ("X-IBEX-Agent-ID", "agent"),
                ("x-ibex-anything", "1"),
                ("Content-Type", "application/json"),
                ("Connection", "keep-alive, X-Hop"),
                ("X-Hop", "gone"),
                ("Keep-Alive", "timeout=5"),
                ("Proxy-Authorization", "Basic x"),
                ("TE", "trailers"),
                ("Transfer-Encoding", "chunked"),
                ("Upgrade", "h2c"),
                ("Host", "client.example"),
                ("Content-Length", "999"),
                ("X-Request-ID", "client-chosen"),
                ("Accept", "text/event-stream"),
                ("User-Agent", "OpenAI/Python 1.0"),
                ("OpenAI-Beta", "assistants=v2"),
            ],
            b"{}",
        );
        let mut out = Vec::new();
        render_head(&mut out, &prefix, &r, "rid-1", Some(r.body.len()));
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("POST /v1/chat/completions HTTP/1.1\r\nHost: up.example\r\n"));
        assert!(text.ends_with("\r\n\r\n"));
        let lines: Vec<&str> = text.split("\r\n").collect();
        for want in [
            "Authorization: Bearer sk-KEY",
            "X-Request-ID: rid-1",
            "Content-Length: 2",
            "Content-Type: application/json",
            "Accept: text/event-stream",
            "User-Agent: OpenAI/Python 1.0",
            "OpenAI-Beta: assistants=v2",
            "Accept-Encoding: identity",
        ] {
            assert!(lines.contains(&want), "missing {want}: {text}");
        }
        let lower = text.to_ascii_lowercase();
        for gone in [
            "ibex_pat",
            "x-ibex",
            "x-hop",
            "keep-alive",
            "proxy-",
            "te:",
            "transfer-encoding",
            "upgrade",
            "client.example",
            "999",
            "client-chosen",
            "connection",
        ] {
            assert!(!lower.contains(gone), "{gone} leaked: {text}");
        }
        assert_eq!(lower.matches("authorization").count(), 1);
    }

    #[test]
    fn empty_key_sends_no_authorization_and_get_has_no_length() {
        let prefix = HeadPrefix::new("GET", "/v1/models", "h", "");
        let mut r = req(&[], b"");
        r.method = Method::Get;
        let mut out = Vec::new();
        render_head(&mut out, &prefix, &r, "rid", None);
        let text = String::from_utf8(out).unwrap();
        assert!(!text.to_ascii_lowercase().contains("authorization"));
        assert!(!text.to_ascii_lowercase().contains("content-length"));
    }
}
