//! The server on a real loopback socket with a trivial service and a raw
//! `std::net::TcpStream` client: keep-alive, pipelining, limits, timeouts,
//! streaming and drain.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ibex_e2e::http::ResponseHead;

use super::*;
use crate::http::chunked::decode_all;
use crate::http::{Body, ConnInfo, HeaderValue, Method, Request, Response};

/// Answers `<METHOD> <path> <body length>`; a few paths do more.
struct TestService {
    /// Told when a `/slow` request has entered the service.
    entered: Arc<Mutex<mpsc::Sender<()>>>,
}

impl Service for TestService {
    async fn call(&self, req: Request, _conn: &ConnInfo) -> Response {
        let text = |s: String| Response {
            status: 200,
            headers: vec![("Content-Type", HeaderValue::Static("text/plain"))],
            body: Body::Full(Bytes::from(s)),
            close: false,
        };
        match &req.path[..] {
            b"/slow" => {
                if let Ok(tx) = self.entered.lock() {
                    let _ = tx.send(());
                }
                monoio::time::sleep(Duration::from_millis(300)).await;
                text("slow done".into())
            }
            b"/stream" => {
                let items: Vec<std::io::Result<Bytes>> = vec![
                    Ok(Bytes::from_static(b"data: one\n\n")),
                    Ok(Bytes::new()),
                    Ok(Bytes::from_static(b"data: two\n\n")),
                ];
                Response {
                    status: 200,
                    headers: vec![("Content-Type", HeaderValue::Static("text/event-stream"))],
                    body: Body::Stream(Box::pin(futures::stream::iter(items))),
                    close: false,
                }
            }
            b"/stream-error" => {
                let items: Vec<std::io::Result<Bytes>> = vec![
                    Ok(Bytes::from_static(b"partial")),
                    Err(std::io::Error::other("upstream broke")),
                ];
                Response {
                    status: 200,
                    headers: vec![],
                    body: Body::Stream(Box::pin(futures::stream::iter(items))),
                    close: false,
                }
            }
            b"/endless" => {
                // Ticks forever; the guard reports when the server drops it.
                let guard = DropSignal(self.entered.clone());
                let ticks = futures::stream::unfold(guard, |guard| async move {
                    monoio::time::sleep(Duration::from_millis(20)).await;
                    Some((Ok(Bytes::from_static(b"data: tick\n\n")), guard))
                });
                Response {
                    status: 200,
                    headers: vec![],
                    body: Body::Stream(Box::pin(ticks)),
                    close: false,
                }
            }
            b"/close" => Response {
                close: true,
                ..text("bye".into())
            },
            b"/empty" => Response {
                status: 204,
                headers: vec![],
                body: Body::Empty,
                close: false,
            },
            _ => {
                let method = match req.method {
                    Method::Get => "GET",
                    Method::Head => "HEAD",
                    Method::Post => "POST",
                    _ => "OTHER",
                };
                let body = String::from_utf8_lossy(&req.body);
                text(format!(
                    "{method} {} {} {body}",
                    String::from_utf8_lossy(&req.path),
                    req.body.len()
                ))
            }
        }
    }
}

/// Sends on the channel when dropped.
struct DropSignal(Arc<Mutex<mpsc::Sender<()>>>);

impl Drop for DropSignal {
    fn drop(&mut self) {
        if let Ok(tx) = self.0.lock() {
            let _ = tx.send(());
        }
    }
}

struct Running {
    addr: SocketAddr,
    handle: ShutdownHandle,
    thread: Option<JoinHandle<std::io::Result<()>>>,
    entered: mpsc::Receiver<()>,
}

impl Running {
    fn start(cfg: ServerConfig) -> Running {
        let server = Server::bind(cfg).unwrap();
        let addr = server.local_addr();
        let handle = server.shutdown_handle();
        let (tx, entered) = mpsc::channel();
        let tx = Arc::new(Mutex::new(tx));
        let thread = std::thread::spawn(move || {
            server.run(move |_worker| TestService {
                entered: tx.clone(),
            })
        });
        Running {
            addr,
            handle,
            thread: Some(thread),
            entered,
        }
    }

    fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    }

    /// Stops the server and returns how long `run` took to come back.
    fn stop(&mut self) -> std::io::Result<()> {
        self.handle.shutdown();
        let thread = self.thread.take().unwrap();
        thread.join().unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.handle.shutdown();
            let _ = t.join();
        }
    }
}

