//! Chain-level tests: `Service::call` driven directly in a monoio runtime
//! with a fake authd and a fake limiter, so every SPEC §3 step, its order and
//! the cache/feed behaviour are checked without a network.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::channel::oneshot;
use futures::future::{LocalBoxFuture, Shared};
use futures::FutureExt;
use uuid::Uuid;

use super::*;
use crate::auth::secret::BearerToken;
use crate::auth::{
    AgentAnswer, AuthCore, AuthSettings, AuthShared, FeedEvent, TokenAnswer, Unavailable,
    ValidToken,
};
use crate::clock::{Clock, FakeClock};
use crate::http::{Body, Method};

const NOW_MS: i64 = 1_800_000_000_000;
const SLA: Duration = Duration::from_millis(300);

fn org() -> Uuid {
    Uuid::from_u128(0x1)
}
fn other_org() -> Uuid {
    Uuid::from_u128(0x2)
}
fn agent() -> Uuid {
    Uuid::from_u128(0xa)
}
fn agent2() -> Uuid {
    Uuid::from_u128(0xb)
}

fn pat(n: u128) -> String {
    format!("ibex_pat_{}_{}", Uuid::from_u128(n), "S".repeat(43))
}

fn valid(n: u128, permissions: u64) -> TokenAnswer {
    TokenAnswer::Valid(ValidToken {
        org: org(),
        token_id: Uuid::from_u128(n),
        permissions,
        expires_at_ms: None,
        agent: None,
        rpm: 0,
        models: None,
        limits: Default::default(),
    })
}

#[derive(Default)]
struct Fake {
    tokens: RefCell<HashMap<String, TokenAnswer>>,
    agents: RefCell<HashMap<(Uuid, Uuid), AgentAnswer>>,
    token_calls: Cell<u32>,
    agent_calls: Cell<u32>,
    down: Cell<bool>,
    /// authd up but saturated: every token call answers RESOURCE_EXHAUSTED.
    busy: Cell<bool>,
    /// When set, answers wait for it (to hold calls in flight).
    gate: RefCell<Option<Shared<oneshot::Receiver<()>>>>,
}

impl Fake {
    fn answer<T: 'static>(
        &self,
        a: Result<T, Unavailable>,
    ) -> LocalBoxFuture<'static, Result<T, Unavailable>> {
        let gate = self.gate.borrow().clone();
        Box::pin(async move {
            if let Some(g) = gate {
                let _ = g.await;
            }
            a
        })
    }

    fn hold(&self) -> oneshot::Sender<()> {
        let (tx, rx) = oneshot::channel();
        *self.gate.borrow_mut() = Some(rx.shared());
        tx
    }
}

impl AuthBackend for Rc<Fake> {
    fn validate_token(
        &self,
        token: &BearerToken,
        _client: std::net::IpAddr,
    ) -> LocalBoxFuture<'static, Result<TokenAnswer, Unavailable>> {
        self.token_calls.set(self.token_calls.get() + 1);
        if self.down.get() {
            return self.answer(Err(Unavailable));
        }
        if self.busy.get() {
            return self.answer(Ok(TokenAnswer::Busy));
        }
        let t = String::from_utf8(token.expose().to_vec()).unwrap();
        let a = self
            .tokens
            .borrow()
            .get(&t)
            .cloned()
            .unwrap_or(TokenAnswer::Invalid);
        self.answer(Ok(a))
    }

    fn validate_agent(
        &self,
        org: Uuid,
        agent: Uuid,
    ) -> LocalBoxFuture<'static, Result<AgentAnswer, Unavailable>> {
        self.agent_calls.set(self.agent_calls.get() + 1);
        if self.down.get() {
            return self.answer(Err(Unavailable));
        }
        let a = self
            .agents
            .borrow()
            .get(&(org, agent))
            .copied()
            .unwrap_or(AgentAnswer::NotFound);
        self.answer(Ok(a))
    }
}

struct Lim {
    admit: Cell<bool>,
    checks: Cell<u32>,
}

impl Limiter for Rc<Lim> {
    async fn check(&self, _org: &Uuid, limit: u32) -> RateDecision {
        self.checks.set(self.checks.get() + 1);
        let admitted = self.admit.get();
        RateDecision {
            admitted,
            limit,
            remaining: Some(if admitted { limit - 1 } else { 0 }),
            reset_unix: (NOW_MS / 1000) as u64 + 42,
            retry_after_ms: 41_500,
            failed_open: false,
        }
    }

    fn healthy(&self) -> bool {
        true
    }
}

struct H {
    chain: Chain<Rc<Fake>, Rc<Lim>>,
    fake: Rc<Fake>,
    lim: Rc<Lim>,
    clock: Rc<FakeClock>,
    core: Rc<AuthCore>,
}

impl H {
    fn new() -> H {
        let settings = AuthSettings::new(SLA, Duration::from_millis(20));
        H::sharing(AuthShared::new(&settings))
    }

