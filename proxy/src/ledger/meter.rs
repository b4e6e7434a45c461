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

use super::prices::{Price, PriceBook, Prices};
use super::record::{clip, RecordRef, MAX_REQUEST_ID};
use super::Recorder;

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
            local: RefCell::new(LocalPrices::default()),
        })
    }
}

pub struct Meter {
    recorder: Recorder,
    prices: Arc<PriceBook>,
    local: RefCell<LocalPrices>,
}

/// A worker's view of the prices: its copy of the book and the last model it priced.
#[derive(Default)]
struct LocalPrices {
    book: (u64, Arc<Prices>),
    last_model: String,
    last_price: Option<Price>,
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
    /// Prompt tokens the provider read from / wrote to its cache, when it said.
    pub cache_read_tokens: u64,
    pub cache_creation_tokens: u64,
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

    /// The price of the worker's last model is kept: most requests of a worker name the same
    /// model as the one before, so a price costs a string compare, not a hash look-up.
    fn cost(&self, model: &str, prompt: u64, completion: u64) -> Option<f64> {
        let mut local = self.local.borrow_mut();
        let local = &mut *local;
        let seen = local.book.0;
        self.prices.current(&mut local.book);
        if local.book.0 != seen || local.last_model != model {
            local.last_price = local.book.1.get(model);
            local.last_model.clear();
            local.last_model.push_str(model);
        }
        Some(local.last_price?.cost(prompt, completion))
    }

    /// The model's prices in micro-USD per million tokens (input, output),
    /// rounded up; `None` = not priced. For the token limiter's USD budget.
    pub fn micro_usd_per_mtok(&self, model: &str) -> Option<(u64, u64)> {
        let input = self.cost(model, 1_000_000, 0)?;
        let output = self.cost(model, 0, 1_000_000)?;
        let micros = |usd: f64| (usd * 1e6).ceil().max(0.0) as u64;
        Some((micros(input), micros(output)))
    }

    /// Starts the record of one forwarded request (no allocation: the ids are copied inline,
    /// the body is kept by reference).
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
            done: false,
            request_id: InlineId::new(request_id),
            org,
            agent,
            token,
            route,
            request_body,
            seen: Seen::default(),
            model: None,
            streamed: false,
            strip_usage: false,
            tokens: None,
            provider: None,
            attempts: 0,
        }
    }
}

/// A request id (≤ [`MAX_REQUEST_ID`] bytes) held without a heap allocation.
struct InlineId {
    len: u8,
    bytes: [u8; MAX_REQUEST_ID],
}

impl InlineId {
    fn new(id: &str) -> Self {
        let id = clip(id, MAX_REQUEST_ID);
        let mut bytes = [0; MAX_REQUEST_ID];
        bytes[..id.len()].copy_from_slice(id.as_bytes());
        InlineId {
            len: u8::try_from(id.len()).unwrap_or(0),
            bytes,
        }
    }

    fn as_str(&self) -> &str {
        // Copied whole from a `&str` cut on a char boundary, so always UTF-8.
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or_default()
    }
}

/// One request's record in the making; recorded once, on [`Pending::finish`] or drop.
pub struct Pending {
    meter: Rc<Meter>,
    started: Instant,
    started_at_ms: i64,
    done: bool,
    request_id: InlineId,
    org: Uuid,
    agent: Uuid,
    token: Uuid,
    route: &'static str,
    request_body: Bytes,
    pub seen: Seen,
    /// The model the response named, if any.
    pub model: Option<String>,
    pub streamed: bool,
    /// The proxy added `include_usage` upstream: the usage-only chunk is not the client's.
    pub strip_usage: bool,
    /// The request's token reservation (SPEC §11), settled to this record's
    /// figures when it is made: the settled figure is the recorded one.
    pub tokens: Option<crate::tokens::Reservation>,
    /// The provider that answered (`None` = not known); shared with the upstream, not copied.
    pub provider: Option<Rc<str>>,
    /// Attempts it took (0 = not known).
    pub attempts: u32,
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
    /// Records what was seen; later calls (and the drop) do nothing. The one place a request's
    /// record is completed: anything that must happen once per metered request hooks in here.
    pub fn finish(&mut self) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let fallback;
        let model = match self.model.as_deref() {
            Some(m) => m,
            None => {
                fallback = request_model(&self.request_body).unwrap_or_default();
                fallback.as_str()
            }
        };
        let mut r = RecordRef {
            request_id: self.request_id.as_str().into(),
            org_id: self.org,
            agent_id: self.agent,
            token_id: self.token,
            model,
            route: self.route,
            status: self.seen.status,
            streamed: self.streamed,
            started_at_ms: self.started_at_ms,
            duration_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            provider: self.provider.as_deref().unwrap_or(""),
            attempts: self.attempts,
            cache_read_tokens: self.seen.cache_read_tokens,
            cache_creation_tokens: self.seen.cache_creation_tokens,
            ..RecordRef::default()
        };
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
            .cost(r.model, r.prompt_tokens, r.completion_tokens);
        self.meter.recorder.record_ref(&r);
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