fn test_config() -> ServerConfig {
    ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        threads: 2,
        header_timeout: Duration::from_secs(5),
        body_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(5),
        drain_timeout: Duration::from_secs(5),
        pin_cpus: false,
        limits: crate::http::Limits::default(),
        max_connections: ServerConfig::MAX_CONNECTIONS,
        legacy_driver: false,
        admin_listen: None,
        tls: None,
        max_conns_per_ip: 0,
    }
}

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Reads responses off one connection, keeping bytes between them.
struct Client {
    stream: TcpStream,
    pending: Vec<u8>,
}

impl Client {
    fn new(stream: TcpStream) -> Client {
        Client {
            stream,
            pending: Vec::new(),
        }
    }

    fn send(&mut self, raw: &[u8]) {
        self.stream.write_all(raw).unwrap();
    }

    fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        match self.stream.read(&mut chunk) {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.pending.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// The next response, or `None` if the server closed first. `head_only`:
    /// the request was HEAD (no body follows whatever the headers say).
    fn reply(&mut self, head_only: bool) -> Option<Reply> {
        loop {
            if let Ok(Some(head)) = ResponseHead::parse(&self.pending) {
                let (status, headers) = (head.status, head.headers);
                self.pending.drain(..head.len);
                let mut reply = Reply {
                    status,
                    headers,
                    body: Vec::new(),
                };
                if head_only || status == 204 || status == 100 {
                    return Some(reply);
                }
                if let Some(len) = reply.header("content-length") {
                    let len: usize = len.parse().unwrap();
                    while self.pending.len() < len {
                        if !self.fill() {
                            return None;
                        }
                    }
                    reply.body = self.pending.drain(..len).collect();
                } else if reply.header("transfer-encoding") == Some("chunked") {
                    loop {
                        if let Some((body, used)) = decode_all(&self.pending).unwrap() {
                            reply.body = body;
                            self.pending.drain(..used);
                            break;
                        }
                        if !self.fill() {
                            return None;
                        }
                    }
                } else {
                    while self.fill() {}
                    reply.body = std::mem::take(&mut self.pending);
                }
                return Some(reply);
            }
            if !self.fill() {
                return None;
            }
        }
    }

    /// True when the server closed the connection (EOF, not a timeout).
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.stream.read(&mut b), Ok(0))
            || matches!(self.stream.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset)
    }
}

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").into_bytes()
}

#[test]
fn keep_alive_serves_many_requests_on_one_connection() {
    let srv = Running::start(test_config());
    let mut c = Client::new(srv.connect());
    for i in 0..5 {
        c.send(&get(&format!("/r{i}")));
        let r = c.reply(false).unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), format!("GET /r{i} 0 "));
        assert_eq!(r.header("connection"), None);
        assert!(r.header("date").is_some());
    }
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let srv = Running::start(test_config());
    for n in [2, 3] {
        let mut c = Client::new(srv.connect());
        let mut raw = Vec::new();
        for i in 0..n {
            raw.extend_from_slice(&get(&format!("/p{i}")));
        }
        // Three pipelined requests, one with a body in the middle.
        if n == 3 {
            raw.clear();
            raw.extend_from_slice(&get("/p0"));
            raw.extend_from_slice(b"POST /p1 HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc");
            raw.extend_from_slice(&get("/p2"));
        }
        c.send(&raw);
        for i in 0..n {
            let r = c.reply(false).unwrap();
            assert!(r.text().contains(&format!("/p{i} ")), "{n}: {}", r.text());
        }
    }
}

#[test]
fn request_bodies_content_length_and_chunked() {
    let srv = Running::start(test_config());
    let mut c = Client::new(srv.connect());
    c.send(b"POST /cl HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\nhello");
    c.send(b" world");
    assert_eq!(c.reply(false).unwrap().text(), "POST /cl 11 hello world");
    c.send(b"POST /ch HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n");
    c.send(b"6;ext=1\r\n world\r\n0\r\nTrailer: x\r\n\r\n");
    assert_eq!(c.reply(false).unwrap().text(), "POST /ch 11 hello world");
}

#[test]
fn expect_continue_gets_100_before_the_body() {
    let srv = Running::start(test_config());
    let mut c = Client::new(srv.connect());
    c.send(b"POST /e HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n");
    assert_eq!(c.reply(false).unwrap().status, 100);
    c.send(b"ok");
    assert_eq!(c.reply(false).unwrap().text(), "POST /e 2 ok");
}

