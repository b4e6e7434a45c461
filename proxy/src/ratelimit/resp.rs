//! The few RESP2 pieces the limiter speaks: commands as arrays of bulk
//! strings, and a bounded parser for replies.
//!
//! Hand-written rather than `redis::parse_redis_value` because it parses
//! from a borrowed buffer that may end mid-reply (pipelined reads) and
//! reports "incomplete" without consuming; the bench compares both. Not a
//! general Redis client: no RESP3, no push frames, small replies only.

/// Largest bulk string or error line accepted in a reply. The limiter's
/// replies are a few bytes; anything near this is a protocol error.
pub const MAX_BULK: usize = 64 * 1024;
/// Largest array accepted in a reply.
pub const MAX_ARRAY: usize = 64;
/// Deepest nesting accepted.
const MAX_DEPTH: usize = 4;

/// Bounds for one reply: the limiter's own replies use [`Limits::REPLY`];
/// a cluster's slot map (`CLUSTER SLOTS`, one array entry per slot range,
/// up to 16,384 of them) uses [`Limits::TOPOLOGY`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_array: usize,
    pub max_depth: usize,
}

impl Limits {
    pub const REPLY: Limits = Limits {
        max_array: MAX_ARRAY,
        max_depth: MAX_DEPTH,
    };
    pub const TOPOLOGY: Limits = Limits {
        max_array: 16_384,
        max_depth: 5,
    };
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Simple(Vec<u8>),
    Error(Vec<u8>),
    Integer(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Frame>>),
}

impl Frame {
    /// `-NOSCRIPT ...`: EVALSHA named a script this server has not cached.
    pub fn is_noscript(&self) -> bool {
        matches!(self, Frame::Error(e) if e.starts_with(b"NOSCRIPT"))
    }

    /// The integer, or the decimal digits of a simple or bulk string.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Frame::Integer(i) => Some(*i),
            Frame::Simple(b) | Frame::Bulk(Some(b)) => integer(b).ok(),
            _ => None,
        }
    }

    /// A simple or bulk string as UTF-8.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Frame::Simple(b) | Frame::Bulk(Some(b)) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed or oversized Redis reply")]
pub struct ProtocolError;

/// Appends one command: `*<n>\r\n` then `$<len>\r\n<arg>\r\n` per argument.
pub fn push_command(out: &mut Vec<u8>, args: &[&[u8]]) {
    // Lengths as stack decimals, not `write!` (a formatter per argument).
    use crate::http::ascii::Decimal;
    out.reserve(16 + args.iter().map(|a| a.len() + 16).sum::<usize>());
    out.push(b'*');
    out.extend_from_slice(Decimal::new(args.len() as u64).as_bytes());
    out.extend_from_slice(b"\r\n");
    for arg in args {
        out.push(b'$');
        out.extend_from_slice(Decimal::new(arg.len() as u64).as_bytes());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
}

/// Parses one reply from the front of `buf`: `Ok(None)` if `buf` holds only
/// part of it, else the frame and how many bytes it used.
pub fn parse(buf: &[u8]) -> Result<Option<(Frame, usize)>, ProtocolError> {
    parse_at(buf, 0, 0, &Limits::REPLY)
}

/// [`parse`] with other bounds (the slot map).
pub fn parse_limited(buf: &[u8], limits: &Limits) -> Result<Option<(Frame, usize)>, ProtocolError> {
    parse_at(buf, 0, 0, limits)
}

fn parse_at(
    buf: &[u8],
    pos: usize,
    depth: usize,
    limits: &Limits,
) -> Result<Option<(Frame, usize)>, ProtocolError> {
    let Some(&tag) = buf.get(pos) else {
        return Ok(None);
    };
    let Some((line, next)) = line(buf, pos + 1)? else {
        return Ok(None);
    };
    let frame = match tag {
        b'+' => Frame::Simple(line.to_vec()),
        b'-' => Frame::Error(line.to_vec()),
        b':' => Frame::Integer(integer(line)?),
        b'$' => {
            let len = integer(line)?;
            if len == -1 {
                return Ok(Some((Frame::Bulk(None), next)));
            }
            let len = usize::try_from(len).map_err(|_| ProtocolError)?;
            if len > MAX_BULK {
                return Err(ProtocolError);
            }
            let end = next + len;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err(ProtocolError);
            }
            return Ok(Some((Frame::Bulk(Some(buf[next..end].to_vec())), end + 2)));
        }
        b'*' => {
            let len = integer(line)?;
            if len == -1 {
                return Ok(Some((Frame::Array(None), next)));
            }
            let len = usize::try_from(len).map_err(|_| ProtocolError)?;
            if len > limits.max_array || depth >= limits.max_depth {
                return Err(ProtocolError);
            }
            let mut items = Vec::with_capacity(len);
            let mut at = next;
            for _ in 0..len {
                match parse_at(buf, at, depth + 1, limits)? {
                    Some((item, after)) => {
                        items.push(item);
                        at = after;
                    }
                    None => return Ok(None),
                }
            }
            return Ok(Some((Frame::Array(Some(items)), at)));
        }
        _ => return Err(ProtocolError),
    };
    Ok(Some((frame, next)))
}

