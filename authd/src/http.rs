//! authd's tiny HTTP side: `GET /health` (the process serves), `GET /ready` (Postgres answers)
//! and `GET /metrics` (refusal counters, Prometheus text).
//!
//! Hand-rolled on purpose: two fixed routes, one request per connection, bounded bytes, time and
//! connections. Not a general HTTP server.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use crate::authz::Refusals;

const MAX_REQUEST_BYTES: usize = 8 * 1024;
const MAX_CONNECTIONS: usize = 64;
const READ_TIMEOUT: Duration = Duration::from_secs(5);
const READY_TIMEOUT: Duration = Duration::from_secs(1);

pub async fn serve(
    listener: TcpListener,
    pool: Pool,
    refusals: Arc<Refusals>,
    mut shutdown: watch::Receiver<bool>,
) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!(error = %err, "http accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let Ok(permit) = Arc::clone(&limit).try_acquire_owned() else {
            continue; // Over the limit: drop the connection.
        };
        let pool = pool.clone();
        let refusals = Arc::clone(&refusals);
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tokio::time::timeout(READ_TIMEOUT, handle(stream, &pool, &refusals)).await;
        });
    }
}

/// Prometheus text for the refusal counters.
pub fn metrics_text(refusals: &Refusals) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    format!(
        "# HELP ibex_authd_service_key_refusals_total Internal calls refused for a missing or wrong service key.\n\
         # TYPE ibex_authd_service_key_refusals_total counter\n\
         ibex_authd_service_key_refusals_total {}\n\
         # HELP ibex_authd_admin_key_refusals_total Management calls with a wrong operator key.\n\
         # TYPE ibex_authd_admin_key_refusals_total counter\n\
         ibex_authd_admin_key_refusals_total {}\n\
         # HELP ibex_authd_admin_key_throttled_total Operator-key attempts refused by the per-address throttle.\n\
         # TYPE ibex_authd_admin_key_throttled_total counter\n\
         ibex_authd_admin_key_throttled_total {}\n",
        refusals.service_key.load(Relaxed),
        refusals.admin_key.load(Relaxed),
        refusals.admin_throttled.load(Relaxed),
    )
}

async fn handle(mut stream: TcpStream, pool: &Pool, refusals: &Refusals) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
        if buf.len() > MAX_REQUEST_BYTES {
            return respond(&mut stream, 431, r#"{"status":"headers too large"}"#).await;
        }
    }
    let line = buf.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, path) = (parts.next(), parts.next());
    match (method, path) {
        (Some(b"GET"), Some(b"/health")) => respond(&mut stream, 200, r#"{"status":"ok"}"#).await,
        (Some(b"GET"), Some(b"/metrics")) => {
            let body = metrics_text(refusals);
            respond_as(&mut stream, 200, "text/plain; version=0.0.4", &body).await
        }
        (Some(b"GET"), Some(b"/ready")) => {
            if ready(pool).await {
                respond(&mut stream, 200, r#"{"status":"ready"}"#).await
            } else {
                respond(
                    &mut stream,
                    503,
                    r#"{"status":"unavailable","down":["postgres"]}"#,
                )
                .await
            }
        }
        (Some(b"GET"), _) => respond(&mut stream, 404, r#"{"status":"not found"}"#).await,
        _ => respond(&mut stream, 405, r#"{"status":"method not allowed"}"#).await,
    }
}

async fn ready(pool: &Pool) -> bool {
    let check = async {
        let client = pool.get().await.ok()?;
        client.simple_query("SELECT 1").await.ok()
    };
    matches!(
        tokio::time::timeout(READY_TIMEOUT, check).await,
        Ok(Some(_))
    )
}

async fn respond(stream: &mut TcpStream, status: u16, body: &str) -> std::io::Result<()> {
    respond_as(stream, status, "application/json", body).await
}

async fn respond_as(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
