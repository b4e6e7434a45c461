//! A throwaway Postgres cluster per test (or per test binary).
//!
//! `initdb` into a fresh temp dir, `postgres` on a free loopback port with a unix socket inside
//! that dir, database `ibex` created, trust auth for loopback only. Durability is switched off
//! (`fsync`, `synchronous_commit`, `full_page_writes`): the cluster lives for one test run.
//! Postgres refuses to run as root, so when we are root the cluster runs as the `postgres`
//! system user and the dir is handed to it. Everything is stopped and removed on Drop.
//!
//! Not for the dev stack (`make dev` runs its own long-lived cluster under `.ibex/`).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::certs::Leaf;
use crate::procs::free_port;
use crate::watchdog::Watchdog;

/// How long a fresh cluster may take to accept connections.
const START_DEADLINE: Duration = Duration::from_secs(30);
/// How long an immediate shutdown may take before the process group is killed.
const STOP_DEADLINE: Duration = Duration::from_secs(10);
/// Port clashes (another process took the port we picked) are retried this many times.
const START_ATTEMPTS: usize = 5;

pub struct Postgres {
    port: u16,
    child: Child,
    watchdog: Option<Watchdog>,
    // Declared last: removed after the server is gone.
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for Postgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Postgres")
            .field("port", &self.port)
            .field("dir", &self.dir.path())
            .finish()
    }
}

/// Who runs the cluster: the `postgres` system user when we are root, else ourselves.
#[derive(Clone, Copy, Debug)]
struct RunAs {
    uid: u32,
    gid: u32,
}

fn run_as() -> Result<Option<RunAs>> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    let user = nix::unistd::User::from_name("postgres")
        .context("looking up the postgres system user")?
        .ok_or_else(|| {
            anyhow!("running as root but there is no `postgres` user: run scripts/ensure-deps.sh")
        })?;
    Ok(Some(RunAs {
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
    }))
}

/// Directory holding `initdb`, `postgres` and `pg_ctl`.
pub fn bindir() -> Result<PathBuf> {
    static BINDIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    BINDIR.get_or_init(find_bindir).clone().ok_or_else(|| {
        anyhow!(
            "Postgres server binaries not found (pg_config --bindir, /usr/lib/postgresql/*/bin): \
                 run scripts/ensure-deps.sh"
        )
    })
}

fn find_bindir() -> Option<PathBuf> {
    let has_server = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
    if let Ok(out) = std::process::Command::new("pg_config")
        .arg("--bindir")
        .output()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && has_server(&dir) {
            return Some(dir);
        }
    }
    // Debian: /usr/lib/postgresql/<major>/bin; take the newest major.
    let mut candidates: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let major = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            has_server(&bin).then_some((major, bin))
        })
        .collect();
    candidates.sort();
    candidates.pop().map(|(_, dir)| dir)
}

fn command(program: &Path, run_as: Option<RunAs>, cwd: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.current_dir(cwd).stdin(Stdio::null()).env("LC_ALL", "C");
    if let Some(user) = run_as {
        // std drops supplementary groups (setgroups(0)) before setuid when we are root.
        cmd.uid(user.uid).gid(user.gid);
    }
    cmd
}

impl Postgres {
    /// initdb a fresh cluster in a temp dir (trust auth on 127.0.0.1 only), start it on a free
    /// loopback port, create database `ibex`. Runs as the `postgres` system user when we are
    /// root; as ourselves otherwise. Stops and removes everything on Drop (also on panic).
    pub async fn start() -> Result<Postgres> {
        Self::start_with(None).await
    }

    /// Like [`Postgres::start`], with `ssl=on` serving `leaf` (copied into the cluster's dir and
    /// handed to the server's user, as Postgres insists). Plain connections still work, so
    /// setup code is unchanged; a client asking for `sslmode=verify-full` gets TLS.
    pub async fn start_tls(leaf: &Leaf) -> Result<Postgres> {
        Self::start_with(Some(leaf)).await
    }

