//! A worker's providers (SPEC §12): the route of a request's model, its alias, and the ordered
//! providers tried for it with fallback.
//!
//! Fallback: the next attempt (a retry on the same provider, then the next provider) is made
//! when an attempt is refused, times out, or answers 429 or 5xx — always before anything was
//! sent to the client, because [`Upstream::attempt`] returns at the response head and only
//! [`Upstream::deliver`] hands a response over. Once delivered, a response is that provider's
//! to the end (a stream cut mid-way ends the client's stream; nothing is replayed). The last
//! attempt's 429/5xx is passed through as it came. The request's usage record is started once
//! and finished once, whatever the number of attempts, naming the provider that answered and
//! the attempts made.
//!
//! Each provider has its own [`Upstream`] (connection pool) on each worker, and a circuit
//! breaker: after [`BREAKER_FAILURES`] failures in a row it is skipped for [`BREAKER_OPEN`],
//! then one request probes it. A route whose providers are all open still tries them.
//!
//! Reload: the table comes from the process's [`ProviderBook`]; when its generation changed, the
//! next request on this worker builds a new set of upstreams. Requests in flight keep the old
//! set (an `Rc`), so nothing in flight is dropped.

use std::cell::RefCell;
use std::ops::Range;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use serde::Deserialize;

use super::stats::{FailureKind, ProviderCounters};
use super::{ForwardCtx, Upstream, UpstreamConfig, UpstreamError, UpstreamRoute, UpstreamStats};
use crate::clock::Clock;
use crate::error::ApiError;
use crate::http::{Body, HeaderValue, Request, Response};
use crate::ledger::meter::Meter;
use crate::providers::{ProviderBook, Table};
use crate::ratelimit::breaker::{Breaker, Permit};

/// Failures in a row that open a provider's breaker.
pub const BREAKER_FAILURES: u32 = 5;
/// How long an open breaker skips its provider before one request probes it.
pub const BREAKER_OPEN: Duration = Duration::from_secs(5);
/// The response header naming the provider that answered.
pub const PROVIDER_HEADER: &str = "x-ibex-provider";

/// What a worker's routers share that is not in the providers file.
#[derive(Clone)]
pub struct RouterSettings {
    /// `IBEX_UPSTREAM_CA_FILE`.
    pub ca_file: Option<std::path::PathBuf>,
    /// `IBEX_UPSTREAM_IDLE_TIMEOUT`.
    pub idle_timeout: Duration,
}

/// Who may call which model: the token's and the org's allow-lists (SPEC §12), already
/// combined. `allows` must be true for the client's name and for the target.
pub trait ModelPolicy {
    fn allows(&self, model: &str) -> bool;