    /// Another worker of the same proxy: its own caches and fake authd, the
    /// proxy's failure budget and verified set.
    fn sharing(shared: AuthShared) -> H {
        let clock = Rc::new(FakeClock::new(NOW_MS));
        let settings = AuthSettings::new(SLA, Duration::from_millis(20));
        let ctx = WorkerCtx::new(0, clock.clone());
        let core = AuthCore::with_shared(&ctx, settings, shared);
        core.apply(FeedEvent::Heartbeat {
            sent_at_unix_ms: NOW_MS,
        });
        let fake = Rc::new(Fake::default());
        fake.tokens.borrow_mut().insert(pat(1), valid(1, 1));
        fake.tokens.borrow_mut().insert(pat(3), valid(3, 3));
        fake.tokens
            .borrow_mut()
            .insert(pat(4), TokenAnswer::Revoked);
        fake.tokens
            .borrow_mut()
            .insert(pat(5), TokenAnswer::Expired);
        fake.agents
            .borrow_mut()
            .insert((org(), agent()), AgentAnswer::Active(Default::default()));
        fake.agents
            .borrow_mut()
            .insert((org(), agent2()), AgentAnswer::Inactive);
        let lim = Rc::new(Lim {
            admit: Cell::new(true),
            checks: Cell::new(0),
        });
        let chain = Chain::new(
            ctx,
            Authenticator::new(core.clone(), fake.clone()),
            lim.clone(),
            None,
            Arc::new(Registry::default()),
            600,
        );
        H {
            chain,
            fake,
            lim,
            clock,
            core,
        }
    }

    async fn send(&self, method: Method, path: &str, headers: &[(&str, &str)]) -> Response {
        self.send_from(method, path, headers, "10.0.0.1:5000").await
    }

    async fn send_from(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        peer: &str,
    ) -> Response {
        self.send_on(crate::http::Listener::Public, method, path, headers, peer)
            .await
    }

    async fn send_on(
        &self,
        listener: crate::http::Listener,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        peer: &str,
    ) -> Response {
        let req = Request::new(method, path, headers, Bytes::new());
        let conn = ConnInfo {
            peer: peer.parse::<SocketAddr>().unwrap(),
            worker: 0,
            listener,
        };
        self.chain.call(req, &conn).await
    }

    /// authd's heartbeat, sent just now.
    fn heartbeat(&self) {
        self.core.apply(FeedEvent::Heartbeat {
            sent_at_unix_ms: self.clock.unix_ms(),
        });
    }

    /// GET the internal probe with token `n` and `agent`.
    async fn probe(&self, n: u128, agent: Uuid) -> Response {
        let bearer = format!("Bearer {}", pat(n));
        let agent = agent.to_string();
        self.send(
            Method::Get,
            "/v1/internal/auth-probe",
            &[("Authorization", &bearer), ("X-IBEX-Agent-ID", &agent)],
        )
        .await
    }
}

fn run<F: std::future::Future>(f: F) -> F::Output {
    monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
        .enable_timer()
        .build()
        .unwrap()
        .block_on(f)
}

fn header(r: &Response, name: &str) -> Option<String> {
    r.headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| String::from_utf8(v.as_bytes().to_vec()).unwrap())
}

fn body(r: &Response) -> serde_json::Value {
    let Body::Full(b) = &r.body else {
        panic!("expected a full body")
    };
    serde_json::from_slice(b).unwrap()
}

/// The envelope's code, checking the envelope's shape on the way.
fn code(r: &Response) -> String {
    let v = body(r);
    assert_eq!(
        v["error"]["request_id"].as_str(),
        header(r, "X-Request-ID").as_deref()
    );
    assert_eq!(
        header(r, "Content-Type").as_deref(),
        Some("application/json")
    );
    v["error"]["code"].as_str().unwrap().to_owned()
}

#[test]
fn public_routes_answer_without_credentials() {
    run(async {
        let h = H::new();
        let r = h.send(Method::Get, "/health", &[]).await;
        assert_eq!(r.status, 200);
        assert_eq!(body(&r), serde_json::json!({"status": "ok"}));
        assert!(header(&r, "X-Request-ID").is_some());
        assert_eq!(h.send(Method::Get, "/ready", &[]).await.status, 200);
        // `/metrics` is the admin listener's only: on the public one it is an
        // unknown route, so an anonymous caller gets 401 first (SPEC §3).
        let r = h.send(Method::Get, "/metrics", &[]).await;
        assert_eq!((r.status, code(&r).as_str()), (401, "MISSING_TOKEN"));
        let admin = crate::http::Listener::Admin;
        let peer = "127.0.0.1:5000";
        let r = h.send_on(admin, Method::Get, "/metrics", &[], peer).await;
        assert_eq!(r.status, 200);
        for path in ["/health", "/ready"] {
            assert_eq!(
                h.send_on(admin, Method::Get, path, &[], peer).await.status,
                200
            );
        }
        let r = h
            .send_on(admin, Method::Get, "/v1/internal/auth-probe", &[], peer)
            .await;
        assert_eq!((r.status, code(&r).as_str()), (404, "NOT_FOUND"));
        let r = h.send(Method::Post, "/health", &[]).await;
        assert_eq!((r.status, code(&r).as_str()), (405, "METHOD_NOT_ALLOWED"));
    });
}

