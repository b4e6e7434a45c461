//! The limiter's Redis client on one worker: a single server or a Redis
//! Cluster, found out by itself from `IBEX_REDIS_URL` (one node, or a
//! comma-separated seed list `redis://a:7000,b:7000`).
//!
//! A maintenance task asks a node `CLUSTER SLOTS` on a short-lived
//! connection of its own. A server with cluster support disabled (or
//! without the command) is a single Redis: one [`Conn`] for every slot,
//! exactly the client of before. A cluster gets one pipelined [`Conn`] per
//! master that owns slots (each loads the script in its handshake), and a
//! [`Router`] from slot to master; the map is refreshed every
//! [`REFRESH_EVERY`], and soon after a connection to a master fails, a
//! `MOVED`, or an error saying a node cannot serve; while a slot has no
//! answering master, every [`FAILOVER_POLL`] at most until one answers.
//!
//! A request for a key goes to its slot's master, on this worker, with no
//! thread hop. `MOVED` updates the slot and resends; `ASK` sends `ASKING`
//! plus the command to the importing node (the map stays); `TRYAGAIN`,
//! `CLUSTERDOWN`, `READONLY`, `MASTERDOWN`, `LOADING` and a slot with no
//! master fail that request open and back the slot off for
//! [`SLOT_BACKOFF`]. A master that dies fails open only the checks of its
//! slots (its connection is down) until the map names its promoted replica;
//! one that keeps its socket but stops answering trips its own circuit
//! breaker (one per master on a cluster), not the other masters'.

use std::cell::{Cell, RefCell};
use std::io;
use std::rc::{Rc, Weak};
use std::time::{Duration, Instant};

use futures::channel::oneshot;
use monoio::io::AsyncWriteRentExt;
use monoio::net::TcpStream;

use super::breaker::{self, Breaker, Permit};
use super::cluster_map::{self, ClusterError, NodeAddr, Route, Router, SlotRange, SLOTS};
use super::conn::{self, Conn, DriveTiming, Event, Phase, SendError, Target};
use super::resp::{self, Frame, Limits};

/// Periodic map refresh in cluster mode (catches a resharding nobody
/// redirected us for yet, and new masters).
pub const REFRESH_EVERY: Duration = Duration::from_secs(5);
/// Longest wait between map reads while a slot has no answering master.
pub const FAILOVER_POLL: Duration = Duration::from_millis(200);
/// Least time between two refreshes, whatever asks for them.
const REFRESH_MIN_GAP: Duration = Duration::from_millis(100);
/// How long a slot that answered `TRYAGAIN`/`CLUSTERDOWN`/... fails open
/// without asking.
pub const SLOT_BACKOFF: Duration = Duration::from_millis(100);
/// Redirects followed for one request (a `MOVED` then an `ASK` is two).
const MAX_REDIRECTS: usize = 3;
/// A slot map larger than this is refused (16,384 single-slot ranges with
/// two replicas each stay well under it).
const MAX_TOPOLOGY_BYTES: usize = 8 * 1024 * 1024;

/// Why a request got no usable reply; the caller fails open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallError {
    NotConnected,
    QueueFull,
    Timeout,
    ConnectionLost,
    /// The slot has no answering master right now (or is backing off).
    SlotDown,
    /// Redirected more than [`MAX_REDIRECTS`] times.
    Redirects,
}

