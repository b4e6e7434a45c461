//! The pure half of the Redis Cluster client: key slots, the errors a
//! cluster answers with (`MOVED`, `ASK`, `TRYAGAIN`, `CLUSTERDOWN`, ...),
//! the `CLUSTER SLOTS` reply, and the [`Router`] that maps a slot to the
//! master that owns it. No I/O and no clock: `now_ms` is passed in.
//!
//! Reference for the behaviour: the `redis` crate's `cluster_async` and
//! `cluster_routing` (tokio-only, hence this client; see
//! `perf/results/ratelimit.md`).

use std::collections::HashMap;
use std::fmt;

use super::resp::Frame;

/// Hash slots of a Redis Cluster.
pub const SLOTS: usize = 16_384;
/// The slot table's "no master known" entry.
const NONE: u16 = u16::MAX;
/// Node table bound: a cluster has at most one master per slot, and far
/// fewer in practice; past this a redirect to a new node is not followed.
const MAX_NODES: usize = 1_024;
/// Discovery candidates kept from the last slot map (masters and replicas).
const MAX_KNOWN: usize = 64;

/// The slot of `key`: CRC16/XMODEM of its hash tag (the bytes between the
/// first `{` and the next `}`, if not empty) or of the whole key, mod 16384.
pub fn key_slot(key: &[u8]) -> u16 {
    let hashed = hash_tag(key).unwrap_or(key);
    crc16::State::<crc16::XMODEM>::calculate(hashed) % SLOTS as u16
}

fn hash_tag(key: &[u8]) -> Option<&[u8]> {
    let open = key.iter().position(|&b| b == b'{')?;
    let rest = &key[open + 1..];
    let len = rest.iter().position(|&b| b == b'}')?;
    (len > 0).then(|| &rest[..len])
}

/// A node's address as the cluster names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NodeAddr {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for NodeAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl NodeAddr {
    /// `host:port`, `[v6]:port` or `v6:port` (split at the last colon). An
    /// empty host (a node that does not know its own address) is `None`
    /// host-wise: the caller substitutes the host it asked.
    fn parse(text: &str, fallback_host: &str) -> Option<NodeAddr> {
        let (host, port) = text.rsplit_once(':')?;
        let port = port.parse().ok().filter(|&p| p != 0)?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let host = if host.is_empty() || host == "?" {
            fallback_host
        } else {
            host
        };
        Some(NodeAddr {
            host: host.to_string(),
            port,
        })
    }
}

/// A redirect: the slot and where the cluster says it lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    pub slot: u16,
    pub addr: NodeAddr,
}

/// The error replies a cluster gives that the client acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterError {
    /// The slot belongs to another master now: update the map, resend.
    Moved(Redirect),
    /// The slot is being migrated and the key is not here: send `ASKING`
    /// plus the command to the importing node, once; the map stays.
    Ask(Redirect),
    /// Resharding in progress for a multi-key command; back off.
    TryAgain,
    /// The cluster cannot serve the slot (no master, or the whole cluster
    /// down); back off.
    ClusterDown,
    /// The node is not (or not yet) a master that can serve: `READONLY`
    /// (a demoted master), `MASTERDOWN`, `LOADING`. Refresh and back off.
    NotServing,
}

/// Classifies an error reply's text; `None` for every other error (a
/// script error, `NOSCRIPT`, ...), which the caller handles itself.
/// `asked` is the host of the node that replied (for an empty host).
pub fn classify(error: &[u8], asked: &str) -> Option<ClusterError> {
    let text = std::str::from_utf8(error).ok()?;
    let mut words = text.split_ascii_whitespace();
    let kind = words.next()?;
    let redirect = |mut words: std::str::SplitAsciiWhitespace<'_>| {
        let slot: u16 = words.next()?.parse().ok()?;
        if usize::from(slot) >= SLOTS {
            return None;
        }
        let addr = NodeAddr::parse(words.next()?, asked)?;
        Some(Redirect { slot, addr })
    };
    match kind {
        "MOVED" => redirect(words).map(ClusterError::Moved),
        "ASK" => redirect(words).map(ClusterError::Ask),
        "TRYAGAIN" => Some(ClusterError::TryAgain),
        "CLUSTERDOWN" => Some(ClusterError::ClusterDown),
        "READONLY" | "MASTERDOWN" | "LOADING" => Some(ClusterError::NotServing),
        _ => None,
    }
}

