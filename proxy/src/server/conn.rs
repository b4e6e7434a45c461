//! The per-connection loop: read a head, read its body, call the service,
//! write the response ([`super::respond`]), repeat (keep-alive, pipelining in
//! order), with the timeouts, limits and error answers of SPEC §3.
//!
//! The parsing itself is pure ([`crate::http::parse_head`],
//! [`crate::http::chunked`]); this file only moves bytes and keeps time.

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures::FutureExt;
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRent};
use monoio::time::Instant;

use super::config::ServerConfig;
use super::edge::Edge;
use super::shutdown::WorkerDrain;
use crate::error::{render, ApiError};
use crate::http::chunked::{ChunkedDecoder, Event};
use crate::http::{parse_head, BodyFraming, ConnInfo, DateCache, Head, Method, Service, Version};
use crate::request_id::{self, RequestId};
use crate::tls::WorkerTls;

/// Smallest free space offered to a read; below it the buffer grows.
const MIN_READ: usize = 1024;
/// Growth step of the read buffer.
pub(super) const READ_CHUNK: usize = 8 * 1024;
/// After an error response, at most this much unread input is discarded
/// (lingering close, so the client can read the answer before a RST).
const LINGER_BYTES: usize = 256 * 1024;
const LINGER_TIME: Duration = Duration::from_secs(2);

/// What one worker's connections share. Lives on one thread.
pub(super) struct Shared<S> {
    pub(super) worker: usize,
    pub(super) cfg: ServerConfig,
    pub(super) service: S,
    pub(super) drain: WorkerDrain,
    pub(super) date: DateCache,
    pub(super) edge: Edge,
    /// This worker's view of the TLS configuration (public listener only).
    pub(super) tls: Option<WorkerTls>,
}

/// Why a connection loop ends, when it does not end cleanly.
pub(super) enum Close {
    /// EOF, I/O error, idle timeout, drain: just close.
    Silently,
    /// Answer with this error envelope, then close.
    Refuse(ApiError),
}

/// Result of waiting for bytes.
enum ReadOutcome {
    Data,
    Eof,
    TimedOut,
    Failed,
}

/// One connection's state over any byte stream (plain TCP or TLS: nothing
/// below knows which).
pub(super) struct Conn<IO> {
    pub(super) stream: IO,
    pub(super) buf: BytesMut,
    /// Response bytes waiting for one write ([`super::respond`]).
    pub(super) out: Vec<u8>,
    pub(super) info: ConnInfo,
}

impl<IO: AsyncReadRent + AsyncWriteRent> Conn<IO> {
    pub(super) async fn run<S: Service>(&mut self, shared: &Shared<S>) -> Result<(), Close> {
        let cfg = &shared.cfg;
        // The first request gets `header_timeout` to start, later ones
        // `idle_timeout` (keep-alive).
        let mut first = true;
        loop {
            let head = self.read_head(shared, first).await?;
            first = false;
            let Some(head) = head else {
                return Ok(());
            };
            let method = head.method;
            let version = head.version;
            let keep_alive = head.keep_alive;
            let body = self.read_body(&head, cfg).await?;
            let req = head.into_request(body);

            let call = shared.service.call(req, &self.info);
            let resp = match AssertUnwindSafe(call).catch_unwind().await {
                Ok(resp) => resp,
                Err(_) => {
                    tracing::error!(
                        worker = shared.worker,
                        "service panicked; closing connection"
                    );
                    return Err(Close::Silently);
                }
            };
            let close = resp.close || !keep_alive || shared.drain.is_draining();
            let http10_keep_alive = version == Version::Http10 && !close;
            let closed_by_body = self
                .write_response(
                    shared,
                    resp,
                    method == Method::Head,
                    version,
                    close,
                    http10_keep_alive,
                )
                .await?;
            if close || closed_by_body {
                return Ok(());
            }
        }
    }

    /// Waits for and parses the next head. `Ok(None)`: the connection ended
    /// (or went idle too long) between requests.
    async fn read_head<S>(
        &mut self,
        shared: &Shared<S>,
        first: bool,
    ) -> Result<Option<Head>, Close> {
        let cfg = &shared.cfg;
        let limits = &cfg.limits;
        // Set once the first byte of this head is here (or was already).
        let mut deadline = (!self.buf.is_empty()).then(|| Instant::now() + cfg.header_timeout);
        loop {
            match parse_head(&mut self.buf, limits) {
                Ok(Some(head)) => return Ok(Some(head)),
                Ok(None) => {}
                Err(e) => return Err(Close::Refuse(e.into())),
            }
            match deadline {
                None => {
                    // Idle: nothing of the next request yet.
                    let wait = if first {
                        cfg.header_timeout
                    } else {
                        cfg.idle_timeout
                    };
                    if shared.drain.is_draining() {
                        return Ok(None);
                    }
                    let outcome = monoio::select! {
                        _ = shared.drain.started() => return Ok(None),
                        r = self.read_more(Instant::now() + wait) => r,
                    };
                    match outcome {
                        ReadOutcome::Data => deadline = Some(Instant::now() + cfg.header_timeout),
                        ReadOutcome::Eof | ReadOutcome::TimedOut | ReadOutcome::Failed => {
                            return Ok(None)
                        }
                    }
                }
                Some(at) => match self.read_more(at).await {
                    ReadOutcome::Data => {}
                    ReadOutcome::TimedOut => return Err(Close::Refuse(ApiError::RequestTimeout)),
                    ReadOutcome::Eof | ReadOutcome::Failed => return Err(Close::Silently),
                },
            }
        }
    }

