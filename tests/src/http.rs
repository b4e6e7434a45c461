//! A deliberately small HTTP/1.1 client for talking to the proxy in tests.
//!
//! Tests need to send exactly the bytes they mean — malformed requests included — and to see
//! exactly what came back, so this writes the request by hand and parses the response with
//! httparse (`Content-Length`, chunked, or read-to-close bodies). One request per connection
//! unless the caller drives a [`Conn`] itself. Not a general client: no TLS, no redirects.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Limit on one response (headers + body) so a runaway server cannot exhaust the test.
const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;
const IO_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// First header of that name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body)
            .with_context(|| format!("response body is not JSON: {}", self.text()))
    }

    /// `error.code` of the SPEC error envelope, if the body is one.
    pub fn error_code(&self) -> Option<String> {
        let json = self.json().ok()?;
        Some(json.get("error")?.get("code")?.as_str()?.to_owned())
    }

    /// Status line, headers and body as text, for assertion messages.
    pub fn dump(&self) -> String {
        let mut out = format!("HTTP {}\n", self.status);
        for (k, v) in &self.headers {
            out.push_str(&format!("{k}: {v}\n"));
        }
        out.push('\n');
        out.push_str(&self.text());
        out
    }
}

/// A response head parsed from the start of a buffer: the one place test code
/// parses one (raw-socket tests read the body themselves).
#[derive(Debug, Clone)]
pub struct ResponseHead {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// Bytes the head took, the blank line included.
    pub len: usize,
}

impl ResponseHead {
    /// `Ok(None)` while the head is incomplete; an error if it is malformed.
    pub fn parse(buf: &[u8]) -> Result<Option<ResponseHead>> {
        let mut slots = [httparse::EMPTY_HEADER; 128];
        let mut parsed = httparse::Response::new(&mut slots);
        match parsed.parse(buf).context("malformed response head")? {
            httparse::Status::Complete(len) => Ok(Some(ResponseHead {
                status: parsed.code.unwrap_or(0),
                headers: owned_headers(parsed.headers),
                len,
            })),
            httparse::Status::Partial => Ok(None),
        }
    }

    /// First header of that name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    /// The `Content-Length` value, if there is one; an error if it is not a number.
    pub fn content_length(&self) -> Result<Option<usize>> {
        self.header("content-length")
            .map(|v| v.trim().parse().context("bad Content-Length"))
            .transpose()
    }
}

