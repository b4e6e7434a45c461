//! The workspace binaries as child processes, and small process helpers.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};

/// A loopback port that was free a moment ago (bind `127.0.0.1:0`, read, drop). Callers that
/// pass it to another process must retry on a clash.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .context("binding 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Path of a workspace binary built in the same target dir as the running test
/// (current_exe is `target/<profile>/deps/xxx` → `target/<profile>/<name>`). Error if missing,
/// telling the user to run `cargo build --bins`.
pub fn bin_path(name: &str) -> Result<PathBuf> {
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
