//! Single-flight: concurrent misses for one key on one worker make one authd
//! call; the others wait for its answer. If the caller doing the work is
//! dropped (client went away), its waiters wake with nothing and one of them
//! takes over, so no entry is ever left behind.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::hash::{BuildHasher, Hash};

use futures::channel::oneshot;

pub struct SingleFlight<K, V, S> {
    inflight: RefCell<HashMap<K, Vec<oneshot::Sender<V>>, S>>,
}

/// Removes the key (dropping the waiters' senders) if the leader is dropped
/// before it finishes.
struct LeaderGuard<'a, K: Hash + Eq, V, S: BuildHasher> {
    map: &'a RefCell<HashMap<K, Vec<oneshot::Sender<V>>, S>>,
    key: Option<K>,
}

impl<K: Hash + Eq, V, S: BuildHasher> Drop for LeaderGuard<'_, K, V, S> {
    fn drop(&mut self) {
        if let Some(k) = self.key.take() {
            self.map.borrow_mut().remove(&k);
        }
    }
}

/// Whether this caller did the work or shared someone else's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Leader,
    Follower,
}

impl<K, V, S> SingleFlight<K, V, S>
where
    K: Hash + Eq + Copy,
    V: Clone,
    S: BuildHasher + Default,
{
    pub fn new() -> Self {
        Self {
            inflight: RefCell::new(HashMap::with_hasher(S::default())),
        }
    }

    pub fn in_flight(&self) -> usize {
        self.inflight.borrow().len()
    }

    /// Runs `work` unless a call for `key` is already running, in which case
    /// it waits for that call's value.
    pub async fn run<F, Fut>(&self, key: K, work: F) -> (V, Role)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V>,
    {
        loop {
            let waiting = {
                let mut map = self.inflight.borrow_mut();
                match map.get_mut(&key) {
                    Some(waiters) => {
                        let (tx, rx) = oneshot::channel();
                        waiters.push(tx);
                        Some(rx)
                    }
                    None => {
                        map.insert(key, Vec::new());
                        None
                    }
                }
            };
            match waiting {
                // The leader was dropped: try again (maybe as leader).
                Some(rx) => match rx.await {
                    Ok(v) => return (v, Role::Follower),
                    Err(_) => continue,
                },
                None => break,
            }
        }
        let mut guard = LeaderGuard {
            map: &self.inflight,
            key: Some(key),
        };
        let value = work().await;
        guard.key = None;
        let waiters = self.inflight.borrow_mut().remove(&key).unwrap_or_default();
        for w in waiters {
            let _ = w.send(value.clone());
        }
        (value, Role::Leader)
    }
}

impl<K, V, S> Default for SingleFlight<K, V, S>
where
    K: Hash + Eq + Copy,
    V: Clone,
    S: BuildHasher + Default,
{
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::collections::hash_map::RandomState;
    use std::rc::Rc;

    type Flight = SingleFlight<u32, u32, RandomState>;

    #[test]
    fn concurrent_callers_share_one_call() {
        futures::executor::block_on(async {
            let f = Flight::new();
            let calls = Cell::new(0);
            let (tx, rx) = oneshot::channel::<u32>();
            let rx = RefCell::new(Some(rx));
            let work = || async {
                calls.set(calls.get() + 1);
                let rx = rx.borrow_mut().take().unwrap();
                rx.await.unwrap()
            };
            let a = f.run(1, work);
            let b = f.run(1, || async { unreachable!("second call made") });
            let c = f.run(1, || async { unreachable!("third call made") });
            let release = async {
                tx.send(7).unwrap();
            };
            let (a, b, c, ()) = futures::join!(a, b, c, release);
            assert_eq!((a, b.0, c.0), ((7, Role::Leader), 7, 7));
            assert_eq!(b.1, Role::Follower);
            assert_eq!(calls.get(), 1);
            assert_eq!(f.in_flight(), 0);
        });
    }

    #[test]
    fn a_dropped_leader_hands_over() {
        futures::executor::block_on(async {
            let f = Rc::new(Flight::new());
            let never = futures::future::pending::<u32>();
            {
                let leader = f.run(1, || never);
                futures::pin_mut!(leader);
                // Poll once so it registers, then drop it.
                assert!(futures::poll!(leader.as_mut()).is_pending());
                assert_eq!(f.in_flight(), 1);
            }
            assert_eq!(f.in_flight(), 0);
            let (v, role) = f.run(1, || async { 9 }).await;
            assert_eq!((v, role), (9, Role::Leader));
        });
    }

    #[test]
    fn follower_takes_over_when_leader_dropped() {
        futures::executor::block_on(async {
            let f = Flight::new();
            let mut leader = Box::pin(f.run(1, futures::future::pending::<u32>));
            assert!(futures::poll!(leader.as_mut()).is_pending());
            let follower = f.run(1, || async { 5 });
            futures::pin_mut!(follower);
            assert!(futures::poll!(follower.as_mut()).is_pending());
            drop(leader);
            let (v, role) = follower.await;
            assert_eq!((v, role), (5, Role::Leader));
        });
    }
}
