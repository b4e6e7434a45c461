//! The workspace binaries as child processes, and small process helpers.
//!
//! Each service runs in its own process group with a scrubbed `IBEX_*` environment (nothing
//! leaks in from a developer's shell), listens on `127.0.0.1:0`, and announces its addresses
//! in one `IBEX_READY key=addr …` line on stdout. stdout and stderr both go to a log file per
//! process, so a test can assert that no secret was ever logged. Processes are killed on Drop
//! (and by a watchdog if the test binary dies); a failing test gets the log tail on stderr.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

use crate::pg::Postgres;
use crate::watchdog::Watchdog;

/// How long a binary may take to print its ready line.
const READY_DEADLINE: Duration = Duration::from_secs(30);
/// How many lines of a service's log a panicking test prints.
const LOG_TAIL_LINES: usize = 60;

/// A loopback port that was free a moment ago (bind `127.0.0.1:0`, read, drop). Callers that
/// pass it to another process must retry on a clash.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .context("binding 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Path of a workspace binary built in the same target dir as the running test
/// (current_exe is `target/<profile>/deps/xxx` → `target/<profile>/<name>`). Error if missing,
/// telling the user to run `cargo build --bins`. `IBEX_E2E_BIN_<NAME>` (the name upper-cased,
/// `-` as `_`: `IBEX_E2E_BIN_IBEX_AUTHD`) points at another build instead (a benchmark's
/// "before" binary).
pub fn bin_path(name: &str) -> Result<PathBuf> {
    let var = format!("IBEX_E2E_BIN_{}", name.to_uppercase().replace('-', "_"));
    if let Some(path) = std::env::var_os(&var) {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().context("current_exe")?;
    let mut dir = exe
        .parent()
        .context("current_exe has no parent directory")?
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    if !path.is_file() {
        bail!(
            "{} not found: build the binaries first with `cargo build --workspace --bins` \
             (same profile as the tests)",
            path.display()
        );
    }
    Ok(path)
}

/// A fresh random operator key (`IBEX_ADMIN_KEY`) for one test stack.
pub fn random_admin_key() -> String {
    format!(
        "ibex-admin-{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// The service key (`IBEX_SERVICE_KEY`) every authd and proxy of this test binary shares unless
/// a test sets its own: random, generated once per process, so stacks started separately by one
/// test still talk to each other.
pub fn service_key() -> &'static str {
    static KEY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    KEY.get_or_init(|| {
        format!(
            "ibex-service-{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        )
    })
}

/// `ibex-authd` on free loopback ports against a [`Postgres`] that has been migrated.
#[derive(Debug)]
pub struct Authd {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    /// The operator key this instance was started with (`IBEX_ADMIN_KEY`).
    pub admin_key: String,
    /// The service key this instance was started with (`IBEX_SERVICE_KEY`).
    pub service_key: String,
    service: Service,
}

impl Authd {
    /// Starts authd with `IBEX_DATABASE_URL` (the runtime role), a random `IBEX_ADMIN_KEY`
    /// (unless `extra_env` sets one), the process's [`service_key`] and `IBEX_LOG=info`;
    /// `extra_env` overrides any of them.
    pub async fn start(pg: &Postgres, extra_env: &[(&str, &str)]) -> Result<Authd> {
        let admin_key = extra_env
            .iter()
            .find(|(k, _)| *k == "IBEX_ADMIN_KEY")
            .map(|(_, v)| (*v).to_owned())
            .unwrap_or_else(random_admin_key);
        let service_key = extra_env
            .iter()
            .find(|(k, _)| *k == "IBEX_SERVICE_KEY")
            .map(|(_, v)| (*v).to_owned())
            .unwrap_or_else(|| service_key().to_owned());
        let mut env = vec![
            ("IBEX_DATABASE_URL".to_owned(), pg.app_url()),
            ("IBEX_ADMIN_KEY".to_owned(), admin_key.clone()),
            ("IBEX_SERVICE_KEY".to_owned(), service_key.clone()),
            (
                "IBEX_AUTHD_GRPC_LISTEN".to_owned(),
                "127.0.0.1:0".to_owned(),
            ),
            (
                "IBEX_AUTHD_HTTP_LISTEN".to_owned(),
                "127.0.0.1:0".to_owned(),
            ),
            ("IBEX_LOG".to_owned(), "info".to_owned()),
        ];
        merge_env(&mut env, extra_env);
        let mut service = Service::new("ibex-authd", env)?;
        let ready = service.spawn(&[]).await?;
        Ok(Authd {
            grpc_addr: ready_addr(&ready, "grpc")?,
            http_addr: ready_addr(&ready, "http")?,
            admin_key,
            service_key,
            service,
        })
    }

    /// `http://127.0.0.1:PORT` (or `https://` when started with `IBEX_AUTHD_TLS_CERT_FILE`), the
    /// form `IBEX_AUTHD_GRPC` and tonic clients take.
    pub fn grpc_url(&self) -> String {
        let scheme = if self.service.has_env("IBEX_AUTHD_TLS_CERT_FILE") {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.grpc_addr)
    }

    /// SIGKILL (as abrupt as a crash); the ports stay reserved for [`Authd::restart`].
    pub fn kill(&mut self) {
        self.service.kill();
    }

    /// Starts it again on the same two ports (after [`Authd::kill`], or kills it first).
    pub async fn restart(&mut self) -> Result<()> {
        self.service.kill();
        let same_ports = [
            (
                "IBEX_AUTHD_GRPC_LISTEN".to_owned(),
                self.grpc_addr.to_string(),
            ),
            (
                "IBEX_AUTHD_HTTP_LISTEN".to_owned(),
                self.http_addr.to_string(),
            ),
        ];
        self.service.spawn_retrying(&same_ports).await?;
        Ok(())
    }

    pub fn is_running(&mut self) -> bool {
        self.service.is_running()
    }

    /// Everything the process wrote to stdout and stderr so far (all its runs).
    pub fn log_contents(&self) -> String {
        self.service.log_contents()
    }

    /// Environment for `ibexctl` management commands through this authd as the operator.
    pub fn ibexctl_env(&self) -> Vec<(String, String)> {
        vec![
            ("IBEX_AUTHD_GRPC".to_owned(), self.grpc_url()),
            ("IBEX_ADMIN_KEY".to_owned(), self.admin_key.clone()),
        ]
    }

    /// Runs `ibexctl <args>` through this authd with the operator key; expects success and one
    /// JSON object on stdout (SPEC §7).
    pub async fn ibexctl_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        ibexctl(&self.ibexctl_env(), args).await?.json()
    }

    /// A fresh org (named `<prefix>-<uuid>`, `rpm` requests a minute), one agent in it, and one
    /// token per entry of `permissions` (bound to the agent when `bound`), in that order.
    pub async fn tenant(
        &self,
        prefix: &str,
        rpm: u32,
        bound: bool,
        permissions: &[&str],
    ) -> Result<Tenant> {
        let name = format!("{prefix}-{}", uuid::Uuid::new_v4().simple());
        let rpm = rpm.to_string();
        let org = self
            .ibexctl_json(&["org", "create", "--name", &name, "--rpm", &rpm])
            .await?;
        let org = json_str(&org, "id")?;
        let agent = self
            .ibexctl_json(&["agent", "create", "--org", &org, "--name", prefix])
            .await?;
        let agent = json_str(&agent, "id")?;
        let mut pats = Vec::new();
        for permissions in permissions {
            let mut args = vec!["token", "create", "--org", &org, "--name", prefix];
            if bound {
                args.extend(["--agent", &agent]);
            }
            args.extend(["--permissions", permissions]);
            pats.push(json_str(&self.ibexctl_json(&args).await?, "token")?);
        }
        Ok(Tenant { org, agent, pats })
    }
}

/// What [`Authd::tenant`] made.
#[derive(Debug, Clone)]
pub struct Tenant {
    pub org: String,
    pub agent: String,
    /// One PAT per requested permission set, in order.
    pub pats: Vec<String>,
}

/// The string at `key` of an `ibexctl` JSON answer.
pub fn json_str(v: &serde_json::Value, key: &str) -> Result<String> {
    v[key]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("no {key} in {v}"))
}

/// `ibex-proxy` on a free loopback port.
#[derive(Debug)]
pub struct Proxy {
    /// The public listener (plain HTTP, or TLS when the proxy was given a certificate).
    pub addr: SocketAddr,
    /// `IBEX_USAGE_SPOOL_DIR`: the caller's, or a directory of this proxy's own (kept across
    /// [`Proxy::restart`], removed on drop).
    pub spool_dir: std::path::PathBuf,
    /// The admin listener (`/metrics`, `/health`, `/ready`), always plain HTTP.
    pub admin: SocketAddr,
    /// Whether the public listener speaks TLS (`https=` in the ready line).
    pub tls: bool,
    service: Service,
    _spool: Option<tempfile::TempDir>,
}

impl Proxy {
    /// Starts the proxy against `authd_grpc` and `redis_url` with `IBEX_PROXY_THREADS=2`,
    /// `IBEX_LOG=info`, `IBEX_AUTH_VALIDATE_TIMEOUT=2s`, the process's [`service_key`] and a
    /// usage spool of its own;
    /// `extra_env` overrides any of them.
    pub async fn start(
        authd_grpc: SocketAddr,
        redis_url: &str,
        extra_env: &[(&str, &str)],
    ) -> Result<Proxy> {
        let mut env = vec![
            ("IBEX_PROXY_LISTEN".to_owned(), "127.0.0.1:0".to_owned()),
            (
                "IBEX_PROXY_ADMIN_LISTEN".to_owned(),
                "127.0.0.1:0".to_owned(),
            ),
            ("IBEX_AUTHD_GRPC".to_owned(), format!("http://{authd_grpc}")),
            ("IBEX_REDIS_URL".to_owned(), redis_url.to_owned()),
            ("IBEX_SERVICE_KEY".to_owned(), service_key().to_owned()),
            ("IBEX_PROXY_THREADS".to_owned(), "2".to_owned()),
            ("IBEX_LOG".to_owned(), "info".to_owned()),
            // A cold validation costs an Argon2id verify plus, on first use, a gRPC connection;
            // on a loaded 2-core CI box that can exceed the 50 ms production default. Tests of
            // the timeout itself set it explicitly.
            ("IBEX_AUTH_VALIDATE_TIMEOUT".to_owned(), "2s".to_owned()),
        ];
        let (spool_dir, spool) = match extra_env.iter().find(|(k, _)| *k == "IBEX_USAGE_SPOOL_DIR")
        {
            Some((_, dir)) => (std::path::PathBuf::from(dir), None),
            None => {
                let dir = tempfile::Builder::new().prefix("ibex-spool-").tempdir()?;
                (dir.path().to_owned(), Some(dir))
            }
        };
        env.push((
            "IBEX_USAGE_SPOOL_DIR".to_owned(),
            spool_dir.to_string_lossy().into_owned(),
        ));
        merge_env(&mut env, extra_env);
        let mut service = Service::new("ibex-proxy", env)?;
        let ready = service.spawn(&[]).await?;
        let tls = ready.contains_key("https");
        Ok(Proxy {
            addr: ready_addr(&ready, if tls { "https" } else { "http" })?,
            admin: ready_addr(&ready, "admin")?,
            tls,
            spool_dir,
            service,
            _spool: spool,
        })
    }

    /// `http://127.0.0.1:PORT<path>` on the admin listener.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// `http://127.0.0.1:PORT<path>`
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn kill(&mut self) {
        self.service.kill();
    }

    /// Sends `sig` to the proxy (SIGHUP: re-read the TLS pair; SIGTERM: drain).
    pub fn signal(&self, sig: Signal) -> Result<()> {
        self.service.signal(sig)
    }

    /// Starts it again on the same port.
    pub async fn restart(&mut self) -> Result<()> {
        self.service.kill();
        let same_port = [
            ("IBEX_PROXY_LISTEN".to_owned(), self.addr.to_string()),
            ("IBEX_PROXY_ADMIN_LISTEN".to_owned(), self.admin.to_string()),
        ];
        self.service.spawn_retrying(&same_port).await?;
        Ok(())
    }

    pub fn is_running(&mut self) -> bool {
        self.service.is_running()
    }

    /// The process id while it runs (for the perf tools that read its `/proc/<pid>/stat`).
    pub fn pid(&self) -> Option<u32> {
        self.service.running.as_ref().map(|r| r.child.id())
    }

    pub fn log_contents(&self) -> String {
        self.service.log_contents()
    }
}

/// Runs `ibexctl migrate` with `IBEX_DATABASE_ADMIN_URL` and `IBEX_DATABASE_URL`.
pub async fn migrate(pg: &Postgres) -> Result<()> {
    ibexctl(&db_env(pg), &["migrate"]).await?.success()?;
    Ok(())
}

/// Runs `ibexctl seed` and returns its `export IBEX_DEV_*=` values by name
/// (e.g. `IBEX_DEV_TOKEN`, `IBEX_DEV_AGENT_ID`).
pub async fn seed(pg: &Postgres) -> Result<HashMap<String, String>> {
    let out = ibexctl(&db_env(pg), &["seed"]).await?.success()?;
    let exports = parse_exports(&out.stdout);
    if exports.is_empty() {
        bail!("ibexctl seed printed no `export IBEX_DEV_*=` lines");
    }
    Ok(exports)
}

fn db_env(pg: &Postgres) -> Vec<(String, String)> {
    vec![
        ("IBEX_DATABASE_ADMIN_URL".to_owned(), pg.admin_url()),
        ("IBEX_DATABASE_URL".to_owned(), pg.app_url()),
    ]
}

/// `export NAME=value` lines (value optionally single- or double-quoted) → map.
pub fn parse_exports(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("export "))
        .filter_map(|assignment| assignment.split_once('='))
        .map(|(name, value)| {
            let value = value.trim();
            let unquoted = value
                .strip_prefix('\'')
                .and_then(|v| v.strip_suffix('\''))
                .or_else(|| value.strip_prefix('"').and_then(|v| v.strip_suffix('"')))
                .unwrap_or(value);
            (name.trim().to_owned(), unquoted.to_owned())
        })
        .collect()
}

