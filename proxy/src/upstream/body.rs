//! Reading an upstream response body, as a stream of chunks passed on as
//! they arrive ([`BodyReader::into_stream`]) or whole when it is small and
//! length-delimited ([`BodyReader::read_full`]). Every piece goes through
//! the usage scanner on its way; the [`Record`] writes the request's log
//! line and usage metrics when the body is done or dropped.
//!
//! Connection fate: a body read to its end on a keep-alive connection
//! returns the connection to the pool; anything else (client gone, idle
//! timeout, upstream error, junk after the body) closes it.

use std::io;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::clock::Clock;

use bytes::{Buf, Bytes, BytesMut};
use monoio::buf::IoBufMut;

use super::conn::{Conn, Pool};
use super::stats::UpstreamStats;
use super::target::UpstreamRoute;
use super::usage::Scanner;
use crate::http::chunked::{ChunkedDecoder, Event};
use crate::http::BodyStream;

/// Bytes asked of the kernel per read.
pub const READ_SIZE: usize = 16 * 1024;

pub enum Decoder {
    Length(u64),
    Chunked(ChunkedDecoder),
    Close,
}

/// Why a body ended early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyError {
    /// No bytes for `IBEX_UPSTREAM_IDLE_TIMEOUT`.
    IdleTimeout,
    /// The upstream closed or reset before the body was complete.
    Truncated,
    /// Chunked framing the proxy cannot trust.
    Framing,
    /// A whole body over the in-memory cap.
    TooLarge,
}

/// Everything the request's log line and usage metrics need; written once,
/// when the body is finished or dropped.
pub struct Record {
    pub stats: Arc<UpstreamStats>,
    pub request_id: Box<str>,
    pub org: uuid::Uuid,
    pub route: UpstreamRoute,
    pub status: u16,
    pub started: Instant,
    /// The worker's clock, which `started` was read from.
    pub clock: Rc<dyn Clock>,
    pub ttfb: Duration,
    pub streamed: bool,
    pub bytes: u64,
    pub scanner: Scanner,
    /// How the body ended; stays `client_gone` if it was dropped unfinished.
    pub outcome: &'static str,
    /// The request's usage record, finished with what was seen when this drops.
    pub ledger: Option<crate::ledger::meter::Pending>,
}

impl Record {
    /// The client gets an error instead of this response (body too large or broken).
    pub fn client_status(&mut self, err: super::UpstreamError) {
        if let Some(p) = self.ledger.as_mut() {
            p.seen.status = crate::error::ApiError::from(err).status();
        }
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        let events = self.scanner.events();
        let found = self.scanner.take();
        let model = found.model.as_deref().unwrap_or("unknown");
        if let Some(u) = found.usage {
            self.stats.usage(self.org, model, u);
        }
        let usage = found.usage.unwrap_or_default();
        tracing::info!(
            target: "ibex::upstream",
            request_id = %self.request_id,
            org = %self.org,
            route = ?self.route,
            model,
            upstream_status = self.status,
            ttfb_ms = self.ttfb.as_secs_f64() * 1e3,
            total_ms = self.clock.now().saturating_duration_since(self.started).as_secs_f64() * 1e3,
            streamed = self.streamed,
            body_bytes = self.bytes,
            outcome = self.outcome,
            metered = found.usage.is_some(),
            prompt_tokens = usage.prompt_tokens,
            completion_tokens = usage.completion_tokens,
            total_tokens = usage.total_tokens,
            "forwarded"
        );
        if let Some(mut p) = self.ledger.take() {
            p.seen.usage = found
                .usage
                .map(|u| (u.prompt_tokens, u.completion_tokens, u.total_tokens));
            (p.seen.cache_read_tokens, p.seen.cache_creation_tokens) = found
                .usage
                .map_or((0, 0), |u| (u.cache_read_tokens, u.cache_creation_tokens));
            p.seen.events = events;
            p.seen.body_bytes = self.bytes;
            // Moved, not copied: the log line above was the last to read it.
            p.model = found.model;
            p.streamed = self.streamed;
            p.finish();
        }
    }
}

pub struct BodyReader {
    conn: Option<Conn>,
    buf: BytesMut,
    decoder: Decoder,
    idle_timeout: Duration,
    pool: Rc<Pool>,
    keep_alive: bool,
    done: bool,
    pub record: Record,
}

impl BodyReader {
    /// `buf` holds whatever was read past the response head.
    pub fn new(
        conn: Conn,
        buf: BytesMut,
        decoder: Decoder,
        keep_alive: bool,
        idle_timeout: Duration,
        pool: Rc<Pool>,
        record: Record,
    ) -> Self {
        Self {
            conn: Some(conn),
            buf,
            decoder,
            idle_timeout,
            pool,
            keep_alive,
            done: false,
            record,
        }
    }

    /// The next piece of body, `None` at its end. After an `Err` the
    /// connection is closed and the reader yields nothing more.
    pub async fn next(&mut self) -> Result<Option<Bytes>, BodyError> {
        loop {
            if self.done {
                return Ok(None);
            }
            if let Some(piece) = self.decode()? {
                self.record.bytes += piece.len() as u64;
                self.record.scanner.feed(&piece);
                return Ok(Some(piece));
            }
            if self.done {
                return Ok(None);
            }
            self.fill().await?;
        }
    }

