//! A client reading a chunked (or length-delimited) response as it arrives, for the suites
//! that check streams event by event (`forwarding.rs`, `ledger_proxy.rs`). Uses the including
//! crate's `WITHIN` deadline.

use anyhow::{anyhow, bail, ensure, Context, Result};
use ibex_e2e::http::{header, Request, ResponseHead};
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::WITHIN;

/// A streamed response read as it arrives: what the client has seen so far.
#[derive(Debug, Clone)]
pub struct Progress {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// The data of every complete chunk so far.
    pub body: Vec<u8>,
    /// The terminating zero-size chunk (and the empty trailer line) arrived.
    pub complete: bool,
}

/// The first value of the response header `name` (case-insensitive).
#[allow(
    dead_code,
    reason = "not every suite including this module reads headers"
)]
pub fn header_of(p: &Progress, name: &str) -> Option<String> {
    header(&p.headers, name).map(str::to_owned)
}

/// A client reading a chunked response bit by bit.
pub struct Streamed {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Streamed {
    pub async fn send(addr: SocketAddr, req: &Request) -> Result<Streamed> {
        let mut stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        stream.write_all(&req.to_bytes(addr, true)).await?;
        Ok(Streamed {
            stream,
            buf: Vec::new(),
        })
    }

    /// Reads until `done` holds for what arrived (within [`WITHIN`]).
    pub async fn read_until(&mut self, done: impl Fn(&Progress) -> bool) -> Result<Progress> {
        let deadline = tokio::time::Instant::now() + WITHIN;
        loop {
            if let Some(p) = parse_chunked(&self.buf)? {
                if done(&p) {
                    return Ok(p);
                }
                if p.complete {
                    bail!("the response ended first: {p:?}");
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = tokio::time::timeout_at(deadline, self.stream.read(&mut chunk))
                .await
                .map_err(|_| {
                    anyhow!(
                        "not within {WITHIN:?}; so far: {:?}",
                        String::from_utf8_lossy(&self.buf)
                    )
                })??;
            if n == 0 {
                bail!(
                    "the proxy closed the connection; so far: {:?}",
                    String::from_utf8_lossy(&self.buf)
                );
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// The response head and the chunks complete so far; `None` until the head is complete.
/// A non-chunked response counts as complete once its `Content-Length` body is in.
fn parse_chunked(buf: &[u8]) -> Result<Option<Progress>> {
    let Some(head) = ResponseHead::parse(buf)? else {
        return Ok(None);
    };
    let head_len = head.len;
    let mut progress = Progress {
        status: head.status,
        body: Vec::new(),
        complete: false,
        headers: head.headers,
    };
    let rest = &buf[head_len..];
    let chunked = header(&progress.headers, "transfer-encoding")
        .is_some_and(|te| te.eq_ignore_ascii_case("chunked"));
    if !chunked {
        let len: usize = header(&progress.headers, "content-length")
            .map(|v| v.trim().parse())
            .transpose()?
            .unwrap_or(0);
        progress.complete = rest.len() >= len;
        progress.body = rest[..len.min(rest.len())].to_vec();
        return Ok(Some(progress));
    }
    let mut pos = 0;
    while let Some(eol) = find_crlf(&rest[pos..]) {
        let line = std::str::from_utf8(&rest[pos..pos + eol])?;
        let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
            .with_context(|| format!("bad chunk size line {line:?}"))?;
        let data = pos + eol + 2;
        if size == 0 {
            // No trailers expected: the empty line ends the body.
            progress.complete = rest.get(data..data + 2) == Some(b"\r\n".as_slice());
            break;
        }
        if rest.len() < data + size + 2 {
            break;
        }
        ensure!(
            &rest[data + size..data + size + 2] == b"\r\n",
            "chunk data not followed by CRLF"
        );
        progress.body.extend_from_slice(&rest[data..data + size]);
        pos = data + size + 2;
    }
    Ok(Some(progress))
}

fn find_crlf(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\r\n")
}
