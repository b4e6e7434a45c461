//! The request head sent upstream, and the header hygiene of SPEC §3.1: a
//! client header reaches the upstream only if it is on the allow-list
//! ([`FORWARDED`], [`FORWARDED_PREFIXES`]); everything else — credentials,
//! cookies, every `X-IBEX-*`, hop-by-hop and `Proxy-*` headers,
//! `X-Forwarded-For`/`Forwarded`, and `OpenAI-Organization`/`OpenAI-Project`
//! (which of the operator's provider organisations is billed is the
//! operator's choice, `IBEX_UPSTREAM_ORGANIZATION`/`_PROJECT`) — stays here.
//! The upstream gets the proxy's own key and the request id.
//!
//! The fixed part of each head (request line, `Host`, `Authorization`, the
//! operator's organisation and project, `Accept-Encoding`) is rendered once
//! per route when the [`Upstream`] is built; a request only appends its own
//! headers. The rendered prefix holds the API key, so it is never printed
//! (`HeadPrefix` has no `Debug`).
//!
//! [`Upstream`]: super::Upstream

use crate::http::ascii::{push_decimal, starts_with_ignore_case};
use crate::http::{Header, Request};

/// Client headers forwarded as they are (compared ASCII-case-insensitively).
/// `Content-Length` is the proxy's own; `Accept-Encoding` is replaced by
/// `identity` so usage can always be read from the response.
const FORWARDED: &[&str] = &[
    "content-type",
    "accept",
    "user-agent",
    "openai-beta",
    "idempotency-key",
];

/// Client header name prefixes forwarded: the OpenAI SDKs' own telemetry.
const FORWARDED_PREFIXES: &[&str] = &["x-stainless-"];

/// The operator's settings that become fixed upstream headers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OperatorHeaders {
    /// `IBEX_UPSTREAM_ORGANIZATION` → `OpenAI-Organization`.
    pub organization: Option<String>,
    /// `IBEX_UPSTREAM_PROJECT` → `OpenAI-Project`.
    pub project: Option<String>,
}

impl OperatorHeaders {
    /// Refuses values that cannot go in a header line (naming the variable,
    /// not the value).
    pub fn check(&self) -> anyhow::Result<()> {
        for (var, value) in [
            ("IBEX_UPSTREAM_ORGANIZATION", &self.organization),
            ("IBEX_UPSTREAM_PROJECT", &self.project),
        ] {
            if let Some(v) = value {
                if v.is_empty() || !v.bytes().all(|b| b.is_ascii_graphic()) {
                    anyhow::bail!("{var} must be printable ASCII without spaces");
                }
            }
        }
        Ok(())
    }
}

/// Request line and fixed headers for one route, rendered once.
pub struct HeadPrefix {
    bytes: Vec<u8>,
    /// An anthropic provider: the client's `anthropic-version` and `anthropic-beta` pass too.
    anthropic: bool,
}

/// Passed to an anthropic provider only (SPEC §12), beside [`FORWARDED`].
const FORWARDED_ANTHROPIC: &[&str] = &["anthropic-version", "anthropic-beta"];