/// One entry of `CLUSTER SLOTS`: a range and its master (replicas are
/// kept only as discovery candidates).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotRange {
    pub start: u16,
    pub end: u16,
    pub master: NodeAddr,
    pub replicas: Vec<NodeAddr>,
}

/// Parses a `CLUSTER SLOTS` reply (`[[start, end, [host, port, id, ...],
/// replica...], ...]`). `asked` replaces an empty or `?` host. An empty
/// map (a cluster not yet formed) is an error.
pub fn parse_slots(reply: &Frame, asked: &str) -> Result<Vec<SlotRange>, &'static str> {
    let Frame::Array(Some(entries)) = reply else {
        return Err("CLUSTER SLOTS: not an array");
    };
    let mut ranges = Vec::with_capacity(entries.len());
    for entry in entries {
        let Frame::Array(Some(items)) = entry else {
            return Err("CLUSTER SLOTS: an entry is not an array");
        };
        let [start, end, master, replicas @ ..] = items.as_slice() else {
            return Err("CLUSTER SLOTS: an entry without a master");
        };
        let slot = |f: &Frame| {
            f.as_int()
                .and_then(|i| u16::try_from(i).ok())
                .filter(|&s| usize::from(s) < SLOTS)
        };
        let (Some(start), Some(end)) = (slot(start), slot(end)) else {
            return Err("CLUSTER SLOTS: a slot out of range");
        };
        if start > end {
            return Err("CLUSTER SLOTS: a range that ends before it starts");
        }
        let node = |f: &Frame| -> Option<NodeAddr> {
            let Frame::Array(Some(parts)) = f else {
                return None;
            };
            let host = parts.first()?.as_str()?;
            let port = u16::try_from(parts.get(1)?.as_int()?).ok()?;
            NodeAddr::parse(&format!("{host}:{port}"), asked)
        };
        let master = node(master).ok_or("CLUSTER SLOTS: a master without an address")?;
        ranges.push(SlotRange {
            start,
            end,
            master,
            replicas: replicas.iter().filter_map(node).collect(),
        });
    }
    if ranges.is_empty() {
        return Err("CLUSTER SLOTS: no slot is assigned (cluster not formed)");
    }
    Ok(ranges)
}

/// Where a command for a slot goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Node(usize),
    /// No master known for the slot: fail open, refresh the map.
    NoMaster,
    /// The slot answered `TRYAGAIN`/`CLUSTERDOWN`/... lately: fail open
    /// without asking until the back-off ends.
    BackingOff,
}

/// Slot → node, with node ids that stay stable while a node owns slots
/// (its connection is keyed by the id).
pub struct Router {
    nodes: Vec<Option<NodeAddr>>,
    slots: Box<[u16]>,
    /// Slot → end of its back-off (ms on the caller's clock).
    backoff: HashMap<u16, u64>,
    /// Every node of the last map, masters first: where to ask next time.
    known: Vec<NodeAddr>,
}

impl Default for Router {
    fn default() -> Self {
        Self::new()
    }
}

impl Router {
    pub fn new() -> Self {
        Self {
            nodes: Vec::new(),
            slots: vec![NONE; SLOTS].into_boxed_slice(),
            backoff: HashMap::new(),
            known: Vec::new(),
        }
    }

    /// Replaces the map with `ranges`. Nodes that own no slot afterwards
    /// are dropped (their ids may be reused); back-offs are cleared, since
    /// the new map is the cluster's latest word.
    pub fn install(&mut self, ranges: &[SlotRange]) {
        // Free every node the new map does not name first, so that the
        // new ones find room; survivors keep their ids.
        let masters: std::collections::HashSet<&NodeAddr> =
            ranges.iter().map(|r| &r.master).collect();
        for node in &mut self.nodes {
            if !node.as_ref().is_some_and(|n| masters.contains(n)) {
                *node = None;
            }
        }
        self.slots.fill(NONE);
        for range in ranges {
            let Some(id) = self.id_for(&range.master) else {
                continue;
            };
            for slot in range.start..=range.end {
                self.slots[usize::from(slot)] = id as u16;
            }
        }
        self.backoff.clear();
        self.known.clear();
        let masters = ranges.iter().map(|r| &r.master);
        let replicas = ranges.iter().flat_map(|r| r.replicas.iter());
        for addr in masters.chain(replicas) {
            if self.known.len() < MAX_KNOWN && !self.known.contains(addr) {
                self.known.push(addr.clone());
            }
        }
    }

