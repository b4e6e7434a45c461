//! The validation door: a worker's cache miss becomes a [`Call`] in the
//! bridge's bounded queue; the bridge thread runs at most
//! [`MAX_IN_FLIGHT`] authd calls at once and answers each on its oneshot.
//! authd's replies are mapped here, failing closed on anything unexpected.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::future::LocalBoxFuture;
use ibex_proto::pb;
use ibex_proto::pb::auth_service_client::AuthServiceClient;
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tonic::transport::{Channel, Endpoint};

use uuid::Uuid;

use super::balance::{token_key, Balancer};
use super::ServiceKey;
use crate::auth::backend::{
    AgentAnswer, AgentLimits, Answer, AuthBackend, OrgLimits, TokenAnswer, Unavailable, ValidToken,
};
use crate::auth::secret::BearerToken;
use crate::metrics::BridgeStats;

/// authd's reason on a RESOURCE_EXHAUSTED ValidateToken: `throttled` = this
/// client address failed too often on this token id (its own doing);
/// anything else = authd is saturated.
const REFUSAL_HEADER: &str = "x-ibex-refusal";

/// Concurrent authd calls the bridge makes.
const MAX_IN_FLIGHT: usize = 512;
/// Longest the bridge keeps one validation call open.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) enum Call {
    Token {
        token: SecretString,
        /// The end client's address, for authd's guess throttle.
        client: std::net::IpAddr,
        reply: oneshot::Sender<Answer<TokenAnswer>>,
    },
    Agent {
        org: Uuid,
        agent: Uuid,
        reply: oneshot::Sender<Answer<AgentAnswer>>,
    },
    /// The month re-seed of the token limiter (SPEC §11): `GetMonthUsage`.
    Month {
        org: Uuid,
        agent: Uuid,
        since_ms: i64,
        reply: oneshot::Sender<Answer<crate::tokens::MonthUsage>>,
    },
}

/// A worker's handle for validations.
#[derive(Clone)]
pub struct BridgeClient {
    calls: mpsc::Sender<Call>,
    stats: Arc<BridgeStats>,
}

impl BridgeClient {
    pub(super) fn new(calls: mpsc::Sender<Call>, stats: Arc<BridgeStats>) -> Self {
        Self { calls, stats }
    }

    fn submit<T: 'static>(
        &self,
        call: Call,
        rx: oneshot::Receiver<Answer<T>>,
    ) -> LocalBoxFuture<'static, Answer<T>> {
        if self.calls.try_send(call).is_err() {
            self.stats.queue_full.fetch_add(1, Ordering::Relaxed);
            return Box::pin(async { Err(Unavailable) });
        }
        Box::pin(async move { rx.await.unwrap_or(Err(Unavailable)) })
    }
}

impl AuthBackend for BridgeClient {
    fn validate_token(
        &self,
        token: &BearerToken,
        client: std::net::IpAddr,
    ) -> LocalBoxFuture<'static, Answer<TokenAnswer>> {
        let (reply, rx) = oneshot::channel();
        // A malformed value may not be UTF-8 (obs-text). The lossy form can
        // never be a PAT (U+FFFD is not alphanumeric), so authd refuses it
        // like any other malformed token, after the same dummy Argon2.
        let token = SecretString::from(String::from_utf8_lossy(token.expose()).into_owned());
        self.submit(
            Call::Token {
                token,
                client,
                reply,
            },
            rx,
        )
    }

    fn validate_agent(
        &self,
        org: Uuid,
        agent: Uuid,
    ) -> LocalBoxFuture<'static, Answer<AgentAnswer>> {
        let (reply, rx) = oneshot::channel();
        self.submit(Call::Agent { org, agent, reply }, rx)
    }
}

impl crate::tokens::MonthSource for BridgeClient {
    fn month_usage(
        &self,
        org: Uuid,
        agent: Uuid,
        since_ms: i64,
    ) -> LocalBoxFuture<'static, Option<crate::tokens::MonthUsage>> {
        let (reply, rx) = oneshot::channel();
        let call = Call::Month {
            org,
            agent,
            since_ms,
            reply,
        };
        let fut = self.submit(call, rx);
        Box::pin(async move { fut.await.ok() })
    }
}

/// The validation channel's endpoint. Workers give up after
/// `IBEX_AUTH_VALIDATE_TIMEOUT`; [`CALL_TIMEOUT`] only makes sure a call authd
/// never answers cannot hold its permit forever.
pub(super) fn endpoint(endpoint: Endpoint) -> Endpoint {
    endpoint.timeout(CALL_TIMEOUT)
}