impl From<SendError> for CallError {
    fn from(e: SendError) -> Self {
        match e {
            SendError::NotConnected => CallError::NotConnected,
            SendError::QueueFull => CallError::QueueFull,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// No node has answered yet: every request fails open.
    Discovering,
    Single,
    Cluster,
}

/// Parses `redis://[user:pass@]host[:port][,host[:port]...][/db]` into one
/// target per host, all with the same credentials and db. The message
/// never quotes the URL (it may hold a password).
pub fn parse_seeds(url: &str) -> Result<Vec<Target>, String> {
    const BAD: &str = "IBEX_REDIS_URL is not a valid redis:// URL";
    let rest = url
        .strip_prefix("redis://")
        .ok_or_else(|| BAD.to_string())?;
    // Userinfo ends at the last '@' (a password may hold '/' or ',').
    let (userinfo, hosts_and_path) = match rest.rfind('@') {
        Some(at) => (&rest[..=at], &rest[at + 1..]),
        None => ("", rest),
    };
    let (hosts, path) = match hosts_and_path.find('/') {
        Some(slash) => hosts_and_path.split_at(slash),
        None => (hosts_and_path, ""),
    };
    if !hosts.contains(',') {
        return Target::parse(url).map(|t| vec![t]);
    }
    let mut seeds = Vec::new();
    for host in hosts.split(',') {
        if host.is_empty() {
            return Err("IBEX_REDIS_URL: an empty host in the seed list".into());
        }
        seeds.push(Target::parse(&format!("redis://{userinfo}{host}{path}"))?);
    }
    Ok(seeds)
}

/// A master's connection and the handle that stops its driver.
struct NodeConn {
    addr: NodeAddr,
    conn: Rc<Conn>,
    /// Cluster mode only: this master's breaker (timeouts open it).
    breaker: RefCell<Breaker>,
    _stop: oneshot::Sender<()>,
}

type OnEvent = Rc<dyn Fn(Event<'_>)>;

struct Inner {
    seeds: Vec<Target>,
    script: Rc<str>,
    timing: DriveTiming,
    max_pending: usize,
    /// What each master's breaker starts as.
    breaker: Breaker,
    mode: Cell<Mode>,
    router: RefCell<Router>,
    /// By node id (the router's), `None` where the router has no node.
    conns: RefCell<Vec<Option<NodeConn>>>,
    refresh: conn::Notify,
    on_event: RefCell<Option<OnEvent>>,
    started: Instant,
    /// Map refreshes done (tests and logs).
    refreshes: Cell<u64>,
}

/// One worker's Redis: built inside its monoio runtime; dropping it stops
/// every connection.
pub struct Client {
    inner: Rc<Inner>,
    _stop: oneshot::Sender<()>,
}

impl Client {
    /// Starts discovery and the connections. `on_event` hears every
    /// connection change (for the log and the error counter).
    pub fn start(
        seeds: Vec<Target>,
        script: Rc<str>,
        timing: DriveTiming,
        max_pending: usize,
        breaker: Breaker,
        on_event: impl Fn(Event<'_>) + 'static,
    ) -> Client {
        let inner = Rc::new(Inner {
            seeds,
            script,
            timing,
            max_pending,
            breaker,
            mode: Cell::new(Mode::Discovering),
            router: RefCell::new(Router::new()),
            conns: RefCell::new(Vec::new()),
            refresh: conn::Notify::default(),
            on_event: RefCell::new(Some(Rc::new(on_event))),
            started: Instant::now(),
            refreshes: Cell::new(0),
        });
        let (stop, stopped) = oneshot::channel::<()>();
        monoio::spawn(maintain(inner.clone(), stopped));
        Client { inner, _stop: stop }
    }

    pub fn is_cluster(&self) -> bool {
        self.inner.mode.get() == Mode::Cluster
    }

    /// How many times the slot map was (re)read.
    pub fn refreshes(&self) -> u64 {
        self.inner.refreshes.get()
    }

    /// Redis answers: the single server's connection is up; on a cluster,
    /// at least one master that owns slots is connected with its breaker
    /// closed. A failover of one master keeps `/ready` at 200 (its orgs
    /// fail open meanwhile, the rest are counted): a readiness check that
    /// dropped every proxy for one master's failover would let a balancer
    /// drain the whole fleet.
    pub fn healthy(&self) -> bool {
        let inner = &self.inner;
        if inner.mode.get() == Mode::Discovering {
            return false;
        }
        let router = inner.router.borrow();
        let conns = inner.conns.borrow();
        let up = router.ids().filter(|&id| router.owns_slots(id)).any(|id| {
            conns.get(id).and_then(Option::as_ref).is_some_and(|n| {
                n.conn.phase() == Phase::Up && n.breaker.borrow().state() == breaker::State::Closed
            })
        });
        up
    }

    /// Resets the connections whose oldest command waited past
    /// `threshold_ms` (a master that keeps the socket but stopped answering).
    pub fn reset_stalled(&self, now_ms: u64, threshold_ms: u64) {
        for node in self.inner.conns.borrow().iter().flatten() {
            if node.conn.oldest_wait_ms(now_ms) > threshold_ms {
                node.conn.request_reset();
            }
        }
    }

    /// Sends `args` (a command on one key of `slot`) to the slot's master
    /// and returns its reply, following `MOVED` and `ASK`. `now_ms` stamps
    /// the command's queue age (the caller's monotonic clock).
    pub async fn request(
        &self,
        slot: u16,
        args: &[&[u8]],
        now_ms: u64,
        deadline: monoio::time::Instant,
    ) -> Result<Frame, CallError> {
        let inner = &self.inner;
        let mut asking: Option<usize> = None;
        for _ in 0..=MAX_REDIRECTS {
            let (rx, node) = match asking.take() {
                Some(node) => (inner.send_to(node, true, args, now_ms)?, node),
                None => inner.send_slot(slot, args, now_ms)?,
            };
            let reply = match monoio::time::timeout_at(deadline, rx).await {
                Ok(Ok(frame)) => {
                    inner.node_outcome(node, true);
                    frame
                }
                Ok(Err(_)) => return Err(CallError::ConnectionLost),
                Err(_) => {
                    inner.node_outcome(node, false);
                    return Err(CallError::Timeout);
                }
            };
            let Frame::Error(text) = &reply else {
                return Ok(reply);
            };
            let asked = inner.host_of(node);
            match cluster_map::classify(text, &asked) {
                None => return Ok(reply),
                Some(ClusterError::Moved(redirect)) => {
                    let moved = inner.router.borrow_mut().moved(&redirect);
                    inner.sync_conns();
                    inner.refresh.notify();
                    if moved.is_none() {
                        return Err(CallError::SlotDown);
                    }
                }
                Some(ClusterError::Ask(redirect)) => {
                    let id = inner.router.borrow_mut().id_for(&redirect.addr);
                    inner.sync_conns();
                    asking = Some(id.ok_or(CallError::SlotDown)?);
                }
                Some(
                    ClusterError::TryAgain | ClusterError::ClusterDown | ClusterError::NotServing,
                ) => {
                    inner.back_off(slot);
                    inner.refresh.notify();
                    return Err(CallError::SlotDown);
                }
            }
        }
        Err(CallError::Redirects)
    }
}

impl Inner {
    fn mono_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn back_off(&self, slot: u16) {
        let until = self.mono_ms() + SLOT_BACKOFF.as_millis() as u64;
        self.router.borrow_mut().back_off(slot, until);
    }

    /// Feeds a master's breaker (cluster mode; a single Redis has the
    /// limiter's own breaker): an answer closes it, a timeout counts.
    fn node_outcome(&self, node: usize, answered: bool) {
        if self.mode.get() != Mode::Cluster {
            return;
        }
        let now = self.mono_ms();
        if let Some(n) = self.conns.borrow().get(node).and_then(Option::as_ref) {
            let mut breaker = n.breaker.borrow_mut();
            if answered {
                breaker.on_success();
            } else {
                breaker.on_failure(now);
            }
        }
    }

    fn host_of(&self, node: usize) -> String {
        self.router
            .borrow()
            .addr(node)
            .map(|a| a.host.clone())
            .unwrap_or_default()
    }

    fn send_slot(
        &self,
        slot: u16,
        args: &[&[u8]],
        now_ms: u64,
    ) -> Result<(oneshot::Receiver<Frame>, usize), CallError> {
        let route = self.router.borrow_mut().route(slot, self.mono_ms());
        match route {
            Route::Node(node) => Ok((self.send_to(node, false, args, now_ms)?, node)),
            Route::NoMaster => {
                if self.mode.get() == Mode::Discovering {
                    return Err(CallError::NotConnected);
                }
                self.refresh.notify();
                Err(CallError::SlotDown)
            }
            Route::BackingOff => Err(CallError::SlotDown),
        }
    }

    /// Queues `args` on node `node`'s connection, after `ASKING` if asked.
    fn send_to(
        &self,
        node: usize,
        asking: bool,
        args: &[&[u8]],
        now_ms: u64,
    ) -> Result<oneshot::Receiver<Frame>, CallError> {
        let conns = self.conns.borrow();
        let node = conns
            .get(node)
            .and_then(Option::as_ref)
            .ok_or(CallError::NotConnected)?;
        if self.mode.get() == Mode::Cluster
            && node.breaker.borrow_mut().permit(self.mono_ms()) == Permit::Reject
        {
            // This master timed out lately: its slots fail open at once.
            return Err(CallError::SlotDown);
        }
        let conn = &node.conn;
        if asking {
            // Same connection, same tick: nothing can come between them.
            // Its `+OK` goes to a receiver dropped here.
            drop(conn.send(&[b"ASKING"], now_ms)?);
        }
        Ok(conn.send(args, now_ms)?)
    }

    /// Makes the connections match the router: one per node it names.
    fn sync_conns(self: &Rc<Self>) {
        let wanted: Vec<(usize, NodeAddr)> = {
            let router = self.router.borrow();
            router
                .ids()
                .filter_map(|id| router.addr(id).map(|a| (id, a.clone())))
                .collect()
        };
        let mut conns = self.conns.borrow_mut();
        let len = wanted.last().map_or(0, |(id, _)| id + 1);
        // Nodes the router dropped: their drivers stop, their checks fail open.
        for (id, slot) in conns.iter_mut().enumerate() {
            if !wanted
                .iter()
                .any(|(w, a)| *w == id && slot.as_ref().is_some_and(|n| &n.addr == a))
            {
                *slot = None;
            }
        }
        conns.truncate(len);
        conns.resize_with(len, || None);
        for (id, addr) in wanted {
            if conns[id].is_none() {
                conns[id] = Some(self.spawn_conn(addr));
            }
        }
    }

    fn spawn_conn(self: &Rc<Self>, addr: NodeAddr) -> NodeConn {
        let conn = Rc::new(Conn::new(self.max_pending));
        // Commands queue from now on and go out once it is up.
        conn.set_phase(Phase::Connecting);
        let (stop, stopped) = oneshot::channel::<()>();
        let first = &self.seeds[0];
        let target = Target {
            host: addr.host.clone(),
            port: addr.port,
            // SELECT is refused by a cluster: it has db 0 only.
            db: if self.mode.get() == Mode::Cluster {
                0
            } else {
                first.db
            },
            username: first.username.clone(),
            password: first.password.clone(),
        };
        let weak: Weak<Inner> = Rc::downgrade(self);
        monoio::spawn(conn::drive(
            conn.clone(),
            target,
            self.script.clone(),
            self.timing,
            move |event| {
                if let Some(inner) = weak.upgrade() {
                    inner.on_conn_event(event);
                }
            },
            async move {
                let _ = stopped.await;
            },
        ));
        NodeConn {
            addr,
            conn,
            breaker: RefCell::new(self.breaker.clone()),
            _stop: stop,
        }
    }

    fn on_conn_event(&self, event: Event<'_>) {
        if self.mode.get() == Mode::Cluster && !matches!(event, Event::Connected) {
            // A master went away: a replica may be taking over.
            self.refresh.notify();
        }
        let handler = self.on_event.borrow().clone();
        if let Some(handler) = handler {
            handler(event);
        }
    }

    /// Where to ask for the map: masters that are up, then every node of
    /// the last map, then the seeds.
    fn candidates(&self) -> Vec<Target> {
        let first = &self.seeds[0];
        let as_target = |addr: &NodeAddr| Target {
            host: addr.host.clone(),
            port: addr.port,
            db: 0,
            username: first.username.clone(),
            password: first.password.clone(),
        };
        let mut addrs: Vec<NodeAddr> = Vec::new();
        for node in self.conns.borrow().iter().flatten() {
            if node.conn.phase() == Phase::Up {
                addrs.push(node.addr.clone());
            }
        }
        for addr in self.router.borrow().known() {
            if !addrs.contains(addr) {
                addrs.push(addr.clone());
            }
        }
        let mut out: Vec<Target> = addrs.iter().map(as_target).collect();
        for seed in &self.seeds {
            if !addrs
                .iter()
                .any(|a| a.host == seed.host && a.port == seed.port)
            {
                out.push(seed.clone());
            }
        }
        out
    }

    /// Reads the map from the first candidate that answers and installs
    /// it. True when every slot has a master whose connection is not down.
    async fn refresh_once(self: &Rc<Self>) -> bool {
        let mut last_err = None;
        for target in self.candidates() {
            let limit = self.timing.connect_timeout * 2;
            let answer = monoio::time::timeout(limit, query_topology(&target))
                .await
                .unwrap_or_else(|_| {
                    Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "CLUSTER SLOTS timed out",
                    ))
                });
            match answer {
                Ok(Topology::Single) if self.mode.get() != Mode::Cluster => {
                    self.mode.set(Mode::Single);
                    self.refreshes.set(self.refreshes.get() + 1);
                    self.router.borrow_mut().install_single(NodeAddr {
                        host: target.host.clone(),
                        port: target.port,
                    });
                    self.sync_conns();
                    return true;
                }
                // A node of a cluster we know answering as a single
                // server (restarted without cluster support?): ask another.
                Ok(Topology::Single) => {}
                Ok(Topology::Cluster(ranges)) => {
                    if self.mode.get() != Mode::Cluster {
                        if self.seeds[0].db != 0 {
                            tracing::warn!(
                                "IBEX_REDIS_URL names a db, but a Redis Cluster has only db 0: using 0"
                            );
                        }
                        tracing::info!(ranges = ranges.len(), "rate limiter: Redis Cluster found");
                    }
                    self.mode.set(Mode::Cluster);
                    self.refreshes.set(self.refreshes.get() + 1);
                    self.router.borrow_mut().install(&ranges);
                    self.sync_conns();
                    return self.complete();
                }
                Err(e) => last_err = Some(e),
            }
        }
        if let Some(err) = last_err {
            self.on_conn_event(Event::ConnectFailed(&err));
        }
        false
    }

    fn complete(&self) -> bool {
        let router = self.router.borrow();
        if router.covered() < SLOTS {
            return false;
        }
        let conns = self.conns.borrow();
        let live = router.ids().all(|id| {
            conns
                .get(id)
                .and_then(Option::as_ref)
                .is_none_or(|n| n.conn.phase() != Phase::Down)
        });
        live
    }
}

/// Discovery, then map refreshes until the client is dropped.
async fn maintain(inner: Rc<Inner>, stopped: oneshot::Receiver<()>) {
    let work = async {
        let mut retry = inner.timing.backoff_min;
        loop {
            inner.refresh.clear();
            let started = monoio::time::Instant::now();
            let ok = inner.refresh_once().await;
            if inner.mode.get() == Mode::Single {
                // The connection reconnects by itself; nothing to map.
                futures::future::pending::<()>().await;
            }
            let wait = if ok {
                retry = inner.timing.backoff_min;
                REFRESH_EVERY
            } else {
                let wait = retry;
                // A cluster with a master down: poll for the promoted
                // replica at a steady pace, not the reconnect backoff's.
                let most = match inner.mode.get() {
                    Mode::Cluster => FAILOVER_POLL.min(inner.timing.backoff_max),
                    _ => inner.timing.backoff_max,
                };
                retry = (retry * 2).min(most);
                wait
            };
            let asked = std::pin::pin!(inner.refresh.notified());
            let timer = std::pin::pin!(monoio::time::sleep(wait));
            futures::future::select(asked, timer).await;
            monoio::time::sleep_until(started + REFRESH_MIN_GAP).await;
        }
    };
    let work = std::pin::pin!(work);
    futures::future::select(work, stopped).await;
    // Break the cycle through the event handler and stop every driver.
    inner.on_event.borrow_mut().take();
    inner.conns.borrow_mut().clear();
}

enum Topology {
    Single,
    Cluster(Vec<SlotRange>),
}

/// `AUTH` (if any) and `CLUSTER SLOTS` on a fresh connection.
async fn query_topology(target: &Target) -> io::Result<Topology> {
    let addr = conn::resolve(&target.host, target.port).await?;
    let mut stream = TcpStream::connect_addr(addr).await?;
    stream.set_nodelay(true)?;
    let mut hello = Vec::with_capacity(128);
    let mut expected = 1;
    if conn::push_auth(&mut hello, target) {
        expected += 1;
    }
    resp::push_command(&mut hello, &[b"CLUSTER", b"SLOTS"]);
    let (res, _) = stream.write_all(hello).await;
    res?;
    let mut buf = Vec::with_capacity(16 * 1024);
    let mut answered = 0;
    loop {
        buf = conn::read_more(&mut stream, buf).await?;
        let mut at = 0;
        while let Some((frame, used)) =
            resp::parse_limited(&buf[at..], &Limits::TOPOLOGY).map_err(conn::protocol)?
        {
            at += used;
            answered += 1;
            if answered < expected {
                if let Frame::Error(_) = frame {
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        "Redis refused AUTH",
                    ));
                }
                continue;
            }
            return topology(&frame, &target.host);
        }
        buf.drain(..at);
        if buf.len() > MAX_TOPOLOGY_BYTES {
            return Err(conn::protocol(resp::ProtocolError));
        }
    }
}