    /// One server for every slot (not a cluster).
    pub fn install_single(&mut self, addr: NodeAddr) {
        self.install(&[SlotRange {
            start: 0,
            end: (SLOTS - 1) as u16,
            master: addr,
            replicas: Vec::new(),
        }]);
    }

    pub fn route(&mut self, slot: u16, now_ms: u64) -> Route {
        if let Some(&until) = self.backoff.get(&slot) {
            if now_ms < until {
                return Route::BackingOff;
            }
            self.backoff.remove(&slot);
        }
        match self.slots.get(usize::from(slot)) {
            Some(&id) if id != NONE => Route::Node(usize::from(id)),
            _ => Route::NoMaster,
        }
    }

    /// `MOVED`: the slot is `addr`'s now. Returns its node id (`None` when
    /// the node table is full).
    pub fn moved(&mut self, redirect: &Redirect) -> Option<usize> {
        let id = self.id_for(&redirect.addr)?;
        self.slots[usize::from(redirect.slot)] = id as u16;
        self.backoff.remove(&redirect.slot);
        Some(id)
    }

    /// The id of `addr`, added if new (an `ASK` target).
    pub fn id_for(&mut self, addr: &NodeAddr) -> Option<usize> {
        if let Some(id) = self.nodes.iter().position(|n| n.as_ref() == Some(addr)) {
            return Some(id);
        }
        let id = match self.nodes.iter().position(Option::is_none) {
            Some(free) => free,
            None if self.nodes.len() < MAX_NODES => {
                self.nodes.push(None);
                self.nodes.len() - 1
            }
            None => return None,
        };
        self.nodes[id] = Some(addr.clone());
        Some(id)
    }

    pub fn back_off(&mut self, slot: u16, until_ms: u64) {
        self.backoff.insert(slot, until_ms);
    }

    /// Slots with a master.
    pub fn covered(&self) -> usize {
        self.slots.iter().filter(|&&id| id != NONE).count()
    }

    pub fn addr(&self, id: usize) -> Option<&NodeAddr> {
        self.nodes.get(id).and_then(Option::as_ref)
    }

