//! Fake providers for the routes suite: one tokio HTTP/1.1 server per provider on `127.0.0.1:0`,
//! OpenAI- or Anthropic-shaped, answering every route of SPEC §12 plain or streamed (by the
//! body's `"stream": true`), recording each request as received, and told how to misbehave
//! ([`Behaviour`]) while the test runs.
//!
//! Streams of a model whose name contains `pause` send their first event, then wait for
//! [`Provider::release`] before the rest, so a test can see the first event reach the client
//! while the provider still holds the last.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use super::fake_upstream::{read_request, Seen};

/// Longest a paused stream waits for its release.
const PAUSE_LIMIT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    OpenAi,
    Anthropic,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    Normal,
    /// Answers every request with this status and an error body.
    Status(u16),
    /// Reads the request and never answers.
    Silent,
    /// Streams: the head and the first event, then the connection is closed.
    CutMidStream,
}

struct State {
    seen: Mutex<Vec<Seen>>,
    behaviour: Mutex<Behaviour>,
    release: Semaphore,
    last_sent: AtomicUsize,
    conns: Mutex<Vec<JoinHandle<()>>>,
}

pub struct Provider {
    pub addr: SocketAddr,
    state: Arc<State>,
    accept: JoinHandle<()>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Provider {
    pub async fn start(shape: Shape) -> Result<Provider> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            seen: Mutex::default(),
            behaviour: Mutex::new(Behaviour::Normal),
            release: Semaphore::new(0),
            last_sent: AtomicUsize::new(0),
            conns: Mutex::default(),
        });
        let accept = tokio::spawn({
            let state = state.clone();
            async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let _ = stream.set_nodelay(true);
                    let conn = tokio::spawn(serve(state.clone(), shape, stream));
                    lock(&state.conns).push(conn);
                }
            }
        });
        Ok(Provider {
            addr,
            state,
            accept,
        })
    }

    /// `http://127.0.0.1:PORT/v1`, a provider's `base_url`.
    pub fn url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn set(&self, b: Behaviour) {
        *lock(&self.state.behaviour) = b;
    }

    pub fn seen(&self) -> Vec<Seen> {
        lock(&self.state.seen).clone()
    }

    pub fn seen_count(&self) -> usize {
        lock(&self.state.seen).len()
    }

    pub fn release(&self) {
        self.state.release.add_permits(1);
    }

    pub fn last_sent(&self) -> usize {
        self.state.last_sent.load(Ordering::SeqCst)
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        self.accept.abort();
        for c in lock(&self.state.conns).drain(..) {
            c.abort();
        }
    }
}

async fn serve(state: Arc<State>, shape: Shape, mut stream: TcpStream) {
    let mut buf = Vec::new();
    while let Ok(Some(seen)) = read_request(&mut stream, &mut buf).await {
        lock(&state.seen).push(seen.clone());
        let behaviour = *lock(&state.behaviour);
        let keep = match behaviour {
            Behaviour::Silent => {
                let mut sink = [0u8; 4096];
                while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
                false
            }
            Behaviour::Status(code) => {
                let body = r#"{"error":{"message":"fake failure","type":"server_error"}}"#;
                full(&mut stream, code, "application/json", body)
                    .await
                    .is_ok()
            }
            Behaviour::Normal | Behaviour::CutMidStream => {
                answer(&state, shape, &seen, &mut stream, behaviour)
                    .await
                    .unwrap_or(false)
            }
        };
        if !keep {
            return;
        }
    }
}

async fn full(stream: &mut TcpStream, status: u16, ctype: &str, body: &str) -> Result<()> {
    let head = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    Ok(())
}

async fn chunk(stream: &mut TcpStream, data: &str) -> Result<()> {
    stream
        .write_all(format!("{:x}\r\n{data}\r\n", data.len()).as_bytes())
        .await?;
    stream.flush().await?;
    Ok(())
}

fn sse(event: Option<&str>, data: &serde_json::Value) -> String {
    match event {
        Some(e) => format!("event: {e}\ndata: {data}\n\n"),
        None => format!("data: {data}\n\n"),
    }
}

