//! `Upstream::forward` against a fake OpenAI-compatible upstream started by
//! each test (std threads, plain HTTP or TLS with certificates generated at
//! test time). The client side runs in a monoio runtime, as on a worker.

use std::future::Future;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use ibex_proxy::clock::SystemClock;
use ibex_proxy::http::{Body, Method, Request, Response};
use ibex_proxy::upstream::{
    render_prometheus, ForwardCtx, Upstream, UpstreamConfig, UpstreamError, UpstreamRoute,
};

const KEY: &str = "sk-upstream-test-key";
const ORG: uuid::Uuid = uuid::Uuid::from_u128(0x1111_2222_3333_4444_5555_6666_7777_8888);

// ---------------------------------------------------------------- fake upstream

/// A request as the fake upstream received it.
#[derive(Debug, Clone)]
struct Seen {
    head: String,
    body: Vec<u8>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<String> {
        self.head.split("\r\n").skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    }
}

trait Io: Read + Write {}
impl<T: Read + Write> Io for T {}

/// Answers one request on the connection; returns false to close it.
type Handler = Arc<dyn Fn(&Seen, &mut dyn Io) -> bool + Send + Sync>;

struct Fake {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    seen: mpsc::Receiver<Seen>,
}

impl Fake {
    fn start(handler: Handler) -> Self {
        Self::start_with(handler, None)
    }

    #[expect(
        clippy::unwrap_used,
        reason = "a test helper: setup failure fails the test"
    )]
    fn start_with(handler: Handler, tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let (tx, seen) = mpsc::channel();
        let count = accepted.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                count.fetch_add(1, Ordering::SeqCst);
                let (handler, tx, tls) = (handler.clone(), tx.clone(), tls.clone());
                std::thread::spawn(move || match tls {
                    None => serve(stream, &*handler, &tx),
                    Some(config) => {
                        let Ok(conn) = rustls::ServerConnection::new(config) else {
                            return;
                        };
                        serve(rustls::StreamOwned::new(conn, stream), &*handler, &tx);
                    }
                });
            }
        });
        Self {
            addr,
            accepted,
            seen,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    #[expect(
        clippy::unwrap_used,
        reason = "a test helper: setup failure fails the test"
    )]
    fn next_seen(&self) -> Seen {
        self.seen.recv_timeout(Duration::from_secs(10)).unwrap()
    }
}

/// Reads requests (Content-Length bodies) until EOF or the handler says stop.
#[expect(
    clippy::unwrap_used,
    reason = "a test helper: setup failure fails the test"
)]
fn serve(mut io: impl Io, handler: &dyn Fn(&Seen, &mut dyn Io) -> bool, tx: &mpsc::Sender<Seen>) {
    let mut buf = Vec::new();
    loop {
        let head_end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            let mut chunk = [0u8; 4096];
            match io.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8(buf[..head_end].to_vec()).unwrap();
        let mut seen = Seen {
            head,
            body: Vec::new(),
        };
        let len: usize = seen
            .header("content-length")
            .map(|v| v.parse().unwrap())
            .unwrap_or(0);
        buf.drain(..head_end);
        while buf.len() < len {
            let mut chunk = [0u8; 4096];
            match io.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        seen.body = buf.drain(..len).collect();
        let _ = tx.send(seen.clone());
        if !handler(&seen, &mut io) {
            return;
        }
    }
}

#[expect(
    clippy::unwrap_used,
    reason = "a test helper: setup failure fails the test"
)]
fn respond(io: &mut dyn Io, raw: &[u8]) {
    io.write_all(raw).unwrap();
    io.flush().unwrap();
}

fn chunk(io: &mut dyn Io, data: &str) {
    let framed = format!("{:x}\r\n{data}\r\n", data.len());
    respond(io, framed.as_bytes());
}