/// Parsed headers as owned text (values lossily UTF-8), in order.
pub fn owned_headers(headers: &[httparse::Header<'_>]) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|h| {
            (
                h.name.to_owned(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect()
}

/// First header of that name in `headers` (case-insensitive).
pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// A request to build and send.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn get(path: &str) -> Request {
        Request::new("GET", path)
    }

    pub fn post(path: &str, body: impl Into<Vec<u8>>) -> Request {
        let mut req = Request::new("POST", path);
        req.body = body.into();
        req
    }

    pub fn new(method: &str, path: &str) -> Request {
        Request {
            method: method.to_owned(),
            path: path.to_owned(),
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Request {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// `Authorization: Bearer <token>` and `X-IBEX-Agent-ID: <agent>`.
    pub fn auth(self, token: &str, agent_id: &str) -> Request {
        self.header("Authorization", &format!("Bearer {token}"))
            .header("X-IBEX-Agent-ID", agent_id)
    }

    /// The request's bytes: Host, the caller's headers, Content-Length when there is a body
    /// (unless the caller set one or Transfer-Encoding).
    pub fn to_bytes(&self, addr: SocketAddr, close: bool) -> Vec<u8> {
        let mut head = format!("{} {} HTTP/1.1\r\n", self.method, self.path);
        let has = |name: &str| {
            self.headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case(name))
        };
        if !has("host") {
            head.push_str(&format!("Host: {addr}\r\n"));
        }
        for (k, v) in &self.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        if (!self.body.is_empty() || self.method == "POST")
            && !has("content-length")
            && !has("transfer-encoding")
        {
            head.push_str(&format!("Content-Length: {}\r\n", self.body.len()));
        }
        if close && !has("connection") {
            head.push_str("Connection: close\r\n");
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(&self.body);
        bytes
    }

    /// Sends it on a fresh connection (`Connection: close`) and reads the whole response.
    pub async fn send(&self, addr: SocketAddr) -> Result<Response> {
        let mut conn = Conn::connect(addr).await?;
        conn.send(self, true).await
    }

    /// [`Request::send`] from a chosen local address (see [`Conn::connect_from`]).
    pub async fn send_from(&self, addr: SocketAddr, local: IpAddr) -> Result<Response> {
        let mut conn = Conn::connect_from(addr, local).await?;
        conn.send(self, true).await
    }
}

/// One keep-alive connection: several requests in turn, or raw bytes. Over plain TCP, or any
/// other byte stream (a TLS client stream: [`Conn::over`]).
#[derive(Debug)]
pub struct Conn<S = TcpStream> {
    addr: SocketAddr,
    stream: S,
    buf: Vec<u8>,
}

impl<S> Conn<S> {
    /// A connection over an established `stream` to `addr` (e.g. after a TLS handshake).
    pub fn over(stream: S, addr: SocketAddr) -> Conn<S> {
        Conn {
            addr,
            stream,
            buf: Vec::new(),
        }
    }

    /// The underlying stream (a TLS stream's negotiated parameters).
    pub fn stream(&self) -> &S {
        &self.stream
    }
}

impl Conn {
    pub async fn connect(addr: SocketAddr) -> Result<Conn> {
        let stream = tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| anyhow!("connect to {addr} timed out"))?
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            addr,
            stream,
            buf: Vec::new(),
        })
    }

    /// [`Conn::connect`] from a chosen local address: on Linux every `127.0.0.0/8` address is
    /// local, so a test can appear as a client of its own to per-address limits (the proxy's
    /// flood guard counts authentication failures per client address).
    pub async fn connect_from(addr: SocketAddr, local: IpAddr) -> Result<Conn> {
        let socket = match local {
            IpAddr::V4(_) => TcpSocket::new_v4()?,
            IpAddr::V6(_) => TcpSocket::new_v6()?,
        };
        socket
            .bind(SocketAddr::new(local, 0))
            .with_context(|| format!("binding {local}:0"))?;
        let stream = tokio::time::timeout(IO_TIMEOUT, socket.connect(addr))
            .await
            .map_err(|_| anyhow!("connect to {addr} from {local} timed out"))?
            .with_context(|| format!("connecting to {addr} from {local}"))?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            addr,
            stream,
            buf: Vec::new(),
        })
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    pub async fn send(&mut self, req: &Request, close: bool) -> Result<Response> {
        let bytes = req.to_bytes(self.addr, close);
        self.write_raw(&bytes).await?;
        self.read_response(req.method == "HEAD").await
    }

    pub async fn write_raw(&mut self, bytes: &[u8]) -> Result<()> {
        tokio::time::timeout(IO_TIMEOUT, self.stream.write_all(bytes))
            .await
            .map_err(|_| anyhow!("write timed out"))??;
        Ok(())
    }

    /// True when the server has closed the connection (reads EOF within `wait`).
    pub async fn is_closed(&mut self, wait: Duration) -> bool {
        let mut byte = [0u8; 1];
        matches!(
            tokio::time::timeout(wait, self.stream.read(&mut byte)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }

    /// Reads one response (after raw writes).
    pub async fn read_response(&mut self, head_only: bool) -> Result<Response> {
        tokio::time::timeout(IO_TIMEOUT, self.read_response_inner(head_only))
            .await
            .map_err(|_| anyhow!("no complete response within {IO_TIMEOUT:?}"))?
    }

    async fn fill(&mut self) -> Result<usize> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.stream.read(&mut chunk).await?;
        self.buf.extend_from_slice(&chunk[..n]);
        if self.buf.len() > MAX_RESPONSE_BYTES {
            bail!("response larger than {MAX_RESPONSE_BYTES} bytes");
        }
        Ok(n)
    }

    async fn read_response_inner(&mut self, head_only: bool) -> Result<Response> {
        let (status, headers, head_len) = loop {
            match ResponseHead::parse(&self.buf)? {
                Some(head) => break (head.status, head.headers, head.len),
                None => {
                    if self.fill().await? == 0 {
                        bail!(
                            "connection closed before a complete response head ({} bytes: {:?})",
                            self.buf.len(),
                            String::from_utf8_lossy(&self.buf)
                        );
                    }
                }
            }
        };
        self.buf.drain(..head_len);
        let mut response = Response {
            status,
            headers,
            body: Vec::new(),
        };
        let no_body = head_only || status == 204 || status == 304 || (100..200).contains(&status);
        if no_body {
            return Ok(response);
        }
        let chunked = response
            .header("transfer-encoding")
            .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"));
        if chunked {
            response.body = self.read_chunked().await?;
        } else if let Some(len) = response.header("content-length") {
            let len: usize = len.trim().parse().context("bad Content-Length")?;
            while self.buf.len() < len {
                if self.fill().await? == 0 {
                    bail!("connection closed inside a {len}-byte body");
                }
            }
            response.body = self.buf.drain(..len).collect();
        } else {
            while self.fill().await? > 0 {}
            response.body = std::mem::take(&mut self.buf);
        }
        Ok(response)
    }

    async fn read_chunked(&mut self) -> Result<Vec<u8>> {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(pos) = self.buf.windows(2).position(|w| w == b"\r\n") {
                    break pos;
                }
                if self.fill().await? == 0 {
                    bail!("connection closed inside a chunk size line");
                }
            };
            let line = String::from_utf8_lossy(&self.buf[..line_end]).into_owned();
            let size_text = line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size_text, 16)
                .with_context(|| format!("bad chunk size {line:?}"))?;
            self.buf.drain(..line_end + 2);
            if size == 0 {
                // Trailers end with an empty line.
                loop {
                    if let Some(pos) = self.buf.windows(2).position(|w| w == b"\r\n") {
                        let empty = pos == 0;
                        self.buf.drain(..pos + 2);
                        if empty {
                            return Ok(body);
                        }
                    } else if self.fill().await? == 0 {
                        return Ok(body);
                    }
                }
            }
            while self.buf.len() < size + 2 {
                if self.fill().await? == 0 {
                    bail!("connection closed inside a chunk");
                }
            }
            body.extend_from_slice(&self.buf[..size]);
            self.buf.drain(..size + 2);
        }
    }
}