#[test]
fn oversized_body_is_413_and_others_are_still_served() {
    let cfg = ServerConfig {
        limits: crate::http::Limits {
            body_bytes: 1024,
            ..Default::default()
        },
        ..test_config()
    };
    let srv = Running::start(cfg);

    // Declared too large: answered before the body is read.
    let mut c = Client::new(srv.connect());
    c.send(b"POST /big HTTP/1.1\r\nHost: h\r\nContent-Length: 1000000\r\n\r\n");
    c.send(&[b'x'; 4096]);
    let r = c.reply(false).unwrap();
    assert_eq!(r.status, 413);
    assert_eq!(r.header("connection"), Some("close"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    let id = r.header("x-request-id").unwrap().to_string();
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["error"]["code"], "PAYLOAD_TOO_LARGE");
    assert_eq!(v["error"]["request_id"], id.as_str());
    assert!(uuid::Uuid::parse_str(&id).is_ok());
    assert!(c.closed());

    // Chunked, growing past the limit while being read.
    let mut c = Client::new(srv.connect());
    c.send(b"POST /big HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n");
    for _ in 0..3 {
        c.send(b"200\r\n");
        c.send(&[b'y'; 0x200]);
        c.send(b"\r\n");
    }
    assert_eq!(c.reply(false).unwrap().status, 413);

    // The server keeps serving other connections.
    let mut c = Client::new(srv.connect());
    c.send(&get("/after"));
    assert_eq!(c.reply(false).unwrap().status, 200);
}

#[test]
fn malformed_and_oversized_heads_are_refused_and_closed() {
    let srv = Running::start(test_config());
    let cases: &[(&[u8], u16, &str)] = &[
        (
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nabc",
            400,
            "BAD_REQUEST",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: +3\r\n\r\nabc",
            400,
            "BAD_REQUEST",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n folded\r\n\r\n",
            400,
            "BAD_REQUEST",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            400,
            "BAD_REQUEST",
        ),
        // No Host, a body claimed but never sent: answered from the head alone
        // (h1spec "Missing Host header"), not after waiting for the body.
        (
            b"GET / HTTP/1.1\r\nContent-Length: 5\r\n\r\n",
            400,
            "BAD_REQUEST",
        ),
    ];
    for (raw, status, code) in cases {
        let mut c = Client::new(srv.connect());
        c.send(raw);
        let r = c.reply(false).unwrap();
        assert_eq!(r.status, *status, "{:?}", String::from_utf8_lossy(raw));
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["error"]["code"], *code);
        assert!(c.closed());
    }
    let mut c = Client::new(srv.connect());
    let mut raw = b"GET / HTTP/1.1\r\nHost: h\r\n".to_vec();
    raw.extend_from_slice(format!("X-Big: {}\r\n\r\n", "a".repeat(20_000)).as_bytes());
    c.send(&raw);
    let r = c.reply(false).unwrap();
    assert_eq!(r.status, 431);
    assert!(c.closed());
}

#[test]
fn slow_header_gets_408_and_close() {
    let cfg = ServerConfig {
        header_timeout: Duration::from_millis(300),
        ..test_config()
    };
    let srv = Running::start(cfg);
    let mut c = Client::new(srv.connect());
    c.send(b"GET /slow-client HTTP/1.1\r\nHost: t\r\n");
    let started = Instant::now();
    let r = c.reply(false).unwrap();
    assert_eq!(r.status, 408);
    assert!(started.elapsed() >= Duration::from_millis(250));
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["error"]["code"], "REQUEST_TIMEOUT");
    assert!(c.closed());
}