fn json_response(body: &'static str) -> Handler {
    Arc::new(move |_, io| {
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nSet-Cookie: up=1\r\n\
             openai-processing-ms: 5\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        respond(io, head.as_bytes());
        respond(io, body.as_bytes());
        true
    })
}

// ---------------------------------------------------------------- client side

#[expect(
    clippy::unwrap_used,
    reason = "a test helper: setup failure fails the test"
)]
fn run<F: Future>(f: F) -> F::Output {
    monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .build()
        .unwrap()
        .block_on(f)
}

fn config(url: &str) -> UpstreamConfig {
    UpstreamConfig {
        name: "test".to_owned(),
        kind: ibex_proxy::providers::Kind::Openai,
        retries: 0,
        url: url.to_owned(),
        api_key: KEY.to_owned().into(),
        ca_file: None,
        timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(5),
        operator: Default::default(),
    }
}

#[expect(
    clippy::unwrap_used,
    reason = "a test helper: setup failure fails the test"
)]
fn upstream(config: UpstreamConfig) -> Upstream {
    Upstream::new(Rc::new(config), Rc::new(SystemClock::new())).unwrap()
}

fn chat_request(body: &'static str) -> Request {
    let headers = [
        ("Host", "proxy.example"),
        ("Authorization", "Bearer ibex_pat_client_secret_token"),
        ("X-IBEX-Agent-ID", "0b0b0b0b-0000-4000-8000-000000000000"),
        ("Content-Type", "application/json"),
        ("Accept", "application/json"),
        ("User-Agent", "OpenAI/Python 1.51.0"),
        ("Connection", "keep-alive"),
        ("Content-Length", "999"),
    ];
    Request::new(
        Method::Post,
        "/v1/chat/completions",
        &headers,
        Bytes::from_static(body.as_bytes()),
    )
}

async fn chat(up: &Upstream, body: &'static str) -> Result<Response, UpstreamError> {
    let req = chat_request(body);
    let ctx = ForwardCtx {
        request_id: "req-abc-123",
        org_id: &ORG,
        agent_id: &ORG,
        token_id: &ORG,
    };
    up.forward(&req, UpstreamRoute::ChatCompletions, ctx).await
}

fn header<'a>(resp: &'a Response, name: &str) -> Option<&'a [u8]> {
    resp.headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_bytes())
}

#[expect(
    clippy::unwrap_used,
    reason = "a test helper: setup failure fails the test"
)]
async fn body_bytes(resp: Response) -> Vec<u8> {
    match resp.body {
        Body::Empty => Vec::new(),
        Body::Full(b) => b.to_vec(),
        Body::Stream(mut s) => {
            let mut out = Vec::new();
            while let Some(piece) = next_item(&mut s).await {
                out.extend_from_slice(&piece.unwrap());
            }
            out
        }
    }
}

#[expect(
    clippy::expect_used,
    reason = "a test helper: setup failure fails the test"
)]
async fn next_item(s: &mut ibex_proxy::http::BodyStream) -> Option<std::io::Result<Bytes>> {
    monoio::time::timeout(Duration::from_secs(10), s.next())
        .await
        .expect("stream item within 10 s")
}

fn metrics(up: &Upstream) -> String {
    let mut out = String::new();
    render_prometheus(&[up.stats()], &mut out);
    out
}

/// Polls `rx` from inside the runtime (so pending io_uring work such as a
/// close still gets submitted) until a message or the deadline.
async fn recv_async<T>(rx: &mpsc::Receiver<T>) -> Option<T> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(v) = rx.try_recv() {
            return Some(v);
        }
        monoio::time::sleep(Duration::from_millis(5)).await;
    }
    None
}

const COMPLETION: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Hello \"there\""},"finish_reason":"stop"}],"usage":{"prompt_tokens":11,"completion_tokens":5,"total_tokens":16}}"#;

// ---------------------------------------------------------------- tests

