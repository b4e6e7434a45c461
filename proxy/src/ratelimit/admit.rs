//! The local part of a check, decided without awaiting: admit from this
//! worker's lease of the org's budget, refuse once the budget is spent,
//! count alone in Redis, or wait for the one acquisition in flight (which
//! runs in its own task and wakes its waiters). Lease arithmetic is in
//! [`super::lease`].

use std::rc::Rc;

use futures::channel::oneshot;
use uuid::Uuid;

use super::breaker::Permit;
use super::decision::Failure;
use super::lease::{self, Lease, MAX_ENTRIES};
use super::state::{Entry, Outcome, Shared};
use super::window::Window;

/// What a check does next, decided without awaiting.
pub(super) enum Step {
    /// Admitted from the lease, with this remaining.
    Admit(u32),
    /// The budget is spent in this window.
    Refuse,
    /// Count this check alone in Redis (no lease).
    Direct,
    /// Wait for the acquisition in flight, then decide again.
    Wait(oneshot::Receiver<Outcome>),
    FailOpen(Failure),
}

impl Shared {
    /// The local part of a check: use the lease, or say what to wait for.
    /// Never awaits, so no borrow is held across a suspension point.
    pub(super) fn step(
        self: &Rc<Self>,
        org: &Uuid,
        window: &Window,
        wall: u64,
        limit: u32,
        first: bool,
    ) -> Step {
        let mut map = self.leases.borrow_mut();
        if !map.contains_key(org) {
            lease::make_room(
                &mut map,
                MAX_ENTRIES,
                window.number,
                |e: &Entry| e.lease.window(),
                |e: &Entry| e.lease.in_flight(),
            );
        }
        let entry = map.entry(*org).or_insert_with(|| Entry {
            lease: Lease::new(window.number, wall),
            waiters: Vec::new(),
        });
        if entry.lease.window() != window.number {
            // Waiters of the old window's acquisition decide again.
            entry.lease.roll(window.number);
            entry.waiters.clear();
        }
        if first {
            entry.lease.observe(wall);
        }
        if entry.lease.take() {
            let remaining = entry.lease.remaining(limit);
            if let Some(n) = entry.lease.prefetch(limit) {
                if self.breaker.borrow_mut().permit(self.mono_ms()) != Permit::Reject {
                    entry.lease.begin();
                    monoio::spawn(self.clone().acquire(*org, *window, n, limit));
                }
                self.publish_breaker();
            }
            return Step::Admit(remaining);
        }
        if entry.lease.size() > 1 && entry.lease.exhausted(limit) {
            return Step::Refuse;
        }
        if entry.lease.in_flight() {
            let (tx, rx) = oneshot::channel();
            entry.waiters.push(tx);
            return Step::Wait(rx);
        }
        let n = entry.lease.want(limit);
        if n <= 1 {
            return Step::Direct;
        }
        let permit = self.breaker.borrow_mut().permit(self.mono_ms());
        self.publish_breaker();
        if permit == Permit::Reject {
            return Step::FailOpen(Failure::BreakerOpen);
        }
        entry.lease.begin();
        let (tx, rx) = oneshot::channel();
        entry.waiters.push(tx);
        // In its own task, so a check whose future is dropped cannot leave
        // the acquisition (and its waiters) hanging.
        monoio::spawn(self.clone().acquire(*org, *window, n, limit));
        Step::Wait(rx)
    }

    /// Leases `n` units of `org`'s `window` and wakes the checks waiting.
    async fn acquire(self: Rc<Self>, org: Uuid, window: Window, n: u64, limit: u32) {
        let outcome = self.call(&org, &window, n, self.mono_ms()).await;
        let waiters = {
            let mut map = self.leases.borrow_mut();
            match map.get_mut(&org) {
                Some(entry) if entry.lease.window() == window.number => {
                    match outcome {
                        Ok(count) => {
                            entry.lease.apply(window.number, count, n, limit);
                        }
                        Err(_) => entry.lease.abort(window.number),
                    }
                    std::mem::take(&mut entry.waiters)
                }
                // Evicted or rolled over: the units are lost (conservative).
                _ => Vec::new(),
            }
        };
        let outcome = outcome.map(|_| ());
        for waiter in waiters {
            let _ = waiter.send(outcome);
        }
    }
}
