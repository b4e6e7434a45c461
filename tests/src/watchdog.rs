//! Clean-up that survives the death of the test binary.
//!
//! `Drop` does not run when a test binary is killed, aborts, or keeps a handle in a `static`.
//! Each service we start therefore gets a tiny `sh` watchdog in its own process group, whose
//! stdin is a pipe held by this process: when the pipe closes (this process is gone, however it
//! died) `read` returns and the watchdog signals the service. Normal shutdown goes through the
//! owner's `Drop`, which kills the watchdog first so it never fires on a recycled pid.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result};
use std::os::unix::process::CommandExt;

/// `$1` signal, `$2` target, `$3` directory to remove afterwards (may be empty).
const SCRIPT: &str = r#"
read -r _
kill -s "$1" -- "$2" 2>/dev/null
if [ -n "$3" ]; then
    i=0
    # Alive and not yet a zombie (our parent is gone, so reaping is up to init).
    while kill -0 -- "$2" 2>/dev/null && ! grep -qs ') Z' "/proc/$2/stat" && [ "$i" -lt 100 ]; do
        sleep 0.1
        i=$((i + 1))
    done
    kill -s KILL -- "$2" 2>/dev/null
    rm -rf -- "$3"
fi
exit 0
"#;

/// Signals `target` (a pid, or `-pgid` for a whole process group) with `signal` (e.g. `QUIT`,
/// `KILL`) when this process exits.
#[derive(Debug)]
pub struct Watchdog {
    child: Child,
}

impl Watchdog {
    ///
    /// With `remove`, it then waits (up to 10 s) for the target to exit and deletes that
    /// directory: a killed test binary leaves no data dir behind either.
    pub fn spawn(target: &str, signal: &str, remove: Option<&Path>) -> Result<Watchdog> {
        let child = Command::new("sh")
            .arg("-c")
            .arg(SCRIPT)
            .arg("ibex-watchdog")
            .arg(signal)
            .arg(target)
            .arg(remove.map(Path::as_os_str).unwrap_or_default())
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
