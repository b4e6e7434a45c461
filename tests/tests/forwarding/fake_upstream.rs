//! A fake OpenAI-compatible upstream for the forwarding suite: a tokio TCP server on
//! `127.0.0.1:0` speaking just enough HTTP/1.1 (keep-alive, `Content-Length` request bodies)
//! and recording every request it receives, head and body, as it received them.
//!
//! What it answers depends on the request (see [`Fake::start`]), so one fake serves every case
//! of a run; [`Mode::Silent`] never answers at all (the upstream timeout case).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ibex_e2e::http::owned_headers;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

/// `GET /v1/models`.
pub const MODELS_BODY: &str = "{\"object\":\"list\",\"data\":[{\"id\":\"fake-model-1\",\"object\":\"model\",\"owned_by\":\"fake\"}]}";
/// A non-streaming completion, deliberately not in serde_json's formatting (spaces, a
/// non-ASCII character, a trailing newline), so a re-serialising proxy would show.
pub const COMPLETION_BODY: &str = "{ \"id\": \"chatcmpl-fwd-1\", \"object\": \"chat.completion\", \"model\": \"fake-model-1\",\n  \"choices\": [{\"index\": 0, \"message\": {\"role\": \"assistant\", \"content\": \"h\u{e9}llo \\u00e9\"}, \"finish_reason\": \"stop\"}],\n  \"usage\": {\"prompt_tokens\": 11, \"completion_tokens\": 7, \"total_tokens\": 18} }\n";
pub const COMPLETION_CONTENT_TYPE: &str = "application/json; charset=utf-8";
/// Usage the completion reports (for `/metrics`).
pub const COMPLETION_MODEL: &str = "fake-model-1";
pub const COMPLETION_TOTAL_TOKENS: u64 = 18;
/// What the fake answers to `"model": BAD_REQUEST_MODEL`.
pub const BAD_REQUEST_MODEL: &str = "fake-400";
pub const BAD_REQUEST_BODY: &str = "{\"error\":{\"message\":\"The model `fake-400` does not exist\",\"type\":\"invalid_request_error\",\"code\":\"model_not_found\"}}";
/// `"stream": true` with this model streams until the connection is closed.
pub const ENDLESS_MODEL: &str = "fake-endless";
/// The events of a paused stream: the first, then (once released) the rest.
pub const STREAM_FIRST: &str = "data: {\"id\":\"chatcmpl-s\",\"object\":\"chat.completion.chunk\",\"model\":\"fake-model-stream\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"first\"}}]}\n\n";
pub const STREAM_REST: [&str; 3] = [
    "data: {\"id\":\"chatcmpl-s\",\"object\":\"chat.completion.chunk\",\"model\":\"fake-model-stream\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" last\"},\"finish_reason\":\"stop\"}]}\n\n",
    "data: {\"id\":\"chatcmpl-s\",\"object\":\"chat.completion.chunk\",\"model\":\"fake-model-stream\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2,\"total_tokens\":7}}\n\n",
    "data: [DONE]\n\n",
];
pub const STREAM_MODEL: &str = "fake-model-stream";
pub const STREAM_TOTAL_TOKENS: u64 = 7;

/// Longest the fake waits for a release, or streams an endless response.
const FAKE_LIMIT: Duration = Duration::from_secs(20);
/// Between two events of an endless stream.
const ENDLESS_PACE: Duration = Duration::from_millis(20);
const MAX_REQUEST_BYTES: usize = 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Answers like an OpenAI-compatible provider (see [`Fake::start`]).
    OpenAi,
    /// Reads requests and never answers.
    Silent,
}

/// One request as the fake received it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    /// In the order received, names as sent.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Seen {
    /// Every value of the header `name` (case-insensitive).
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.all(name).into_iter().next()
    }
}

struct State {
    seen: Mutex<Vec<Seen>>,
    conns: Mutex<Vec<JoinHandle<()>>>,
    /// A paused stream waits for one permit here after its first event.
    release: Semaphore,
    first_sent: AtomicUsize,
    last_sent: AtomicUsize,
    /// Endless streams that saw their connection closed by the proxy.
    endless_closed: AtomicUsize,
    endless_started: AtomicUsize,
}

pub struct Fake {
    pub addr: SocketAddr,
    state: Arc<State>,
    accept: Option<JoinHandle<()>>,
}

