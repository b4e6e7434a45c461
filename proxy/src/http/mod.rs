//! HTTP/1.1 types shared by the codec, the server loop and the chain.
//!
//! A [`Request`] is parsed from owned [`bytes::Bytes`]: header values are
//! slices of the read buffer, not copies. A [`Response`] body is either
//! complete or a stream of chunks (forwarded SSE), which the server writes as
//! it arrives.
//!
//! Layout: [`message`] the types; `parse` the request head (pure);
//! [`chunked`] the chunked body (pure); `write` the response head;
//! [`ascii`] the byte helpers. The bottom of the crate: imports nothing of it.

pub mod ascii;
pub mod chunked;
pub mod message;
mod parse;
pub(crate) mod write;

#[cfg(test)]
mod tests;

pub use message::{
    Body, BodyStream, ConnInfo, Header, HeaderValue, Headers, Listener, Method, Request, Response,
    Service, Version,
};
pub use parse::{parse_head, BodyFraming, Head, Limits, ParseError, MAX_HEADER_COUNT};
pub use write::{write_head, BodyKind, DateCache};
