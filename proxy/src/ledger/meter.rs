//! A worker's end of the ledger as the forwarding code sees it: [`Meter::admits`] before a
//! metered route is forwarded, and one [`Pending`] per forwarded request, finished exactly once
//! with what was seen (its `Drop` records it if nobody finished it, so a request whose future is
//! dropped mid-way is still recorded).
//!
//! Estimates when the provider's usage never came (`usage_source = estimated`): prompt tokens
//! = request body bytes / 4 (rounded up; ≈4 bytes per token for English text in OpenAI's
//! tokenizers, JSON punctuation included, so it errs high); completion tokens = the number of
//! `data:` events streamed (OpenAI streams about one token per content chunk; `[DONE]` is not
//! counted) or, for a whole body, its bytes / 4. An upstream error
//! or timeout (status ≥ 400) without provider usage is recorded with 0 tokens.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use uuid::Uuid;

use super::prices::{PriceBook, Prices};
use super::{Recorder, UsageRecord};

/// The process-wide parts a worker's [`Meter`] is made from (`Send + Sync`).
#[derive(Clone)]
pub struct MeterFactory {
    pub ledger: Arc<super::Shared>,
    pub prices: Arc<PriceBook>,
}

impl MeterFactory {
    /// One worker's meter (call on the worker's thread).
    pub fn meter(&self) -> Rc<Meter> {
        Rc::new(Meter {
            recorder: super::Ledger::recorder_for(&self.ledger),
            prices: self.prices.clone(),
            local: RefCell::new((0, Arc::new(Prices::default()))),
        })
    }
}

pub struct Meter {
    recorder: Recorder,
    prices: Arc<PriceBook>,
    local: RefCell<(u64, Arc<Prices>)>,
}

/// What the forwarding code saw when a request ended.
#[derive(Debug, Default, Clone, Copy)]
pub struct Seen {
    /// The status the client got.
    pub status: u16,
    /// The provider's numbers, when they came.
    pub usage: Option<(u64, u64, u64)>,
    /// `data:` events with content streamed to the client.
    pub events: u64,
    pub body_bytes: u64,
    /// Anthropic's cache read and creation tokens, recorded apart from the prompt's.
    pub cache: (u64, u64),
}

impl Meter {
    /// False while the spool is full (→ 503 USAGE_UNAVAILABLE).
    pub fn admits(&self) -> bool {
        let ok = self.recorder.admit();
        if !ok {
            self.recorder
                .stats()
                .refused
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        ok
    }

    fn cost(&self, model: &str, prompt: u64, completion: u64) -> Option<f64> {
        let mut local = self.local.borrow_mut();
        self.prices.current(&mut local);
        local.1.cost(model, prompt, completion)
    }

    /// The model's prices in micro-USD per million tokens (input, output),
    /// rounded up; `None` = not priced. For the token limiter's USD budget.
    pub fn micro_usd_per_mtok(&self, model: &str) -> Option<(u64, u64)> {
        let input = self.cost(model, 1_000_000, 0)?;
        let output = self.cost(model, 0, 1_000_000)?;
        let micros = |usd: f64| (usd * 1e6).ceil().max(0.0) as u64;
        Some((micros(input), micros(output)))
    }

    /// Starts the record of one forwarded request.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        self: &Rc<Self>,
        request_id: &str,
        org: Uuid,
        agent: Uuid,
        token: Uuid,
        route: &'static str,
        request_body: Bytes,
    ) -> Pending {
        Pending {
            meter: self.clone(),
            started: Instant::now(),
            started_at_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
            record: Some(UsageRecord {
                request_id: request_id.to_owned(),
                org_id: org,
                agent_id: agent,
                token_id: token,
                route: route.to_owned(),
                ..Default::default()
            }),
            request_body,
            seen: Seen::default(),
            model: None,
            streamed: false,
            strip_usage: false,
            provider: None,
            attempts: 0,
            tokens: None,
        }
    }
}

/// One request's record in the making; recorded once, on [`Pending::finish`] or drop.
pub struct Pending {
    meter: Rc<Meter>,
    started: Instant,
    started_at_ms: i64,
    record: Option<UsageRecord>,
    request_body: Bytes,
    pub seen: Seen,
    /// The model the response named, if any.
    pub model: Option<String>,
    pub streamed: bool,
    /// The proxy added `include_usage` upstream: the usage-only chunk is not the client's.
    pub strip_usage: bool,
    /// The provider that answered (or was tried last), SPEC §12.
    pub provider: Option<Box<str>>,
    /// Attempts made, fallbacks and retries included.
    pub attempts: u32,
    /// The request's token reservation (SPEC §11), settled to this record's
    /// figures when it is made: the settled figure is the recorded one.
    pub tokens: Option<crate::tokens::Reservation>,
}

fn quarter(bytes: u64) -> u64 {
    bytes.div_ceil(4)
}

/// The top-level `"model"` of a JSON request body.
fn request_model(body: &[u8]) -> Option<String> {
    let mut scanner = crate::upstream::usage::JsonScanner::new();
    scanner.feed(body);
    scanner.found.model
}

impl Pending {
    /// Records what was seen; later calls (and the drop) do nothing.
    pub fn finish(&mut self) {
        let Some(mut r) = self.record.take() else {
            return;
        };
        r.status = self.seen.status;
        r.provider = self.provider.take().map(String::from).unwrap_or_default();
        r.attempts = self.attempts;
        (r.cache_read_tokens, r.cache_creation_tokens) = self.seen.cache;
        r.streamed = self.streamed;
        r.started_at_ms = self.started_at_ms;
        r.duration_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        r.model = self
            .model
            .take()
            .or_else(|| request_model(&self.request_body))
            .unwrap_or_default();
        match self.seen.usage {
            Some((prompt, completion, total)) => {
                r.prompt_tokens = prompt;
                r.completion_tokens = completion;
                r.total_tokens = if total == 0 {
                    prompt + completion
                } else {
                    total
                };
            }
            // An upstream error or timeout the provider did not meter: nothing was generated.
            None if r.status >= 400 => r.estimated = true,
            None => {
                r.estimated = true;
                r.prompt_tokens = quarter(self.request_body.len() as u64);
                r.completion_tokens = if self.streamed {
                    self.seen.events
                } else {
                    quarter(self.seen.body_bytes)
                };
                r.total_tokens = r.prompt_tokens + r.completion_tokens;
            }
        }
        r.cost_usd = self
            .meter
            .cost(&r.model, r.prompt_tokens, r.completion_tokens);
        self.meter.recorder.record(&r);
        if let Some(reservation) = self.tokens.take() {
            reservation.settle(r.total_tokens, r.cost_usd);
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.finish();
    }
}