#[test]
fn ready_names_authd_when_the_feed_is_stale() {
    run(async {
        let h = H::new();
        h.clock.advance(SLA + Duration::from_millis(1));
        let r = h.send(Method::Get, "/ready", &[]).await;
        assert_eq!(r.status, 503);
        assert!(body(&r)["error"]["message"]
            .as_str()
            .unwrap()
            .contains("authd"));
    });
}

#[test]
fn unknown_routes_are_401_before_404() {
    run(async {
        let h = H::new();
        for path in ["/v1/nope", "/nope", "/", "/v1/chat/completions"] {
            let r = h.send(Method::Get, path, &[]).await;
            assert_eq!(
                (r.status, code(&r).as_str()),
                (401, "MISSING_TOKEN"),
                "{path}"
            );
        }
        let bearer = format!("Bearer {}", pat(1));
        let auth = [
            ("Authorization", bearer.as_str()),
            ("X-IBEX-Agent-ID", "00000000-0000-0000-0000-00000000000a"),
        ];
        let r = h.send(Method::Get, "/v1/nope", &auth).await;
        assert_eq!((r.status, code(&r).as_str()), (404, "NOT_FOUND"));
        let r = h.send(Method::Get, "/v1/chat/completions", &auth).await;
        assert_eq!((r.status, code(&r).as_str()), (405, "METHOD_NOT_ALLOWED"));
        assert_eq!(
            h.lim.checks.get(),
            0,
            "refusals before the limiter spend no budget"
        );
    });
}

