//! The auth steps of the chain: token, agent header, agent. Each returns the
//! typed proof the next step needs ([`TokenGrant`] → [`Principal`]) or the
//! refusal to render. Cache hits answer without I/O; misses go through
//! single-flight to the [`AuthBackend`] with `IBEX_AUTH_VALIDATE_TIMEOUT`.

use std::net::IpAddr;
use std::rc::Rc;
use std::time::Instant;

use uuid::Uuid;

use super::backend::{AgentAnswer, AuthBackend, TokenAnswer, Unavailable, ValidToken};
use super::cache::TokenLookup;
use super::core::AuthCore;
use super::principal::{Principal, TokenGrant};
use super::secret::{BearerToken, TokenDigest, MAX_FORWARDED_LEN};
use crate::error::ApiError;
use crate::http::ascii::starts_with_ignore_case;
use crate::http::Headers;

pub const AGENT_HEADER: &str = "X-IBEX-Agent-ID";

pub struct Authenticator<B> {
    core: Rc<AuthCore>,
    backend: B,
}

/// `Authorization: Bearer <value>`; the scheme is case-insensitive (RFC 9110
/// §11.1). `None` for a missing header, another scheme or an empty value.
pub fn bearer(headers: &Headers) -> Option<BearerToken> {
    let v = headers.get("authorization")?;
    if !starts_with_ignore_case(v, b"bearer ") {
        return None;
    }
    let start = 7 + v[7..].iter().take_while(|&&c| c == b' ').count();
    let end = v.len()
        - v[start..]
            .iter()
            .rev()
            .take_while(|&&c| c == b' ' || c == b'\t')
            .count();
    if start >= end {
        return None;
    }
    Some(BearerToken::new(v.slice(start..end)))
}

/// `x-api-key: <value>` (trimmed), accepted on `/v1/messages` only (SPEC §12).
pub fn api_key(headers: &Headers) -> Option<BearerToken> {
    let v = headers.get("x-api-key")?;
    let start = v.iter().take_while(|&&c| c == b' ' || c == b'\t').count();
    let end = v.len()
        - v[start..]
            .iter()
            .rev()
            .take_while(|&&c| c == b' ' || c == b'\t')
            .count();
    if start >= end {
        return None;
    }
    Some(BearerToken::new(v.slice(start..end)))
}

/// The agent header step: present and non-empty, then a UUID.
pub fn agent_header(headers: &Headers) -> Result<Uuid, ApiError> {
    let v = headers
        .get(AGENT_HEADER)
        .map(|v| v.trim_ascii())
        .unwrap_or_default();
    if v.is_empty() {
        return Err(ApiError::MissingAgentId);
    }
    Uuid::try_parse_ascii(v).map_err(|_| ApiError::InvalidAgentId)
}

impl<B: AuthBackend> Authenticator<B> {
    pub fn new(core: Rc<AuthCore>, backend: B) -> Self {
        Self { core, backend }
    }

    pub fn core(&self) -> &Rc<AuthCore> {
        &self.core
    }

