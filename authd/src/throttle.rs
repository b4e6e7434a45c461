//! Failure throttles: per (token id, client address) for cold validations, per caller address
//! for the operator key.
//!
//! Each key has a small bucket of failed attempts ([`BURST`]) refilled at one per [`REFILL`].
//! A cold validation whose (id, client) bucket is empty is refused before any database or Argon2
//! work (gRPC `RESOURCE_EXHAUSTED`: undecided, try later — never "invalid"). The key includes the
//! client's address ([`ClientKey`]: an IPv4 address or an IPv6 /64), so someone guessing at an id
//! from one address never refuses the holder of the right secret at another (SPEC §6). A success
//! empties the record. Unknown ids are throttled exactly like known ones, so the throttle says
//! nothing about which ids exist.
//!
//! Memory is bounded at [`MAX_TRACKED`] keys; when full, fully refilled records are dropped, and
//! if none are, new keys go untracked (the Argon2 pool's admission limit still bounds the cost).
//! Time is passed in, so tests control the clock.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use uuid::Uuid;

/// Where a guess comes from: an IPv4 address, or the /64 an IPv6 address belongs to (one host
/// commonly holds a whole /64). `Unknown` when no address was given or it did not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientKey {
    V4([u8; 4]),
    V6Prefix([u8; 8]),
    Unknown,
}

impl ClientKey {
    pub fn from_ip(ip: IpAddr) -> ClientKey {
        match ip {
            IpAddr::V4(v4) => ClientKey::V4(v4.octets()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => ClientKey::V4(v4.octets()),
                None => {
                    let mut prefix = [0u8; 8];
                    prefix.copy_from_slice(&v6.octets()[..8]);
                    ClientKey::V6Prefix(prefix)
                }
            },
        }
    }

    /// `1.2.3.4`, `1.2.3.4:56`, `::1`, `[::1]:56`; anything else is `None`.
    pub fn parse(text: &str) -> Option<ClientKey> {
        let text = text.trim();
        if let Ok(ip) = text.parse::<IpAddr>() {
            return Some(ClientKey::from_ip(ip));
        }
        text.parse::<SocketAddr>()
            .ok()
            .map(|addr| ClientKey::from_ip(addr.ip()))
    }
}

/// The cold-validation throttle: one bucket per (token id, client).
pub type GuessThrottle = FailureThrottle<(Uuid, ClientKey)>;
/// The operator-key throttle: one bucket per caller address.
pub type AdminThrottle = FailureThrottle<ClientKey>;

pub const BURST: u32 = 5;
pub const REFILL: Duration = Duration::from_secs(1);
pub const MAX_TRACKED: usize = 65_536;

#[derive(Clone, Copy)]
struct Bucket {
    tokens: u32,
    at: Instant,
}

impl Bucket {
    fn refilled(self, now: Instant) -> Bucket {
        let elapsed = now.saturating_duration_since(self.at);
        let gained = (elapsed.as_millis() / REFILL.as_millis().max(1)) as u64;
        if gained == 0 {
            return self;
        }
        let tokens = (u64::from(self.tokens) + gained).min(u64::from(BURST)) as u32;
        // Keep the fractional progress towards the next refill.
        let used = REFILL.saturating_mul(u32::try_from(gained).unwrap_or(u32::MAX));
        Bucket {
            tokens,
            at: if tokens == BURST { now } else { self.at + used },
        }
    }
}

pub struct FailureThrottle<K> {
    buckets: Mutex<HashMap<K, Bucket>>,
}