impl Fake {
    /// In [`Mode::OpenAi`]: `GET /v1/models` → [`MODELS_BODY`]; `POST /v1/chat/completions` →
    /// by the body's `model` and `stream`: [`BAD_REQUEST_MODEL`] → 400 [`BAD_REQUEST_BODY`];
    /// a stream of [`ENDLESS_MODEL`] → an event every 20 ms until the connection closes;
    /// any other stream → [`STREAM_FIRST`], a pause until [`Fake::release`], then
    /// [`STREAM_REST`] (chunked, `text/event-stream`); otherwise → [`COMPLETION_BODY`].
    pub async fn start(mode: Mode) -> Result<Fake> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            seen: Mutex::default(),
            conns: Mutex::default(),
            release: Semaphore::new(0),
            first_sent: AtomicUsize::new(0),
            last_sent: AtomicUsize::new(0),
            endless_closed: AtomicUsize::new(0),
            endless_started: AtomicUsize::new(0),
        });
        let accept = tokio::spawn({
            let state = state.clone();
            async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let _ = stream.set_nodelay(true);
                    let conn = tokio::spawn(serve(state.clone(), mode, stream));
                    lock(&state.conns).push(conn);
                }
            }
        });
        Ok(Fake {
            addr,
            state,
            accept: Some(accept),
        })
    }

    /// `http://127.0.0.1:PORT/v1`, the form of `IBEX_UPSTREAM_URL`.
    pub fn url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        lock(&self.state.seen).clone()
    }

    pub fn seen_count(&self) -> usize {
        lock(&self.state.seen).len()
    }

    /// Lets one paused stream send the rest of its events.
    pub fn release(&self) {
        self.state.release.add_permits(1);
    }

    /// Paused streams that have sent their first / their last event.
    pub fn first_sent(&self) -> usize {
        self.state.first_sent.load(Ordering::SeqCst)
    }

    pub fn last_sent(&self) -> usize {
        self.state.last_sent.load(Ordering::SeqCst)
    }

    pub fn endless_started(&self) -> usize {
        self.state.endless_started.load(Ordering::SeqCst)
    }

    /// Endless streams whose connection the proxy closed.
    pub fn endless_closed(&self) -> usize {
        self.state.endless_closed.load(Ordering::SeqCst)
    }

    /// Stops listening and closes every connection: from now on a connect is refused.
    pub async fn stop(&mut self) {
        if let Some(accept) = self.accept.take() {
            accept.abort();
            let _ = accept.await;
        }
        let conns = std::mem::take(&mut *lock(&self.state.conns));
        for conn in conns {
            conn.abort();
            let _ = conn.await;
        }
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        if let Some(accept) = self.accept.take() {
            accept.abort();
        }
        for conn in lock(&self.state.conns).drain(..) {
            conn.abort();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn serve(state: Arc<State>, mode: Mode, mut stream: TcpStream) {
    let mut buf = Vec::new();
    loop {
        let seen = match read_request(&mut stream, &mut buf).await {
            Ok(Some(seen)) => seen,
            Ok(None) | Err(_) => return,
        };
        lock(&state.seen).push(seen.clone());
        let keep = match mode {
            Mode::Silent => {
                // Hold the connection, answer nothing, until the proxy gives up.
                let mut sink = [0u8; 4096];
                while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
                false
            }
            Mode::OpenAi => answer(&state, &seen, &mut stream).await.unwrap_or(false),
        };
        if !keep {
            return;
        }
    }
}

/// Reads one request; `None` on a clean close between requests.
pub async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<Option<Seen>> {
    loop {
        let mut slots = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut slots);
        if let httparse::Status::Complete(head_len) = req.parse(buf)? {
            let headers = owned_headers(req.headers);
            let mut seen = Seen {
                method: req.method.unwrap_or_default().to_owned(),
                path: req.path.unwrap_or_default().to_owned(),
                headers,
                body: Vec::new(),
            };
            if seen.header("transfer-encoding").is_some() {
                bail!("the fake reads Content-Length bodies only");
            }
            let len: usize = seen
                .header("content-length")
                .map(|v| v.trim().parse())
                .transpose()
                .context("Content-Length")?
                .unwrap_or(0);
            if len > MAX_REQUEST_BYTES {
                bail!("request body too large for the fake");
            }
            while buf.len() < head_len + len {
                if fill(stream, buf).await? == 0 {
                    bail!("closed inside a body");
                }
            }
            seen.body = buf[head_len..head_len + len].to_vec();
            buf.drain(..head_len + len);
            return Ok(Some(seen));
        }
        if buf.len() > MAX_REQUEST_BYTES {
            bail!("request head too large for the fake");
        }
        if fill(stream, buf).await? == 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            bail!("closed inside a request head");
        }
    }
}

