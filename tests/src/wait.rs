//! Waiting for a condition by polling, with a deadline: how the suites wait instead of
//! sleeping. A failed attempt is retried (a process still starting refuses connections), and
//! the last error is named if the deadline passes.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, Result};

use crate::http::Request;

/// Runs `f` every 25 ms until it returns `Ok(Some(_))`, at most until `within` has passed.
pub async fn poll<T>(
    what: &str,
    within: Duration,
    mut f: impl AsyncFnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let last = f().await;
        if let Ok(Some(v)) = last {
            return Ok(v);
        }
        if tokio::time::Instant::now() > deadline {
            return Err(anyhow!(
                "timed out waiting for {what}; last: {:?}",
                last.err()
            ));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Until `GET /ready` at `addr` answers 200.
pub async fn ready(addr: SocketAddr, within: Duration) -> Result<()> {
    poll("/ready 200", within, async || {
        Ok((Request::get("/ready").send(addr).await?.status == 200).then_some(()))
    })
    .await
}
