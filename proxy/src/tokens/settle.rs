//! A worker's pending settles: folded into later traffic so a settle costs
//! no round trip of its own.
//!
//! A request's record made ([`super::Reservation::settle`]), its settle is
//! queued on the worker under its org. The next reservation of that org on
//! this worker carries the org's pending settles in its own script call
//! (applied first, then the decision: [`super::script::RESERVE`]). Settles no
//! reservation picked up within `IBEX_TOKEN_SETTLE_DELAY` (5 ms) are flushed
//! by a worker-local timer: one multi-settle call per org (all of an org's
//! keys share its hash tag, so one call is one cluster slot), all orgs'
//! calls issued at once on the pipelined connection. At [`MAX_PENDING`] the
//! queue is flushed at once (memory bounded).
//!
//! **The ceiling stays exact.** A pending settle only returns unused tokens
//! later: until it is applied the reservation counts its worst case, which
//! is conservative — it can refuse a request that would have fit a few ms
//! later, never admit one that does not fit.
//!
//! **Idempotent, retried.** Each settle deletes its reservation key first
//! and is a no-op if it is gone, so a call retried after a lost reply (or
//! sent twice) applies each settle once. A failed call (timeout, breaker,
//! error reply) is retried with backoff ([`SETTLE_ATTEMPTS`], from 100 ms
//! doubling); after the last the reservation stands until its window ends
//! (a minute expires; a month keeps the over-count), counted in
//! `settle_failures`.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use futures::future::LocalBoxFuture;
use uuid::Uuid;

use super::call::{CallBuf, KeySet};
use super::TokenStats;
use crate::ratelimit::eval::{Frame, Runner, Script};

/// Settles a worker holds at most before it flushes them all at once.
pub const MAX_PENDING: usize = 256;
/// Settles one script call carries at most (6 keys each).
pub const MAX_PER_CALL: usize = 32;
/// Attempts of one settle call before the reservations are left to their TTL.
pub const SETTLE_ATTEMPTS: u32 = 5;
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// Where script calls go: the worker's [`Runner`], or a fake in tests.
pub trait Sink {
    fn eval<'a>(
        &'a self,
        script: &'a Script,
        keys: &'a [&'a [u8]],
        args: &'a [&'a [u8]],
    ) -> LocalBoxFuture<'a, Result<Frame, &'static str>>;
}

impl Sink for Runner {
    fn eval<'a>(
        &'a self,
        script: &'a Script,
        keys: &'a [&'a [u8]],
        args: &'a [&'a [u8]],
    ) -> LocalBoxFuture<'a, Result<Frame, &'static str>> {
        Box::pin(Runner::eval(self, script, keys, args))
    }
}

/// One reservation's settle: where its keys are, and the adjustment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settle {
    pub keys: KeySet,
    /// The keys the reservation counted in (bit `i` = key `i + 1`).
    pub mask: u8,
    /// Tokens used minus reserved.
    pub delta: i64,
    /// The same in micro-USD.
    pub delta_usd: i64,
}

impl Settle {
    /// Appends the settle's 6 keys.
    pub fn push_keys(&self, call: &mut CallBuf, org: &[u8]) {
        call.keys(org, &self.keys);
    }

    /// Appends the settle's 3 arguments.
    pub fn push_args(&self, call: &mut CallBuf) {
        call.int(self.delta);
        call.int(self.delta_usd);
        call.num(u64::from(self.mask));
    }
}

#[derive(Default)]
struct State {
    orgs: HashMap<Uuid, Vec<Settle>>,
    total: usize,
}

/// One worker's queue of pending settles (see the module doc).
pub struct Settles {
    sink: Rc<dyn Sink>,
    script: Script,
    stats: Arc<TokenStats>,
    delay: Duration,
    state: RefCell<State>,
    armed: Cell<bool>,
}

impl Settles {
    pub fn new(sink: Rc<dyn Sink>, stats: Arc<TokenStats>, delay: Duration) -> Rc<Self> {
        Rc::new(Self {
            sink,
            script: Script::new(super::script::SETTLE),
            stats,
            delay,
            state: RefCell::default(),
            armed: Cell::new(false),
        })
    }

    /// Settles waiting on this worker.
    pub fn pending(&self) -> usize {
        self.state.borrow().total
    }

    /// Queues `settle` under `org`: arms the timer, or flushes everything
    /// now at [`MAX_PENDING`].
    pub fn push(self: &Rc<Self>, org: Uuid, settle: Settle) {
        let total = {
            let mut state = self.state.borrow_mut();
            state.orgs.entry(org).or_default().push(settle);
            state.total += 1;
            state.total
        };
        if total >= MAX_PENDING {
            monoio::spawn(self.clone().flush());
        } else if !self.armed.replace(true) {
            let this = self.clone();
            monoio::spawn(async move {
                monoio::time::sleep(this.delay).await;
                this.armed.set(false);
                this.flush().await;
            });
        }
    }