/// Request headers, expected status, expected code.
type Case = (Vec<(&'static str, String)>, u16, &'static str);

#[test]
fn every_refusal_in_spec_order() {
    run(async {
        let h = H::new();
        let a = agent().to_string();
        let cases: Vec<Case> = vec![
            (vec![], 401, "MISSING_TOKEN"),
            (
                vec![("Authorization", "Basic abc".into())],
                401,
                "MISSING_TOKEN",
            ),
            (
                vec![("Authorization", "Bearer ".into())],
                401,
                "MISSING_TOKEN",
            ),
            (
                vec![("Authorization", "Bearer    ".into())],
                401,
                "MISSING_TOKEN",
            ),
            // A bad token wins over a missing agent header.
            (
                vec![("Authorization", "Bearer not-a-pat".into())],
                401,
                "INVALID_TOKEN",
            ),
            (
                vec![("Authorization", format!("Bearer {}", pat(99)))],
                401,
                "INVALID_TOKEN",
            ),
            (
                vec![("Authorization", format!("Bearer {}", pat(4)))],
                401,
                "TOKEN_REVOKED",
            ),
            (
                vec![("Authorization", format!("Bearer {}", pat(5)))],
                401,
                "TOKEN_EXPIRED",
            ),
            (
                vec![("Authorization", format!("bearer {}", pat(1)))],
                400,
                "MISSING_AGENT_ID",
            ),
            (
                vec![
                    ("Authorization", format!("Bearer {}", pat(1))),
                    ("X-IBEX-Agent-ID", " ".into()),
                ],
                400,
                "MISSING_AGENT_ID",
            ),
            (
                vec![
                    ("Authorization", format!("Bearer {}", pat(1))),
                    ("X-IBEX-Agent-ID", "agent-7".into()),
                ],
                400,
                "INVALID_AGENT_ID",
            ),
            (
                vec![
                    ("Authorization", format!("Bearer {}", pat(1))),
                    ("X-IBEX-Agent-ID", Uuid::from_u128(0xdead).to_string()),
                ],
                403,
                "AGENT_NOT_AUTHORIZED",
            ),
            (
                vec![
                    ("Authorization", format!("Bearer {}", pat(1))),
                    ("X-IBEX-Agent-ID", agent2().to_string()),
                ],
                403,
                "AGENT_SUSPENDED",
            ),
        ];
        for (headers, status, want) in cases {
            let hs: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
            let r = h.send(Method::Get, "/v1/internal/auth-probe", &hs).await;
            assert_eq!((r.status, code(&r).as_str()), (status, want), "{headers:?}");
        }
        // Permission: token 1 has only `read`.
        let bearer = format!("Bearer {}", pat(1));
        let auth = [
            ("Authorization", bearer.as_str()),
            ("X-IBEX-Agent-ID", a.as_str()),
        ];
        let r = h.send(Method::Post, "/v1/chat/completions", &auth).await;
        assert_eq!(
            (r.status, code(&r).as_str()),
            (403, "INSUFFICIENT_PERMISSIONS")
        );
        assert_eq!(
            h.lim.checks.get(),
            0,
            "no refusal so far reached the limiter"
        );
        // Rate limit.
        h.lim.admit.set(false);
        let r = h.send(Method::Get, "/v1/internal/auth-probe", &auth).await;
        assert_eq!((r.status, code(&r).as_str()), (429, "RATE_LIMITED"));
        assert_eq!(header(&r, "Retry-After").as_deref(), Some("42"));
        assert_eq!(header(&r, "retry-after-ms").as_deref(), Some("41500"));
        assert_eq!(header(&r, "X-RateLimit-Limit").as_deref(), Some("600"));
        assert_eq!(header(&r, "X-RateLimit-Remaining").as_deref(), Some("0"));
        assert_eq!(
            header(&r, "x-ratelimit-reset-requests").as_deref(),
            Some("42s")
        );
        assert_eq!(h.lim.checks.get(), 1);
    });
}

#[test]
fn happy_path_probe_and_rate_headers() {
    run(async {
        let h = H::new();
        let r = h.probe(1, agent()).await;
        assert_eq!(r.status, 200);
        assert_eq!(
            body(&r),
            serde_json::json!({
                "org_id": org().to_string(),
                "agent_id": agent().to_string(),
                "token_id": Uuid::from_u128(1).to_string(),
                "permissions": 1,
            })
        );
        assert_eq!(header(&r, "X-RateLimit-Limit").as_deref(), Some("600"));
        assert_eq!(
            header(&r, "x-ratelimit-limit-requests").as_deref(),
            Some("600")
        );
        assert_eq!(header(&r, "X-RateLimit-Remaining").as_deref(), Some("599"));
        assert_eq!(
            header(&r, "x-ratelimit-remaining-requests").as_deref(),
            Some("599")
        );
        assert_eq!(
            header(&r, "X-RateLimit-Reset").as_deref(),
            Some(((NOW_MS / 1000) + 42).to_string().as_str())
        );
        assert!(header(&r, "Retry-After").is_none());
    });
}

#[test]
fn org_probe_is_403_across_tenants_never_404() {
    run(async {
        let h = H::new();
        let bearer = format!("Bearer {}", pat(1));
        let a = agent().to_string();
        let auth = [
            ("Authorization", bearer.as_str()),
            ("X-IBEX-Agent-ID", a.as_str()),
        ];
        let own = format!("/v1/orgs/{}/auth-probe", org());
        assert_eq!(h.send(Method::Get, &own, &auth).await.status, 200);
        for path in [
            format!("/v1/orgs/{}/auth-probe", other_org()),
            "/v1/orgs/xyz/auth-probe".into(),
            "/v1/orgs//auth-probe".into(),
        ] {
            let r = h.send(Method::Get, &path, &auth).await;
            assert_eq!(
                (r.status, code(&r).as_str()),
                (403, "PERMISSION_DENIED"),
                "{path}"
            );
        }
    });
}

#[test]
fn provider_routes_without_upstream_are_501() {
    run(async {
        let h = H::new();
        let bearer = format!("Bearer {}", pat(3));
        let a = agent().to_string();
        let auth = [
            ("Authorization", bearer.as_str()),
            ("X-IBEX-Agent-ID", a.as_str()),
        ];
        let r = h.send(Method::Post, "/v1/chat/completions", &auth).await;
        assert_eq!(
            (r.status, code(&r).as_str()),
            (501, "PROVIDER_NOT_CONFIGURED")
        );
        let r = h.send(Method::Get, "/v1/models", &auth).await;
        assert_eq!(
            (r.status, code(&r).as_str()),
            (501, "PROVIDER_NOT_CONFIGURED")
        );
    });
}

#[test]
fn bound_token_refuses_other_agents_identically() {
    run(async {
        let h = H::new();
        let mut bound = match valid(7, 1) {
            TokenAnswer::Valid(t) => t,
            _ => unreachable!(),
        };
        bound.agent = Some(agent());
        h.fake
            .tokens
            .borrow_mut()
            .insert(pat(7), TokenAnswer::Valid(bound));
        assert_eq!(h.probe(7, agent()).await.status, 200);
        // Another active agent of the org, a suspended one, an unknown one:
        // all the same answer.
        h.fake.agents.borrow_mut().insert(
            (org(), Uuid::from_u128(0xc)),
            AgentAnswer::Active(Default::default()),
        );
        for other in [Uuid::from_u128(0xc), agent2(), Uuid::from_u128(0xdead)] {
            let r = h.probe(7, other).await;
            assert_eq!((r.status, code(&r).as_str()), (403, "AGENT_NOT_AUTHORIZED"));
        }
    });
}

#[test]
fn request_id_is_echoed_or_generated() {
    run(async {
        let h = H::new();
        let r = h
            .send(Method::Get, "/v1/x", &[("X-Request-ID", "abc-123")])
            .await;
        assert_eq!(header(&r, "X-Request-ID").as_deref(), Some("abc-123"));
        assert_eq!(body(&r)["error"]["request_id"], "abc-123");
        let r = h
            .send(Method::Get, "/health", &[("X-Request-ID", "bad id")])
            .await;
        assert!(Uuid::parse_str(&header(&r, "X-Request-ID").unwrap()).is_ok());
    });
}

#[test]
fn cache_hits_skip_authd_and_recheck_expiry() {
    run(async {
        let h = H::new();
        let mut t = match valid(8, 1) {
            TokenAnswer::Valid(t) => t,
            _ => unreachable!(),
        };
        t.expires_at_ms = Some(NOW_MS + 1_000);
        h.fake
            .tokens
            .borrow_mut()
            .insert(pat(8), TokenAnswer::Valid(t));
        assert_eq!(h.probe(8, agent()).await.status, 200);
        assert_eq!(h.probe(8, agent()).await.status, 200);
        assert_eq!((h.fake.token_calls.get(), h.fake.agent_calls.get()), (1, 1));
        // Keep the feed fresh while time passes the expiry.
        h.clock.advance(Duration::from_millis(1_000));
        h.heartbeat();
        let r = h.probe(8, agent()).await;
        assert_eq!((r.status, code(&r).as_str()), (401, "TOKEN_EXPIRED"));
        assert_eq!(h.fake.token_calls.get(), 1, "expiry decided from the cache");
    });
}

#[test]
fn refused_tokens_are_cached_briefly() {
    run(async {
        let h = H::new();
        for _ in 0..3 {
            assert_eq!(code(&h.probe(99, agent()).await), "INVALID_TOKEN");
        }
        assert_eq!(h.fake.token_calls.get(), 1);
        h.clock.advance(Duration::from_secs(2));
        h.heartbeat();
        assert_eq!(code(&h.probe(99, agent()).await), "INVALID_TOKEN");
        assert_eq!(h.fake.token_calls.get(), 2);
    });
}

#[test]
fn malformed_tokens_take_the_unknown_token_path() {
    run(async {
        let h = H::new();
        let a = agent().to_string();
        let send = |bearer: String, rid: &'static str| {
            let (h, a) = (&h, a.clone());
            async move {
                h.send(
                    Method::Get,
                    "/v1/internal/auth-probe",
                    &[
                        ("Authorization", &bearer),
                        ("X-IBEX-Agent-ID", &a),
                        ("X-Request-ID", rid),
                    ],
                )
                .await
            }
        };
        // Malformed and unknown: one authd call each, the same answer.
        let unknown = send(format!("Bearer {}", pat(99)), "r1").await;
        assert_eq!(h.fake.token_calls.get(), 1);
        for junk in [
            "not-a-pat",
            "ibex_pat_guess",
            "ibex_pat_00000000-0000-0000-0000-000000000004_short",
        ] {
            let calls = h.fake.token_calls.get();
            let r = send(format!("Bearer {junk}"), "r1").await;
            assert_eq!(
                (r.status, code(&r).as_str()),
                (401, "INVALID_TOKEN"),
                "{junk}"
            );
            assert_eq!(body(&r), body(&unknown), "{junk}");
            let heads = |r: &Response| {
                r.headers
                    .iter()
                    .map(|(n, v)| (*n, v.as_bytes().to_vec()))
                    .collect::<Vec<_>>()
            };
            assert_eq!(heads(&r), heads(&unknown), "{junk}");
            assert_eq!(h.fake.token_calls.get(), calls + 1, "{junk}: asks authd");
            // Seen lately: the negative cache answers, as for an unknown PAT.
            let r = send(format!("Bearer {junk}"), "r1").await;
            assert_eq!(code(&r), "INVALID_TOKEN");
            assert_eq!(
                h.fake.token_calls.get(),
                calls + 1,
                "{junk}: cached refusal"
            );
        }
        // authd down: malformed fails closed exactly like unknown.
        h.fake.down.set(true);
        let unknown = send(format!("Bearer {}", pat(98)), "r2").await;
        let junk = send("Bearer still-not-a-pat".into(), "r2").await;
        assert_eq!(
            (junk.status, code(&junk).as_str()),
            (503, "AUTH_UNAVAILABLE")
        );
        assert_eq!(body(&junk), body(&unknown));
    });
}