    /// The token step. Order inside it matters:
    /// 1. length cap — a value longer than any PAT could be is refused
    ///    locally (counted as a guess); any other value, well-formed or not,
    ///    takes the same path below, so a malformed token is answered like
    ///    an unknown one in answer *and* timing (SPEC §3): a negative-cache
    ///    hit if seen lately, else an authd call that costs one Argon2;
    /// 2. the cache — a trusted valid entry passes even from an address the
    ///    flood guard blocks (its owner must not suffer from a flood);
    /// 3. the flood guard — before any authd call;
    /// 4. authd through single-flight.
    ///
    /// `now` is the request's start (one clock read per request).
    pub async fn token(
        &self,
        headers: &Headers,
        x_api_key: bool,
        peer: IpAddr,
        now: Instant,
    ) -> Result<TokenGrant, ApiError> {
        let core = &*self.core;
        let bearer = bearer(headers)
            .or_else(|| x_api_key.then(|| api_key(headers)).flatten())
            .ok_or(ApiError::MissingToken)?;
        if bearer.len() > MAX_FORWARDED_LEN {
            // No valid PAT is this long, so a fast local answer tells the
            // caller nothing it did not know; authd never hashes the junk.
            return Err(core.refuse_guess(peer, now));
        }
        let key = bearer.digest();
        let lookup = core.tokens.borrow_mut().lookup(&key, now);
        let known_credential = match lookup {
            TokenLookup::Positive(e) if core.trusts(e.validated_at, now) => {
                core.metrics.token_cache_hits.inc();
                return self.grant(e.token, now);
            }
            // Known to be a real credential, but the feed cannot vouch for it
            // any more: re-validate (and let it past the flood guard).
            TokenLookup::Positive(_) => true,
            TokenLookup::Negative(err) => {
                core.metrics.token_negative_hits.inc();
                return Err(match err {
                    ApiError::InvalidToken => core.refuse_guess(peer, now),
                    _ if core.guard_blocks(peer, now) => ApiError::RateLimited,
                    other => other,
                });
            }
            TokenLookup::Miss => false,
        };
        // Past the address's failure budget, only a credential some worker
        // of this proxy has verified may still cost an authd call (SPEC §3).
        if !known_credential && !core.may_ask_for_token(peer, &key, now) {
            return Err(ApiError::RateLimited);
        }
        core.metrics.token_cache_misses.inc();
        // Boxed: the miss path's future is large and rare; inline it would
        // grow every request's future, which is moved on each call.
        match Box::pin(self.validate_token(key, &bearer, peer)).await? {
            TokenAnswer::Valid(t) => self.grant(t, core.clock.now()),
            TokenAnswer::Invalid => Err(core.refuse_guess(peer, core.clock.now())),
            TokenAnswer::Revoked => Err(ApiError::TokenRevoked),
            TokenAnswer::Expired => Err(ApiError::TokenExpired),
            TokenAnswer::Busy if known_credential => Err(ApiError::AuthUnavailable),
            TokenAnswer::Busy => Err(core.refuse_undecided(peer, core.clock.now())),
            TokenAnswer::Throttled => Err(ApiError::AuthUnavailable),
        }
    }

    /// The agent step: the agent must be active in the token's org and, for
    /// a bound token, be the bound agent. The lookup runs even when the
    /// binding already fails, so "not yours" and "unknown" take the same path.
    /// Every AGENT_NOT_AUTHORIZED spends `peer`'s failure budget; past it, an
    /// agent no worker has verified for this org is 429 with no authd call.
    pub async fn agent(
        &self,
        grant: TokenGrant,
        agent: Uuid,
        peer: IpAddr,
        now: Instant,
    ) -> Result<Principal, ApiError> {
        let core = &*self.core;
        let t = grant.token;
        let cached = core.agents.borrow_mut().lookup(t.org, agent, now);
        let answer = match cached {
            Some(e) if !e.answer.is_active() || core.trusts(e.validated_at, now) => {
                core.metrics.agent_cache_hits.inc();
                e.answer
            }
            _ if !core.may_ask_for_agent(peer, t.org, agent, now) => {
                return Err(ApiError::RateLimited);
            }
            _ => {
                core.metrics.agent_cache_misses.inc();
                Box::pin(self.validate_agent(t.org, agent)).await?
            }
        };
        if t.agent.is_some_and(|bound| bound != agent) {
            return Err(core.refuse_agent(peer, now));
        }
        match answer {
            AgentAnswer::Active(limits) => Ok(Principal::new(&t, agent, limits)),
            AgentAnswer::Inactive => Err(ApiError::AgentSuspended),
            AgentAnswer::NotFound => Err(core.refuse_agent(peer, now)),
        }
    }

    /// Expiry is re-checked on every use, cached or fresh, against the wall clock itself: the
    /// time derived from the request's monotonic instant ([`Clock::unix_ms_at`]) can trail the
    /// wall clock authd's expiry is in (millisecond flooring, and the two clocks drift apart
    /// over a process's life), and a token must not be admitted for as long as it trails.
    fn grant(&self, token: ValidToken, _now: Instant) -> Result<TokenGrant, ApiError> {
        match token.expires_at_ms {
            Some(exp) if self.core.clock.unix_ms() >= exp => Err(ApiError::TokenExpired),
            _ => Ok(TokenGrant { token }),
        }
    }