    /// Takes what the buffer holds of the body; sets `done` at its end.
    /// Chunked pieces that arrived together are joined into one.
    fn decode(&mut self) -> Result<Option<Bytes>, BodyError> {
        match &mut self.decoder {
            Decoder::Length(remaining) => {
                if *remaining == 0 {
                    self.finish();
                    return Ok(None);
                }
                if self.buf.is_empty() {
                    return Ok(None);
                }
                let n = usize::try_from(*remaining)
                    .unwrap_or(usize::MAX)
                    .min(self.buf.len());
                *remaining -= n as u64;
                let piece = self.buf.split_to(n).freeze();
                if *remaining == 0 {
                    self.finish();
                }
                Ok(Some(piece))
            }
            Decoder::Close => Ok((!self.buf.is_empty()).then(|| self.buf.split().freeze())),
            Decoder::Chunked(d) => {
                let mut pieces = Joiner::default();
                let mut finished = false;
                loop {
                    let Ok(step) = d.decode(&self.buf) else {
                        self.fail("bad_framing");
                        return Err(BodyError::Framing);
                    };
                    match step.event {
                        Event::Data(range) => {
                            self.buf.advance(range.start);
                            pieces.push(self.buf.split_to(range.len()).freeze());
                        }
                        Event::NeedMore => {
                            self.buf.advance(step.consumed);
                            break;
                        }
                        Event::Done => {
                            self.buf.advance(step.consumed);
                            finished = true;
                            break;
                        }
                    }
                }
                if finished {
                    self.finish();
                }
                Ok(pieces.into_bytes())
            }
        }
    }

    /// Reads more bytes from the upstream into `buf`, waiting at most the
    /// idle timeout.
    async fn fill(&mut self) -> Result<(), BodyError> {
        let Some(conn) = self.conn.as_mut() else {
            return Err(BodyError::Truncated);
        };
        let mut buf = std::mem::take(&mut self.buf);
        buf.reserve(READ_SIZE);
        let (len, cap) = (buf.len(), buf.capacity());
        let read = monoio::time::timeout(self.idle_timeout, conn.read(buf.slice_mut(len..cap)));
        match read.await {
            // A timed-out read may have taken bytes with it: the connection
            // is closed, never reused.
            Err(_) => {
                self.fail("idle_timeout");
                Err(BodyError::IdleTimeout)
            }
            Ok((res, slice)) => {
                self.buf = slice.into_inner();
                match res {
                    Ok(0) if matches!(self.decoder, Decoder::Close) => {
                        self.keep_alive = false;
                        self.finish();
                        Ok(())
                    }
                    Ok(0) => {
                        self.fail("upstream_closed");
                        Err(BodyError::Truncated)
                    }
                    Ok(_) => Ok(()),
                    Err(_) => {
                        self.fail("upstream_error");
                        Err(BodyError::Truncated)
                    }
                }
            }
        }
    }

    /// The body is complete: the connection goes back to the pool if it is
    /// keep-alive and nothing unexpected follows the body.
    fn finish(&mut self) {
        self.done = true;
        self.record.outcome = "complete";
        if let Some(conn) = self.conn.take() {
            if self.keep_alive && self.buf.is_empty() {
                self.pool.put(conn);
            }
        }
    }

    fn fail(&mut self, outcome: &'static str) {
        self.done = true;
        self.record.outcome = outcome;
        self.conn = None;
    }

    /// Reads the whole body into memory (at most `cap` bytes).
    pub async fn read_full(&mut self, cap: usize) -> Result<Bytes, BodyError> {
        let mut body = Joiner::default();
        while let Some(piece) = self.next().await? {
            if body.len() + piece.len() > cap {
                self.fail("too_large");
                return Err(BodyError::TooLarge);
            }
            body.push(piece);
        }
        Ok(body.into_bytes().unwrap_or_default())
    }

    /// The body as a client-facing stream. An idle timeout ends it with an
    /// `Err` (the server then closes the client connection, so the client
    /// sees a truncated body); an upstream that stops early ends it cleanly.
    /// Dropping the stream drops the upstream connection.
    pub fn into_stream(mut self) -> BodyStream {
        self.record.streamed = true;
        Box::pin(futures::stream::unfold(Some(self), |state| async move {
            let mut reader = state?;
            match reader.next().await {
                Ok(Some(piece)) => Some((Ok(piece), Some(reader))),
                Ok(None) => None,
                Err(BodyError::IdleTimeout) => Some((
                    Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "upstream idle timeout",
                    )),
                    None,
                )),
                Err(BodyError::Truncated | BodyError::Framing | BodyError::TooLarge) => None,
            }
        }))
    }
}

/// Joins pieces, copying only when there is more than one.
#[derive(Default)]
struct Joiner {
    first: Option<Bytes>,
    joined: Option<BytesMut>,
}

impl Joiner {
    fn push(&mut self, piece: Bytes) {
        match (&mut self.joined, self.first.take()) {
            (Some(j), _) => j.extend_from_slice(&piece),
            (None, None) => self.first = Some(piece),
            (None, Some(f)) => {
                let mut j = BytesMut::with_capacity(f.len() + piece.len());
                j.extend_from_slice(&f);
                j.extend_from_slice(&piece);
                self.joined = Some(j);
            }
        }
    }

    fn len(&self) -> usize {
        self.first.as_ref().map_or(0, Bytes::len) + self.joined.as_ref().map_or(0, BytesMut::len)
    }

    fn into_bytes(self) -> Option<Bytes> {
        self.joined.map(BytesMut::freeze).or(self.first)
    }
}