/// The bridge thread's validation loop, until every worker's client is gone.
/// `clients[i]` is the channel to the `i`-th listed authd; each call goes to
/// the one [`Balancer::pick`] ranks first and, if that one fails (anything
/// but an answer or a RESOURCE_EXHAUSTED refusal), to the next, each authd at
/// most once, while the worker still waits.
pub(super) async fn run(
    clients: Vec<AuthServiceClient<Channel>>,
    balancer: Balancer,
    key: ServiceKey,
    mut calls: mpsc::Receiver<Call>,
) {
    let clients: Arc<[AuthServiceClient<Channel>]> = clients.into();
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    while let Some(call) = calls.recv().await {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let (clients, balancer, key) = (clients.clone(), balancer.clone(), key.clone());
        tokio::spawn(async move {
            let _permit = permit;
            match call {
                Call::Token {
                    token,
                    client: addr,
                    reply,
                } => {
                    let req = pb::ValidateTokenRequest {
                        token: token.expose_secret().to_owned(),
                        client_addr: addr.to_string(),
                    };
                    let affinity = Some(token_key(&req.token));
                    let answer = failover(&clients, &balancer, affinity, &reply, |mut c| {
                        let req = key.request(req.clone());
                        async move { c.validate_token(req).await }
                    })
                    .await;
                    let answer = match answer {
                        Some(Ok(r)) => token_answer(r),
                        Some(Err(status)) => Ok(refusal(&status)),
                        None => Err(Unavailable),
                    };
                    let _ = reply.send(answer);
                }
                Call::Month {
                    org,
                    agent,
                    since_ms,
                    reply,
                } => {
                    let req = pb::GetMonthUsageRequest {
                        org_id: org.to_string(),
                        agent_id: agent.to_string(),
                        since_unix_ms: since_ms,
                    };
                    let answer = failover(&clients, &balancer, None, &reply, |mut c| {
                        let req = key.request(req.clone());
                        async move { c.get_month_usage(req).await }
                    })
                    .await;
                    let answer = match answer {
                        Some(Ok(r)) => Ok(crate::tokens::MonthUsage {
                            org_tokens: r.org_tokens,
                            org_usd_micros: usd_micros(r.org_usd),
                            agent_tokens: r.agent_tokens,
                        }),
                        Some(Err(status)) => {
                            tracing::debug!(code = ?status.code(), "authd GetMonthUsage failed");
                            Err(Unavailable)
                        }
                        None => Err(Unavailable),
                    };
                    let _ = reply.send(answer);
                }
                Call::Agent { org, agent, reply } => {
                    let req = pb::ValidateAgentRequest {
                        org_id: org.to_string(),
                        agent_id: agent.to_string(),
                    };
                    let answer = failover(&clients, &balancer, None, &reply, |mut c| {
                        let req = key.request(req.clone());
                        async move { c.validate_agent(req).await }
                    })
                    .await;
                    let answer = match answer {
                        Some(Ok(r)) => agent_answer(r),
                        // authd refuses agents only by answering; treat any
                        // refusal like an outage (fail closed).
                        Some(Err(_)) | None => Err(Unavailable),
                    };
                    let _ = reply.send(answer);
                }
            }
        });
    }
}

/// Runs `call` on the authd [`Balancer::pick`] chooses, then on the next
/// while one fails. `Some(Ok)`: an answer; `Some(Err)`: a RESOURCE_EXHAUSTED
/// refusal (authd decided not to decide: not retried elsewhere, or a guesser
/// throttled on one authd would just move to the next); `None`: every authd
/// failed, or the worker stopped waiting.
async fn failover<T, R, F, Fut>(
    clients: &[AuthServiceClient<Channel>],
    balancer: &Balancer,
    affinity: Option<u64>,
    reply: &oneshot::Sender<R>,
    call: F,
) -> Option<Result<T, tonic::Status>>
where
    F: Fn(AuthServiceClient<Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let mut tried = 0u64;
    while let Some((index, _in_flight)) = balancer.pick(tried, affinity) {
        if reply.is_closed() {
            return None; // the worker gave up already
        }
        tried |= 1u64
            .checked_shl(u32::try_from(index).unwrap_or(u32::MAX))
            .unwrap_or(0);
        let client = clients.get(index)?.clone();
        match call(client).await {
            Ok(r) => {
                balancer.answered(index);
                return Some(Ok(r.into_inner()));
            }
            Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                balancer.answered(index);
                return Some(Err(status));
            }
            Err(status) => {
                tracing::debug!(authd = index, code = ?status.code(), "authd validation call failed");
                balancer.failed(index);
            }
        }
    }
    None
}

/// Why authd declined to decide: its guess throttle, or saturation.
fn refusal(status: &tonic::Status) -> TokenAnswer {
    match status.metadata().get(REFUSAL_HEADER).map(|v| v.as_bytes()) {
        Some(b"throttled") => TokenAnswer::Throttled,
        _ => TokenAnswer::Busy,
    }
}