    async fn validate_token(
        &self,
        key: TokenDigest,
        bearer: &BearerToken,
        peer: IpAddr,
    ) -> Result<TokenAnswer, ApiError> {
        let core = self.core.clone();
        let (answer, _) = self
            .core
            .token_flights
            .run(key, || {
                let call = self.backend.validate_token(bearer, peer);
                async move {
                    core.metrics.authd_token_calls.inc();
                    let (started, epoch) = (core.clock.now(), core.epoch());
                    let answer = timed(&core, started, call).await;
                    if let Ok(a) = &answer {
                        cache_token(&core, key, a.clone(), started, epoch);
                    }
                    answer
                }
            })
            .await;
        answer.map_err(|Unavailable| ApiError::AuthUnavailable)
    }

    async fn validate_agent(&self, org: Uuid, agent: Uuid) -> Result<AgentAnswer, ApiError> {
        let core = self.core.clone();
        let (answer, _) = self
            .core
            .agent_flights
            .run((org, agent), || {
                let call = self.backend.validate_agent(org, agent);
                async move {
                    core.metrics.authd_agent_calls.inc();
                    let (started, epoch) = (core.clock.now(), core.epoch());
                    let answer = timed(&core, started, call).await;
                    if let Ok(a) = answer {
                        // Refusals are safe to keep whatever happened meanwhile.
                        let settled = || {
                            core.recent
                                .borrow()
                                .agent_settled(org, agent, core.clock.now())
                        };
                        if !a.is_active() || (core.epoch() == epoch && settled()) {
                            core.agents.borrow_mut().insert(org, agent, a, started);
                        }
                        if a.is_active() {
                            core.shared.verified.add_agent(org, agent, core.clock.now());
                        }
                    }
                    answer
                }
            })
            .await;
        answer.map_err(|Unavailable| ApiError::AuthUnavailable)
    }
}

/// One authd call under `IBEX_AUTH_VALIDATE_TIMEOUT`, measured.
async fn timed<T>(
    core: &AuthCore,
    started: Instant,
    call: impl std::future::Future<Output = Result<T, Unavailable>>,
) -> Result<T, Unavailable> {
    let answer = monoio::time::timeout(core.settings.validate_timeout, call)
        .await
        .unwrap_or(Err(Unavailable));
    let took = core.clock.now().saturating_duration_since(started);
    core.metrics
        .authd_latency
        .observe_us(u64::try_from(took.as_micros()).unwrap_or(u64::MAX));
    if answer.is_err() {
        core.metrics.authd_errors.inc();
    }
    answer
}

/// Caches authd's answer. A valid answer from a call that started before the
/// latest invalidation on this worker is not cached: it may predate the
/// revocation the invalidation announced.
fn cache_token(
    core: &AuthCore,
    key: TokenDigest,
    answer: TokenAnswer,
    started: Instant,
    epoch: u64,
) {
    let now = core.clock.now();
    if let TokenAnswer::Valid(_) = answer {
        // Remembered proxy-wide even when not cached here: it only lets this
        // token past a spent failure budget, authd still decides.
        core.shared.verified.add_token(key, now);
    }
    let mut tokens = core.tokens.borrow_mut();
    match answer {
        TokenAnswer::Valid(t)
            if core.epoch() == epoch
                && core.recent.borrow().token_settled(t.org, t.token_id, now) =>
        {
            tokens.insert_valid(key, t, started)
        }
        TokenAnswer::Valid(_) => {}
        TokenAnswer::Invalid => tokens.insert_refused(key, ApiError::InvalidToken, now),
        TokenAnswer::Revoked => tokens.insert_refused(key, ApiError::TokenRevoked, now),
        TokenAnswer::Expired => tokens.insert_refused(key, ApiError::TokenExpired, now),
        TokenAnswer::Busy | TokenAnswer::Throttled => {}
    }
}
