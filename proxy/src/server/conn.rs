//! The accept loop and the per-connection loop: read a head, read its body,
//! call the service, write the response, repeat (keep-alive, pipelining in
//! order), with the timeouts, limits and error answers of SPEC §3.
//!
//! The parsing itself is pure ([`crate::http::parse_head`],
//! [`crate::http::chunked`]); this file only moves bytes and keeps time.

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::rc::Rc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures::{FutureExt, StreamExt};
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};
use monoio::net::{TcpListener, TcpStream};
use monoio::time::Instant;
use tokio::sync::watch;

use super::shutdown::WorkerDrain;
use super::ServerConfig;
use crate::error::{render, ApiError};
use crate::http::chunked::{ChunkedDecoder, Event};
use crate::http::write::{push_chunk_size, status_has_body};
use crate::http::{
    parse_head, Body, BodyFraming, BodyKind, ConnInfo, DateCache, Head, Method, Response, Service,
    Version,
};
use crate::request_id::{self, RequestId};

/// Smallest free space offered to a read; below it the buffer grows.
const MIN_READ: usize = 1024;
/// Growth step of the read buffer.
const READ_CHUNK: usize = 8 * 1024;
/// A full body up to this size is copied behind the head: one write.
const COALESCE_BODY: usize = 16 * 1024;
/// After an error response, at most this much unread input is discarded
/// (lingering close, so the client can read the answer before a RST).
const LINGER_BYTES: usize = 256 * 1024;
const LINGER_TIME: Duration = Duration::from_secs(2);
/// How long aborted connections get to unwind after the drain deadline.
const ABORT_GRACE: Duration = Duration::from_millis(200);
/// Pause after an accept error (EMFILE...) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// What one worker's connections share. Lives on one thread.
struct Shared<S> {
    worker: usize,
    cfg: ServerConfig,
    service: S,
    drain: WorkerDrain,
    date: DateCache,
}

/// The worker's accept loop; returns when drained (or `drain_timeout`).
pub(super) async fn serve<S: Service + 'static>(
    worker: usize,
    cfg: ServerConfig,
    listener: TcpListener,
    service: S,
    mut stop: watch::Receiver<bool>,
) {
    let drain_timeout = cfg.drain_timeout;
    let max_connections = cfg.max_connections;
    let shared = Rc::new(Shared {
        worker,
        cfg,
        service,
        drain: WorkerDrain::default(),
        date: DateCache::new(),
    });

    let watcher = shared.clone();
    monoio::spawn(async move {
        // An Err means the handle is gone: stop too.
        let _ = stop.wait_for(|stopped| *stopped).await;
        watcher.drain.start();
    });

    loop {
        monoio::select! {
            _ = shared.drain.started() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if shared.drain.open() >= max_connections {
                        tracing::debug!(worker, "connection limit reached: refusing");
                        drop(stream);
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    shared.drain.conn_opened();
                    monoio::spawn(connection(stream, peer, shared.clone()));
                }
                Err(e) => {
                    tracing::warn!(worker, error = %e, "accept failed");
                    monoio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }
    drop(listener);
    tracing::debug!(
        worker,
        open = shared.drain.open(),
        "stopped accepting; draining"
    );
    if monoio::time::timeout(drain_timeout, shared.drain.all_closed())
        .await
        .is_err()
    {
        tracing::warn!(
            worker,
            open = shared.drain.open(),
            "drain timeout: closing remaining connections"
        );
        shared.drain.abort();
        // The aborted tasks run once more to drop their state.
        let _ = monoio::time::timeout(ABORT_GRACE, shared.drain.all_closed()).await;
    }
}

/// Decrements the worker's open-connection count however the task ends.
struct OpenGuard<S>(Rc<Shared<S>>);

impl<S> Drop for OpenGuard<S> {
    fn drop(&mut self) {
        self.0.drain.conn_closed();
    }
}

async fn connection<S: Service + 'static>(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Rc<Shared<S>>,
) {
    let _open = OpenGuard(shared.clone());
    let mut conn = Conn {
        stream,
        buf: BytesMut::with_capacity(READ_CHUNK),
        out: Vec::with_capacity(1024),
        info: ConnInfo {
            peer,
            worker: shared.worker,
        },
    };
    let work = async {
        match conn.run(&shared).await {
            Ok(()) | Err(Close::Silently) => {}
            Err(Close::Refuse(err)) => conn.refuse(&shared, err).await,
        }
    };
    // Past the drain deadline the connection is dropped wherever it is, so
    // the worker can close its socket and release whatever it streams from.
    monoio::select! {
        _ = work => {}
        _ = shared.drain.aborted() => {}
    }
}

/// Why a connection loop ends, when it does not end cleanly.
enum Close {
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

struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    out: Vec<u8>,
    info: ConnInfo,
}

impl Conn {
    async fn run<S: Service>(&mut self, shared: &Shared<S>) -> Result<(), Close> {
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
                    let missing = n - self.buf.len();
                    self.buf.reserve(missing.min(1 << 20));
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

    /// Writes `self.out` completely, or fails if the peer stalls for `stall`.
    async fn flush_out(&mut self, stall: Duration) -> Result<(), Close> {
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
    async fn write_response<S>(
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

    /// Answers `err` with the envelope and a fresh request id, then closes
    /// after a bounded lingering read so the client gets to read it.
    async fn refuse<S>(&mut self, shared: &Shared<S>, err: ApiError) {
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