/// Maps authd's reply; anything unexpected fails closed.
fn token_answer(r: pb::ValidateTokenResponse) -> Answer<TokenAnswer> {
    match pb::TokenStatus::try_from(r.status) {
        Ok(pb::TokenStatus::Valid) => {
            let org = Uuid::parse_str(&r.org_id).map_err(|_| Unavailable)?;
            let token_id = Uuid::parse_str(&r.token_id).map_err(|_| Unavailable)?;
            let agent = match r.agent_id.as_str() {
                "" => None,
                a => Some(Uuid::parse_str(a).map_err(|_| Unavailable)?),
            };
            // Normalised again here: a list the proxy cannot read refuses the token (fail closed).
            let token_models =
                ibex_proto::models::normalize(&r.token_allowed_models).map_err(|_| Unavailable)?;
            let org_models =
                ibex_proto::models::normalize(&r.org_allowed_models).map_err(|_| Unavailable)?;
            let models = (!token_models.is_empty() || !org_models.is_empty()).then(|| {
                std::sync::Arc::new(crate::auth::backend::ModelLists {
                    token: token_models,
                    org: org_models,
                })
            });
            Ok(TokenAnswer::Valid(ValidToken {
                org,
                token_id,
                permissions: r.permissions,
                expires_at_ms: (r.expires_at_unix_ms != 0).then_some(r.expires_at_unix_ms),
                agent,
                rpm: r.org_rpm_limit,
                models,
                limits: OrgLimits {
                    tpm: r.org_tpm_limit,
                    month_tokens: r.org_monthly_token_budget,
                    month_usd_micros: usd_micros(r.org_monthly_usd_budget),
                },
            }))
        }
        Ok(pb::TokenStatus::Invalid) => Ok(TokenAnswer::Invalid),
        Ok(pb::TokenStatus::Revoked) => Ok(TokenAnswer::Revoked),
        Ok(pb::TokenStatus::Expired) => Ok(TokenAnswer::Expired),
        Ok(pb::TokenStatus::Unspecified) | Err(_) => Err(Unavailable),
    }
}

/// A budget in USD as millionths (negative or NaN = none).
fn usd_micros(usd: f64) -> u64 {
    if usd.is_finite() && usd > 0.0 {
        (usd * 1e6).round().min(u64::MAX as f64) as u64
    } else {
        0
    }
}

fn agent_answer(r: pb::ValidateAgentResponse) -> Answer<AgentAnswer> {
    match pb::AgentStatus::try_from(r.status) {
        Ok(pb::AgentStatus::Active) => Ok(AgentAnswer::Active(AgentLimits {
            tpm: r.tpm_limit,
            month_tokens: r.monthly_token_budget,
        })),
        Ok(pb::AgentStatus::Paused | pb::AgentStatus::Archived | pb::AgentStatus::Suspended) => {
            Ok(AgentAnswer::Inactive)
        }
        Ok(pb::AgentStatus::NotFound) => Ok(AgentAnswer::NotFound),
        Ok(pb::AgentStatus::Unspecified) | Err(_) => Err(Unavailable),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_replies_fail_closed_on_nonsense() {
        let ok = pb::ValidateTokenResponse {
            status: pb::TokenStatus::Valid as i32,
            org_id: Uuid::from_u128(1).to_string(),
            token_id: Uuid::from_u128(2).to_string(),
            permissions: 3,
            expires_at_unix_ms: 0,
            agent_id: String::new(),
            user_id: String::new(),
            org_rpm_limit: 60,
            ..Default::default()
        };
        let Ok(TokenAnswer::Valid(v)) = token_answer(ok.clone()) else {
            panic!("valid")
        };
        assert_eq!((v.expires_at_ms, v.agent, v.rpm), (None, None, 60));
        let bad_org = pb::ValidateTokenResponse {
            org_id: "x".into(),
            ..ok.clone()
        };
        assert_eq!(token_answer(bad_org), Err(Unavailable));
        let unspecified = pb::ValidateTokenResponse {
            status: 0,
            ..ok.clone()
        };
        assert_eq!(token_answer(unspecified), Err(Unavailable));
        let unknown = pb::ValidateTokenResponse { status: 99, ..ok };
        assert_eq!(token_answer(unknown), Err(Unavailable));
    }

    #[test]
    fn agent_statuses() {
        let a = |s: pb::AgentStatus| {
            agent_answer(pb::ValidateAgentResponse {
                status: s as i32,
                ..Default::default()
            })
        };
        assert_eq!(
            a(pb::AgentStatus::Active),
            Ok(AgentAnswer::Active(Default::default()))
        );
        assert_eq!(a(pb::AgentStatus::Paused), Ok(AgentAnswer::Inactive));
        assert_eq!(a(pb::AgentStatus::Archived), Ok(AgentAnswer::Inactive));
        assert_eq!(a(pb::AgentStatus::Suspended), Ok(AgentAnswer::Inactive));
        assert_eq!(a(pb::AgentStatus::NotFound), Ok(AgentAnswer::NotFound));
        assert_eq!(a(pb::AgentStatus::Unspecified), Err(Unavailable));
    }
}
