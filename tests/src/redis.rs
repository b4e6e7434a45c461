//! A throwaway `redis-server` on a free loopback port: no persistence, no password, killed on
//! Drop. `stop`/`restart` (same port) let tests check that rate limiting fails open.
//! [`RedisCluster`]: six of them formed into a Redis Cluster (3 masters, 3 replicas).

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use crate::procs::free_port;
use crate::watchdog::Watchdog;

const START_DEADLINE: Duration = Duration::from_secs(15);
const START_ATTEMPTS: usize = 5;

pub struct Redis {
    port: u16,
    /// Extra `redis-server` arguments (a cluster node's settings).
    extra_args: Vec<String>,
    running: Option<(Child, Watchdog)>,
    // Declared last: removed after the server is gone.
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis")
            .field("port", &self.port)
            .field("running", &self.running.is_some())
            .finish()
    }
}

impl Redis {
    /// redis-server on a free loopback port, no persistence, killed on Drop.
    pub async fn start() -> Result<Redis> {
        Redis::start_with(|_| Ok(Vec::new())).await
    }

    /// Like [`Redis::start`] with extra arguments, made from the port it will use.
    async fn start_with(args: impl Fn(u16) -> Result<Vec<String>>) -> Result<Redis> {
        let dir = tempfile::Builder::new()
            .prefix("ibex-redis-")
            .tempdir()
            .context("creating the Redis temp dir")?;
        let mut redis = Redis {
            port: 0,
            extra_args: Vec::new(),
            running: None,
            dir,
        };
        let mut last_err = anyhow!("no attempt made");
        for _ in 0..START_ATTEMPTS {
            redis.port = free_port()?;
            redis.extra_args = args(redis.port)?;
            match redis.spawn().await {
                Ok(()) => return Ok(redis),
                Err(err) => last_err = err,
            }
        }
        Err(last_err.context("starting redis-server"))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT/0`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kills the server (SIGKILL: as abrupt as a crash) and waits for it to exit.
    pub async fn stop(&mut self) -> Result<()> {
        if let Some((mut child, watchdog)) = self.running.take() {
            drop(watchdog);
            child.kill().await.context("killing redis-server")?;
        }
        Ok(())
    }

    /// Starts the server again on the SAME port (empty: nothing was persisted).
    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await?;
        let mut last_err = anyhow!("no attempt made");
        // The port is ours unless someone grabbed it while we were down; retry briefly.
        for _ in 0..START_ATTEMPTS {
            match self.spawn().await {
                Ok(()) => return Ok(()),
                Err(err) => last_err = err,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(last_err.context(format!("restarting redis-server on port {}", self.port)))
    }

    /// Sends one command and returns the raw RESP reply (e.g. `+PONG\r\n`).
    pub async fn command(&self, args: &[&str]) -> Result<String> {
        raw_command(self.port, args).await
    }

    /// The server log so far.
    pub fn log_contents(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    async fn spawn(&mut self) -> Result<()> {
        let log_path = self.dir.path().join("redis.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let mut child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra_args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .context("spawning redis-server (is it installed? run scripts/ensure-deps.sh)")?;
        let pid = child
            .id()
            .ok_or_else(|| anyhow!("redis-server exited at once"))?;
        let watchdog = Watchdog::spawn(&pid.to_string(), "KILL", Some(self.dir.path()))?;
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "redis-server on port {} exited during startup ({status}):\n{}",
                    self.port,
                    self.log_contents()
                );
            }
            if let Ok(reply) = raw_command(self.port, &["PING"]).await {
                if reply.starts_with("+PONG") {
                    self.running = Some((child, watchdog));
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                let _ = child.kill().await;
                bail!("redis-server not answering PING after {START_DEADLINE:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some((mut child, watchdog)) = self.running.take() {
            drop(watchdog);
            let _ = child.start_kill();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                match child.try_wait() {
                    Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                    _ => break,
                }
            }
        }
    }
}

/// One RESP command over a fresh connection; returns the reply as text (a bulk string reply
/// is read to its end; other replies are the first chunk).
async fn raw_command(port: u16, args: &[&str]) -> Result<String> {
    let mut request = format!("*{}\r\n", args.len());
    for arg in args {
        request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    let io = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
        stream.write_all(request.as_bytes()).await?;
        let mut buf = Vec::with_capacity(64 * 1024);
        loop {
            let mut chunk = vec![0u8; 64 * 1024];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                bail!("redis closed the connection");
            }
            buf.extend_from_slice(&chunk[..n]);
            if bulk_complete(&buf) {
                return Ok(String::from_utf8_lossy(&buf).into_owned());
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(2), io)
        .await
        .map_err(|_| anyhow!("redis command timed out"))?
}

/// Whether `buf` holds a whole reply: a bulk string up to its announced length, anything else
/// once a line has ended.
fn bulk_complete(buf: &[u8]) -> bool {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return false;
    };
    if buf.first() != Some(&b'$') {
        return true;
    }
    match std::str::from_utf8(&buf[1..end])
        .ok()
        .and_then(|n| n.parse::<i64>().ok())
    {
        Some(len) if len >= 0 => buf.len() >= end + 2 + len as usize + 2,
        _ => true,
    }
}

/// The text of a bulk string reply (`$n\r\n<text>\r\n`), or the line of any other reply.
pub fn reply_text(reply: &str) -> &str {
    match reply.strip_prefix('$') {
        Some(rest) => rest
            .split_once("\r\n")
            .map_or("", |(_, body)| body.strip_suffix("\r\n").unwrap_or(body)),
        None => reply.get(1..).unwrap_or("").trim_end(),
    }
}

/// A six-node Redis Cluster on free loopback ports: 3 masters and 3 replicas formed by
/// `redis-cli --cluster create --cluster-replicas 1`, `--cluster-node-timeout 1000` (a dead
/// master is replaced in about two seconds) and `--cluster-require-full-coverage no` (the
/// slots of a dead master fail, not the whole cluster). Each node has its own temp dir and is
/// killed on Drop.
pub struct RedisCluster {
    nodes: Vec<Redis>,
}

impl std::fmt::Debug for RedisCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.nodes.iter().map(|n| n.port))
            .finish()
    }
}

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone)]
pub struct ClusterNode {
    pub id: String,
    pub port: u16,
    pub master: bool,
    pub failed: bool,
    /// Slot ranges served (masters), inclusive.
    pub slots: Vec<(u16, u16)>,
}

const CLUSTER_DEADLINE: Duration = Duration::from_secs(60);

impl RedisCluster {
    pub async fn start() -> Result<RedisCluster> {
        let mut last_err = anyhow!("no attempt made");
        for _ in 0..3 {
            match RedisCluster::try_start().await {
                Ok(cluster) => return Ok(cluster),
                Err(err) => last_err = err,
            }
        }
        Err(last_err.context("starting a Redis Cluster"))
    }

    async fn try_start() -> Result<RedisCluster> {
        let mut nodes = Vec::new();
        for _ in 0..6 {
            nodes.push(
                Redis::start_with(|_| {
                    Ok([
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        "1000",
                        "--cluster-require-full-coverage",
                        "no",
                        "--cluster-port",
                        &free_port()?.to_string(),
                    ]
                    .map(str::to_owned)
                    .to_vec())
                })
                .await?,
            );
        }
        let cluster = RedisCluster { nodes };
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for node in &cluster.nodes {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        create
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let out = tokio::time::timeout(CLUSTER_DEADLINE, create.output())
            .await
            .map_err(|_| anyhow!("redis-cli --cluster create timed out"))?
            .context("running redis-cli (is redis-tools installed? run scripts/ensure-deps.sh)")?;
        if !out.status.success() {
            bail!(
                "redis-cli --cluster create failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        cluster.wait_ok().await?;
        Ok(cluster)
    }

    /// Polls until every running node says `cluster_state:ok`, every replica has synced with
    /// its master (else it would refuse to take over), and 3 masters have slots.
    pub async fn wait_ok(&self) -> Result<()> {
        let deadline = Instant::now() + CLUSTER_DEADLINE;
        loop {
            let mut ok = self.wait_ok_once().await;
            for node in self.nodes.iter().filter(|n| n.running.is_some()) {
                let info = node
                    .command(&["INFO", "replication"])
                    .await
                    .unwrap_or_default();
                if info.contains("role:slave") && !info.contains("master_link_status:up") {
                    ok = false;
                    break;
                }
            }
            if ok {
                let masters = self.masters().await.unwrap_or_default();
                if masters.len() == 3 && masters.iter().all(|m| !m.slots.is_empty()) {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("the Redis Cluster never reached cluster_state:ok on every node");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every node's port, in start order.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// `redis://127.0.0.1:PORT` of one node.
    pub fn node_url(&self, port: u16) -> String {
        format!("redis://127.0.0.1:{port}")
    }

    /// `redis://127.0.0.1:P1,127.0.0.1:P2,...` of every node.
    pub fn seed_url(&self) -> String {
        let hosts: Vec<String> = self
            .ports()
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("redis://{}", hosts.join(","))
    }

    fn node(&self, port: u16) -> Result<&Redis> {
        self.nodes
            .iter()
            .find(|n| n.port == port)
            .ok_or_else(|| anyhow!("no cluster node on port {port}"))
    }

    /// One command on the node at `port`; returns the raw reply.
    pub async fn command(&self, port: u16, args: &[&str]) -> Result<String> {
        self.node(port)?.command(args).await
    }

    /// `CLUSTER NODES` as seen by the first running node that answers.
    pub async fn nodes(&self) -> Result<Vec<ClusterNode>> {
        let mut last_err = anyhow!("no node is running");
        for node in self.nodes.iter().filter(|n| n.running.is_some()) {
            match node.command(&["CLUSTER", "NODES"]).await {
                Ok(reply) if reply.starts_with('$') => return Ok(parse_nodes(reply_text(&reply))),
                Ok(reply) => last_err = anyhow!("CLUSTER NODES: {reply}"),
                Err(e) => last_err = e,
            }
        }
        Err(last_err)
    }

    /// Masters not flagged as failed.
    pub async fn masters(&self) -> Result<Vec<ClusterNode>> {
        Ok(self
            .nodes()
            .await?
            .into_iter()
            .filter(|n| n.master && !n.failed)
            .collect())
    }

    /// The port of the live master serving `slot`.
    pub async fn master_of(&self, slot: u16) -> Result<u16> {
        self.masters()
            .await?
            .iter()
            .find(|m| m.slots.iter().any(|&(a, b)| (a..=b).contains(&slot)))
            .map(|m| m.port)
            .ok_or_else(|| anyhow!("no live master serves slot {slot}"))
    }

    /// `CLUSTER KEYSLOT key`, asked of the first running node.
    pub async fn keyslot(&self, key: &str) -> Result<u16> {
        let node = self
            .nodes
            .iter()
            .find(|n| n.running.is_some())
            .ok_or_else(|| anyhow!("no node is running"))?;
        let reply = node.command(&["CLUSTER", "KEYSLOT", key]).await?;
        reply_text(&reply)
            .parse()
            .with_context(|| format!("CLUSTER KEYSLOT reply {reply:?}"))
    }

    /// SIGKILLs the node at `port` (it stays down).
    pub async fn kill(&mut self, port: u16) -> Result<()> {
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.port == port)
            .ok_or_else(|| anyhow!("no cluster node on port {port}"))?;
        node.stop().await
    }

