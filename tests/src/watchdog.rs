//! Clean-up that survives the death of the test binary.
//!
//! `Drop` does not run when a test binary is killed, aborts, or keeps a handle in a `static`.
//! Each service we start therefore gets a tiny `sh` watchdog in its own process group, whose
//! stdin is a pipe held by this process: when the pipe closes (this process is gone, however it
//! died) `read` returns and the watchdog signals the service. Normal shutdown goes through the
//! owner's `Drop`, which kills the watchdog first so it never fires on a recycled pid.

use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result};
use std::os::unix::process::CommandExt;

/// Signals `target` (a pid, or `-pgid` for a whole process group) with `signal` (e.g. `QUIT`,
/// `KILL`) when this process exits.
#[derive(Debug)]
pub struct Watchdog {
    child: Child,
}

impl Watchdog {
    pub fn spawn(target: &str, signal: &str) -> Result<Watchdog> {
        let child = Command::new("sh")
            .arg("-c")
            .arg(r#"read -r _; kill -s "$1" -- "$2" 2>/dev/null; exit 0"#)
            .arg("ibex-watchdog")
            .arg(signal)
            .arg(target)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own group: a harness that kills our process group (test timeout, Ctrl-C) must not
            // take the watchdog down with us before it has done its job.
            .process_group(0)
            .spawn()
            .context("spawning the watchdog (sh)")?;
        Ok(Watchdog { child })
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        // Disarm: kill it before its stdin closes, then reap it.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