/// The events of a stream: those before the pause point, and those after. Chat and completions
/// streams end with a usage-only chunk (`"choices": []`) only when the request asked with
/// `stream_options.include_usage` (`usage`), as OpenAI's do.
pub fn stream_events(
    shape: Shape,
    path: &str,
    model: &str,
    usage: bool,
) -> (Vec<String>, Vec<String>) {
    use serde_json::json;
    match (shape, path) {
        (Shape::Anthropic, _) => (
            vec![
                sse(
                    Some("message_start"),
                    &json!({"type":"message_start","message":{"id":"msg_f","type":"message","role":"assistant","model":model,"content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":25,"cache_creation_input_tokens":7,"cache_read_input_tokens":100,"output_tokens":1}}}),
                ),
                sse(
                    Some("content_block_start"),
                    &json!({"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}),
                ),
                sse(
                    Some("content_block_delta"),
                    &json!({"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"first"}}),
                ),
            ],
            vec![
                sse(
                    Some("content_block_delta"),
                    &json!({"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":" last"}}),
                ),
                sse(
                    Some("content_block_stop"),
                    &json!({"type":"content_block_stop","index":0}),
                ),
                sse(
                    Some("message_delta"),
                    &json!({"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":15}}),
                ),
                sse(Some("message_stop"), &json!({"type":"message_stop"})),
            ],
        ),
        (Shape::OpenAi, "/v1/responses") => (
            vec![
                sse(
                    Some("response.created"),
                    &json!({"type":"response.created","sequence_number":0,"response":{"id":"resp_f","object":"response","created_at":1,"status":"in_progress","model":model,"output":[],"usage":null}}),
                ),
                sse(
                    Some("response.output_text.delta"),
                    &json!({"type":"response.output_text.delta","sequence_number":1,"item_id":"msg_f","output_index":0,"content_index":0,"delta":"first"}),
                ),
            ],
            vec![
                sse(
                    Some("response.output_text.delta"),
                    &json!({"type":"response.output_text.delta","sequence_number":2,"item_id":"msg_f","output_index":0,"content_index":0,"delta":" last"}),
                ),
                sse(
                    Some("response.completed"),
                    &json!({"type":"response.completed","sequence_number":3,"response":{"id":"resp_f","object":"response","created_at":1,"status":"completed","model":model,"output":[{"type":"message","id":"msg_f","status":"completed","role":"assistant","content":[{"type":"output_text","text":"first last","annotations":[]}]}],"usage":{"input_tokens":5,"output_tokens":2,"total_tokens":7}}}),
                ),
            ],
        ),
        (Shape::OpenAi, "/v1/completions") => (
            vec![sse(
                None,
                &json!({"id":"cmpl-f","object":"text_completion","created":1,"model":model,"choices":[{"index":0,"text":"first","finish_reason":null}]}),
            )],
            [
                Some(sse(
                    None,
                    &json!({"id":"cmpl-f","object":"text_completion","created":1,"model":model,"choices":[{"index":0,"text":" last","finish_reason":"stop"}]}),
                )),
                usage.then(|| sse(
                    None,
                    &json!({"id":"cmpl-f","object":"text_completion","created":1,"model":model,"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}),
                )),
                Some("data: [DONE]\n\n".to_owned()),
            ]
            .into_iter()
            .flatten()
            .collect(),
        ),
        (Shape::OpenAi, _) => (
            vec![sse(
                None,
                &json!({"id":"chatcmpl-f","object":"chat.completion.chunk","created":1,"model":model,"choices":[{"index":0,"delta":{"role":"assistant","content":"first"},"finish_reason":null}]}),
            )],
            [
                Some(sse(
                    None,
                    &json!({"id":"chatcmpl-f","object":"chat.completion.chunk","created":1,"model":model,"choices":[{"index":0,"delta":{"content":" last"},"finish_reason":"stop"}]}),
                )),
                usage.then(|| sse(
                    None,
                    &json!({"id":"chatcmpl-f","object":"chat.completion.chunk","created":1,"model":model,"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}),
                )),
                Some("data: [DONE]\n\n".to_owned()),
            ]
            .into_iter()
            .flatten()
            .collect(),
        ),
    }
}

/// The whole body of a non-streamed answer.
fn whole(shape: Shape, path: &str, model: &str) -> String {
    use serde_json::json;
    match (shape, path) {
        (Shape::Anthropic, _) => json!({"id":"msg_f","type":"message","role":"assistant","model":model,"content":[{"type":"text","text":"hi"}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":21,"cache_creation_input_tokens":7,"cache_read_input_tokens":100,"output_tokens":4}}),
        (Shape::OpenAi, "/v1/responses") => json!({"id":"resp_f","object":"response","created_at":1,"status":"completed","model":model,"output":[{"type":"message","id":"msg_f","status":"completed","role":"assistant","content":[{"type":"output_text","text":"hi","annotations":[]}]}],"usage":{"input_tokens":9,"output_tokens":4,"total_tokens":13}}),
        (Shape::OpenAi, "/v1/completions") => json!({"id":"cmpl-f","object":"text_completion","created":1,"model":model,"choices":[{"index":0,"text":"hi","finish_reason":"stop","logprobs":null}],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}),
        (Shape::OpenAi, "/v1/embeddings") => json!({"object":"list","model":model,"data":[{"object":"embedding","index":0,"embedding":[0.25,0.5]}],"usage":{"prompt_tokens":6,"total_tokens":6}}),
        (Shape::OpenAi, _) => json!({"id":"chatcmpl-f","object":"chat.completion","created":1,"model":model,"choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":11,"completion_tokens":7,"total_tokens":18}}),
    }
    .to_string()
}

async fn answer(
    state: &State,
    shape: Shape,
    seen: &Seen,
    stream: &mut TcpStream,
    behaviour: Behaviour,
) -> Result<bool> {
    if seen.method == "GET" && seen.path == "/v1/models" {
        full(
            stream,
            200,
            "application/json",
            r#"{"object":"list","data":[]}"#,
        )
        .await?;
        return Ok(true);
    }
    let body: serde_json::Value = serde_json::from_slice(&seen.body).unwrap_or_default();
    let model = body["model"].as_str().unwrap_or_default().to_owned();
    if !body["stream"].as_bool().unwrap_or(false) {
        full(
            stream,
            200,
            "application/json",
            &whole(shape, &seen.path, &model),
        )
        .await?;
        return Ok(true);
    }
    stream
        .write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n",
        )
        .await?;
    let usage = body["stream_options"]["include_usage"]
        .as_bool()
        .unwrap_or(false);
    let (first, rest) = stream_events(shape, &seen.path, &model, usage);
    for e in &first {
        chunk(stream, e).await?;
    }
    if behaviour == Behaviour::CutMidStream {
        return Ok(false);
    }
    if model.contains("pause") {
        match tokio::time::timeout(PAUSE_LIMIT, state.release.acquire()).await {
            Ok(Ok(p)) => p.forget(),
            _ => return Ok(false),
        }
    }
    for e in &rest {
        chunk(stream, e).await?;
    }
    if model.contains("pause") {
        state.last_sent.fetch_add(1, Ordering::SeqCst);
    }
    stream.write_all(b"0\r\n\r\n").await?;
    Ok(true)
}