    async fn read_body(&mut self, head: &Head, cfg: &ServerConfig) -> Result<Bytes, Close> {
        let deadline = Instant::now() + cfg.body_timeout;
        if head.expect_continue && head.framing != BodyFraming::Empty && self.buf.is_empty() {
            // RFC 9110 §10.1.1: tell the client to send the body it holds back.
            self.out.clear();
            self.out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
            self.flush_out(cfg.idle_timeout).await?;
        }
        match head.framing {
            BodyFraming::Empty => Ok(Bytes::new()),
            BodyFraming::Length(n) => {
                // parse_head checked n against the body limit.
                let n = usize::try_from(n).map_err(|_| Close::Refuse(ApiError::PayloadTooLarge))?;
                while self.buf.len() < n {
                    // Grow with what has arrived (doubling), never ahead of it
                    // by more than a read chunk: a head that only claims a large
                    // body reserves nothing large before the token is checked.
                    let missing = n - self.buf.len();
                    self.buf
                        .reserve(missing.min(self.buf.len().max(READ_CHUNK)));
                    self.read_body_bytes(deadline).await?;
                }
                Ok(self.buf.split_to(n).freeze())
            }
            BodyFraming::Chunked => {
                let limit = cfg.limits.body_bytes;
                let mut decoder = ChunkedDecoder::new();
                let mut body = BytesMut::new();
                loop {
                    let step = decoder
                        .decode(&self.buf)
                        .map_err(|e| Close::Refuse(e.into()))?;
                    if let Event::Data(range) = &step.event {
                        if body.len() + range.len() > limit {
                            return Err(Close::Refuse(ApiError::PayloadTooLarge));
                        }
                        body.extend_from_slice(&self.buf[range.clone()]);
                    }
                    self.buf.advance(step.consumed);
                    match step.event {
                        Event::Done => return Ok(body.freeze()),
                        Event::NeedMore => self.read_body_bytes(deadline).await?,
                        Event::Data(_) => {}
                    }
                }
            }
        }
    }

    async fn read_body_bytes(&mut self, deadline: Instant) -> Result<(), Close> {
        match self.read_more(deadline).await {
            ReadOutcome::Data => Ok(()),
            ReadOutcome::TimedOut => Err(Close::Refuse(ApiError::RequestTimeout)),
            ReadOutcome::Eof | ReadOutcome::Failed => Err(Close::Silently),
        }
    }

    /// One read into the buffer's free space, bounded by `deadline`. After a
    /// timeout the read may still consume bytes: callers close.
    async fn read_more(&mut self, deadline: Instant) -> ReadOutcome {
        if self.buf.capacity() - self.buf.len() < MIN_READ {
            self.buf.reserve(READ_CHUNK);
        }
        let buf = std::mem::take(&mut self.buf);
        let len = buf.len();
        let read = self.stream.read(buf.slice_mut(len..));
        match monoio::time::timeout_at(deadline, read).await {
            Err(_) => ReadOutcome::TimedOut,
            Ok((result, slice)) => {
                self.buf = slice.into_inner();
                match result {
                    Ok(0) => ReadOutcome::Eof,
                    Ok(_) => ReadOutcome::Data,
                    Err(_) => ReadOutcome::Failed,
                }
            }
        }
    }

    /// Answers `err` with the envelope and a fresh request id, then closes
    /// after a bounded lingering read so the client gets to read it.
    pub(super) async fn refuse<S>(&mut self, shared: &Shared<S>, err: ApiError) {
        let request_id = RequestId::fresh();
        tracing::debug!(
            worker = shared.worker,
            peer = %self.info.peer,
            request_id = request_id.as_str(),
            code = err.code(),
            "refused malformed or oversized request"
        );
        let mut resp = render(err, request_id.as_str());
        resp.headers
            .push((request_id::HEADER, request_id.header_value()));
        resp.close = true;
        if self
            .write_response(shared, resp, false, Version::Http11, true, false)
            .await
            .is_err()
        {
            return;
        }
        self.linger(&shared.drain).await;
    }

    /// Half-closes, then discards input for a short, bounded while: closing
    /// with unread bytes would send a RST that can destroy the response in
    /// flight to the client.
    async fn linger(&mut self, drain: &WorkerDrain) {
        if self.stream.shutdown().await.is_err() {
            return;
        }
        let deadline = Instant::now() + LINGER_TIME;
        let mut discarded = 0;
        while discarded < LINGER_BYTES && !drain.is_draining() {
            self.buf.clear();
            let outcome = monoio::select! {
                // Politeness only: a drain does not wait for it.
                _ = drain.started() => return,
                r = self.read_more(deadline) => r,
            };
            match outcome {
                ReadOutcome::Data => discarded += self.buf.len(),
                _ => return,
            }
        }
    }
}