#[test]
fn slow_body_gets_408() {
    let cfg = ServerConfig {
        body_timeout: Duration::from_millis(300),
        ..test_config()
    };
    let srv = Running::start(cfg);
    let mut c = Client::new(srv.connect());
    c.send(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nabc");
    assert_eq!(c.reply(false).unwrap().status, 408);
    assert!(c.closed());
}

#[test]
fn idle_keep_alive_connection_is_closed_silently() {
    let cfg = ServerConfig {
        idle_timeout: Duration::from_millis(200),
        ..test_config()
    };
    let srv = Running::start(cfg);
    let mut c = Client::new(srv.connect());
    c.send(&get("/once"));
    assert_eq!(c.reply(false).unwrap().status, 200);
    // No 408: the connection just ends.
    assert!(c.reply(false).is_none());
    assert!(c.pending.is_empty());
}

#[test]
fn connection_close_and_http10_rules() {
    let srv = Running::start(test_config());
    // HTTP/1.1 asking to close.
    let mut c = Client::new(srv.connect());
    c.send(b"GET /a HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n");
    let r = c.reply(false).unwrap();
    assert_eq!(r.header("connection"), Some("close"));
    assert!(c.closed());
    // HTTP/1.0 without keep-alive: one response, then close.
    let mut c = Client::new(srv.connect());
    c.send(b"GET /b HTTP/1.0\r\n\r\n");
    assert_eq!(c.reply(false).unwrap().header("connection"), Some("close"));
    assert!(c.closed());
    // HTTP/1.0 with keep-alive: confirmed, and the connection stays.
    let mut c = Client::new(srv.connect());
    c.send(b"GET /c HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    assert_eq!(
        c.reply(false).unwrap().header("connection"),
        Some("keep-alive")
    );
    c.send(b"GET /d HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    assert_eq!(c.reply(false).unwrap().text(), "GET /d 0 ");
    // The service asking to close.
    let mut c = Client::new(srv.connect());
    c.send(&get("/close"));
    assert_eq!(c.reply(false).unwrap().header("connection"), Some("close"));
    assert!(c.closed());
}

#[test]
fn head_and_no_content_responses_have_no_body() {
    let srv = Running::start(test_config());
    let mut c = Client::new(srv.connect());
    c.send(b"HEAD /h HTTP/1.1\r\nHost: h\r\n\r\n");
    let r = c.reply(true).unwrap();
    assert_eq!(r.header("content-length"), Some("10")); // "HEAD /h 0 "
    c.send(&get("/empty"));
    let r = c.reply(false).unwrap();
    assert_eq!(r.status, 204);
    assert_eq!(r.header("content-length"), None);
    // Nothing stray was sent: the next response parses cleanly.
    c.send(&get("/x"));
    assert_eq!(c.reply(false).unwrap().text(), "GET /x 0 ");
}

#[test]
fn streamed_responses_are_chunked_and_errors_truncate() {
    let srv = Running::start(test_config());
    let mut c = Client::new(srv.connect());
    c.send(&get("/stream"));
    let r = c.reply(false).unwrap();
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    assert_eq!(r.text(), "data: one\n\ndata: two\n\n");
    // Still usable afterwards.
    c.send(&get("/x"));
    assert_eq!(c.reply(false).unwrap().status, 200);

    // HTTP/1.0 gets the raw bytes ended by close.
    let mut c = Client::new(srv.connect());
    c.send(b"GET /stream HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    let r = c.reply(false).unwrap();
    assert_eq!(r.header("transfer-encoding"), None);
    assert_eq!(r.text(), "data: one\n\ndata: two\n\n");

    // An error mid-stream closes without the terminating chunk.
    let mut c = Client::new(srv.connect());
    c.send(&get("/stream-error"));
    assert!(c.reply(false).is_none());
    let text = String::from_utf8_lossy(&c.pending);
    assert!(text.contains("7\r\npartial\r\n"), "{text}");
    assert!(!text.contains("0\r\n\r\n"), "{text}");
}

#[test]
fn shutdown_drains_in_flight_requests() {
    let mut srv = Running::start(test_config());
    // An idle keep-alive connection: closed by the drain.
    let mut idle = Client::new(srv.connect());
    idle.send(&get("/warm"));
    assert_eq!(idle.reply(false).unwrap().status, 200);

    let mut busy = Client::new(srv.connect());
    busy.send(&get("/slow"));
    srv.entered.recv_timeout(Duration::from_secs(5)).unwrap();
    let started = Instant::now();
    srv.handle.shutdown();

    // The in-flight request completes, told that the connection closes.
    let r = busy.reply(false).unwrap();
    assert_eq!(r.text(), "slow done");
    assert_eq!(r.header("connection"), Some("close"));
    assert!(busy.closed());
    assert!(idle.closed());
    assert!(srv.stop().is_ok());
    assert!(started.elapsed() < Duration::from_secs(5));
    // And nothing listens any more.
    assert!(TcpStream::connect(srv.addr).is_err());
}

#[test]
fn drain_timeout_bounds_shutdown() {
    let cfg = ServerConfig {
        drain_timeout: Duration::from_millis(100),
        threads: 1,
        ..test_config()
    };
    let mut srv = Running::start(cfg);
    let mut busy = Client::new(srv.connect());
    busy.send(&get("/slow"));
    srv.entered.recv_timeout(Duration::from_secs(5)).unwrap();
    assert!(srv.stop().is_ok());
    // The slow request was cut off by the deadline: its connection is
    // closed (EOF, not a read timeout), nothing was answered.
    assert!(busy.closed());
    assert!(busy.pending.is_empty());
}

#[test]
fn connections_beyond_the_limit_are_refused() {
    let cfg = ServerConfig {
        max_connections: 2,
        threads: 1,
        ..test_config()
    };
    let srv = Running::start(cfg);
    let mut a = Client::new(srv.connect());
    let mut b = Client::new(srv.connect());
    a.send(&get("/a"));
    b.send(&get("/b"));
    assert_eq!(a.reply(false).unwrap().status, 200);
    assert_eq!(b.reply(false).unwrap().status, 200);
    let mut c = Client::new(srv.connect());
    c.send(&get("/c"));
    assert!(c.reply(false).is_none());
    drop(a);
    // Once a slot frees up, new connections are served again.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut d = Client::new(srv.connect());
        d.send(&get("/d"));
        if d.reply(false).is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "slot never freed");
    }
}

#[test]
fn bind_failure_is_reported() {
    let srv = Running::start(test_config());
    // A plain (non-reuseport) listener on a port in use cannot be shared.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let cfg = ServerConfig {
        listen: taken.local_addr().unwrap(),
        ..test_config()
    };
    assert!(Server::bind(cfg).is_err());
    drop(srv);
}

