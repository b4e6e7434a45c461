//! A hash map with a hard entry cap and O(1) eviction, the storage under every
//! per-core cache and the flood guard. Entries live in a dense `Vec` indexed by
//! the map, so a victim is two random slots away: of two distinct sampled
//! entries the one that expires first goes ("power of two choices", close to LRU-by-TTL
//! at the cost of two random reads). Expiry itself is the caller's business:
//! values tell their deadline through [`Expiring`].
//!
//! Single-threaded on purpose: one instance per worker, no locks.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::time::Instant;

pub trait Expiring {
    fn deadline(&self) -> Instant;
}

pub struct BoundedMap<K, V, S> {
    index: HashMap<K, usize, S>,
    slots: Vec<(K, V)>,
    cap: usize,
    rng: u64,
}

impl<K, V, S> BoundedMap<K, V, S>
where
    K: Hash + Eq + Copy,
    V: Expiring,
    S: BuildHasher + Default,
{
    pub fn new(cap: usize) -> Self {
        Self::with_seed(cap, rand::random::<u64>())
    }

    /// Like [`BoundedMap::new`] with the victim sampling seeded (tests).
    pub fn with_seed(cap: usize, seed: u64) -> Self {
        Self {
            index: HashMap::with_hasher(S::default()),
            slots: Vec::new(),
            cap: cap.max(1),
            rng: seed | 1,
        }
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn get(&self, key: &K) -> Option<&V> {
        self.index.get(key).map(|&i| &self.slots[i].1)
    }

    /// Inserts or replaces; returns the entry evicted to make room, if any.
    pub fn insert(&mut self, key: K, value: V) -> Option<(K, V)> {
        if let Some(&i) = self.index.get(&key) {
            self.slots[i].1 = value;
            return None;
        }
        let evicted = if self.slots.len() >= self.cap {
            let victim = self.pick_victim();
            let vk = self.slots[victim].0;
            self.remove(&vk).map(|v| (vk, v))
        } else {
            None
        };
        self.index.insert(key, self.slots.len());
        self.slots.push((key, value));
        evicted
    }

    pub fn remove(&mut self, key: &K) -> Option<V> {
        let i = self.index.remove(key)?;
        let (_, v) = self.slots.swap_remove(i);
        if let Some((moved, _)) = self.slots.get(i) {
            self.index.insert(*moved, i);
        }
        Some(v)
    }

    /// Removes every entry `keep` refuses; returns the removed keys.
    pub fn retain(&mut self, mut keep: impl FnMut(&K, &V) -> bool) -> Vec<K> {
        let gone: Vec<K> = self
            .slots
            .iter()
            .filter(|(k, v)| !keep(k, v))
            .map(|(k, _)| *k)
            .collect();
        for k in &gone {
            self.remove(k);
        }
        gone
    }

    fn next_rand(&mut self) -> usize {
        // xorshift64: cheap and good enough to spread victims.
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x as usize
    }

    /// Two distinct slots (when there are two), the earlier deadline goes:
    /// sampling the same slot twice would make it a victim whatever it holds.
    fn pick_victim(&mut self) -> usize {
        let n = self.slots.len();
        let a = self.next_rand() % n;
        if n < 2 {
            return a;
        }
        let b = (a + 1 + self.next_rand() % (n - 1)) % n;
        if self.slots[a].1.deadline() <= self.slots[b].1.deadline() {
            a
        } else {
            b
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::hash_map::RandomState;
    use std::time::Duration;

    struct V(Instant);
    impl Expiring for V {
        fn deadline(&self) -> Instant {
            self.0
        }
    }

    #[test]
    fn never_exceeds_its_cap_and_stays_consistent() {
        let t = Instant::now();
        let mut m: BoundedMap<u32, V, RandomState> = BoundedMap::new(100);
        let mut evictions = 0;
        for i in 0..10_000u32 {
            if m.insert(i, V(t + Duration::from_secs(u64::from(i))))
                .is_some()
            {
                evictions += 1;
            }
            assert!(m.len() <= 100);
        }
        assert_eq!(evictions, 10_000 - 100);
        // Every indexed key points at its own slot.
        for (k, &i) in &m.index {
            assert_eq!(m.slots[i].0, *k);
        }
        assert_eq!(m.index.len(), m.slots.len());
    }

    #[test]
    fn prefers_evicting_what_expires_first() {
        let t = Instant::now();
        // Seeded: the same picks on every run.
        let mut m: BoundedMap<u32, V, RandomState> = BoundedMap::with_seed(64, 0x9e37_79b9);
        // One long-lived entry among short-lived ones survives most churn.
        m.insert(0, V(t + Duration::from_secs(3600)));
        for i in 1..64 {
            m.insert(i, V(t));
        }
        let mut survived = 0;
        for round in 0..200u32 {
            m.insert(1000 + round, V(t));
            if m.get(&0).is_some() {
                survived += 1;
            }
        }
        assert!(survived > 150, "long-lived entry survived {survived}/200");
        // The two picks are distinct, so the one long-lived entry is always
        // compared with a short-lived one, and always kept.
        assert_eq!(survived, 200);
    }

    #[test]
    fn the_two_picks_are_distinct_slots() {
        let t = Instant::now();
        for seed in 0..64 {
            let mut m: BoundedMap<u32, V, RandomState> = BoundedMap::with_seed(2, seed);
            m.insert(0, V(t + Duration::from_secs(60)));
            m.insert(1, V(t));
            // Of two entries, the earlier deadline is always the victim.
            let (k, _) = m.insert(2, V(t)).unwrap();
            assert_eq!(k, 1, "seed {seed}");
        }
        let mut one: BoundedMap<u32, V, RandomState> = BoundedMap::with_seed(1, 7);
        one.insert(0, V(t));
        assert_eq!(one.insert(1, V(t)).map(|(k, _)| k), Some(0));
    }

    #[test]
    fn remove_and_retain() {
        let t = Instant::now();
        let mut m: BoundedMap<u32, V, RandomState> = BoundedMap::new(10);
        for i in 0..10 {
            m.insert(i, V(t));
        }
        assert!(m.remove(&3).is_some());
        assert!(m.remove(&3).is_none());
        let gone = m.retain(|k, _| k % 2 == 0);
        assert_eq!(gone.len(), 4); // 1, 5, 7, 9
        assert_eq!(m.len(), 5);
        for k in [0, 2, 4, 6, 8] {
            assert!(m.get(&k).is_some());
        }
    }
}
