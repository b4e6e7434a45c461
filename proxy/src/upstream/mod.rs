//! Forwarding to the OpenAI-compatible upstream (SPEC §3, §9): per-worker
//! keep-alive pools over HTTP or HTTPS (rustls), streaming responses.
//!
//! INTERFACE (the chain relies on exactly this): one [`Upstream`] per worker,
//! built inside its runtime; `forward` is called only after the whole
//! security chain passed.

use std::rc::Rc;
use std::time::Duration;

use crate::http::{Request, Response};

#[derive(Clone)]
pub struct UpstreamConfig {
    /// `IBEX_UPSTREAM_URL`: base with version path, e.g. `https://api.openai.com/v1`.
    pub url: String,
    /// `IBEX_UPSTREAM_API_KEY`; never logged, never echoed.
    pub api_key: secrecy::SecretString,
    /// `IBEX_UPSTREAM_CA_FILE`: PEM bundle replacing the platform roots.
    pub ca_file: Option<std::path::PathBuf>,
    /// `IBEX_UPSTREAM_TIMEOUT`: until response headers.
    pub timeout: Duration,
    /// `IBEX_UPSTREAM_IDLE_TIMEOUT`: between body chunks.
    pub idle_timeout: Duration,
}

/// Which upstream route: `<base>/chat/completions` or `<base>/models`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamRoute {
    ChatCompletions,
    Models,
}

/// Facts about the caller the upstream module needs for headers, metering
/// and logs. The org always comes from the token.
#[derive(Debug, Clone, Copy)]
pub struct ForwardCtx<'a> {
    pub request_id: &'a str,
    pub org_id: &'a uuid::Uuid,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamError {
    /// Connect refused/reset, TLS failure, malformed upstream response → 502.
    Unavailable,
    /// No response headers within the timeout → 504.
    Timeout,
}

pub struct Upstream {
    #[allow(dead_code)]
    config: Rc<UpstreamConfig>,
}

impl Upstream {
    /// Called on the worker thread, inside its monoio runtime.
    pub fn new(config: Rc<UpstreamConfig>) -> anyhow::Result<Self> {
        Ok(Self { config })
    }

    /// Forward `req` (already authorised). Returns the upstream's response
    /// (status and body passed through, streaming as chunks arrive) or an
    /// error the chain renders as 502/504. The returned response must not
    /// carry the upstream key; the chain adds `X-Request-ID`.
    /// PLACEHOLDER until the implementation lands.
    pub async fn forward(
        &self,
        req: &Request,
        route: UpstreamRoute,
        ctx: ForwardCtx<'_>,
    ) -> Result<Response, UpstreamError> {
        let _ = (req, route, ctx);
        Err(UpstreamError::Unavailable)
    }
}