#[test]
fn overlong_bearer_values_are_refused_without_authd() {
    run(async {
        let h = H::new();
        let long = format!(
            "Bearer {}",
            "x".repeat(crate::auth::secret::MAX_FORWARDED_LEN + 1)
        );
        let r = h
            .send(
                Method::Get,
                "/v1/internal/auth-probe",
                &[("Authorization", &long)],
            )
            .await;
        assert_eq!((r.status, code(&r).as_str()), (401, "INVALID_TOKEN"));
        assert_eq!(h.fake.token_calls.get(), 0);
        // At the cap it is still forwarded (and refused by authd).
        let at_cap = format!(
            "Bearer {}",
            "x".repeat(crate::auth::secret::MAX_FORWARDED_LEN)
        );
        let r = h
            .send(
                Method::Get,
                "/v1/internal/auth-probe",
                &[("Authorization", &at_cap)],
            )
            .await;
        assert_eq!(code(&r), "INVALID_TOKEN");
        assert_eq!(h.fake.token_calls.get(), 1);
    });
}

#[test]
fn authd_down_without_a_safe_entry_is_503() {
    run(async {
        let h = H::new();
        h.fake.down.set(true);
        let r = h.probe(1, agent()).await;
        assert_eq!((r.status, code(&r).as_str()), (503, "AUTH_UNAVAILABLE"));
    });
}

#[test]
fn a_slow_authd_times_out_as_503() {
    run(async {
        let h = H::new();
        let _held = h.fake.hold(); // never released
        let r = h.probe(1, agent()).await;
        assert_eq!((r.status, code(&r).as_str()), (503, "AUTH_UNAVAILABLE"));
    });
}