    /// SIGSTOPs (`stop: true`) or SIGCONTs the node at `port`: a master that keeps its sockets
    /// open but stops answering, then answers again.
    pub fn pause(&self, port: u16, stop: bool) -> Result<()> {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        let pid = self
            .node(port)?
            .running
            .as_ref()
            .and_then(|(child, _)| child.id())
            .ok_or_else(|| anyhow!("the node on port {port} is not running"))?;
        let signal = if stop {
            Signal::SIGSTOP
        } else {
            Signal::SIGCONT
        };
        kill(Pid::from_raw(i32::try_from(pid)?), signal).context("signalling redis-server")?;
        Ok(())
    }

    /// Polls until a live master other than `dead` serves `slot` and every running node says
    /// `cluster_state:ok`; returns how long that took.
    pub async fn wait_failover(&self, slot: u16, dead: u16) -> Result<Duration> {
        let start = Instant::now();
        loop {
            if let Ok(port) = self.master_of(slot).await {
                if port != dead && self.wait_ok_once().await {
                    return Ok(start.elapsed());
                }
            }
            if start.elapsed() > CLUSTER_DEADLINE {
                bail!("no replica took over slot {slot} from port {dead}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_ok_once(&self) -> bool {
        for node in self.nodes.iter().filter(|n| n.running.is_some()) {
            let info = node.command(&["CLUSTER", "INFO"]).await.unwrap_or_default();
            if !info.contains("cluster_state:ok") {
                return false;
            }
        }
        true
    }

    /// `CLUSTER MYID` of the node at `port`.
    pub async fn id_of(&self, port: u16) -> Result<String> {
        let reply = self.command(port, &["CLUSTER", "MYID"]).await?;
        Ok(reply_text(&reply).to_owned())
    }

    /// Step 1 of moving `slot` from the master at `from` to the one at `to`:
    /// `IMPORTING` on the target, then `MIGRATING` on the source (the documented order).
    pub async fn begin_migration(&self, slot: u16, from: u16, to: u16) -> Result<()> {
        let (from_id, to_id) = (self.id_of(from).await?, self.id_of(to).await?);
        let s = slot.to_string();
        expect_ok(
            self.command(to, &["CLUSTER", "SETSLOT", &s, "IMPORTING", &from_id])
                .await?,
        )?;
        expect_ok(
            self.command(from, &["CLUSTER", "SETSLOT", &s, "MIGRATING", &to_id])
                .await?,
        )?;
        Ok(())
    }

    /// Step 2: `MIGRATE`s every key of `slot` still on the source; returns how many moved.
    pub async fn migrate_keys(&self, slot: u16, from: u16, to: u16) -> Result<usize> {
        let s = slot.to_string();
        let reply = self
            .command(from, &["CLUSTER", "GETKEYSINSLOT", &s, "1000"])
            .await?;
        let keys: Vec<&str> = reply
            .split("\r\n")
            .skip(1)
            .filter(|l| !l.is_empty() && !l.starts_with('$'))
            .collect();
        if keys.is_empty() {
            return Ok(0);
        }
        let port = to.to_string();
        let mut args = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
        args.extend(keys.iter().copied());
        expect_ok(self.command(from, &args).await?)?;
        Ok(keys.len())
    }

    /// Step 3: `SETSLOT NODE` on the target, the source, then every other master.
    pub async fn finish_migration(&self, slot: u16, from: u16, to: u16) -> Result<()> {
        let to_id = self.id_of(to).await?;
        let s = slot.to_string();
        let mut order = vec![to, from];
        for m in self.masters().await? {
            if !order.contains(&m.port) {
                order.push(m.port);
            }
        }
        for port in order {
            expect_ok(
                self.command(port, &["CLUSTER", "SETSLOT", &s, "NODE", &to_id])
                    .await?,
            )?;
        }
        Ok(())
    }
}

fn expect_ok(reply: String) -> Result<()> {
    if reply.starts_with("+OK") || reply.starts_with("+NOKEY") {
        Ok(())
    } else {
        bail!("Redis answered {reply:?}")
    }
}

/// Parses `CLUSTER NODES`: `<id> <ip:port@cport> <flags> <master> <ping> <pong> <epoch>
/// <link> <slot> <slot>...`; importing/migrating markers (`[...]`) are skipped.
pub fn parse_nodes(text: &str) -> Vec<ClusterNode> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_ascii_whitespace().collect();
            let addr = fields.get(1)?.split('@').next()?;
            let port = addr.rsplit_once(':')?.1.parse().ok()?;
            let flags = fields.get(2)?;
            let slots = fields
                .iter()
                .skip(8)
                .filter(|f| !f.starts_with('['))
                .filter_map(|f| match f.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => f.parse().ok().map(|s| (s, s)),
                })
                .collect();
            Some(ClusterNode {
                id: fields.first()?.to_string(),
                port,
                master: flags.contains("master"),
                failed: flags.contains("fail") && !flags.contains("fail?"),
                slots,
            })
        })
        .collect()
}