#[test]
fn a_worker_that_dies_while_starting_fails_run() {
    let server = Server::bind(test_config()).unwrap();
    let (tx, _rx) = mpsc::channel();
    let tx = Arc::new(Mutex::new(tx));
    let result = server.run(move |worker| {
        assert_ne!(worker, 1, "worker 1 cannot start (deliberate test panic)");
        TestService {
            entered: tx.clone(),
        }
    });
    assert!(result.is_err());
}

#[test]
fn legacy_driver_serves_the_same() {
    let mut srv = Running::start(ServerConfig {
        legacy_driver: true,
        header_timeout: Duration::from_millis(300),
        ..test_config()
    });
    let mut c = Client::new(srv.connect());
    c.send(&get("/a"));
    assert_eq!(c.reply(false).unwrap().text(), "GET /a 0 ");
    let mut raw = get("/b");
    raw.extend_from_slice(
        b"POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
    );
    raw.extend_from_slice(&get("/d"));
    c.send(&raw);
    for want in ["GET /b 0 ", "POST /c 2 hi", "GET /d 0 "] {
        assert_eq!(c.reply(false).unwrap().text(), want);
    }

    let mut slow = Client::new(srv.connect());
    slow.send(b"GET / HTTP/1.1\r\nHost: h\r\n");
    assert_eq!(slow.reply(false).unwrap().status, 408);

    let mut busy = Client::new(srv.connect());
    busy.send(&get("/slow"));
    srv.entered.recv_timeout(Duration::from_secs(5)).unwrap();
    srv.handle.shutdown();
    assert_eq!(busy.reply(false).unwrap().text(), "slow done");
    assert!(c.closed());
    assert!(srv.stop().is_ok());
}

#[test]
fn client_disconnect_drops_the_response_stream() {
    let srv = Running::start(test_config());
    let mut c = Client::new(srv.connect());
    c.send(&get("/endless"));
    while !String::from_utf8_lossy(&c.pending).contains("tick") {
        assert!(c.fill());
    }
    drop(c);
    // The next writes fail, which drops the stream (and with it, in the
    // proxy, the upstream connection).
    srv.entered.recv_timeout(Duration::from_secs(5)).unwrap();
}

#[test]
fn a_connection_that_never_sends_is_closed_without_a_response() {
    let srv = Running::start(ServerConfig {
        header_timeout: Duration::from_millis(200),
        ..test_config()
    });
    let mut c = Client::new(srv.connect());
    assert!(c.closed());
    assert!(c.pending.is_empty());
}

#[test]
fn pinned_workers_serve() {
    let srv = Running::start(ServerConfig {
        pin_cpus: true,
        ..test_config()
    });
    for _ in 0..4 {
        let mut c = Client::new(srv.connect());
        c.send(&get("/pinned"));
        assert_eq!(c.reply(false).unwrap().status, 200);
    }
}