impl HeadPrefix {
    /// `api_key` must already be checked for header-safe bytes; an empty key
    /// sends no `Authorization` (local model servers without auth).
    /// `operator` must be [`OperatorHeaders::check`]ed.
    pub fn new(
        method: &str,
        path: &str,
        authority: &str,
        api_key: &str,
        operator: &OperatorHeaders,
    ) -> Self {
        let mut out = Vec::with_capacity(160);
        for part in [method, " ", path, " HTTP/1.1\r\nHost: ", authority, "\r\n"] {
            out.extend_from_slice(part.as_bytes());
        }
        if !api_key.is_empty() {
            out.extend_from_slice(b"Authorization: Bearer ");
            out.extend_from_slice(api_key.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        for (name, value) in [
            ("OpenAI-Organization", &operator.organization),
            ("OpenAI-Project", &operator.project),
        ] {
            if let Some(v) = value {
                for part in [name, ": ", v, "\r\n"] {
                    out.extend_from_slice(part.as_bytes());
                }
            }
        }
        out.extend_from_slice(b"Accept-Encoding: identity\r\n");
        Self {
            bytes: out,
            anthropic: false,
        }
    }

    /// The head of a request to an anthropic provider: its key goes as `x-api-key`.
    pub fn anthropic(method: &str, path: &str, authority: &str, api_key: &str) -> Self {
        let mut out = Vec::with_capacity(160);
        for part in [method, " ", path, " HTTP/1.1\r\nHost: ", authority, "\r\n"] {
            out.extend_from_slice(part.as_bytes());
        }
        if !api_key.is_empty() {
            out.extend_from_slice(b"x-api-key: ");
            out.extend_from_slice(api_key.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"Accept-Encoding: identity\r\n");
        Self {
            bytes: out,
            anthropic: true,
        }
    }
}

/// True when the client's header `name` may reach the upstream (SPEC §3.1).
pub fn is_forwarded(name: &[u8]) -> bool {
    FORWARDED
        .iter()
        .any(|f| name.eq_ignore_ascii_case(f.as_bytes()))
        || FORWARDED_PREFIXES
            .iter()
            .any(|p| starts_with_ignore_case(name, p.as_bytes()))
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
    out.extend_from_slice(&prefix.bytes);
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
        let passes = is_forwarded(name)
            || (prefix.anthropic
                && FORWARDED_ANTHROPIC
                    .iter()
                    .any(|f| name.eq_ignore_ascii_case(f.as_bytes())));
        if !passes || (has_connection && named_by_connection(name, req)) {
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
    fn forwards_only_the_allow_list() {
        let operator = OperatorHeaders {
            organization: Some("org-operator".to_owned()),
            project: Some("proj_operator".to_owned()),
        };
        let prefix = HeadPrefix::new(
            "POST",
            "/v1/chat/completions",
            "up.example",
            "sk-KEY",
            &operator,
        );
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
                ("Idempotency-Key", "idem-1"),
                ("X-Stainless-Lang", "python"),
                ("OpenAI-Organization", "org-tenant"),
                ("OpenAI-Project", "proj_tenant"),
                ("X-Forwarded-For", "10.0.0.1"),
                ("Forwarded", "for=10.0.0.1"),
                ("Cookie", "session=1"),
                ("X-Custom", "anything"),
                ("Expect", "100-continue"),
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
            "Idempotency-Key: idem-1",
            "X-Stainless-Lang: python",
            "OpenAI-Organization: org-operator",
            "OpenAI-Project: proj_operator",
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
            "org-tenant",
            "proj_tenant",
            "forwarded",
            "cookie",
            "x-custom",
            "expect",
        ] {
            assert!(!lower.contains(gone), "{gone} leaked: {text}");
        }
        assert_eq!(lower.matches("authorization").count(), 1);
        assert_eq!(lower.matches("openai-organization").count(), 1);
    }

    #[test]
    fn anthropic_gets_its_key_as_x_api_key_and_the_version_headers() {
        let prefix = HeadPrefix::anthropic("POST", "/v1/messages", "api.anthropic.com", "sk-ant");
        let r = req(
            &[
                ("x-api-key", "ibex_pat_client"),
                ("Authorization", "Bearer ibex_pat_client"),
                ("anthropic-version", "2023-06-01"),
                ("anthropic-beta", "prompt-caching-2024-07-31"),
                ("OpenAI-Organization", "org-tenant"),
                ("Content-Type", "application/json"),
            ],
            b"{}",
        );
        let mut out = Vec::new();
        render_head(&mut out, &prefix, &r, "rid", Some(2));
        let text = String::from_utf8(out).unwrap();
        for want in [
            "x-api-key: sk-ant",
            "anthropic-version: 2023-06-01",
            "anthropic-beta: prompt-caching-2024-07-31",
            "Content-Type: application/json",
        ] {
            assert!(
                text.split("\r\n").any(|l| l == want),
                "missing {want}: {text}"
            );
        }
        assert!(!text.contains("ibex_pat"), "{text}");
        assert!(
            !text.to_ascii_lowercase().contains("authorization"),
            "{text}"
        );
        assert!(
            !text.to_ascii_lowercase().contains("openai-organization"),
            "{text}"
        );
        // An openai provider never gets the anthropic headers.
        let openai = HeadPrefix::new(
            "POST",
            "/v1/chat/completions",
            "h",
            "sk",
            &OperatorHeaders::default(),
        );
        let mut out = Vec::new();
        render_head(&mut out, &openai, &r, "rid", Some(2));
        let text = String::from_utf8(out).unwrap().to_ascii_lowercase();
        assert!(
            !text.contains("anthropic-") && !text.contains("x-api-key"),
            "{text}"
        );
    }

    #[test]
    fn empty_key_sends_no_authorization_and_get_has_no_length() {
        let prefix = HeadPrefix::new("GET", "/v1/models", "h", "", &OperatorHeaders::default());
        let mut r = req(&[], b"");
        r.method = Method::Get;
        let mut out = Vec::new();
        render_head(&mut out, &prefix, &r, "rid", None);
        let text = String::from_utf8(out).unwrap();
        assert!(!text.to_ascii_lowercase().contains("authorization"));
        assert!(!text.to_ascii_lowercase().contains("content-length"));
        assert!(!text.to_ascii_lowercase().contains("openai-organization"));
    }

    #[test]
    fn operator_values_must_fit_a_header() {
        assert!(OperatorHeaders::default().check().is_ok());
        let bad = OperatorHeaders {
            organization: Some("org\r\nX-Evil: 1".to_owned()),
            project: None,
        };
        let e = bad.check().unwrap_err().to_string();
        assert!(
            e.contains("IBEX_UPSTREAM_ORGANIZATION") && !e.contains("Evil"),
            "{e}"
        );
    }
}