async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<usize> {
    let mut chunk = [0u8; 16 * 1024];
    let n = stream.read(&mut chunk).await?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n)
}

/// Answers one request; `Ok(true)` keeps the connection for another.
async fn answer(state: &State, seen: &Seen, stream: &mut TcpStream) -> Result<bool> {
    if seen.method == "GET" && seen.path == "/v1/models" {
        write_full(stream, 200, "OK", "application/json", MODELS_BODY).await?;
        return Ok(true);
    }
    if !(seen.method == "POST" && seen.path == "/v1/chat/completions") {
        write_full(stream, 404, "Not Found", "application/json", "{}").await?;
        return Ok(true);
    }
    let body: serde_json::Value = serde_json::from_slice(&seen.body).unwrap_or_default();
    let model = body["model"].as_str().unwrap_or_default();
    let streaming = body["stream"].as_bool().unwrap_or(false);
    if model == BAD_REQUEST_MODEL {
        write_full(
            stream,
            400,
            "Bad Request",
            "application/json",
            BAD_REQUEST_BODY,
        )
        .await?;
        return Ok(true);
    }
    if !streaming {
        write_full(stream, 200, "OK", COMPLETION_CONTENT_TYPE, COMPLETION_BODY).await?;
        return Ok(true);
    }
    stream
        .write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\
              Transfer-Encoding: chunked\r\n\r\n",
        )
        .await?;
    if model == ENDLESS_MODEL {
        state.endless_started.fetch_add(1, Ordering::SeqCst);
        endless(state, stream).await;
        return Ok(false);
    }
    write_chunk(stream, STREAM_FIRST).await?;
    state.first_sent.fetch_add(1, Ordering::SeqCst);
    match tokio::time::timeout(FAKE_LIMIT, state.release.acquire()).await {
        Ok(Ok(permit)) => permit.forget(),
        _ => return Ok(false),
    }
    for event in STREAM_REST {
        write_chunk(stream, event).await?;
    }
    state.last_sent.fetch_add(1, Ordering::SeqCst);
    stream.write_all(b"0\r\n\r\n").await?;
    Ok(true)
}

/// Sends an event every [`ENDLESS_PACE`] until a write fails or the peer closes (counted in
/// `endless_closed`), or [`FAKE_LIMIT`] passes (not counted).
async fn endless(state: &State, stream: &mut TcpStream) {
    let deadline = tokio::time::Instant::now() + FAKE_LIMIT;
    let (mut rd, mut wr) = stream.split();
    let mut sink = [0u8; 1024];
    let mut n = 0u64;
    let closed = loop {
        if tokio::time::Instant::now() > deadline {
            break false;
        }
        n += 1;
        let event = format!(
            "data: {{\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{n} \"}}}}]}}\n\n"
        );
        let framed = format!("{:x}\r\n{event}\r\n", event.len());
        if wr.write_all(framed.as_bytes()).await.is_err() {
            break true;
        }
        tokio::select! {
            r = rd.read(&mut sink) => match r {
                Ok(0) | Err(_) => break true,
                Ok(_) => {}
            },
            () = tokio::time::sleep(ENDLESS_PACE) => {}
        }
    };
    if closed {
        state.endless_closed.fetch_add(1, Ordering::SeqCst);
    }
}

async fn write_full(
    stream: &mut TcpStream,
    status: u16,
    reason: &str,
    content_type: &str,
    body: &str,
) -> Result<()> {
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         x-request-id: upstream-own-id\r\nSet-Cookie: upstream=1\r\n\r\n",
        body.len()
    );
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body.as_bytes());
    stream.write_all(&bytes).await?;
    Ok(())
}

async fn write_chunk(stream: &mut TcpStream, data: &str) -> Result<()> {
    let framed = format!("{:x}\r\n{data}\r\n", data.len());
    stream.write_all(framed.as_bytes()).await?;
    stream.flush().await?;
    Ok(())
}