#[test]
fn stale_feed_revalidates_and_fails_closed() {
    run(async {
        let h = H::new();
        assert_eq!(h.probe(1, agent()).await.status, 200);
        // The feed goes silent past the SLA.
        h.clock.advance(SLA + Duration::from_millis(1));
        h.fake.down.set(true);
        let r = h.probe(1, agent()).await;
        assert_eq!((r.status, code(&r).as_str()), (503, "AUTH_UNAVAILABLE"));
        // authd back (feed still down): re-validated, then trusted for the SLA.
        h.fake.down.set(false);
        let calls = h.fake.token_calls.get();
        assert_eq!(h.probe(1, agent()).await.status, 200);
        assert_eq!(h.probe(1, agent()).await.status, 200);
        assert_eq!(h.fake.token_calls.get(), calls + 1);
        h.clock.advance(SLA);
        assert_eq!(h.probe(1, agent()).await.status, 200);
        assert_eq!(h.fake.token_calls.get(), calls + 2);
    });
}

#[test]
fn valid_answers_right_after_an_event_are_used_but_not_cached() {
    // Several authds: the event may come from one while the re-validation
    // lands on another that has not applied the change yet and still says
    // VALID. Caching that would keep a revoked token working; within the
    // settle window (the SLA) such answers are used, not cached.
    run(async {
        let h = H::new();
        assert_eq!(h.probe(1, agent()).await.status, 200);
        h.core.apply(FeedEvent::Token {
            org: org(),
            token_id: Uuid::from_u128(1),
        });
        let calls = h.fake.token_calls.get();
        // The lagging authd still answers VALID: admitted, but asked again next time.
        assert_eq!(h.probe(1, agent()).await.status, 200);
        assert_eq!(h.probe(1, agent()).await.status, 200);
        assert_eq!(h.fake.token_calls.get(), calls + 2);
        // It catches up: the revocation is refused at once, and cached.
        h.fake
            .tokens
            .borrow_mut()
            .insert(pat(1), TokenAnswer::Revoked);
        assert_eq!(code(&h.probe(1, agent()).await), "TOKEN_REVOKED");
        assert_eq!(code(&h.probe(1, agent()).await), "TOKEN_REVOKED");
        assert_eq!(h.fake.token_calls.get(), calls + 3);
        // Another token is unaffected, and once the window has passed a
        // valid answer is cached again.
        assert_eq!(h.probe(3, agent()).await.status, 200);
        let calls = h.fake.token_calls.get();
        assert_eq!(h.probe(3, agent()).await.status, 200);
        assert_eq!(h.fake.token_calls.get(), calls);
        h.clock.advance(SLA);
        h.heartbeat();
        h.core.apply(FeedEvent::Agent {
            org: org(),
            agent: agent(),
        });
        let agent_calls = h.fake.agent_calls.get();
        assert_eq!(h.probe(3, agent()).await.status, 200);
        assert_eq!(h.probe(3, agent()).await.status, 200);
        assert_eq!(
            h.fake.agent_calls.get(),
            agent_calls + 2,
            "agent answers too"
        );
        h.clock.advance(SLA);
        h.heartbeat();
        assert_eq!(h.probe(3, agent()).await.status, 200);
        let agent_calls = h.fake.agent_calls.get();
        assert_eq!(h.probe(3, agent()).await.status, 200);
        assert_eq!(h.fake.agent_calls.get(), agent_calls, "cached again");
    });
}

#[test]
fn invalidation_events_evict_on_this_worker() {
    run(async {
        let h = H::new();
        assert_eq!(h.probe(1, agent()).await.status, 200);
        // Revocation: authd now says revoked and the feed says so.
        h.fake
            .tokens
            .borrow_mut()
            .insert(pat(1), TokenAnswer::Revoked);
        h.core.apply(FeedEvent::Token {
            org: org(),
            token_id: Uuid::from_u128(1),
        });
        assert_eq!(code(&h.probe(1, agent()).await), "TOKEN_REVOKED");

        // Agent paused.
        assert_eq!(h.probe(3, agent()).await.status, 200);
        h.fake
            .agents
            .borrow_mut()
            .insert((org(), agent()), AgentAnswer::Inactive);
        h.core.apply(FeedEvent::Agent {
            org: org(),
            agent: agent(),
        });
        assert_eq!(code(&h.probe(3, agent()).await), "AGENT_SUSPENDED");

        // Reset: nothing cached before it is trusted.
        h.fake
            .agents
            .borrow_mut()
            .insert((org(), agent()), AgentAnswer::Active(Default::default()));
        h.core.apply(FeedEvent::Agent {
            org: org(),
            agent: agent(),
        });
        assert_eq!(h.probe(3, agent()).await.status, 200);
        let calls = h.fake.token_calls.get();
        h.core.apply(FeedEvent::Reset);
        h.clock.advance(Duration::from_millis(1));
        assert_eq!(h.probe(3, agent()).await.status, 200);
        assert_eq!(h.fake.token_calls.get(), calls + 1);

        // Org event drops the org's tokens.
        h.core.apply(FeedEvent::Org { org: org() });
        assert_eq!(h.probe(3, agent()).await.status, 200);
        assert_eq!(h.fake.token_calls.get(), calls + 2);
    });
}

