//! A throwaway `redis-server` on a free loopback port: no persistence, no password, killed on
//! Drop. `stop`/`restart` (same port) let tests check that rate limiting fails open.

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
        let dir = tempfile::Builder::new()
            .prefix("ibex-redis-")
            .tempdir()
            .context("creating the Redis temp dir")?;
        let mut redis = Redis {
            port: 0,
            running: None,
            dir,
        };
        let mut last_err = anyhow!("no attempt made");
        for _ in 0..START_ATTEMPTS {
            redis.port = free_port()?;
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

/// One RESP command over a fresh connection; returns the first reply chunk as text.
async fn raw_command(port: u16, args: &[&str]) -> Result<String> {
    let mut request = format!("*{}\r\n", args.len());
    for arg in args {
        request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    let io = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
        stream.write_all(request.as_bytes()).await?;
        let mut buf = vec![0u8; 64 * 1024];
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            bail!("redis closed the connection");
        }
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(2), io)
        .await
        .map_err(|_| anyhow!("redis command timed out"))?
}