/// What one `ibexctl` run produced.
#[derive(Debug, Clone)]
pub struct CtlOutput {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CtlOutput {
    /// Err (with stderr) unless it exited 0.
    pub fn success(self) -> Result<CtlOutput> {
        if !self.status.success() {
            bail!(
                "ibexctl failed ({}):\nstdout: {}\nstderr: {}",
                self.status,
                self.stdout,
                self.stderr
            );
        }
        Ok(self)
    }

    /// Exit 0 and exactly one JSON object on stdout.
    pub fn json(self) -> Result<serde_json::Value> {
        let out = self.success()?;
        let value: serde_json::Value = serde_json::from_str(out.stdout.trim())
            .with_context(|| format!("ibexctl stdout is not one JSON value: {}", out.stdout))?;
        if !value.is_object() {
            bail!("ibexctl printed JSON that is not an object: {value}");
        }
        Ok(value)
    }
}

/// Runs `ibexctl` with a scrubbed `IBEX_*` environment plus `env`.
pub async fn ibexctl(env: &[(String, String)], args: &[&str]) -> Result<CtlOutput> {
    let bin = bin_path("ibexctl")?;
    let mut cmd = tokio::process::Command::new(&bin);
    scrub_env(cmd.as_std_mut());
    cmd.envs(env.iter().map(|(k, v)| (k, v)))
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .map_err(|_| anyhow!("ibexctl {args:?} did not finish within 60 s"))?
        .context("running ibexctl")?;
    Ok(CtlOutput {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Drops every inherited `IBEX_*` variable: tests must not depend on the caller's shell.
fn scrub_env(cmd: &mut Command) {
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("IBEX_") {
            cmd.env_remove(name);
        }
    }
}

fn merge_env(env: &mut Vec<(String, String)>, extra: &[(&str, &str)]) {
    for (name, value) in extra {
        env.retain(|(k, _)| k != name);
        env.push(((*name).to_owned(), (*value).to_owned()));
    }
}

fn ready_addr(ready: &HashMap<String, SocketAddr>, key: &str) -> Result<SocketAddr> {
    ready
        .get(key)
        .copied()
        .ok_or_else(|| anyhow!("ready line has no {key}= address"))
}

/// Parses `IBEX_READY grpc=127.0.0.1:1 http=127.0.0.1:2`.
pub fn parse_ready_line(line: &str) -> Option<HashMap<String, SocketAddr>> {
    let rest = line.trim().strip_prefix("IBEX_READY")?;
    rest.split_whitespace()
        .map(|pair| {
            let (key, addr) = pair.split_once('=')?;
            Some((key.to_owned(), addr.parse().ok()?))
        })
        .collect()
}

/// One binary with its environment and log file; may be killed and started again.
#[derive(Debug)]
struct Service {
    name: &'static str,
    bin: PathBuf,
    env: Vec<(String, String)>,
    running: Option<Running>,
    log_path: PathBuf,
    // Declared last: removed after the process is gone.
    dir: tempfile::TempDir,
}

#[derive(Debug)]
struct Running {
    child: Child,
    _watchdog: Watchdog,
}

impl Service {
    fn new(name: &'static str, env: Vec<(String, String)>) -> Result<Service> {
        let bin = bin_path(name)?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("{name}-"))
            .tempdir()
            .context("creating a log dir")?;
        Ok(Service {
            name,
            bin,
            env,
            running: None,
            log_path: dir.path().join(format!("{name}.log")),
            dir,
        })
    }

    /// Starts the binary (env: ours, then `overrides`) and waits for its ready line.
    async fn spawn(
        &mut self,
        overrides: &[(String, String)],
    ) -> Result<HashMap<String, SocketAddr>> {
        self.kill();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .context("opening the log file")?;
        // Only this run's output counts when looking for the ready line.
        let start_offset = log.metadata()?.len() as usize;
        let mut cmd = Command::new(&self.bin);
        scrub_env(&mut cmd);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)))
            .envs(overrides.iter().map(|(k, v)| (k, v)))
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", self.bin.display()))?;
        let watchdog = Watchdog::spawn(&format!("-{}", child.id()), "KILL", None)?;
        self.running = Some(Running {
            child,
            _watchdog: watchdog,
        });