/// The bytes from `start` to the next CRLF, and the index after it.
fn line(buf: &[u8], start: usize) -> Result<Option<(&[u8], usize)>, ProtocolError> {
    let rest = buf.get(start..).unwrap_or_default();
    match rest.iter().position(|&b| b == b'\r') {
        Some(i) if i > MAX_BULK => Err(ProtocolError),
        Some(i) => match rest.get(i + 1) {
            Some(b'\n') => Ok(Some((&rest[..i], start + i + 2))),
            Some(_) => Err(ProtocolError),
            None => Ok(None),
        },
        None if rest.len() > MAX_BULK => Err(ProtocolError),
        None => Ok(None),
    }
}

fn integer(digits: &[u8]) -> Result<i64, ProtocolError> {
    std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(ProtocolError)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_commands_as_arrays_of_bulk_strings() {
        let mut out = Vec::new();
        push_command(&mut out, &[b"INCR", b"k"]);
        push_command(&mut out, &[b"SELECT", b"12"]);
        assert_eq!(
            out,
            b"*2\r\n$4\r\nINCR\r\n$1\r\nk\r\n*2\r\n$6\r\nSELECT\r\n$2\r\n12\r\n"
        );
    }

    #[test]
    fn parses_each_reply_type() {
        let cases: &[(&[u8], Frame)] = &[
            (b"+OK\r\n", Frame::Simple(b"OK".to_vec())),
            (b"-ERR no\r\n", Frame::Error(b"ERR no".to_vec())),
            (b":-42\r\n", Frame::Integer(-42)),
            (b"$3\r\na\r\n\r\n", Frame::Bulk(Some(b"a\r\n".to_vec()))),
            (b"$-1\r\n", Frame::Bulk(None)),
            (b"*-1\r\n", Frame::Array(None)),
            (
                b"*2\r\n:7\r\n:60999\r\n",
                Frame::Array(Some(vec![Frame::Integer(7), Frame::Integer(60_999)])),
            ),
        ];
        for (bytes, want) in cases {
            assert_eq!(
                parse(bytes),
                Ok(Some((want.clone(), bytes.len()))),
                "{bytes:?}"
            );
        }
    }

    #[test]
    fn every_strict_prefix_is_incomplete_and_pipelined_replies_split() {
        let two = b"*2\r\n:1\r\n:60000\r\n-NOSCRIPT No matching script\r\n";
        let first_len = 16;
        for cut in 0..first_len {
            assert_eq!(parse(&two[..cut]), Ok(None), "cut at {cut}");
        }
        let (first, used) = parse(two).unwrap().unwrap();
        assert_eq!(used, first_len);
        assert!(!first.is_noscript());
        let (second, used2) = parse(&two[used..]).unwrap().unwrap();
        assert!(second.is_noscript());
        assert_eq!(used + used2, two.len());
    }

    #[test]
    fn rejects_malformed_and_oversized_replies() {
        let oversized = format!("${}\r\n", MAX_BULK + 1);
        let long_line = vec![b'+'; MAX_BULK + 2];
        let bad: &[&[u8]] = &[
            b"?\r\n",
            b":12a\r\n",
            b"$3\r\nabcd\r\n",
            b"+OK\rX",
            b"$-2\r\n",
            b"*65\r\n",
            b"*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n",
            oversized.as_bytes(),
            &long_line,
        ];
        for bytes in bad {
            assert_eq!(
                parse(bytes),
                Err(ProtocolError),
                "{:?}",
                &bytes[..bytes.len().min(20)]
            );
        }
    }

    #[test]
    fn topology_limits_allow_long_arrays_and_one_more_level() {
        let mut long = b"*65\r\n".to_vec();
        for _ in 0..65 {
            long.extend_from_slice(b":1\r\n");
        }
        assert_eq!(parse(&long), Err(ProtocolError));
        assert!(matches!(
            parse_limited(&long, &Limits::TOPOLOGY),
            Ok(Some(_))
        ));
        let deep = b"*1\r\n*1\r\n*1\r\n*1\r\n*0\r\n";
        assert_eq!(parse(deep), Err(ProtocolError));
        assert!(matches!(
            parse_limited(deep, &Limits::TOPOLOGY),
            Ok(Some(_))
        ));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let alphabet = b"+-:$*\r\n0123456789-1aZ";
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 24) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|i| alphabet[((seed >> (i % 8 * 8)) as usize + i) % alphabet.len()])
                .collect();
            let _ = parse(&bytes);
        }
    }
}
