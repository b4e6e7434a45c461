//! The messages the codec, the server loop and the chain pass each other:
//! [`Request`], [`Response`] and their parts, and the [`Service`] a worker
//! runs. Plain data; parsing is in [`super::parse`], writing in
//! [`super::write`].

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;

use bytes::Bytes;

/// The request methods the proxy routes on; anything else is `Other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Patch,
    Options,
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

/// One header as received: `name` keeps the client's bytes (compare with
/// `eq_ignore_ascii_case`), `value` is a zero-copy slice of the read buffer.
#[derive(Debug, Clone)]
pub struct Header {
    pub name: Bytes,
    pub value: Bytes,
}

#[derive(Debug, Clone, Default)]
pub struct Headers(pub Vec<Header>);

impl Headers {
    /// First value of `name` (ASCII case-insensitive).
    pub fn get(&self, name: &str) -> Option<&Bytes> {
        self.0
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name.as_bytes()))
            .map(|h| &h.value)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Header> {
        self.0.iter()
    }

    /// Headers from `(name, value)` pairs, in order (tests, benches).
    pub fn from_pairs(pairs: &[(&str, &str)]) -> Self {
        Headers(
            pairs
                .iter()
                .map(|(n, v)| Header {
                    name: Bytes::copy_from_slice(n.as_bytes()),
                    value: Bytes::copy_from_slice(v.as_bytes()),
                })
                .collect(),
        )
    }
}

/// A complete request: head parsed, body fully read (bounded by
/// `IBEX_MAX_BODY_BYTES`) and de-chunked.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: Method,
    /// Path without the query string, as sent (percent-encoding untouched).
    pub path: Bytes,
    /// The query string without `?`, if any.
    pub query: Option<Bytes>,
    pub version: Version,
    pub headers: Headers,
    pub body: Bytes,
    /// False when the client asked to close (or HTTP/1.0 without keep-alive).
    pub keep_alive: bool,
}

impl Request {
    /// An HTTP/1.1 keep-alive request without a query string, as the parser
    /// would hand it on (tests, benches).
    pub fn new(method: Method, path: &str, headers: &[(&str, &str)], body: Bytes) -> Self {
        Request {
            method,
            path: Bytes::copy_from_slice(path.as_bytes()),
            query: None,
            version: Version::Http11,
            headers: Headers::from_pairs(headers),
            body,
            keep_alive: true,
        }
    }
}

/// A chunk stream for forwarded bodies. Not `Send`: it lives on one worker.
/// Dropping it must release whatever it reads from (e.g. close the upstream
/// connection) — that is how a client disconnect reaches the upstream.
pub type BodyStream = Pin<Box<dyn futures::Stream<Item = std::io::Result<Bytes>>>>;

pub enum Body {
    Empty,
    Full(Bytes),
    /// Written with `Transfer-Encoding: chunked`, one chunk per item, each
    /// flushed as it arrives. An `Err` item ends the response by closing the
    /// connection (the client sees a truncated chunked body).
    Stream(BodyStream),
}

/// A header value the proxy writes: static text or owned bytes.
#[derive(Debug, Clone)]
pub enum HeaderValue {
    Static(&'static str),
    Owned(Bytes),
}

impl HeaderValue {
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            HeaderValue::Static(s) => s.as_bytes(),
            HeaderValue::Owned(b) => b,
        }
    }
}

pub struct Response {
    pub status: u16,
    /// Extra headers; the server adds `Content-Length` / `Transfer-Encoding`,
    /// `Connection` and `Date` itself.
    pub headers: Vec<(&'static str, HeaderValue)>,
    pub body: Body,
    /// Close the connection after writing this response.
    pub close: bool,
}

/// Which listener a connection came in on: the routes served differ (SPEC
/// §3: `/metrics` only on the admin listener). TLS or not is the server's
/// business and appears nowhere here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Listener {
    /// `IBEX_PROXY_LISTEN`: clients.
    #[default]
    Public,
    /// `IBEX_PROXY_ADMIN_LISTEN`: the operator's `/metrics`, `/health`, `/ready`.
    Admin,
}

/// Who is on the other end of a connection, for the chain's per-address
/// guards and logs.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub worker: usize,
    pub listener: Listener,
}

/// What the server loop calls for every parsed request. Implemented by the
/// chain; one instance per worker (no `Send`/`Sync` needed).
pub trait Service {
    fn call(&self, req: Request, conn: &ConnInfo) -> impl Future<Output = Response>;

    /// After the worker's drain, before it exits: work the service still
    /// holds (the token limiter's pending settles) is sent.
    fn drained(&self) -> impl Future<Output = ()> {
        async {}
    }
}