    /// Takes up to [`MAX_PER_CALL`] of `org`'s pending settles, for a
    /// reservation's call to carry.
    pub fn take(&self, org: Uuid) -> Vec<Settle> {
        let mut state = self.state.borrow_mut();
        let Some(queue) = state.orgs.get_mut(&org) else {
            return Vec::new();
        };
        let batch = if queue.len() <= MAX_PER_CALL {
            let batch = std::mem::take(queue);
            state.orgs.remove(&org);
            batch
        } else {
            queue.drain(..MAX_PER_CALL).collect()
        };
        state.total -= batch.len();
        batch
    }

    /// Sends every pending settle: one call per org (per [`MAX_PER_CALL`]),
    /// all issued together; failed ones retried with backoff.
    pub async fn flush(self: Rc<Self>) {
        let batches: Vec<(Uuid, Vec<Settle>)> = {
            let mut state = self.state.borrow_mut();
            state.total = 0;
            let mut out = Vec::with_capacity(state.orgs.len());
            for (org, mut queue) in state.orgs.drain() {
                while queue.len() > MAX_PER_CALL {
                    out.push((org, queue.drain(..MAX_PER_CALL).collect()));
                }
                out.push((org, queue));
            }
            out
        };
        if batches.is_empty() {
            return;
        }
        let sends = batches
            .into_iter()
            .map(|(org, batch)| self.clone().send(org, batch, 1));
        futures::future::join_all(sends).await;
    }

    /// Retries `batch` (a reservation's call that carried it failed).
    pub fn retry(self: &Rc<Self>, org: Uuid, batch: Vec<Settle>) {
        monoio::spawn(self.clone().send(org, batch, 2));
    }

    /// Counts `n` settles applied by a reservation's call.
    pub fn applied(&self, n: usize) {
        self.stats.settled.fetch_add(n as u64, Relaxed);
    }