impl<K: Hash + Eq + Copy> Default for FailureThrottle<K> {
    fn default() -> Self {
        FailureThrottle {
            buckets: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq + Copy> FailureThrottle<K> {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, Bucket>> {
        self.buckets.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// May an attempt for `id` run now?
    pub fn allows(&self, id: K, now: Instant) -> bool {
        self.lock()
            .get(&id)
            .is_none_or(|b| b.refilled(now).tokens > 0)
    }

    /// An attempt for `id` failed (unknown id or wrong secret, wrong operator key).
    pub fn record_failure(&self, id: K, now: Instant) {
        let mut buckets = self.lock();
        if buckets.len() >= MAX_TRACKED && !buckets.contains_key(&id) {
            buckets.retain(|_, b| b.refilled(now).tokens < BURST);
            if buckets.len() >= MAX_TRACKED {
                return;
            }
        }
        let bucket = buckets.entry(id).or_insert(Bucket {
            tokens: BURST,
            at: now,
        });
        let mut refilled = bucket.refilled(now);
        if refilled.tokens == BURST {
            refilled.at = now;
        }
        refilled.tokens = refilled.tokens.saturating_sub(1);
        *bucket = refilled;
    }

    /// The secret verified: forget the failures.
    pub fn record_success(&self, id: K) {
        self.lock().remove(&id);
    }

    pub fn tracked(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_keys_are_addresses_and_ipv6_slash_64s() {
        let v4 = ClientKey::parse("127.0.0.2").expect("v4");
        assert_eq!(
            v4,
            ClientKey::parse("127.0.0.2:4711").expect("v4 with port")
        );
        assert_eq!(v4, ClientKey::parse("::ffff:127.0.0.2").expect("mapped"));
        assert_ne!(v4, ClientKey::parse("127.0.0.3").expect("other"));
        let a = ClientKey::parse("2001:db8:1:2:aaaa::1").expect("v6");
        assert_eq!(
            a,
            ClientKey::parse("[2001:db8:1:2:bbbb::9]:443").expect("same /64")
        );
        assert_ne!(a, ClientKey::parse("2001:db8:1:3::1").expect("other /64"));
        assert!(ClientKey::parse("").is_none());
        assert!(ClientKey::parse("example.com").is_none());
    }

    #[test]
    fn one_address_guessing_never_refuses_another() {
        let throttle = GuessThrottle::new();
        let id = Uuid::new_v4();
        let guesser = (id, ClientKey::parse("127.0.0.2").expect("addr"));
        let holder = (id, ClientKey::parse("127.0.0.3").expect("addr"));
        let t0 = Instant::now();
        for _ in 0..30 {
            throttle.record_failure(guesser, t0);
        }
        assert!(!throttle.allows(guesser, t0));
        assert!(throttle.allows(holder, t0));
    }

    #[test]
    fn burst_then_one_attempt_per_refill() {
        let throttle = FailureThrottle::<Uuid>::new();
        let id = Uuid::new_v4();
        let t0 = Instant::now();
        for _ in 0..BURST {
            assert!(throttle.allows(id, t0));
            throttle.record_failure(id, t0);
        }
        assert!(!throttle.allows(id, t0));
        assert!(!throttle.allows(id, t0 + REFILL / 2));
        assert!(throttle.allows(id, t0 + REFILL));
        throttle.record_failure(id, t0 + REFILL);
        assert!(!throttle.allows(id, t0 + REFILL + REFILL / 2));
        assert!(throttle.allows(id, t0 + REFILL * 2));
        // Other ids are unaffected.
        assert!(throttle.allows(Uuid::new_v4(), t0));
    }

    #[test]
    fn success_resets_and_full_buckets_are_reclaimed() {
        let throttle = FailureThrottle::<Uuid>::new();
        let id = Uuid::new_v4();
        let t0 = Instant::now();
        for _ in 0..BURST {
            throttle.record_failure(id, t0);
        }
        throttle.record_success(id);
        assert!(throttle.allows(id, t0));
        assert_eq!(throttle.tracked(), 0);
    }

    #[test]
    fn memory_is_bounded() {
        let throttle = FailureThrottle::<Uuid>::new();
        let t0 = Instant::now();
        for _ in 0..MAX_TRACKED + 10 {
            throttle.record_failure(Uuid::new_v4(), t0);
        }
        assert!(throttle.tracked() <= MAX_TRACKED);
        // Once the old records have refilled, they make room.
        let later = t0 + REFILL * (BURST + 1);
        let fresh = Uuid::new_v4();
        throttle.record_failure(fresh, later);
        assert!(throttle.tracked() <= MAX_TRACKED);
        assert_eq!(throttle.tracked(), 1);
    }
}
