//! `last_used_at` bookkeeping, off the validation path.
//!
//! A validation only inserts the token id into a bounded in-memory set (a mutex held for one
//! insert; dropped when the set is full). A background task swaps the set out every
//! [`FLUSH_EVERY`] and writes one UPDATE per org. Best effort: lost on crash, never blocking.
//! The tokens trigger ignores `last_used_at`-only updates, so this never flushes any cache.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::watch;
use uuid::Uuid;

pub const FLUSH_EVERY: Duration = Duration::from_secs(1);
pub const MAX_PENDING: usize = 100_000;

#[derive(Clone, Default)]
pub struct UsageRecorder {
    pending: Arc<Mutex<HashMap<Uuid, Uuid>>>,
}

impl UsageRecorder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Notes that `token` (of `org`) was used now. Never blocks for long; drops when full.
    pub fn record(&self, org: Uuid, token: Uuid) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if pending.len() < MAX_PENDING || pending.contains_key(&token) {
            pending.insert(token, org);
        }
    }

    /// Takes everything recorded so far, grouped by org.
    pub fn take(&self) -> HashMap<Uuid, Vec<Uuid>> {
        let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        let mut by_org: HashMap<Uuid, Vec<Uuid>> = HashMap::new();
        for (token, org) in pending {
            by_org.entry(org).or_default().push(token);
        }
        by_org
    }

    /// Flushes every [`FLUSH_EVERY`] until shutdown, then once more.
    pub async fn run(self, pool: Pool, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(FLUSH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.flush(&pool).await,
                _ = shutdown.changed() => {
                    self.flush(&pool).await;
                    return;
                }
            }
        }
    }

    async fn flush(&self, pool: &Pool) {
        for (org, ids) in self.take() {
            if let Err(err) = crate::store::touch_last_used(pool, org, &ids).await {
                tracing::warn!(%org, tokens = ids.len(), error = %err, "last_used_at flush failed; dropped");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_by_org_dedups_and_is_bounded() {
        let usage = UsageRecorder::new();
        let (org_a, org_b) = (Uuid::new_v4(), Uuid::new_v4());
        let t = Uuid::new_v4();
        usage.record(org_a, t);
        usage.record(org_a, t);
        usage.record(org_b, Uuid::new_v4());
        let taken = usage.take();
        assert_eq!(taken[&org_a], vec![t]);
        assert_eq!(taken[&org_b].len(), 1);
        assert!(usage.take().is_empty());
        for _ in 0..MAX_PENDING + 5 {
            usage.record(org_a, Uuid::new_v4());
        }
        assert_eq!(usage.take()[&org_a].len(), MAX_PENDING);
    }
}
