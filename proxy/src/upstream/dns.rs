//! The upstream host's addresses, looked up without ever blocking a worker.
//!
//! The system resolver (`getaddrinfo`) blocks, so a lookup runs on a
//! throwaway thread (one in flight per worker at most) and the worker awaits
//! its answer. An answer is reused for [`DNS_TTL`]; once it is older, the
//! next connection starts a refresh in the background and keeps using the
//! last good answer meanwhile. Only when there is no answer at all (the
//! first connection, or every lookup so far failed) does a connection wait
//! for one, at most [`LOOKUP_WAIT`].
//!
//! Not here: connecting ([`super::conn`]).

use std::cell::RefCell;
use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::channel::oneshot;
use futures::future::{FutureExt, Shared};

use crate::clock::Clock;

/// How long a DNS answer is used before a refresh is started.
pub const DNS_TTL: Duration = Duration::from_secs(30);
/// Longest a connection waits for a lookup when no answer is known yet.
pub const LOOKUP_WAIT: Duration = Duration::from_secs(5);

/// A lookup in flight; `None` when it found nothing. (`Arc`: the answer is
/// built on the lookup thread.)
type Lookup = Shared<oneshot::Receiver<Option<Arc<[SocketAddr]>>>>;

/// One worker's view of the upstream host's addresses.
pub struct Resolver {
    host: String,
    port: u16,
    clock: Rc<dyn Clock>,
    state: Rc<RefCell<State>>,
}

#[derive(Default)]
struct State {
    /// The last good answer and when it arrived.
    last: Option<(Arc<[SocketAddr]>, Instant)>,
    /// Set when connecting to the last answer failed: refresh it now.
    stale: bool,
    /// The refresh in flight, if any (at most one).
    pending: Option<Lookup>,
}

impl Resolver {
    pub fn new(host: String, port: u16, clock: Rc<dyn Clock>) -> Self {
        Self {
            host,
            port,
            clock,
            state: Rc::default(),
        }
    }