#[test]
fn non_streaming_completion_round_trips_byte_for_byte() {
    let fake = Fake::start(json_response(COMPLETION));
    run(async {
        let up = upstream(config(&fake.url()));
        let resp = chat(&up, r#"{"model":"gpt-4o-mini","messages":[]}"#)
            .await
            .unwrap();
        assert_eq!(resp.status, 200);
        assert_eq!(
            header(&resp, "content-type"),
            Some(&b"application/json"[..])
        );
        assert_eq!(header(&resp, "openai-processing-ms"), Some(&b"5"[..]));
        assert_eq!(header(&resp, "set-cookie"), None);
        assert!(matches!(resp.body, Body::Full(_)));
        assert_eq!(body_bytes(resp).await, COMPLETION.as_bytes());

        let m = metrics(&up);
        let org = ORG.to_string();
        for kind_n in [("prompt", 11), ("completion", 5), ("total", 16)] {
            let line = format!(
                "ibex_upstream_usage_tokens_total{{org=\"{org}\",model=\"gpt-4o-mini\",kind=\"{}\"}} {}",
                kind_n.0, kind_n.1
            );
            assert!(m.lines().any(|l| l == line), "missing {line} in\n{m}");
        }
        assert!(m.contains("ibex_upstream_responses_total{status=\"200\"} 1"));
    });
}

#[test]
fn upstream_sees_its_key_and_request_id_never_the_client_credentials() {
    let fake = Fake::start(json_response(COMPLETION));
    run(async {
        let up = upstream(config(&fake.url()));
        let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
        chat(&up, body).await.unwrap();
        let seen = fake.next_seen();
        assert!(
            seen.head
                .starts_with("POST /v1/chat/completions HTTP/1.1\r\n"),
            "{}",
            seen.head
        );
        assert_eq!(
            seen.header("authorization").as_deref(),
            Some(&*format!("Bearer {KEY}"))
        );
        assert_eq!(seen.header("x-request-id").as_deref(), Some("req-abc-123"));
        assert_eq!(seen.header("host"), Some(fake.addr.to_string()));
        assert_eq!(seen.header("content-length"), Some(body.len().to_string()));
        assert_eq!(
            seen.header("user-agent").as_deref(),
            Some("OpenAI/Python 1.51.0")
        );
        assert_eq!(seen.body, body.as_bytes());
        let lower = seen.head.to_ascii_lowercase();
        assert!(!lower.contains("ibex_pat"), "{}", seen.head);
        assert!(!lower.contains("x-ibex-"), "{}", seen.head);
        assert!(!lower.contains("proxy.example"), "{}", seen.head);
        assert!(!lower.contains("connection:"), "{}", seen.head);

        let req = chat_request("");
        let ctx = ForwardCtx {
            request_id: "req-models",
            org_id: &ORG,
            agent_id: &ORG,
            token_id: &ORG,
        };
        up.forward(&req, UpstreamRoute::Models, ctx).await.unwrap();
        let seen = fake.next_seen();
        assert!(
            seen.head.starts_with("GET /v1/models HTTP/1.1\r\n"),
            "{}",
            seen.head
        );
        assert_eq!(seen.header("x-request-id").as_deref(), Some("req-models"));
        assert!(!seen.head.to_ascii_lowercase().contains("ibex_pat"));
    });
}

#[test]
fn upstream_errors_pass_through_with_their_body() {
    let body = r#"{"error":{"message":"model not found","type":"invalid_request_error"}}"#;
    let fake = Fake::start(Arc::new(move |_, io| {
        let head = format!(
            "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nx-ratelimit-remaining-tokens: 9\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        respond(io, head.as_bytes());
        respond(io, body.as_bytes());
        true
    }));
    run(async {
        let up = upstream(config(&fake.url()));
        let resp = chat(&up, "{}").await.unwrap();
        assert_eq!(resp.status, 404);
        assert_eq!(header(&resp, "x-ratelimit-remaining-tokens"), None);
        assert_eq!(body_bytes(resp).await, body.as_bytes());
    });
}

#[test]
fn streamed_chunks_reach_the_client_before_the_upstream_finishes() {
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let go_rx = std::sync::Mutex::new(go_rx);
    let (waited_tx, waited_rx) = mpsc::channel::<bool>();
    let fake = Fake::start(Arc::new(move |_, io| {
        respond(
            io,
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        chunk(io, "data: {\"model\":\"gpt-4o\",\"choices\":[{\"delta\":{\"content\":\"Hel\"}}],\"usage\":null}\n\n");
        // Hold the rest until the client has seen the first chunk.
        let got = go_rx
            .lock()
            .unwrap()
            .recv_timeout(Duration::from_secs(10))
            .is_ok();
        let _ = waited_tx.send(got);
        chunk(io, "data: {\"model\":\"gpt-4o\",\"choices\":[{\"delta\":{\"content\":\"lo\"}}],\"usage\":null}\n\n");
        chunk(io, "data: {\"model\":\"gpt-4o\",\"choices\":[],\"usage\":{\"prompt_tokens\":8,\"completion_tokens\":2,\"total_tokens\":10}}\n\n");
        chunk(io, "data: [DONE]\n\n");
        respond(io, b"0\r\n\r\n");
        true
    }));
    run(async {
        let up = upstream(config(&fake.url()));
        let resp = chat(&up, r#"{"model":"gpt-4o","stream":true}"#)
            .await
            .unwrap();
        assert_eq!(resp.status, 200);
        assert_eq!(
            header(&resp, "content-type"),
            Some(&b"text/event-stream"[..])
        );
        let Body::Stream(mut s) = resp.body else {
            panic!("a streamed body")
        };
        let first = next_item(&mut s).await.unwrap().unwrap();
        assert!(
            first.starts_with(b"data: {\"model\":\"gpt-4o\""),
            "{first:?}"
        );
        assert!(
            first.ends_with(b"\"Hel\"}}],\"usage\":null}\n\n"),
            "{first:?}"
        );
        go_tx.send(()).unwrap();
        let mut rest = Vec::new();
        while let Some(piece) = next_item(&mut s).await {
            rest.extend_from_slice(&piece.unwrap());
        }
        assert!(rest.ends_with(b"data: [DONE]\n\n"));
        assert_eq!(
            waited_rx.recv_timeout(Duration::from_secs(5)),
            Ok(true),
            "first chunk arrived before the upstream went on"
        );
        drop(s);

        let m = metrics(&up);
        let line = format!(
            "ibex_upstream_usage_tokens_total{{org=\"{ORG}\",model=\"gpt-4o\",kind=\"total\"}} 10"
        );
        assert!(m.lines().any(|l| l == line), "missing {line} in\n{m}");
        // The completed stream gave its connection back.
        assert_eq!(up.stats().idle_connections(), 1);
    });
}

#[test]
fn client_gone_mid_stream_closes_the_upstream_connection() {
    let (closed_tx, closed_rx) = mpsc::channel::<()>();
    let fake = Fake::start(Arc::new(move |_, io| {
        respond(
            io,
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        chunk(io, "data: {\"choices\":[]}\n\n");
        // Block until the proxy side closes the connection.
        let mut b = [0u8; 64];
        while matches!(io.read(&mut b), Ok(n) if n > 0) {}
        let _ = closed_tx.send(());
        false
    }));
    run(async {
        let up = upstream(config(&fake.url()));
        let resp = chat(&up, r#"{"stream":true}"#).await.unwrap();
        let Body::Stream(mut s) = resp.body else {
            panic!("a streamed body")
        };
        next_item(&mut s).await.unwrap().unwrap();
        drop(s);
        assert_eq!(
            recv_async(&closed_rx).await,
            Some(()),
            "upstream saw the close"
        );
        assert_eq!(up.stats().idle_connections(), 0);
    });
}

#[test]
fn upstream_that_stops_mid_stream_ends_the_response_cleanly() {
    let fake = Fake::start(Arc::new(|_, io| {
        respond(
            io,
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        chunk(io, "data: {\"choices\":[]}\n\n");
        false
    }));
    run(async {
        let up = upstream(config(&fake.url()));
        let resp = chat(&up, r#"{"stream":true}"#).await.unwrap();
        let Body::Stream(mut s) = resp.body else {
            panic!("a streamed body")
        };
        assert_eq!(
            next_item(&mut s).await.unwrap().unwrap(),
            &b"data: {\"choices\":[]}\n\n"[..]
        );
        assert!(next_item(&mut s).await.is_none(), "clean end, not an error");
    });
}

#[test]
fn silence_mid_stream_ends_it_with_an_error() {
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let release_rx = std::sync::Mutex::new(release_rx);
    let fake = Fake::start(Arc::new(move |_, io| {
        respond(
            io,
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        chunk(io, "data: {}\n\n");
        let _ = release_rx
            .lock()
            .unwrap()
            .recv_timeout(Duration::from_secs(10));
        false
    }));
    run(async {
        let mut cfg = config(&fake.url());
        cfg.idle_timeout = Duration::from_millis(200);
        let up = upstream(cfg);
        let resp = chat(&up, r#"{"stream":true}"#).await.unwrap();
        let Body::Stream(mut s) = resp.body else {
            panic!("a streamed body")
        };
        next_item(&mut s).await.unwrap().unwrap();
        let err = next_item(&mut s).await.unwrap().unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert!(next_item(&mut s).await.is_none());
        release_tx.send(()).unwrap();
    });
}

#[test]
fn upstream_down_is_unavailable() {
    let addr = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    run(async {
        let up = upstream(config(&format!("http://{addr}/v1")));
        assert_eq!(
            chat(&up, "{}").await.err(),
            Some(UpstreamError::Unavailable)
        );
        assert!(metrics(&up).contains("ibex_upstream_errors_total{kind=\"unavailable\"} 1"));
    });
}

#[test]
fn no_headers_in_time_is_a_timeout() {
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let release_rx = std::sync::Mutex::new(release_rx);
    let fake = Fake::start(Arc::new(move |_, _| {
        let _ = release_rx
            .lock()
            .unwrap()
            .recv_timeout(Duration::from_secs(10));
        false
    }));
    run(async {
        let mut cfg = config(&fake.url());
        cfg.timeout = Duration::from_millis(200);
        let up = upstream(cfg);
        assert_eq!(chat(&up, "{}").await.err(), Some(UpstreamError::Timeout));
        assert!(metrics(&up).contains("ibex_upstream_errors_total{kind=\"timeout\"} 1"));
        release_tx.send(()).unwrap();
    });
}

#[test]
fn ambiguous_upstream_framing_is_refused() {
    let fake = Fake::start(Arc::new(|_, io| {
        respond(
            io,
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        );
        false
    }));
    run(async {
        let up = upstream(config(&fake.url()));
        assert_eq!(
            chat(&up, "{}").await.err(),
            Some(UpstreamError::Unavailable)
        );
    });
}

#[test]
fn sequential_requests_reuse_one_connection() {
    let fake = Fake::start(json_response(COMPLETION));
    run(async {
        let up = upstream(config(&fake.url()));
        for _ in 0..5 {
            let resp = chat(&up, "{}").await.unwrap();
            assert_eq!(body_bytes(resp).await, COMPLETION.as_bytes());
        }
        assert_eq!(fake.accepted.load(Ordering::SeqCst), 1);
        assert_eq!(up.stats().connections_opened(), 1);
        assert_eq!(up.stats().idle_connections(), 1);
    });
}

#[test]
fn a_pooled_connection_closed_by_the_upstream_is_replaced_once() {
    // Answers, then closes without saying so: the pooled connection is dead.
    let fake = Fake::start(Arc::new(|_, io| {
        respond(io, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
        false
    }));
    run(async {
        let up = upstream(config(&fake.url()));
        for _ in 0..3 {
            let resp = chat(&up, "{}").await.unwrap();
            assert_eq!(body_bytes(resp).await, b"ok");
        }
        assert_eq!(fake.accepted.load(Ordering::SeqCst), 3);
        let m = metrics(&up);
        assert!(
            m.contains("ibex_upstream_responses_total{status=\"200\"} 3"),
            "{m}"
        );
        assert!(m.contains("ibex_upstream_retries_total 2"), "{m}");
    });
}

#[test]
fn a_connection_that_breaks_after_response_bytes_is_not_retried() {
    // First answer is fine; the second stops inside the head and closes.
    let served = Arc::new(AtomicUsize::new(0));
    let fake = Fake::start(Arc::new(move |_, io| {
        if served.fetch_add(1, Ordering::SeqCst) == 0 {
            respond(io, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
            true
        } else {
            respond(io, b"HTTP/1.1 200 OK\r\nContent-Len");
            false
        }
    }));
    run(async {
        let up = upstream(config(&fake.url()));
        assert_eq!(body_bytes(chat(&up, "{}").await.unwrap()).await, b"ok");
        assert_eq!(
            chat(&up, "{}").await.err(),
            Some(UpstreamError::Unavailable)
        );
        assert_eq!(
            fake.accepted.load(Ordering::SeqCst),
            1,
            "no second connection"
        );
    });
}

#[test]
fn interim_responses_are_skipped() {
    let fake = Fake::start(Arc::new(|_, io| {
        respond(
            io,
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        );
        true
    }));
    run(async {
        let up = upstream(config(&fake.url()));
        let resp = chat(&up, "{}").await.unwrap();
        assert_eq!(resp.status, 200);
        assert_eq!(body_bytes(resp).await, b"ok");
    });
}

#[test]
fn a_close_delimited_body_streams_to_the_end_and_is_not_pooled() {
    let fake = Fake::start(Arc::new(|_, io| {
        respond(
            io,
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{\"a\":",
        );
        respond(io, b"1}");
        false
    }));
    run(async {
        let up = upstream(config(&fake.url()));
        let resp = chat(&up, "{}").await.unwrap();
        assert!(matches!(resp.body, Body::Stream(_)));
        assert_eq!(body_bytes(resp).await, b"{\"a\":1}");
        assert_eq!(up.stats().idle_connections(), 0);
    });
}

#[test]
fn an_oversized_whole_body_is_refused() {
    let fake = Fake::start(Arc::new(|_, io| {
        respond(io, b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 40000000\r\n\r\n{");
        false
    }));
    run(async {
        let up = upstream(config(&fake.url()));
        assert_eq!(
            chat(&up, "{}").await.err(),
            Some(UpstreamError::Unavailable)
        );
    });
}

#[test]
fn a_whole_body_that_stalls_is_a_timeout() {
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let release_rx = std::sync::Mutex::new(release_rx);
    let fake = Fake::start(Arc::new(move |_, io| {
        respond(io, b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 10\r\n\r\n{\"a\"");
        let _ = release_rx
            .lock()
            .unwrap()
            .recv_timeout(Duration::from_secs(10));
        false
    }));
    run(async {
        let mut cfg = config(&fake.url());
        cfg.idle_timeout = Duration::from_millis(200);
        let up = upstream(cfg);
        assert_eq!(chat(&up, "{}").await.err(), Some(UpstreamError::Timeout));
        release_tx.send(()).unwrap();
    });
}

// ---------------------------------------------------------------- TLS

struct Pki {
    ca_pem: String,
    server: Arc<rustls::ServerConfig>,
}

/// A CA and a `localhost` leaf signed by it, made fresh for the test.
#[expect(
    clippy::unwrap_used,
    reason = "a test helper: setup failure fails the test"
)]
fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "ibex test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone(), ca.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .unwrap();
    Pki {
        ca_pem: ca.pem(),
        server: Arc::new(server),
    }
}

#[expect(
    clippy::unwrap_used,
    reason = "a test helper: setup failure fails the test"
)]
fn write_temp(name: &str, contents: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!(
        "ibex-upstream-{}-{}-{name}",
        std::process::id(),
        uuid::Uuid::new_v4()
    ));
    std::fs::write(&path, contents).unwrap();
    path
}

fn tls_config(url: String, ca_pem: &str) -> UpstreamConfig {
    let mut cfg = config(&url);
    cfg.ca_file = Some(write_temp("ca.pem", ca_pem));
    cfg
}

#[test]
fn tls_with_a_valid_chain_works() {
    let pki = pki();
    let fake = Fake::start_with(json_response(COMPLETION), Some(pki.server.clone()));
    run(async {
        let cfg = tls_config(
            format!("https://localhost:{}/v1", fake.addr.port()),
            &pki.ca_pem,
        );
        let up = upstream(cfg);
        for _ in 0..2 {
            let resp = chat(&up, "{}").await.unwrap();
            assert_eq!(body_bytes(resp).await, COMPLETION.as_bytes());
        }
        let seen = fake.next_seen();
        assert_eq!(
            seen.header("authorization").as_deref(),
            Some(&*format!("Bearer {KEY}"))
        );
        assert_eq!(
            fake.accepted.load(Ordering::SeqCst),
            1,
            "TLS connection reused"
        );
    });
}

/// A TLS upstream serving `server`'s `localhost` certificate, reached as
/// `host` while trusting only `ca_pem`: the handshake must fail (502) before
/// any request is sent.
fn assert_tls_refused(server: &Pki, host: &str, ca_pem: &str) {
    let fake = Fake::start_with(json_response(COMPLETION), Some(server.server.clone()));
    run(async {
        let cfg = tls_config(format!("https://{host}:{}/v1", fake.addr.port()), ca_pem);
        let up = upstream(cfg);
        assert_eq!(
            chat(&up, "{}").await.err(),
            Some(UpstreamError::Unavailable)
        );
        assert!(fake.seen.try_recv().is_err(), "no request was sent");
    });
}

#[test]
fn tls_with_the_wrong_host_name_is_refused() {
    let pki = pki();
    // The certificate names `localhost`, not 127.0.0.1.
    assert_tls_refused(&pki, "127.0.0.1", &pki.ca_pem);
}

#[test]
fn tls_with_an_unknown_ca_is_refused() {
    let pki = pki();
    let other = self::pki();
    assert_tls_refused(&pki, "localhost", &other.ca_pem);
}

#[test]
fn bad_configuration_is_refused_at_start() {
    for url in ["ftp://x/v1", "https://user@x/v1", "http://x:0"] {
        assert!(
            Upstream::new(Rc::new(config(url)), Rc::new(SystemClock::new())).is_err(),
            "{url}"
        );
    }
    let mut cfg = config("http://127.0.0.1:1/v1");
    cfg.api_key = "sk-with\r\nInjected: header".to_owned().into();
    assert!(Upstream::new(Rc::new(cfg), Rc::new(SystemClock::new())).is_err());
    let mut cfg = config("https://localhost:1/v1");
    cfg.ca_file = Some(write_temp("empty.pem", ""));
    assert!(
        Upstream::new(Rc::new(cfg), Rc::new(SystemClock::new())).is_err(),
        "a CA file with no certificate"
    );
    // The key never shows in a Debug rendering of the error.
    let mut cfg = config("http://127.0.0.1:1/v1");
    cfg.api_key = "sk secret".to_owned().into();
    let err = Upstream::new(Rc::new(cfg), Rc::new(SystemClock::new()))
        .err()
        .unwrap();
    assert!(!format!("{err:?}").contains("secret"));
}