        let deadline = Instant::now() + READY_DEADLINE;
        loop {
            let log = self.log_contents();
            if let Some(ready) = log
                .get(start_offset..)
                .unwrap_or_default()
                .lines()
                .find_map(parse_ready_line)
            {
                return Ok(ready);
            }
            if let Some(status) = self.exit_status() {
                self.running = None;
                bail!(
                    "{} exited before its IBEX_READY line ({status}):\n{}",
                    self.name,
                    tail(&log, LOG_TAIL_LINES)
                );
            }
            if Instant::now() > deadline {
                self.kill();
                bail!(
                    "{} printed no IBEX_READY line within {READY_DEADLINE:?}:\n{}",
                    self.name,
                    tail(&log, LOG_TAIL_LINES)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// [`Service::spawn`] on ports just released by a killed instance: a few quick retries in
    /// case the kernel has not let go of them yet.
    async fn spawn_retrying(
        &mut self,
        overrides: &[(String, String)],
    ) -> Result<HashMap<String, SocketAddr>> {
        let mut last_err = anyhow!("no attempt made");
        for _ in 0..5 {
            match self.spawn(overrides).await {
                Ok(ready) => return Ok(ready),
                Err(err) => last_err = err,
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(last_err)
    }

    fn has_env(&self, name: &str) -> bool {
        self.env.iter().any(|(k, _)| k == name)
    }

    fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.running.as_mut()?.child.try_wait().ok().flatten()
    }

    fn is_running(&mut self) -> bool {
        self.running.is_some() && self.exit_status().is_none()
    }

    /// Sends `sig` to the process itself (not its group): SIGHUP to reload, SIGTERM to drain.
    fn signal(&self, sig: Signal) -> Result<()> {
        let running = self
            .running
            .as_ref()
            .ok_or_else(|| anyhow!("{} is not running", self.name))?;
        let pid = i32::try_from(running.child.id())?;
        signal::kill(Pid::from_raw(pid), sig)?;
        Ok(())
    }

    /// SIGKILL to the whole process group, then reap.
    fn kill(&mut self) {
        let Some(mut running) = self.running.take() else {
            return;
        };
        if let Ok(pid) = i32::try_from(running.child.id()) {
            let _ = signal::killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let _ = running.child.kill();
        let _ = running.child.wait();
    }

    fn log_contents(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- last {LOG_TAIL_LINES} lines of {} log ----\n{}",
                self.name,
                tail(&self.log_contents(), LOG_TAIL_LINES)
            );
        }
        self.kill();
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_line_parses_every_address() {
        let ready = parse_ready_line("IBEX_READY grpc=127.0.0.1:9091 http=127.0.0.1:8081\n")
            .expect("parses");
        assert_eq!(ready["grpc"], "127.0.0.1:9091".parse().expect("addr"));
        assert_eq!(ready["http"], "127.0.0.1:8081".parse().expect("addr"));
        assert!(parse_ready_line("{\"level\":\"INFO\"}").is_none());
        assert!(parse_ready_line("IBEX_READY http=nonsense").is_none());
    }

    #[test]
    fn exports_are_unquoted() {
        let exports = parse_exports(
            "# dev credentials\nexport IBEX_DEV_TOKEN='ibex_pat_x'\nexport IBEX_DEV_AGENT_ID=\"a\"\nexport IBEX_DEV_ORG_ID=o\n",
        );
        assert_eq!(exports["IBEX_DEV_TOKEN"], "ibex_pat_x");
        assert_eq!(exports["IBEX_DEV_AGENT_ID"], "a");
        assert_eq!(exports["IBEX_DEV_ORG_ID"], "o");
        assert_eq!(exports.len(), 3);
    }
}