    /// Node ids in use (owning slots, or an `ASK` target since the last map).
    pub fn ids(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.nodes.len()).filter(|&id| self.nodes[id].is_some())
    }

    /// Whether node `id` owns at least one slot.
    pub fn owns_slots(&self, id: usize) -> bool {
        self.slots.iter().any(|&s| usize::from(s) == id)
    }

    pub fn known(&self) -> &[NodeAddr] {
        &self.known
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> NodeAddr {
        NodeAddr {
            host: "127.0.0.1".into(),
            port,
        }
    }

    fn bulk(s: &str) -> Frame {
        Frame::Bulk(Some(s.as_bytes().to_vec()))
    }

    fn node(host: &str, port: i64) -> Frame {
        Frame::Array(Some(vec![
            bulk(host),
            Frame::Integer(port),
            bulk("07c37dfeb235213a872192d90877d0cd55635b91"),
            Frame::Array(Some(vec![])),
        ]))
    }

    fn range(start: i64, end: i64, nodes: Vec<Frame>) -> Frame {
        let mut items = vec![Frame::Integer(start), Frame::Integer(end)];
        items.extend(nodes);
        Frame::Array(Some(items))
    }

    #[test]
    fn key_slots_match_redis() {
        // Values from `CLUSTER KEYSLOT` on Redis 7.0.
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"bar"), 5061);
        assert_eq!(key_slot(b"123456789"), 12739);
        // Hash tags: only the first {...}, and not an empty one.
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"x{user1000}y{z}"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"foo{}{bar}"), key_slot(b"foo{}{bar}"));
        assert_ne!(key_slot(b"foo{}{bar}"), key_slot(b"bar"));
        assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
        let org = "6f1c2a9e-3b3d-4d0e-9d7a-0c2b5f1e8a11";
        assert_eq!(
            key_slot(format!("ibex:rl:{{{org}}}:29000000").as_bytes()),
            key_slot(org.as_bytes())
        );
        assert!(usize::from(key_slot(b"")) < SLOTS);
    }

    #[test]
    fn classifies_redirects_and_cluster_errors() {
        let asked = "10.0.0.9";
        assert_eq!(
            classify(b"MOVED 3999 127.0.0.1:6381", asked),
            Some(ClusterError::Moved(Redirect {
                slot: 3999,
                addr: addr(6381)
            }))
        );
        assert_eq!(
            classify(b"ASK 0 127.0.0.1:7002", asked),
            Some(ClusterError::Ask(Redirect {
                slot: 0,
                addr: addr(7002)
            }))
        );
        let empty_host = classify(b"MOVED 16383 :7000", asked);
        assert_eq!(
            empty_host,
            Some(ClusterError::Moved(Redirect {
                slot: 16383,
                addr: NodeAddr {
                    host: asked.into(),
                    port: 7000
                }
            }))
        );
        let v6 = classify(b"MOVED 1 ::1:7000", asked);
        assert!(
            matches!(v6, Some(ClusterError::Moved(Redirect { addr, .. })) if addr.host == "::1")
        );
        assert_eq!(
            classify(
                b"TRYAGAIN Multiple keys request during rehashing of slot",
                asked
            ),
            Some(ClusterError::TryAgain)
        );
        assert_eq!(
            classify(b"CLUSTERDOWN The cluster is down", asked),
            Some(ClusterError::ClusterDown)
        );
        assert_eq!(
            classify(
                b"READONLY You can't write against a read only replica.",
                asked
            ),
            Some(ClusterError::NotServing)
        );
        for other in [
            &b"NOSCRIPT No matching script"[..],
            b"ERR wrong number of arguments",
            b"MOVED 16384 127.0.0.1:1",
            b"MOVED x 127.0.0.1:1",
            b"MOVED 1 127.0.0.1",
            b"MOVED 1 127.0.0.1:0",
            b"ASK 1",
            b"",
            b"\xff\xfe",
        ] {
            assert_eq!(classify(other, asked), None, "{other:?}");
        }
    }

    #[test]
    fn parses_cluster_slots_with_replicas_metadata_and_unknown_hosts() {
        let reply = Frame::Array(Some(vec![
            range(
                0,
                5460,
                vec![node("127.0.0.1", 7000), node("127.0.0.1", 7004)],
            ),
            range(5461, 10922, vec![node("", 7001), node("?", 7005)]),
            range(10923, 16383, vec![node("127.0.0.1", 7002)]),
        ]));
        let ranges = parse_slots(&reply, "10.1.1.1").unwrap();
        assert_eq!(ranges.len(), 3);
        assert_eq!((ranges[0].start, ranges[0].end), (0, 5460));
        assert_eq!(ranges[0].master, addr(7000));
        assert_eq!(ranges[0].replicas, vec![addr(7004)]);
        assert_eq!(ranges[1].master.host, "10.1.1.1");
        assert_eq!(ranges[1].replicas[0].host, "10.1.1.1");
        assert!(ranges[2].replicas.is_empty());
    }

    #[test]
    fn rejects_bad_cluster_slots_replies() {
        let bad = [
            Frame::Error(b"ERR This instance has cluster support disabled".to_vec()),
            Frame::Array(Some(vec![])),
            Frame::Array(Some(vec![Frame::Integer(1)])),
            Frame::Array(Some(vec![range(0, 16384, vec![node("h", 1)])])),
            Frame::Array(Some(vec![range(10, 5, vec![node("h", 1)])])),
            Frame::Array(Some(vec![range(0, 5, vec![])])),
            Frame::Array(Some(vec![range(0, 5, vec![node("h", 70_000)])])),
            Frame::Array(Some(vec![range(-1, 5, vec![node("h", 1)])])),
        ];
        for reply in &bad {
            assert!(parse_slots(reply, "h").is_err(), "{reply:?}");
        }
    }

    fn three_masters() -> Vec<SlotRange> {
        [(0, 5460, 7000), (5461, 10922, 7001), (10923, 16383, 7002)]
            .into_iter()
            .map(|(start, end, port)| SlotRange {
                start,
                end,
                master: addr(port),
                replicas: vec![addr(port + 3)],
            })
            .collect()
    }

    #[test]
    fn routes_by_map_and_follows_moved() {
        let mut r = Router::new();
        assert_eq!(r.route(0, 0), Route::NoMaster, "nothing known yet");
        r.install(&three_masters());
        assert_eq!(r.covered(), SLOTS);
        let a = match r.route(0, 0) {
            Route::Node(id) => id,
            other => panic!("{other:?}"),
        };
        let c = match r.route(16383, 0) {
            Route::Node(id) => id,
            other => panic!("{other:?}"),
        };
        assert_ne!(a, c);
        assert_eq!(r.addr(c), Some(&addr(7002)));
        assert_eq!(r.known().len(), 6);
        assert_eq!(&r.known()[..3], &[addr(7000), addr(7001), addr(7002)]);
        // MOVED: slot 100 now on C; its neighbours stay on A.
        let moved = r
            .moved(&Redirect {
                slot: 100,
                addr: addr(7002),
            })
            .unwrap();
        assert_eq!(moved, c);
        assert_eq!(r.route(100, 0), Route::Node(c));
        assert_eq!(r.route(101, 0), Route::Node(a));
        // MOVED to a node not in the map adds it.
        let d = r
            .moved(&Redirect {
                slot: 101,
                addr: addr(7010),
            })
            .unwrap();
        assert_eq!(r.addr(d), Some(&addr(7010)));
        assert_eq!(r.ids().count(), 4);
    }

    #[test]
    fn a_new_map_keeps_ids_of_surviving_masters_and_drops_the_rest() {
        let mut r = Router::new();
        r.install(&three_masters());
        let id_of = |r: &mut Router, slot| match r.route(slot, 0) {
            Route::Node(id) => id,
            other => panic!("{other:?}"),
        };
        let (a, b) = (id_of(&mut r, 0), id_of(&mut r, 6000));
        // Failover: 7001's replica 7004 takes its slots.
        let mut after = three_masters();
        after[1].master = addr(7004);
        after[1].replicas.clear();
        r.install(&after);
        assert_eq!(id_of(&mut r, 0), a, "untouched master keeps its id");
        let promoted = id_of(&mut r, 6000);
        assert_eq!(r.addr(promoted), Some(&addr(7004)));
        assert!(r.addr(b) != Some(&addr(7001)), "the dead master is gone");
        assert_eq!(r.ids().count(), 3);
        assert!(r.owns_slots(promoted));
        // A map that lost a range: those slots have no master.
        r.install(&after[..2]);
        assert_eq!(r.route(16383, 0), Route::NoMaster);
        assert_eq!(r.covered(), 10923);
    }

    #[test]
    fn back_off_fails_one_slot_until_it_ends() {
        let mut r = Router::new();
        r.install(&three_masters());
        r.back_off(42, 1_000);
        assert_eq!(r.route(42, 999), Route::BackingOff);
        assert!(matches!(r.route(43, 999), Route::Node(_)));
        assert!(matches!(r.route(42, 1_000), Route::Node(_)));
        // A MOVED or a new map ends it at once.
        r.back_off(42, 5_000);
        r.moved(&Redirect {
            slot: 42,
            addr: addr(7001),
        });
        assert!(matches!(r.route(42, 1_001), Route::Node(_)));
        r.back_off(43, 5_000);
        r.install(&three_masters());
        assert!(matches!(r.route(43, 1_001), Route::Node(_)));
    }

    #[test]
    fn single_server_owns_every_slot_and_the_node_table_is_bounded() {
        let mut r = Router::new();
        r.install_single(addr(6379));
        assert_eq!(r.covered(), SLOTS);
        assert_eq!(r.route(16383, 0), Route::Node(0));
        for port in 1..=MAX_NODES as u16 {
            let _ = r.id_for(&addr(port));
        }
        assert_eq!(r.ids().count(), MAX_NODES);
        assert_eq!(r.id_for(&addr(60_000)), None);
        // A new map frees every node that owns nothing.
        r.install(&three_masters());
        assert_eq!(r.ids().count(), 3);
    }
}
