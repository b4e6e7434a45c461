//! `IBEX_MAX_CONNS_PER_IP`: open connections per client address (IPv4, IPv6
//! /64), counted across every worker of the proxy, so one address cannot take
//! every connection slot. Touched twice per connection (accept and close),
//! never per request.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::addr::bucket;
use crate::metrics::ListenerStats;

const SHARDS: usize = 16;

/// The shared counts. `limit` 0 means no cap.
pub struct PerIpLimit {
    limit: u32,
    shards: Box<[Mutex<HashMap<IpAddr, u32>>]>,
    hasher: RandomState,
    stats: Arc<ListenerStats>,
}

/// One open connection's slot; gives it back when dropped.
pub struct Slot {
    owner: Arc<PerIpLimit>,
    key: IpAddr,
}

impl PerIpLimit {
    pub fn new(limit: u32, stats: Arc<ListenerStats>) -> Arc<Self> {
        Arc::new(Self {
            limit,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            stats,
        })
    }

    fn shard(&self, key: &IpAddr) -> MutexGuard<'_, HashMap<IpAddr, u32>> {
        let i = (self.hasher.hash_one(key) as usize) % self.shards.len();
        // The critical sections only add or subtract: nothing to poison.
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot for a connection from `peer`, or `None` (counted) when the
    /// address already holds `limit` connections.
    pub fn acquire(self: &Arc<Self>, peer: IpAddr) -> Option<Slot> {
        let key = bucket(peer);
        if self.limit > 0 {
            let mut counts = self.shard(&key);
            let open = counts.entry(key).or_insert(0);
            if *open >= self.limit {
                drop(counts);
                self.stats.per_ip_refused.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            *open += 1;
        }
        Some(Slot {
            owner: self.clone(),
            key,
        })
    }

    /// Connections refused at accept so far.
    pub fn refused(&self) -> u64 {
        self.stats.per_ip_refused.load(Ordering::Relaxed)
    }

    /// Addresses holding at least one connection.
    pub fn addresses(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.owner.limit == 0 {
            return;
        }
        let mut counts = self.owner.shard(&self.key);
        if let Some(open) = counts.get_mut(&self.key) {
            *open -= 1;
            if *open == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn caps_per_address_and_gives_slots_back() {
        let cap = PerIpLimit::new(2, Arc::default());
        let a = ip("10.9.0.1");
        let s1 = cap.acquire(a).unwrap();
        let s2 = cap.acquire(a).unwrap();
        assert!(cap.acquire(a).is_none());
        assert_eq!(cap.refused(), 1);
        // Another address, and another /64 host of a v6 client, are separate.
        let other = cap.acquire(ip("10.9.0.2")).unwrap();
        let v6a = cap.acquire(ip("2001:db8::1")).unwrap();
        let v6b = cap.acquire(ip("2001:db8::2")).unwrap();
        assert!(cap.acquire(ip("2001:db8::3")).is_none(), "one /64");
        drop(s1);
        let s3 = cap.acquire(a).unwrap();
        drop((s2, s3, other, v6a, v6b));
        assert_eq!(cap.addresses(), 0, "no entry outlives its connections");
    }

    #[test]
    fn zero_is_no_cap() {
        let cap = PerIpLimit::new(0, Arc::default());
        let slots: Vec<_> = (0..1000)
            .map(|_| cap.acquire(ip("10.9.0.9")).unwrap())
            .collect();
        assert_eq!(slots.len(), 1000);
        assert_eq!(cap.addresses(), 0);
    }
}