    async fn start_with(leaf: Option<&Leaf>) -> Result<Postgres> {
        let bindir = bindir()?;
        let run_as = run_as()?;
        let dir = tempfile::Builder::new()
            .prefix("ibex-pg-")
            .tempdir()
            .context("creating the Postgres temp dir")?;
        let root = dir.path().to_path_buf();
        let data = root.join("data");
        let sock = root.join("sock");
        std::fs::create_dir(&sock)?;
        if let Some(user) = run_as {
            for path in [&root, &sock] {
                std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid))
                    .with_context(|| format!("chown {} to postgres", path.display()))?;
            }
        }

        let out = command(&bindir.join("initdb"), run_as, &root)
            .args(["-D"])
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ])
            .output()
            .await
            .context("running initdb")?;
        if !out.status.success() {
            bail!(
                "initdb failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // Loopback TCP and our private socket only; nothing else may connect.
        let hba = data.join("pg_hba.conf");
        std::fs::write(
            &hba,
            "local all all trust\nhost all all 127.0.0.1/32 trust\n",
        )?;
        std::fs::set_permissions(&hba, std::fs::Permissions::from_mode(0o600))?;
        if let Some(user) = run_as {
            std::os::unix::fs::chown(&hba, Some(user.uid), Some(user.gid))?;
        }

        let tls = match leaf {
            None => None,
            Some(leaf) => {
                let (cert, key) = (root.join("server.crt"), root.join("server.key"));
                std::fs::copy(&leaf.cert_file, &cert).context("copying the server cert")?;
                std::fs::copy(&leaf.key_file, &key).context("copying the server key")?;
                std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
                if let Some(user) = run_as {
                    for path in [&cert, &key] {
                        std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid))?;
                    }
                }
                Some((cert, key))
            }
        };

        let log_path = root.join("postgres.log");
        let mut last_err = None;
        for _ in 0..START_ATTEMPTS {
            let port = free_port()?;
            let dirs = Dirs {
                root: &root,
                data: &data,
                sock: &sock,
                log: &log_path,
                tls: tls.as_ref(),
            };
            match Self::spawn(&bindir, run_as, &dirs, port).await {
                Ok((child, watchdog)) => {
                    let pg = Postgres {
                        port,
                        child,
                        watchdog: Some(watchdog),
                        dir,
                    };
                    pg.create_database().await?;
                    return Ok(pg);
                }
                Err(StartError::PortTaken) => {
                    last_err = Some(anyhow!("port {port} was taken"));
                }
                Err(StartError::Other(err)) => return Err(err),
            }
        }
        Err(last_err
            .unwrap_or_else(|| anyhow!("no attempt made"))
            .context("starting Postgres: every free port we picked was taken"))
    }

    async fn spawn(
        bindir: &Path,
        run_as: Option<RunAs>,
        dirs: &Dirs<'_>,
        port: u16,
    ) -> Result<(Child, Watchdog), StartError> {
        let (root, data, sock, log_path) = (dirs.root, dirs.data, dirs.sock, dirs.log);
        let mut ssl = Vec::new();
        if let Some((cert, key)) = dirs.tls {
            ssl.extend([
                "-c".to_owned(),
                "ssl=on".to_owned(),
                "-c".to_owned(),
                format!("ssl_cert_file={}", cert.display()),
                "-c".to_owned(),
                format!("ssl_key_file={}", key.display()),
            ]);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .context("opening postgres.log")?;
        let mut child = command(&bindir.join("postgres"), run_as, root)
            .arg("-D")
            .arg(data)
            .arg("-k")
            .arg(sock)
            .args(["-p", &port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "fsync=off"])
            .args(["-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off"])
            .args(["-c", "max_connections=200"])
            .args(["-c", "logging_collector=off"])
            .args(&ssl)
            .stdout(log.try_clone().context("cloning log fd")?)
            .stderr(log)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .context("spawning postgres")?;
        let pid = child
            .id()
            .ok_or_else(|| anyhow!("postgres exited at once"))?;
        // Immediate shutdown if the test binary dies without dropping us.
        let watchdog = Watchdog::spawn(&pid.to_string(), "QUIT", Some(root))?;

        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if let Some(status) = child.try_wait().context("polling postgres")? {
                let log = std::fs::read_to_string(log_path).unwrap_or_default();
                if log.contains("could not bind") || log.contains("Address already in use") {
                    // Truncate so the next attempt's failure is judged on its own output.
                    let _ = std::fs::write(log_path, "");
                    return Err(StartError::PortTaken);
                }
                return Err(StartError::Other(anyhow!(
                    "postgres exited during startup ({status}):\n{log}"
                )));
            }
            if connect(port, "postgres").await.is_ok() {
                return Ok((child, watchdog));
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(log_path).unwrap_or_default();
                return Err(StartError::Other(anyhow!(
                    "postgres not accepting connections after {START_DEADLINE:?}:\n{log}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    async fn create_database(&self) -> Result<()> {
        let client = connect(self.port, "postgres").await?;
        client
            .batch_execute("CREATE DATABASE ibex")
            .await
            .context("CREATE DATABASE ibex")?;
        Ok(())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// superuser/owner DSN: `postgres://postgres@127.0.0.1:PORT/ibex` (`IBEX_DATABASE_ADMIN_URL`).
    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/ibex", self.port)
    }

    /// runtime DSN: `postgres://ibex_app@127.0.0.1:PORT/ibex` (`IBEX_DATABASE_URL`; the role is
    /// created by `ibexctl migrate`).
    pub fn app_url(&self) -> String {
        format!("postgres://ibex_app@127.0.0.1:{}/ibex", self.port)
    }

    /// A client on database `ibex` as the superuser.
    pub async fn admin_client(&self) -> Result<tokio_postgres::Client> {
        connect_url(&self.admin_url()).await
    }

    /// A client on database `ibex` as the runtime role `ibex_app` (after `ibexctl migrate`).
    pub async fn app_client(&self) -> Result<tokio_postgres::Client> {
        connect_url(&self.app_url()).await
    }

    /// The server log so far (to show in a failing assertion).
    pub fn log_contents(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // Disarm the watchdog, then stop the server ourselves.
        self.watchdog.take();
        let Some(pid) = self.child.id() else { return };
        let pid = Pid::from_raw(pid as i32);
        // SIGQUIT = immediate shutdown: no checkpoint, but shared memory is released.
        let _ = signal::kill(pid, Signal::SIGQUIT);
        let deadline = Instant::now() + STOP_DEADLINE;
        while Instant::now() < deadline {
            match self.child.try_wait() {
                // The postmaster exits only after its backends: the group is empty.
                Ok(Some(_)) => return,
                Err(_) => break,
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        // Stuck: kill the whole group (postmaster and backends).
        let _ = signal::killpg(pid, Signal::SIGKILL);
        let _ = self.child.start_kill();
    }
}

/// Where one cluster lives.
struct Dirs<'a> {
    root: &'a Path,
    data: &'a Path,
    sock: &'a Path,
    log: &'a Path,
    /// (certificate, key) for `ssl=on`.
    tls: Option<&'a (PathBuf, PathBuf)>,
}

enum StartError {
    PortTaken,
    Other(anyhow::Error),
}

impl From<anyhow::Error> for StartError {
    fn from(err: anyhow::Error) -> Self {
        StartError::Other(err)
    }
}

impl From<std::io::Error> for StartError {
    fn from(err: std::io::Error) -> Self {
        StartError::Other(err.into())
    }
}

async fn connect(port: u16, db: &str) -> Result<tokio_postgres::Client> {
    connect_url(&format!("postgres://postgres@127.0.0.1:{port}/{db}")).await
}

/// Connects with a short timeout and drives the connection on a background task.
pub async fn connect_url(url: &str) -> Result<tokio_postgres::Client> {
    let (client, conn) = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_postgres::connect(url, tokio_postgres::NoTls),
    )
    .await
    .map_err(|_| anyhow!("connecting to Postgres timed out"))?
    .context("connecting to Postgres")?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}