    /// The exact names the lists hold (for `/v1/models`: a `gpt-*` route the lists do not allow
    /// whole still lists the `gpt-4o` they do).
    fn exact_names(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Every model allowed (no list).
pub struct AnyModel;

impl ModelPolicy for AnyModel {
    fn allows(&self, _: &str) -> bool {
        true
    }
}

/// What [`Router::prepare`] decided.
pub enum Prepared {
    /// Answered without a provider (`/v1/models` from the routes).
    Answer(Response),
    Forward(Routed),
}

/// A request ready for its providers: the set it was routed in (kept across a reload), the
/// providers in order, and the body to send (the alias applied).
pub struct Routed {
    set: Rc<Set>,
    providers: Vec<usize>,
    route: UpstreamRoute,
    body: Bytes,
}

struct Set {
    generation: u64,
    table: Arc<Table>,
    upstreams: Vec<Upstream>,
    breakers: RefCell<Vec<Breaker>>,
    /// `/metrics` per provider (by index, as `upstreams`).
    counters: Vec<Arc<ProviderCounters>>,
}

pub struct Router {
    book: Arc<ProviderBook>,
    settings: RouterSettings,
    clock: Rc<dyn Clock>,
    stats: Arc<UpstreamStats>,
    meter: Option<Rc<Meter>>,
    set: RefCell<Rc<Set>>,
    failed_generation: std::cell::Cell<u64>,
}

impl Router {
    /// On the worker's thread, inside its runtime.
    pub fn new(
        book: Arc<ProviderBook>,
        settings: RouterSettings,
        clock: Rc<dyn Clock>,
        meter: Option<Rc<Meter>>,
    ) -> anyhow::Result<Self> {
        let stats = Arc::new(UpstreamStats::default());
        let (generation, table) = book.current();
        let set = build_set(generation, table, &settings, &clock, &stats, meter.as_ref())?;
        Ok(Self {
            book,
            settings,
            clock,
            stats,
            meter,
            set: RefCell::new(Rc::new(set)),
            failed_generation: std::cell::Cell::new(0),
        })
    }

    /// This worker's counters, for `/metrics` (every provider's together).
    pub fn stats(&self) -> Arc<UpstreamStats> {
        self.stats.clone()
    }

    /// False while the usage spool is full: a metered route must answer 503.
    pub fn admits(&self) -> bool {
        self.meter.as_ref().is_none_or(|m| m.admits())
    }

    /// The current set, rebuilt first if the providers file was reloaded. A set that cannot be
    /// built (unusable TLS roots) keeps the old one and logs why.
    fn current(&self) -> Rc<Set> {
        let generation = self.book.generation();
        let cur = self.set.borrow().clone();
        if cur.generation == generation || self.failed_generation.get() == generation {
            return cur;
        }
        let (generation, table) = self.book.current();
        match build_set(
            generation,
            table,
            &self.settings,
            &self.clock,
            &self.stats,
            self.meter.as_ref(),
        ) {
            Ok(set) => {
                let set = Rc::new(set);
                *self.set.borrow_mut() = set.clone();
                set
            }
            Err(e) => {
                tracing::error!(
                    error = format!("{e:#}"),
                    "providers not rebuilt on this worker; keeping the old ones"
                );
                // Not retried on every request: this generation is skipped.
                self.failed_generation.set(generation);
                cur
            }
        }
    }

    /// Forwards an authorised request by its model's route (SPEC §12): [`Router::prepare`]
    /// then [`Router::send`].
    pub async fn forward(
        &self,
        req: &Request,
        route: UpstreamRoute,
        ctx: ForwardCtx<'_>,
        policy: &dyn ModelPolicy,
    ) -> Result<Response, ApiError> {
        match self.prepare(req, route, policy)? {
            Prepared::Answer(resp) => Ok(resp),
            Prepared::Forward(s) => self.send(s, req, ctx, None).await,
        }
    }

    /// Everything decided before any upstream call, once per request: the model's route, the
    /// allow-lists, the shape, the alias. A refusal here costs nothing upstream (and, for the
    /// token budgets, is made before anything is reserved).
    pub fn prepare(
        &self,
        req: &Request,
        route: UpstreamRoute,
        policy: &dyn ModelPolicy,
    ) -> Result<Prepared, ApiError> {
        let found = if route == UpstreamRoute::Models {
            None
        } else {
            request_model(&req.body)
        };
        let found = found.as_ref().map(|(m, span)| (m.as_str(), span.clone()));
        self.prepare_with(req, route, policy, found)
    }

    /// [`Router::prepare`] with the body's `model` and its span already read (as
    /// [`request_model`] reads them: the token limiter's estimate reads them in its one pass).
    pub fn prepare_with(
        &self,
        req: &Request,
        route: UpstreamRoute,
        policy: &dyn ModelPolicy,
        found: Option<(&str, Range<usize>)>,
    ) -> Result<Prepared, ApiError> {
        let set = self.current();
        if route == UpstreamRoute::Models {
            if !set.table.legacy {
                return Ok(Prepared::Answer(models_list(&set.table, policy)));
            }
            return Ok(Prepared::Forward(Routed {
                set,
                providers: vec![0],
                route,
                body: req.body.clone(),
            }));
        }
        let model = found.as_ref().map_or("", |(m, _)| *m);
        // The client's name first: a refused name is 403 whether or not a route serves it, so
        // the answer says nothing about the routes a caller may not use.
        if !policy.allows(model) {
            return Err(ApiError::ModelNotAllowed);
        }
        let rule = set.table.route(model).ok_or(ApiError::ModelNotFound)?;
        // Then the name actually sent upstream, so an alias never reaches a model the list
        // refuses.
        let target = rule.target(model);
        if !policy.allows(target) {
            return Err(ApiError::ModelNotAllowed);
        }
        if rule.kind != route.kind() {
            return Err(ApiError::ModelRouteMismatch);
        }
        let mut body = req.body.clone();
        if target != model {
            let Some((_, span)) = &found else {
                return Err(ApiError::BadRequest);
            };
            body = splice_model(&body, span.clone(), target);
        }
        let providers = rule.providers.clone();
        Ok(Prepared::Forward(Routed {
            set: set.clone(),
            providers,
            route,
            body,
        }))
    }

    /// Sends a prepared request through its providers with fallback; one usage record, which
    /// carries the request's token reservation (settled when the record is made).
    pub async fn send(
        &self,
        s: Routed,
        req: &Request,
        ctx: ForwardCtx<'_>,
        tokens: Option<crate::tokens::Reservation>,
    ) -> Result<Response, ApiError> {
        self.forward_to(s, req, ctx, tokens).await
    }

    async fn forward_to(
        &self,
        routed: Routed,
        req: &Request,
        ctx: ForwardCtx<'_>,
        tokens: Option<crate::tokens::Reservation>,
    ) -> Result<Response, ApiError> {
        let Routed {
            set,
            providers,
            route,
            mut body,
        } = routed;
        let (set, providers) = (&*set, &providers[..]);
        let started = self.clock.now();
        let first = set
            .upstreams
            .get(providers[0])
            .ok_or(ApiError::ProviderNotConfigured)?;
        let mut pending = first.start_meter(route, ctx, &body);
        if let Some(p) = pending.as_mut() {
            p.tokens = tokens;
        }
        // A metered chat or completions stream always carries the provider's usage (SPEC §10).
        if let Some(p) = pending.as_mut() {
            if route.asks_for_usage() {
                if let Some(asked) = crate::ledger::stream_usage::ask_for_usage(&body) {
                    body = asked;
                    p.strip_usage = true;
                }
            }
        }
        let plan = self.plan(set, providers);
        let mut attempts = 0u32;
        let mut last: Option<(&Upstream, usize, UpstreamError)> = None;
        for (n, &(i, retry)) in plan.iter().enumerate() {
            let Some(up) = set.upstreams.get(i) else {
                continue;
            };
            if retry > 0 {
                backoff(retry).await;
            }
            attempts += 1;
            let final_attempt = n + 1 == plan.len();
            match up.attempt(req, route, &body, ctx.request_id).await {
                Ok(x) => {
                    let status = x.status();
                    let bad = status == 429 || status >= 500;
                    self.outcome(set, i, !bad);
                    if bad {
                        let kind = if status == 429 {
                            FailureKind::TooMany
                        } else {
                            FailureKind::Server
                        };
                        set.counters[i].failure(kind);
                    }
                    if bad && !final_attempt {
                        note_fallback(set, &plan, n);
                        tracing::info!(target: "ibex::upstream", request_id = ctx.request_id,
                            provider = up.name(), status, "attempt failed; trying the next");
                        continue;
                    }
                    if let Some(p) = pending.as_mut() {
                        p.provider = Some(up.provider());
                        p.attempts = attempts;
                    }
                    set.counters[i].answered();
                    let mut resp = up
                        .deliver(x, route, ctx, started, pending)
                        .await
                        .map_err(ApiError::from)?;
                    resp.headers.push((
                        PROVIDER_HEADER,
                        HeaderValue::Owned(Bytes::copy_from_slice(up.name().as_bytes())),
                    ));
                    return Ok(resp);
                }
                Err(e) => {
                    self.outcome(set, i, false);
                    set.counters[i].failure(match e {
                        UpstreamError::Unavailable => FailureKind::Refused,
                        UpstreamError::Timeout => FailureKind::Timeout,
                    });
                    note_fallback(set, &plan, n);
                    up.attempt_failed(e, route, ctx, started);
                    last = Some((up, i, e));
                }
            }
        }
        let (up, _, err) = last.ok_or(ApiError::UpstreamUnavailable)?;
        if let Some(p) = pending.as_mut() {
            p.provider = Some(up.provider());
            p.attempts = attempts;
        }
        Err(ApiError::from(
            up.failed_metered(pending, err, route, ctx, started),
        ))
    }

    /// The attempts in order: each provider `1 + retries` times, providers whose breaker is
    /// open left out — unless that leaves nothing, then all of them.
    fn plan(&self, set: &Set, providers: &[usize]) -> Vec<(usize, u32)> {
        let now = self.now_ms();
        let mut breakers = set.breakers.borrow_mut();
        let open: Vec<usize> = providers
            .iter()
            .copied()
            .filter(|&i| {
                breakers.get_mut(i).is_some_and(|b| {
                    let reject = b.permit(now) == Permit::Reject;
                    set.counters[i].set_breaker(b.state().as_metric());
                    reject
                })
            })
            .collect();
        let usable: Vec<usize> = match providers.iter().filter(|i| !open.contains(i)).count() {
            0 => providers.to_vec(),
            _ => providers
                .iter()
                .copied()
                .filter(|i| !open.contains(i))
                .collect(),
        };
        let mut plan = Vec::with_capacity(usable.len());
        for i in usable {
            let retries = set.upstreams.get(i).map_or(0, Upstream::retries);
            plan.extend((0..=retries).map(|r| (i, r)));
        }
        plan
    }

    fn outcome(&self, set: &Set, provider: usize, ok: bool) {
        let now = self.now_ms();
        if let Some(b) = set.breakers.borrow_mut().get_mut(provider) {
            if ok {
                b.on_success();
            } else {
                b.on_failure(now);
            }
            set.counters[provider].set_breaker(b.state().as_metric());
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.clock.unix_ms_at(self.clock.now())).unwrap_or(0)
    }
}

fn build_set(
    generation: u64,
    table: Arc<Table>,
    settings: &RouterSettings,
    clock: &Rc<dyn Clock>,
    stats: &Arc<UpstreamStats>,
    meter: Option<&Rc<Meter>>,
) -> anyhow::Result<Set> {
    let mut upstreams = Vec::with_capacity(table.providers.len());
    for p in &table.providers {
        let config = UpstreamConfig {
            name: p.name.clone(),
            kind: p.kind,
            url: p.base_url.clone(),
            api_key: p.api_key.clone(),
            ca_file: settings.ca_file.clone(),
            timeout: p.timeout,
            idle_timeout: settings.idle_timeout,
            retries: p.retries,
            operator: p.operator.clone(),
        };
        let mut up = Upstream::with_stats(Rc::new(config), clock.clone(), stats.clone())
            .map_err(|e| e.context(format!("provider {:?}", p.name)))?;
        if let Some(m) = meter {
            up.set_meter(m.clone());
        }
        upstreams.push(up);
    }
    let probe_ms = |i: usize| {
        u64::try_from(table.providers[i].timeout.as_millis())
            .unwrap_or(u64::MAX)
            .saturating_add(1000)
    };
    let breakers = (0..table.providers.len())
        .map(|i| {
            Breaker::new(
                BREAKER_FAILURES,
                u64::try_from(BREAKER_OPEN.as_millis()).unwrap_or(5000),
                probe_ms(i),
            )
        })
        .collect();
    let counters = table
        .providers
        .iter()
        .map(|p| {
            let c = stats.provider(&p.name);
            // A new set starts with closed breakers.
            c.set_breaker(0);
            c
        })
        .collect();
    Ok(Set {
        generation,
        table,
        upstreams,
        breakers: RefCell::new(breakers),
        counters,
    })
}

/// Counts a failed attempt `n` of `plan` as a fallback when the next attempt is on another
/// provider (a retry on the same one is not).
fn note_fallback(set: &Set, plan: &[(usize, u32)], n: usize) {
    if let (Some(&(i, _)), Some(&(next, _))) = (plan.get(n), plan.get(n + 1)) {
        if next != i {
            set.counters[i].fallback();
        }
    }
}

/// Jittered backoff before a retry on the same provider: 25–75 ms times the retry number.
async fn backoff(retry: u32) {
    let ms = 25 + rand::random::<u64>() % 50;
    monoio::time::sleep(Duration::from_millis(ms * u64::from(retry))).await;
}

/// The request's top-level `model` and the byte range of its JSON string. `None` when the body
/// is not a JSON object, has no string `model`, or names `model` twice (which one a provider
/// would read is not ours to guess).
pub fn request_model(body: &[u8]) -> Option<(String, Range<usize>)> {
    #[derive(Deserialize)]
    struct Top<'a> {
        #[serde(borrow)]
        model: Option<&'a serde_json::value::RawValue>,
    }
    // A struct also deserialises from an array: only an object is a request.
    if body.trim_ascii_start().first() != Some(&b'{') {
        return None;
    }
    let top: Top<'_> = serde_json::from_slice(body).ok()?;
    let raw = top.model?;
    let model: String = serde_json::from_str(raw.get()).ok()?;
    let start = (raw.get().as_ptr() as usize).checked_sub(body.as_ptr() as usize)?;
    Some((model, start..start + raw.get().len()))
}

/// `body` with the JSON string at `span` replaced by `target`.
fn splice_model(body: &Bytes, span: Range<usize>, target: &str) -> Bytes {
    let quoted = serde_json::to_string(target).unwrap_or_default();
    let mut out = BytesMut::with_capacity(body.len() + quoted.len());
    out.extend_from_slice(&body[..span.start]);
    out.extend_from_slice(quoted.as_bytes());
    out.extend_from_slice(&body[span.end..]);
    out.freeze()
}

/// `GET /v1/models` with a providers file: the routes this caller may use, OpenAI's list shape.
fn models_list(table: &Table, policy: &dyn ModelPolicy) -> Response {
    let owner = |r: &crate::providers::Route| {
        r.providers
            .first()
            .and_then(|&i| table.providers.get(i))
            .map_or(String::new(), |p| p.name.clone())
    };
    let names = policy.exact_names();
    let mut ids: Vec<(String, String)> = Vec::new();
    for r in &table.routes {
        let target_ok = |m: &str| policy.allows(r.target(m));
        let pattern = r.pattern();
        if policy.allows(&pattern) && target_ok(&pattern) {
            ids.push((pattern, owner(r)));
        } else if r.prefix {
            // The names the lists allow that this route serves (the route that serves them).
            for n in names
                .iter()
                .filter(|n| table.route(n) == Some(r) && target_ok(n))
            {
                ids.push((n.clone(), owner(r)));
            }
        }
    }
    ids.dedup();
    let data: Vec<serde_json::Value> = ids
        .into_iter()
        .map(|(id, owner)| serde_json::json!({"id": id, "object": "model", "owned_by": owner}))
        .collect();
    let body = serde_json::json!({"object": "list", "data": data}).to_string();
    Response {
        status: 200,
        headers: vec![("Content-Type", HeaderValue::Static("application/json"))],
        body: Body::Full(Bytes::from(body)),
        close: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_model_and_its_span() {
        let body = br#"{"messages": [], "model" : "fast", "x": {"model": "inner"}}"#;
        let (m, span) = request_model(body).unwrap();
        assert_eq!(m, "fast");
        assert_eq!(&body[span.clone()], br#""fast""#);
        let out = splice_model(&Bytes::from_static(body), span, "gpt-4o-mini");
        assert_eq!(
            &out[..],
            br#"{"messages": [], "model" : "gpt-4o-mini", "x": {"model": "inner"}}"#
        );
        let (m, _) = request_model(br#"{"model":"gpt\u002d4"}"#).unwrap();
        assert_eq!(m, "gpt-4", "escapes are read as the provider reads them");
    }

    struct List(Vec<String>);

    impl ModelPolicy for List {
        fn allows(&self, model: &str) -> bool {
            ibex_proto::models::allows(&self.0, model)
        }
        fn exact_names(&self) -> Vec<String> {
            self.0
                .iter()
                .filter(|e| !e.ends_with('*'))
                .cloned()
                .collect()
        }
    }

    fn ids(resp: Response) -> Vec<String> {
        let Body::Full(b) = resp.body else { panic!() };
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn models_list_shows_only_what_the_lists_allow() {
        let file = r#"
[[provider]]
name = "p"
kind = "openai"
base_url = "http://127.0.0.1:1/v1"
api_key_env = "K"
[[route]]
model = "gpt-*"
providers = ["p"]
[[route]]
model = "fast"
target_model = "gpt-4o-mini"
providers = ["p"]
[[route]]
model = "cheap"
target_model = "gpt-3.5"
providers = ["p"]
[[route]]
model = "claude-*"
providers = ["p"]
"#;
        let table = Table::parse(file, Duration::from_secs(1), &|_| Some("k".into())).unwrap();
        assert_eq!(
            ids(models_list(&table, &AnyModel)),
            ["gpt-*", "fast", "cheap", "claude-*"]
        );
        let list = List(
            ibex_proto::models::normalize(&["fast", "GPT-4o-mini", "gpt-4o", "claude-*"]).unwrap(),
        );
        // `cheap` aliases a refused target; `gpt-*` is not allowed whole, but two names under it are.
        assert_eq!(
            ids(models_list(&table, &list)),
            ["gpt-4o-mini", "gpt-4o", "fast", "claude-*"]
        );
    }

    #[test]
    fn refuses_what_a_provider_could_read_differently() {
        for bad in [
            &br#"{"model":"a","model":"b"}"#[..],
            br#"{"model":1}"#,
            br#"["model"]"#,
            br#"{"model":"a""#,
            b"not json",
            br#"{"messages":[]}"#,
        ] {
            assert!(
                request_model(bad).is_none(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