#[test]
fn a_validation_racing_an_invalidation_is_not_cached() {
    run(async {
        let h = H::new();
        // Warm the agent so only the token call is held.
        assert_eq!(h.probe(3, agent()).await.status, 200);
        let release = h.fake.hold();
        let in_flight = h.probe(1, agent());
        let race = async {
            // The call has started (authd read the row) when the revocation
            // event arrives; then the stale answer comes back.
            h.core.apply(FeedEvent::Token {
                org: org(),
                token_id: Uuid::from_u128(1),
            });
            h.fake
                .tokens
                .borrow_mut()
                .insert(pat(1), TokenAnswer::Revoked);
            release.send(()).unwrap();
        };
        let (r, ()) = futures::join!(in_flight, race);
        assert_eq!(r.status, 200, "the in-flight request used its answer");
        *h.fake.gate.borrow_mut() = None;
        assert_eq!(
            code(&h.probe(1, agent()).await),
            "TOKEN_REVOKED",
            "but did not cache it"
        );
    });
}

#[test]
fn concurrent_misses_make_one_authd_call() {
    run(async {
        let h = H::new();
        let release = h.fake.hold();
        let (a, b, c, ()) = futures::join!(
            h.probe(1, agent()),
            h.probe(1, agent()),
            h.probe(1, agent()),
            async {
                release.send(()).unwrap();
            }
        );
        assert_eq!((a.status, b.status, c.status), (200, 200, 200));
        assert_eq!(h.fake.token_calls.get(), 1);
        assert_eq!(h.fake.agent_calls.get(), 1);
    });
}

#[test]
fn undecided_guesses_spend_the_failure_budget_but_outages_do_not() {
    run(async {
        let h = H::new();
        let a = agent().to_string();
        let probe = |i: u128| format!("Bearer {}", pat(i));
        // authd saturated: fresh unknown tokens get 503 and count as guesses…
        h.fake.busy.set(true);
        let flooder = "10.8.8.8:4000";
        for i in 0..20u128 {
            let r = h
                .send_from(
                    Method::Get,
                    "/v1/x",
                    &[("Authorization", &probe(5000 + i))],
                    flooder,
                )
                .await;
            assert_eq!((r.status, code(&r).as_str()), (503, "AUTH_UNAVAILABLE"));
        }
        // …so the flood stops costing authd calls.
        let calls = h.fake.token_calls.get();
        let r = h
            .send_from(
                Method::Get,
                "/v1/x",
                &[("Authorization", &probe(6000))],
                flooder,
            )
            .await;
        assert_eq!((r.status, code(&r).as_str()), (429, "RATE_LIMITED"));
        assert_eq!(h.fake.token_calls.get(), calls);
        // authd unreachable is an outage, not a guess: always 503, never 429.
        h.fake.busy.set(false);
        h.fake.down.set(true);
        let victim = "10.8.8.9:4000";
        for i in 0..30u128 {
            let r = h
                .send_from(
                    Method::Get,
                    "/v1/x",
                    &[("Authorization", &probe(7000 + i))],
                    victim,
                )
                .await;
            assert_eq!((r.status, code(&r).as_str()), (503, "AUTH_UNAVAILABLE"));
        }
        // Nothing undecided was cached: authd back, a valid token passes.
        h.fake.down.set(false);
        let r = h
            .send_from(
                Method::Get,
                "/v1/internal/auth-probe",
                &[("Authorization", &probe(1)), ("X-IBEX-Agent-ID", &a)],
                victim,
            )
            .await;
        assert_eq!(r.status, 200);
    });
}

