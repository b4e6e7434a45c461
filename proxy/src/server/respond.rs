//! Writing a response on a connection: the head in one place (framing
//! decided from status, body and version), a small full body coalesced
//! behind it, a streamed body chunked (HTTP/1.1) or until close (HTTP/1.0).
//! Every write is bounded by the stall timeout; a stalled peer closes.

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};

use super::conn::{Close, Conn, Shared};
use crate::http::write::{push_chunk_size, status_has_body};
use crate::http::{Body, BodyKind, Response, Version};

/// A full body up to this size is copied behind the head: one write.
const COALESCE_BODY: usize = 16 * 1024;

impl<IO: AsyncReadRent + AsyncWriteRent> Conn<IO> {
    /// Writes `self.out` completely, or fails if the peer stalls for `stall`.
    pub(super) async fn flush_out(&mut self, stall: Duration) -> Result<(), Close> {
        let out = std::mem::take(&mut self.out);
        match monoio::time::timeout(stall, self.stream.write_all(out)).await {
            Ok((Ok(_), out)) => {
                self.out = out;
                self.out.clear();
                Ok(())
            }
            _ => Err(Close::Silently),
        }
    }

    async fn write_bytes(&mut self, data: Bytes, stall: Duration) -> Result<(), Close> {
        match monoio::time::timeout(stall, self.stream.write_all(data)).await {
            Ok((Ok(_), _)) => Ok(()),
            _ => Err(Close::Silently),
        }
    }

    /// Writes a response; `Ok(true)` when its framing requires closing the
    /// connection afterwards (a stream to an HTTP/1.0 client, a stream error).
    pub(super) async fn write_response<S>(
        &mut self,
        shared: &Shared<S>,
        resp: Response,
        is_head: bool,
        version: Version,
        close: bool,
        http10_keep_alive: bool,
    ) -> Result<bool, Close> {
        let stall = shared.cfg.idle_timeout;
        let date = shared.date.now();
        let has_body = status_has_body(resp.status);
        let Response {
            status,
            headers,
            body,
            ..
        } = resp;
        self.out.clear();
        // The framing follows from the status, the body and the version.
        let kind = match &body {
            _ if !has_body => BodyKind::NoBody,
            Body::Empty => BodyKind::Length(0),
            Body::Full(data) => BodyKind::Length(data.len() as u64),
            Body::Stream(_) if version == Version::Http10 => BodyKind::UntilClose,
            Body::Stream(_) => BodyKind::Chunked,
        };
        crate::http::write_head(
            &mut self.out,
            status,
            &headers,
            kind,
            close,
            http10_keep_alive,
            &date,
        );
        match body {
            Body::Empty => {
                self.flush_out(stall).await?;
                Ok(false)
            }
            Body::Full(data) => {
                let send_body = has_body && !is_head && !data.is_empty();
                if send_body && data.len() <= COALESCE_BODY {
                    self.out.extend_from_slice(&data);
                    self.flush_out(stall).await?;
                } else {
                    self.flush_out(stall).await?;
                    if send_body {
                        self.write_bytes(data, stall).await?;
                    }
                }
                Ok(false)
            }
            Body::Stream(mut stream) => {
                self.flush_out(stall).await?;
                if is_head || !has_body {
                    // Dropping the stream releases the upstream.
                    return Ok(kind == BodyKind::UntilClose);
                }
                while let Some(item) = stream.next().await {
                    let data = match item {
                        Ok(data) => data,
                        // The client sees a truncated body, never a clean end.
                        Err(_) => return Ok(true),
                    };
                    if data.is_empty() {
                        continue;
                    }
                    if kind == BodyKind::Chunked {
                        push_chunk_size(&mut self.out, data.len());
                        self.out.extend_from_slice(&data);
                        self.out.extend_from_slice(b"\r\n");
                    } else {
                        self.out.extend_from_slice(&data);
                    }
                    // A failed write returns here and drops the stream.
                    self.flush_out(stall).await?;
                }
                if kind == BodyKind::Chunked {
                    self.out.extend_from_slice(b"0\r\n\r\n");
                    self.flush_out(stall).await?;
                    Ok(false)
                } else {
                    Ok(true)
                }
            }
        }
    }
}
