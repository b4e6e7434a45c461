//! `IBEX_UPSTREAM_URL` parsed once at start-up: scheme, host, port and the
//! base path (`https://api.openai.com/v1` → host `api.openai.com`, port 443,
//! base `/v1`). Not a general URL parser: user info, queries and fragments
//! are refused because nothing in an OpenAI-style base URL needs them.

use anyhow::{bail, Context};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

/// Which upstream route: `<base>/chat/completions` or `<base>/models`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamRoute {
    ChatCompletions,
    Completions,
    Responses,
    Embeddings,
    /// Anthropic's Messages API.
    Messages,
    Models,
}

impl UpstreamRoute {
    pub const ALL: [UpstreamRoute; 6] = [
        UpstreamRoute::ChatCompletions,
        UpstreamRoute::Completions,
        UpstreamRoute::Responses,
        UpstreamRoute::Embeddings,
        UpstreamRoute::Messages,
        UpstreamRoute::Models,
    ];

    /// A streamed request on this route reports usage only when it asks with
    /// `stream_options.include_usage` (OpenAI's chat and completions): the proxy asks for it and
    /// strips the usage-only chunk the client did not ask for ([`crate::ledger::stream_usage`]).
    /// Responses and Messages streams always end with their usage.
    pub fn asks_for_usage(self) -> bool {
        matches!(
            self,
            UpstreamRoute::ChatCompletions | UpstreamRoute::Completions
        )
    }

    /// The path under the base URL.
    pub fn tail(self) -> &'static str {
        match self {
            UpstreamRoute::ChatCompletions => "/chat/completions",
            UpstreamRoute::Completions => "/completions",
            UpstreamRoute::Responses => "/responses",
            UpstreamRoute::Embeddings => "/embeddings",
            UpstreamRoute::Messages => "/messages",
            UpstreamRoute::Models => "/models",
        }
    }

    /// The client's path (for the usage record).
    pub fn client_path(self) -> &'static str {
        match self {
            UpstreamRoute::ChatCompletions => "/v1/chat/completions",
            UpstreamRoute::Completions => "/v1/completions",
            UpstreamRoute::Responses => "/v1/responses",
            UpstreamRoute::Embeddings => "/v1/embeddings",
            UpstreamRoute::Messages => "/v1/messages",
            UpstreamRoute::Models => "/v1/models",
        }
    }

    /// The provider kind the route is forwarded to (SPEC §12).
    pub fn kind(self) -> crate::providers::Kind {
        match self {
            UpstreamRoute::Messages => crate::providers::Kind::Anthropic,
            _ => crate::providers::Kind::Openai,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub scheme: Scheme,
    /// Host name or IP literal, without IPv6 brackets: what DNS, SNI and
    /// certificate verification see.
    pub host: String,
    pub port: u16,
    /// The `Host` header value: `host[:port]`, port left out when default.
    pub authority: String,
    /// Base path without a trailing slash (`/v1`, or empty).
    pub base_path: String,
}

impl Target {
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        let (scheme, rest) = match url.split_once("://") {
            Some((s, rest)) if s.eq_ignore_ascii_case("http") => (Scheme::Http, rest),
            Some((s, rest)) if s.eq_ignore_ascii_case("https") => (Scheme::Https, rest),
            _ => bail!("IBEX_UPSTREAM_URL must start with http:// or https://"),
        };
        if rest.contains(['?', '#', '@']) {
            bail!("IBEX_UPSTREAM_URL must not contain user info, a query or a fragment");
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        // The path goes verbatim into the request line: only visible ASCII.
        if !path.bytes().all(|b| b.is_ascii_graphic()) {
            bail!("IBEX_UPSTREAM_URL path must be visible ASCII (percent-encode the rest)");
        }
        let default_port = match scheme {
            Scheme::Http => 80,
            Scheme::Https => 443,
        };
        let (host, port) = split_host_port(authority, default_port)?;
        let host_header = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_ascii_lowercase()
        };
        let authority = if port == default_port {
            host_header
        } else {
            format!("{host_header}:{port}")
        };
        Ok(Self {
            scheme,
            host: host.to_ascii_lowercase(),
            port,
            authority,
            base_path: path.trim_end_matches('/').to_owned(),
        })
    }

    /// The request target for `route`: `<base>/chat/completions` or `<base>/models`.
    pub fn path_for(&self, route: UpstreamRoute) -> String {
        format!("{}{}", self.base_path, route.tail())
    }
}

fn split_host_port(authority: &str, default_port: u16) -> anyhow::Result<(&str, u16)> {
    let bracketed = authority.starts_with('[');
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .context("IBEX_UPSTREAM_URL: unterminated IPv6 literal")?;
        host.parse::<std::net::Ipv6Addr>()
            .context("IBEX_UPSTREAM_URL: bad IPv6 literal")?;
        match after {
            "" => (host, None),
            _ => match after.strip_prefix(':') {
                Some(p) => (host, Some(p)),
                None => bail!("IBEX_UPSTREAM_URL: junk after IPv6 literal"),
            },
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let valid_name = bracketed
        || (!host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-'));
    if !valid_name {
        bail!("IBEX_UPSTREAM_URL: missing or invalid host");
    }
    let port = match port {
        None => default_port,
        Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .context("IBEX_UPSTREAM_URL: port out of range")?,
        Some(_) => bail!("IBEX_UPSTREAM_URL: invalid port"),
    };
    Ok((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_openai_style_bases() {
        let t = Target::parse("https://api.openai.com/v1").unwrap();
        assert_eq!(t.scheme, Scheme::Https);
        assert_eq!((t.host.as_str(), t.port), ("api.openai.com", 443));
        assert_eq!(t.authority, "api.openai.com");
        assert_eq!(
            t.path_for(UpstreamRoute::ChatCompletions),
            "/v1/chat/completions"
        );

        let t = Target::parse("http://127.0.0.1:18000/v1/").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("127.0.0.1", 18000));
        assert_eq!(t.authority, "127.0.0.1:18000");
        assert_eq!(t.path_for(UpstreamRoute::Models), "/v1/models");

        let t = Target::parse("HTTP://[::1]:8080").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 8080));
        assert_eq!(t.authority, "[::1]:8080");
        assert_eq!(t.path_for(UpstreamRoute::Models), "/models");

        let t = Target::parse("http://Example.COM:80/openai/v1").unwrap();
        assert_eq!(t.authority, "example.com");
        assert_eq!(t.base_path, "/openai/v1");
    }

    #[test]
    fn refuses_what_a_base_url_never_needs() {
        for bad in [
            "api.openai.com/v1",
            "ftp://x/v1",
            "https://user:pw@x/v1",
            "https://x/v1?k=1",
            "https://x/v1#f",
            "https:///v1",
            "https://x:0/v1",
            "https://x:99999/v1",
            "https://x:+1/v1",
            "https://x/v 1",
            "https://[::1/v1",
            "https://x y/v1",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }
}
