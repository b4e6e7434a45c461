//! The request id every response carries (SPEC §3): the client's
//! `X-Request-ID` when it is 1–128 characters of `[A-Za-z0-9._:-]`, else a
//! fresh random UUID. The accepted alphabet needs no escaping in a header,
//! JSON or a log line, which is why it is echoed verbatim.

use bytes::Bytes;
use rand::RngCore;

use crate::http::{HeaderValue, Headers};

pub const HEADER: &str = "X-Request-ID";
const MAX_LEN: usize = 128;

#[derive(Debug, Clone)]
pub struct RequestId(Bytes);

impl RequestId {
    pub fn from_headers(headers: &Headers) -> Self {
        match headers.get(HEADER) {
            Some(v) if is_acceptable(v) => RequestId(v.clone()),
            _ => Self::fresh(),
        }
    }

    pub fn fresh() -> Self {
        let mut bytes = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut bytes);
        let id = uuid::Builder::from_random_bytes(bytes).into_uuid();
        let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
        let s = id.hyphenated().encode_lower(&mut buf);
        RequestId(Bytes::copy_from_slice(s.as_bytes()))
    }

    pub fn as_str(&self) -> &str {
        // Only ever built from the ASCII alphabet above.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    pub fn header_value(&self) -> HeaderValue {
        HeaderValue::Owned(self.0.clone())
    }
}

fn is_acceptable(v: &[u8]) -> bool {
    (1..=MAX_LEN).contains(&v.len())
        && v.iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b':' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::Header;

    fn with(value: &[u8]) -> Headers {
        Headers(vec![Header {
            name: Bytes::from_static(b"x-request-id"),
            value: Bytes::copy_from_slice(value),
        }])
    }

    #[test]
    fn keeps_an_acceptable_client_value() {
        for v in [&b"a"[..], b"req-1.2_3:4", &[b'x'; 128]] {
            assert_eq!(RequestId::from_headers(&with(v)).as_str().as_bytes(), v);
        }
    }

    #[test]
    fn replaces_anything_else_with_a_uuid() {
        for v in [
            &b""[..],
            &[b'x'; 129],
            b"has space",
            b"quote\"",
            b"new\nline",
            b"<script>",
            "é".as_bytes(),
        ] {
            let id = RequestId::from_headers(&with(v));
            assert!(
                uuid::Uuid::parse_str(id.as_str()).is_ok(),
                "{v:?} -> {}",
                id.as_str()
            );
        }
        let a = RequestId::from_headers(&Headers::default());
        let b = RequestId::from_headers(&Headers::default());
        assert_ne!(a.as_str(), b.as_str());
        assert_eq!(
            uuid::Uuid::parse_str(a.as_str()).unwrap().get_version_num(),
            4
        );
    }
}