fn topology(reply: &Frame, asked: &str) -> io::Result<Topology> {
    if let Frame::Error(text) = reply {
        let text = String::from_utf8_lossy(text).to_ascii_lowercase();
        if text.contains("cluster support disabled") || text.starts_with("err unknown command") {
            return Ok(Topology::Single);
        }
        return Err(io::Error::other(format!(
            "CLUSTER SLOTS refused: {}",
            text.chars().take(80).collect::<String>()
        )));
    }
    cluster_map::parse_slots(reply, asked)
        .map(Topology::Cluster)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn seed_lists_share_credentials_and_db() {
        let seeds = parse_seeds("redis://:pw@10.0.0.1:7000,10.0.0.2:7001,[::1]:7002/0").unwrap();
        assert_eq!(seeds.len(), 3);
        assert_eq!((seeds[0].host.as_str(), seeds[0].port), ("10.0.0.1", 7000));
        assert_eq!((seeds[2].host.as_str(), seeds[2].port), ("::1", 7002));
        for s in &seeds {
            assert_eq!(s.password.as_ref().map(|p| p.expose_secret()), Some("pw"));
            assert_eq!(s.db, 0);
        }
        let one = parse_seeds("redis://127.0.0.1:6390/3").unwrap();
        assert_eq!((one.len(), one[0].port, one[0].db), (1, 6390, 3));
        let default_port = parse_seeds("redis://a,b:7001").unwrap();
        assert_eq!((default_port[0].port, default_port[1].port), (6379, 7001));
    }

    #[test]
    fn bad_seed_lists_are_refused_without_quoting_the_password() {
        for bad in [
            "redis://:s3cret@a:1,,b:2",
            "redis://:s3cret@a:1,",
            "rediss://:s3cret@a:1,b:2",
            "redis://:s3cret@a:1,[bad:2",
            "redis://:s3cret@a:1,b:notaport",
        ] {
            let err = parse_seeds(bad).err().unwrap_or_default();
            assert!(!err.is_empty(), "{bad} was accepted");
            assert!(!err.contains("s3cret"), "{err}");
        }
    }

    #[test]
    fn a_server_without_cluster_support_is_single() {
        let disabled = Frame::Error(b"ERR This instance has cluster support disabled".to_vec());
        assert!(matches!(topology(&disabled, "h"), Ok(Topology::Single)));
        let renamed = Frame::Error(b"ERR unknown command 'CLUSTER', with args".to_vec());
        assert!(matches!(topology(&renamed, "h"), Ok(Topology::Single)));
        let loading = Frame::Error(b"LOADING Redis is loading the dataset".to_vec());
        assert!(topology(&loading, "h").is_err());
        assert!(topology(&Frame::Array(Some(vec![])), "h").is_err());
    }
}