    /// One multi-settle call for `batch`, from attempt `first` (a retry
    /// waits its backoff first).
    async fn send(self: Rc<Self>, org: Uuid, batch: Vec<Settle>, first: u32) {
        let mut text = [0u8; 36];
        let org_text = org.hyphenated().encode_lower(&mut text).as_bytes();
        let mut call = CallBuf::new(batch.len(), 3 * batch.len());
        for s in &batch {
            s.push_keys(&mut call, org_text);
        }
        for s in &batch {
            s.push_args(&mut call);
        }
        let parts = call.parts();
        let (keys, args) = parts.split_at(call.key_count());
        let mut backoff = FIRST_BACKOFF * 2u32.pow(first.saturating_sub(2));
        for attempt in first..=SETTLE_ATTEMPTS {
            if attempt > 1 {
                monoio::time::sleep(backoff).await;
                backoff *= 2;
            }
            self.stats.calls.fetch_add(1, Relaxed);
            match self.sink.eval(&self.script, keys, args).await {
                Ok(_) => {
                    self.applied(batch.len());
                    return;
                }
                Err(why) if attempt == SETTLE_ATTEMPTS => {
                    self.stats
                        .settle_failures
                        .fetch_add(batch.len() as u64, Relaxed);
                    tracing::warn!(
                        reason = why,
                        settles = batch.len(),
                        "token settle failed; the reservations stand until their window ends"
                    );
                }
                Err(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokens::call::Rid;

    /// One call's keys and arguments.
    type Sent = (Vec<Vec<u8>>, Vec<Vec<u8>>);

    /// Records every call's keys and arguments; fails the first `fail` calls.
    #[derive(Default)]
    struct Fake {
        calls: RefCell<Vec<Sent>>,
        fail: Cell<u32>,
    }

    impl Sink for Fake {
        fn eval<'a>(
            &'a self,
            _: &'a Script,
            keys: &'a [&'a [u8]],
            args: &'a [&'a [u8]],
        ) -> LocalBoxFuture<'a, Result<Frame, &'static str>> {
            self.calls.borrow_mut().push((
                keys.iter().map(|k| k.to_vec()).collect(),
                args.iter().map(|a| a.to_vec()).collect(),
            ));
            let fail = self.fail.get();
            Box::pin(async move {
                if fail > 0 {
                    self.fail.set(fail - 1);
                    Err("timeout")
                } else {
                    Ok(Frame::Integer(1))
                }
            })
        }
    }

    fn settle(n: u64, delta: i64) -> Settle {
        Settle {
            keys: KeySet {
                agent: Uuid::from_u128(7),
                minute: 100,
                month: 202_612,
                rid: Rid { prefix: 1, n },
            },
            mask: 0b11,
            delta,
            delta_usd: 0,
        }
    }

    fn run<F: std::future::Future>(f: F) -> F::Output {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    /// Polls `cond` every millisecond, 10 s at most (no timing assumed).
    async fn until(what: &str, cond: impl Fn() -> bool) {
        for _ in 0..10_000 {
            if cond() {
                return;
            }
            monoio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("timed out waiting for {what}");
    }

    fn queue(delay: Duration) -> (Rc<Fake>, Rc<Settles>) {
        let fake = Rc::new(Fake::default());
        let q = Settles::new(fake.clone(), Arc::default(), delay);
        (fake, q)
    }

    const A: Uuid = Uuid::from_u128(0xa);
    const B: Uuid = Uuid::from_u128(0xb);

    #[test]
    fn a_reservation_takes_its_orgs_pending_settles_and_no_call_is_made() {
        run(async {
            let (fake, q) = queue(Duration::from_millis(20));
            q.push(A, settle(1, -3));
            q.push(A, settle(2, -4));
            q.push(B, settle(3, -5));
            let taken = q.take(A);
            assert_eq!(taken, [settle(1, -3), settle(2, -4)]);
            assert_eq!(q.pending(), 1);
            assert!(q.take(A).is_empty());
            // The timer then sends only B's, in one call.
            until("the timer's flush", || q.stats.settled.load(Relaxed) == 1).await;
            let calls = fake.calls.borrow();
            assert_eq!(calls.len(), 1, "one call for the one org left");
            assert_eq!(calls[0].0.len(), 6);
            assert_eq!(calls[0].1, [b"-5".to_vec(), b"0".to_vec(), b"3".to_vec()]);
            assert_eq!(q.pending(), 0);
        });
    }

    #[test]
    fn the_timer_flushes_one_call_per_org() {
        run(async {
            let (fake, q) = queue(Duration::from_millis(5));
            for n in 0..3 {
                q.push(A, settle(n, -1));
            }
            q.push(B, settle(9, -2));
            assert!(
                fake.calls.borrow().is_empty(),
                "nothing sent before the delay"
            );
            until("the timer's flush", || q.stats.settled.load(Relaxed) == 4).await;
            let calls = fake.calls.borrow();
            let mut sizes: Vec<usize> = calls.iter().map(|(k, _)| k.len() / 6).collect();
            sizes.sort_unstable();
            assert_eq!(sizes, [1, 3]);
            // Every key of a call shares the call's org hash tag (one cluster slot).
            for (keys, args) in calls.iter() {
                let tag = &keys[0][..keys[0].iter().position(|&b| b == b'}').unwrap()];
                assert!(keys.iter().all(|k| k.starts_with(tag)));
                assert_eq!(args.len(), keys.len() / 2);
            }
            assert_eq!(q.pending(), 0);
        });
    }

    #[test]
    fn at_the_bound_everything_is_flushed_at_once() {
        run(async {
            // A delay far beyond the test: only the bound can send.
            let (fake, q) = queue(Duration::from_secs(3600));
            for n in 0..MAX_PENDING as u64 - 1 {
                q.push(A, settle(n, -1));
            }
            monoio::time::sleep(Duration::from_millis(5)).await;
            assert!(fake.calls.borrow().is_empty());
            q.push(B, settle(999, -1));
            until("the flush at the bound", || {
                q.stats.settled.load(Relaxed) == MAX_PENDING as u64
            })
            .await;
            assert_eq!(q.pending(), 0, "drained at the bound");
            let calls = fake.calls.borrow();
            let sent: usize = calls.iter().map(|(k, _)| k.len() / 6).sum();
            assert_eq!(sent, MAX_PENDING);
            assert!(calls.iter().all(|(k, _)| k.len() / 6 <= MAX_PER_CALL));
            // A's 255 in ⌈255 / 32⌉ calls, B's one in one.
            assert_eq!(calls.len(), (MAX_PENDING - 1).div_ceil(MAX_PER_CALL) + 1);
        });
    }

    #[test]
    fn a_failed_call_is_retried_with_the_same_settles_then_given_up() {
        run(async {
            let (fake, q) = queue(Duration::from_millis(1));
            fake.fail.set(2);
            q.push(A, settle(1, -3));
            // Attempts at ~1 ms, +100 ms, +200 ms.
            until("the third attempt", || q.stats.settled.load(Relaxed) == 1).await;
            {
                let calls = fake.calls.borrow();
                assert_eq!(calls.len(), 3, "two failures, then success");
                assert!(calls.iter().all(|c| *c == calls[0]), "the same call again");
            }
            assert_eq!(q.stats.settled.load(Relaxed), 1);
            assert_eq!(q.stats.settle_failures.load(Relaxed), 0);

            // A reservation's call that carried settles failed: retried from attempt 2.
            fake.fail.set(u32::MAX);
            q.retry(B, vec![settle(2, -1), settle(3, -1)]);
            // Waits 100 + 200 + 400 + 800 ms over attempts 2..=5.
            until("the last attempt", || {
                q.stats.settle_failures.load(Relaxed) == 2
            })
            .await;
            assert_eq!(fake.calls.borrow().len(), 3 + 4);
            assert_eq!(q.stats.settle_failures.load(Relaxed), 2);
            assert_eq!(q.stats.settled.load(Relaxed), 1);
        });
    }
}