    /// The addresses to try, in the resolver's order. Waits only when no
    /// answer is known; must run inside a monoio runtime with the timer.
    pub async fn addrs(&self) -> io::Result<Arc<[SocketAddr]>> {
        if let Ok(ip) = self.host.parse::<IpAddr>() {
            return Ok(Arc::from([SocketAddr::new(ip, self.port)]));
        }
        let now = self.clock.now();
        let (last, stale) = {
            let state = self.state.borrow();
            (state.last.clone(), state.stale)
        };
        match last {
            Some((addrs, at)) if !stale && now.saturating_duration_since(at) < DNS_TTL => Ok(addrs),
            Some((addrs, _)) => {
                // Stale: refresh in the background (a task on this worker
                // awaits it), use the last good answer now.
                let _in_flight = self.refresh()?;
                Ok(addrs)
            }
            None => {
                let lookup = self.refresh()?;
                match monoio::time::timeout(LOOKUP_WAIT, lookup).await {
                    Ok(Ok(Some(addrs))) => Ok(addrs),
                    Ok(_) => Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        "upstream host has no address",
                    )),
                    Err(_) => Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "upstream host lookup timed out",
                    )),
                }
            }
        }
    }

    /// Connecting to every address failed: the answer may be stale, so the
    /// next connection starts a refresh (still using this answer meanwhile).
    pub fn mark_stale(&self) {
        self.state.borrow_mut().stale = true;
    }

    /// The lookup in flight, or a new one started on a throwaway thread. A
    /// task on this worker stores its answer when it arrives, whoever waits.
    fn refresh(&self) -> io::Result<Lookup> {
        if let Some(pending) = self.state.borrow().pending.clone() {
            return Ok(pending);
        }
        let (tx, rx) = oneshot::channel();
        let name = (self.host.clone(), self.port);
        std::thread::Builder::new()
            .name("ibex-upstream-dns".into())
            .spawn(move || {
                let found = name
                    .to_socket_addrs()
                    .ok()
                    .map(|addrs| addrs.collect::<Arc<[SocketAddr]>>());
                let _ = tx.send(found.filter(|addrs| !addrs.is_empty()));
            })?;
        let lookup = rx.shared();
        self.state.borrow_mut().pending = Some(lookup.clone());
        let (state, clock, done) = (self.state.clone(), self.clock.clone(), lookup.clone());
        monoio::spawn(async move {
            let answer = done.await;
            let mut state = state.borrow_mut();
            state.pending = None;
            match answer {
                Ok(Some(addrs)) => {
                    state.last = Some((addrs, clock.now()));
                    state.stale = false;
                }
                // Keep the last good answer; the next connection tries again.
                _ => tracing::debug!(target: "ibex::upstream", "upstream host lookup failed"),
            }
        });
        Ok(lookup)
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::task::{Context, Poll, Waker};

    use super::*;
    use crate::clock::FakeClock;

    fn block_on<F: Future>(f: F) -> F::Output {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap()
            .block_on(f)
    }

    /// Polls once: the answer must be there without waiting.
    fn ready<F: Future>(f: F) -> F::Output {
        let mut f = std::pin::pin!(f);
        match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(v) => v,
            Poll::Pending => panic!("the worker waited for DNS"),
        }
    }

    /// Waits (polling, generous deadline) until no lookup is in flight.
    async fn landed(r: &Resolver) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while r.state.borrow().pending.is_some() {
            assert!(std::time::Instant::now() < deadline, "lookup never landed");
            monoio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[test]
    fn an_ip_literal_needs_no_lookup() {
        let r = Resolver::new("127.0.0.1".into(), 9, Rc::new(FakeClock::new(0)));
        let addrs = ready(r.addrs()).unwrap();
        assert_eq!(&*addrs, &[SocketAddr::from(([127, 0, 0, 1], 9))]);
        assert!(r.state.borrow().pending.is_none());
    }

    #[test]
    fn a_stale_answer_is_used_while_the_refresh_runs_off_the_worker() {
        block_on(async {
            let clock = Rc::new(FakeClock::new(0));
            let r = Resolver::new("localhost".into(), 9, clock.clone());
            // No answer yet: the first connection waits (boundedly).
            let first = r.addrs().await.unwrap();
            assert!(first.iter().all(|a| a.ip().is_loopback()), "{first:?}");
            landed(&r).await;

            // Fresh: served from the cache, no lookup started.
            assert_eq!(ready(r.addrs()).unwrap(), first);
            assert!(r.state.borrow().pending.is_none());

            // Stale: the last answer at once, and one refresh in flight.
            clock.advance(DNS_TTL);
            assert_eq!(ready(r.addrs()).unwrap(), first);
            assert!(r.state.borrow().pending.is_some());
            assert_eq!(ready(r.addrs()).unwrap(), first);

            // The refresh lands without anyone waiting for it.
            landed(&r).await;
            let (_, at) = r.state.borrow().last.clone().unwrap();
            assert_eq!(at, clock.now());
        });
    }

    #[test]
    fn a_failed_connect_marks_the_answer_stale_but_keeps_it() {
        block_on(async {
            let clock = Rc::new(FakeClock::new(0));
            let r = Resolver::new("localhost".into(), 9, clock.clone());
            let first = r.addrs().await.unwrap();
            landed(&r).await;
            r.mark_stale();
            assert_eq!(ready(r.addrs()).unwrap(), first);
            assert!(r.state.borrow().pending.is_some());
        });
    }

    #[test]
    fn a_name_without_addresses_is_an_error_not_a_hang() {
        block_on(async {
            let r = Resolver::new("no-such-host.invalid".into(), 9, Rc::new(FakeClock::new(0)));
            assert!(r.addrs().await.is_err());
            assert!(r.state.borrow().last.is_none());
        });
    }
}