fn probe_auth(token: u128, agent: Uuid) -> [(&'static str, String); 2] {
    [
        ("Authorization", format!("Bearer {}", pat(token))),
        ("X-IBEX-Agent-ID", agent.to_string()),
    ]
}

async fn probe(h: &H, token: u128, agent: Uuid, peer: &str) -> Response {
    let auth = probe_auth(token, agent);
    let headers: Vec<(&str, &str)> = auth.iter().map(|(k, v)| (*k, v.as_str())).collect();
    h.send_from(Method::Get, "/v1/internal/auth-probe", &headers, peer)
        .await
}

#[test]
fn random_agent_ids_spend_the_failure_budget_verified_agents_still_pass() {
    run(async {
        let h = H::new();
        let peer = "10.7.7.7:4000";
        assert_eq!(probe(&h, 1, agent(), peer).await.status, 200);
        for i in 0..20u128 {
            let r = probe(&h, 1, Uuid::from_u128(0x1000 + i), peer).await;
            assert_eq!(
                (r.status, code(&r).as_str()),
                (403, "AGENT_NOT_AUTHORIZED"),
                "{i}"
            );
        }
        let calls = h.fake.agent_calls.get();
        // Past the budget: 429 and no authd call for an agent nobody verified…
        let r = probe(&h, 1, Uuid::from_u128(0x2000), peer).await;
        assert_eq!((r.status, code(&r).as_str()), (429, "RATE_LIMITED"));
        assert_eq!(h.fake.agent_calls.get(), calls);
        // …while the verified agent passes, and another address is unaffected.
        assert_eq!(probe(&h, 1, agent(), peer).await.status, 200);
        let r = probe(&h, 1, Uuid::from_u128(0x3000), "10.7.7.8:4000").await;
        assert_eq!(code(&r), "AGENT_NOT_AUTHORIZED");
    });
}

#[test]
fn one_failure_budget_per_proxy_and_verified_credentials_pass_on_every_worker() {
    run(async {
        let w1 = H::new();
        let w2 = H::sharing(w1.core.shared().clone());
        let peer = "10.6.6.6:4000";
        // Worker 1 verifies the token and the agent.
        assert_eq!(probe(&w1, 1, agent(), peer).await.status, 200);
        // The address spends its budget on worker 2 with random tokens…
        for i in 0..20u128 {
            let bad = format!("Bearer {}", pat(5000 + i));
            let r = w2
                .send_from(Method::Get, "/v1/x", &[("Authorization", &bad)], peer)
                .await;
            assert_eq!(code(&r), "INVALID_TOKEN", "{i}");
        }
        // …so a guess on worker 1 is 429 at once (one budget for the proxy),
        let bad = format!("Bearer {}", pat(6000));
        let calls = w1.fake.token_calls.get();
        let r = w1
            .send_from(Method::Get, "/v1/x", &[("Authorization", &bad)], peer)
            .await;
        assert_eq!((r.status, code(&r).as_str()), (429, "RATE_LIMITED"));
        assert_eq!(w1.fake.token_calls.get(), calls);
        // a real token no worker verified is refused without an authd call,
        let calls = w2.fake.token_calls.get();
        assert_eq!(probe(&w2, 3, agent(), peer).await.status, 429);
        assert_eq!(w2.fake.token_calls.get(), calls);
        // and the token and agent verified on worker 1 pass on worker 2, where
        // neither is cached (it asks authd once for each).
        assert_eq!(probe(&w2, 1, agent(), peer).await.status, 200);
        assert_eq!(w2.fake.token_calls.get(), calls + 1);
    });
}

#[test]
fn throttle_refusals_are_not_charged_to_the_address() {
    run(async {
        let h = H::new();
        // authd's (id, address) throttle refused: 503 every time, and never
        // counted as a guess, so the address is not locked out by it (a
        // holder sharing an address with a guesser keeps being asked about).
        let shared = "10.8.8.10:4000";
        for i in 0..30u128 {
            h.fake
                .tokens
                .borrow_mut()
                .insert(pat(8000 + i), TokenAnswer::Throttled);
            let bearer = format!("Bearer {}", pat(8000 + i));
            let r = h
                .send_from(Method::Get, "/v1/x", &[("Authorization", &bearer)], shared)
                .await;
            assert_eq!((r.status, code(&r).as_str()), (503, "AUTH_UNAVAILABLE"));
        }
        assert_eq!(h.fake.token_calls.get(), 30, "every one reached authd");
    });
}

#[test]
fn flood_guard_blocks_guessers_but_not_cached_credentials() {
    run(async {
        let h = H::new();
        let attacker = "10.9.9.9:4000";
        let a = agent().to_string();
        // A valid token of this address is cached before the flood.
        let good = format!("Bearer {}", pat(1));
        let good_auth = [
            ("Authorization", good.as_str()),
            ("X-IBEX-Agent-ID", a.as_str()),
        ];
        assert_eq!(
            h.send_from(Method::Get, "/v1/internal/auth-probe", &good_auth, attacker)
                .await
                .status,
            200
        );
        for i in 0..20u128 {
            let bad = format!("Bearer {}", pat(1000 + i));
            let r = h
                .send_from(Method::Get, "/v1/x", &[("Authorization", &bad)], attacker)
                .await;
            assert_eq!(code(&r), "INVALID_TOKEN");
        }
        let calls = h.fake.token_calls.get();
        // Past the limit: 429 without asking authd, malformed or not.
        for bad in [format!("Bearer {}", pat(2000)), "Bearer junk".to_string()] {
            let r = h
                .send_from(Method::Get, "/v1/x", &[("Authorization", &bad)], attacker)
                .await;
            assert_eq!((r.status, code(&r).as_str()), (429, "RATE_LIMITED"));
        }
        // An uncached valid token from there is also refused (it would need authd)…
        let other = format!("Bearer {}", pat(3));
        let r = h
            .send_from(
                Method::Get,
                "/v1/internal/auth-probe",
                &[("Authorization", &other), ("X-IBEX-Agent-ID", &a)],
                attacker,
            )
            .await;
        assert_eq!(r.status, 429);
        assert_eq!(h.fake.token_calls.get(), calls);
        // …but the cached one passes, and other addresses are unaffected.
        assert_eq!(
            h.send_from(Method::Get, "/v1/internal/auth-probe", &good_auth, attacker)
                .await
                .status,
            200
        );
        assert_eq!(
            code(
                &h.send_from(
                    Method::Get,
                    "/v1/x",
                    &[("Authorization", "Bearer junk")],
                    "10.0.0.2:1"
                )
                .await
            ),
            "INVALID_TOKEN"
        );
        // The window passes.
        h.clock.advance(Duration::from_secs(60));
        h.heartbeat();
        let r = h
            .send_from(
                Method::Get,
                "/v1/x",
                &[("Authorization", "Bearer junk")],
                attacker,
            )
            .await;
        assert_eq!(code(&r), "INVALID_TOKEN");
    });
}

#[test]
fn decimal_header_values() {
    for n in [0u64, 7, 10, 599, 1_800_000_042, u64::MAX] {
        assert_eq!(num(n).as_bytes(), n.to_string().as_bytes());
    }
}
