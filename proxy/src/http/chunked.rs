//! Incremental decoder for `Transfer-Encoding: chunked` (RFC 9112 §7.1).
//!
//! Pure and I/O-free: feed it whatever bytes have arrived, it returns where
//! the data is inside them, or that it needs more. It keeps its own state
//! between calls, so input may be split at any byte. Used for request bodies
//! by the server loop and reusable for upstream response bodies.
//!
//! Strict on framing (the smuggling surface): the size is 1–16 hex digits,
//! every line ends in CRLF (a bare LF or CR is an error), the data is followed
//! by CRLF. Chunk extensions and trailers are accepted but bounded in total
//! bytes per message, and discarded. It does not bound the total data size:
//! the caller counts the bytes of the `Data` ranges against its own limit.
//!
//! ```
//! use ibex_proxy::http::chunked::{ChunkedDecoder, Event};
//! let mut dec = ChunkedDecoder::new();
//! let input = b"5\r\nhello\r\n0\r\n\r\nNEXT";
//! let mut at = 0;
//! let mut body = Vec::new();
//! loop {
//!     let step = dec.decode(&input[at..]).unwrap();
//!     if let Event::Data(r) = &step.event {
//!         body.extend_from_slice(&input[at..][r.clone()]);
//!     }
//!     at += step.consumed;
//!     match step.event {
//!         Event::Done => break,
//!         Event::NeedMore => unreachable!("whole message given"),
//!         Event::Data(_) => {}
//!     }
//! }
//! assert_eq!(body, b"hello");
//! assert_eq!(&input[at..], b"NEXT");
//! ```

use std::ops::Range;

/// Most bytes of chunk extensions (after `;`, up to the CR) in one message.
pub const DEFAULT_MAX_EXTENSION_BYTES: usize = 16 * 1024;
/// Most bytes of trailer section in one message (after the last chunk).
pub const DEFAULT_MAX_TRAILER_BYTES: usize = 16 * 1024;
/// A chunk size has at most this many hex digits (leading zeros included),
/// so it always fits in a `u64`.
const MAX_SIZE_DIGITS: u32 = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkedError {
    /// Not a valid chunked framing: bad size line, missing CRLF, bare LF...
    Malformed,
    /// Chunk extensions over their byte bound.
    ExtensionsTooLong,
    /// Trailer section over its byte bound.
    TrailersTooLarge,
}

/// What one [`ChunkedDecoder::decode`] call found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Body data at this range of the input given to this call. The range
    /// ends at `consumed`.
    Data(Range<usize>),
    /// All input was consumed (framing bytes only); call again with more.
    NeedMore,
    /// The message ended: the last chunk and the trailers were read. Bytes
    /// after `consumed` belong to whatever follows on the connection.
    Done,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// Bytes of the input this call used up; drop them before the next call.
    pub consumed: usize,
    pub event: Event,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading the hex digits of a size line.
    Size {
        value: u64,
        digits: u32,
    },
    /// Optional whitespace after the size, before `;` or CR.
    SizeWs {
        value: u64,
    },
    /// Inside a chunk extension, until CR.
    Extension {
        value: u64,
    },
    /// CR seen at the end of a size line; LF must follow.
    SizeLf {
        value: u64,
    },
    Data {
        remaining: u64,
    },
    DataCr,
    DataLf,
    /// At the start of a trailer line (or the final empty line).
    TrailerStart,
    TrailerLine,
    TrailerLf,
    EndLf,
    Done,
}

/// Byte-at-a-time state machine over chunked framing. Never buffers input.
#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: State,
    extension_bytes: usize,
    trailer_bytes: usize,
    max_extension_bytes: usize,
    max_trailer_bytes: usize,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkedDecoder {
    pub fn new() -> Self {
        Self::with_limits(DEFAULT_MAX_EXTENSION_BYTES, DEFAULT_MAX_TRAILER_BYTES)
    }

    pub fn with_limits(max_extension_bytes: usize, max_trailer_bytes: usize) -> Self {
        Self {
            state: State::Size {
                value: 0,
                digits: 0,
            },
            extension_bytes: 0,
            trailer_bytes: 0,
            max_extension_bytes,
            max_trailer_bytes,
        }
    }

    /// True once the terminating chunk and trailers were read.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Advances over `input`. Returns at most one data range per call; call
    /// again on `input[consumed..]` (plus more bytes on `NeedMore`).
    pub fn decode(&mut self, input: &[u8]) -> Result<Decoded, ChunkedError> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                State::Data { remaining } => {
                    let avail = input.len() - i;
                    let take = usize::try_from(remaining).map_or(avail, |r| r.min(avail));
                    let left = remaining - take as u64;
                    self.state = if left == 0 {
                        State::DataCr
                    } else {
                        State::Data { remaining: left }
                    };
                    return Ok(Decoded {
                        consumed: i + take,
                        event: Event::Data(i..i + take),
                    });
                }
                State::Done => {
                    return Ok(Decoded {
                        consumed: i,
                        event: Event::Done,
                    })
                }
                _ => {
                    self.step(b)?;
                    i += 1;
                    if self.state == State::Done {
                        return Ok(Decoded {
                            consumed: i,
                            event: Event::Done,
                        });
                    }
                }
            }
        }
        let event = if self.state == State::Done {
            Event::Done
        } else {
            Event::NeedMore
        };
        Ok(Decoded { consumed: i, event })
    }

    /// One framing byte (never called in `Data` or `Done`).
    fn step(&mut self, b: u8) -> Result<(), ChunkedError> {
        use ChunkedError::Malformed;
        self.state = match self.state {
            State::Size { value, digits } => match hex_value(b) {
                Some(d) => {
                    if digits >= MAX_SIZE_DIGITS {
                        return Err(Malformed);
                    }
                    State::Size {
                        value: (value << 4) | u64::from(d),
                        digits: digits + 1,
                    }
                }
                None if digits == 0 => return Err(Malformed),
                None => match b {
                    b'\r' => State::SizeLf { value },
                    b';' => State::Extension { value },
                    b' ' | b'\t' => State::SizeWs { value },
                    _ => return Err(Malformed),
                },
            },
            State::SizeWs { value } => match b {
                b' ' | b'\t' => {
                    self.count_extension()?;
                    State::SizeWs { value }
                }
                b';' => State::Extension { value },
                b'\r' => State::SizeLf { value },
                _ => return Err(Malformed),
            },
            State::Extension { value } => match b {
                b'\r' => State::SizeLf { value },
                // A bare LF or other control bytes inside an extension are
                // how parsers get desynchronised: refuse them.
                b'\n' | 0 => return Err(Malformed),
                _ => {
                    self.count_extension()?;
                    State::Extension { value }
                }
            },
            State::SizeLf { value } => match b {
                b'\n' if value == 0 => State::TrailerStart,
                b'\n' => State::Data { remaining: value },
                _ => return Err(Malformed),
            },
            State::DataCr => match b {
                b'\r' => State::DataLf,
                _ => return Err(Malformed),
            },
            State::DataLf => match b {
                b'\n' => State::Size {
                    value: 0,
                    digits: 0,
                },
                _ => return Err(Malformed),
            },
            State::TrailerStart => match b {
                b'\r' => State::EndLf,
                b'\n' => return Err(Malformed),
                _ => {
                    self.count_trailer()?;
                    State::TrailerLine
                }
            },
            State::TrailerLine => match b {
                b'\r' => {
                    self.count_trailer()?;
                    State::TrailerLf
                }
                b'\n' => return Err(Malformed),
                _ => {
                    self.count_trailer()?;
                    State::TrailerLine
                }
            },
            State::TrailerLf => match b {
                b'\n' => {
                    self.count_trailer()?;
                    State::TrailerStart
                }
                _ => return Err(Malformed),
            },
            State::EndLf => match b {
                b'\n' => State::Done,
                _ => return Err(Malformed),
            },
            State::Data { .. } | State::Done => return Err(Malformed),
        };
        Ok(())
    }

    fn count_extension(&mut self) -> Result<(), ChunkedError> {
        self.extension_bytes += 1;
        if self.extension_bytes > self.max_extension_bytes {
            return Err(ChunkedError::ExtensionsTooLong);
        }
        Ok(())
    }

    fn count_trailer(&mut self) -> Result<(), ChunkedError> {
        self.trailer_bytes += 1;
        if self.trailer_bytes > self.max_trailer_bytes {
            return Err(ChunkedError::TrailersTooLarge);
        }
        Ok(())
    }
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decodes a whole message held in `input`: the de-chunked body and the
/// bytes consumed, or `Ok(None)` when `input` ends before the message does.
/// For tests and small in-memory uses; the server loop decodes incrementally.
pub fn decode_all(input: &[u8]) -> Result<Option<(Vec<u8>, usize)>, ChunkedError> {
    let mut dec = ChunkedDecoder::new();
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let step = dec.decode(&input[at..])?;
        if let Event::Data(r) = &step.event {
            body.extend_from_slice(&input[at..][r.clone()]);
        }
        at += step.consumed;
        match step.event {
            Event::Done => return Ok(Some((body, at))),
            Event::NeedMore => return Ok(None),
            Event::Data(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Feeds `input` in the given pieces, like bytes arriving from a socket:
    /// unconsumed bytes stay buffered and are given again with the next piece.
    fn decode_pieces(pieces: &[&[u8]]) -> Result<(Vec<u8>, Vec<u8>, bool), ChunkedError> {
        let mut dec = ChunkedDecoder::new();
        let mut pending: Vec<u8> = Vec::new();
        let mut body = Vec::new();
        for piece in pieces {
            pending.extend_from_slice(piece);
            loop {
                let step = dec.decode(&pending)?;
                if let Event::Data(r) = &step.event {
                    assert_eq!(r.end, step.consumed);
                    body.extend_from_slice(&pending[r.clone()]);
                }
                pending.drain(..step.consumed);
                match step.event {
                    Event::Done => return Ok((body, pending, true)),
                    Event::NeedMore => break,
                    Event::Data(_) if pending.is_empty() => break,
                    Event::Data(_) => {}
                }
            }
        }
        Ok((body, pending, false))
    }

    const GOOD: &[(&[u8], &[u8])] = &[
        (b"0\r\n\r\n", b""),
        (b"5\r\nhello\r\n0\r\n\r\n", b"hello"),
        (b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", b"hello world"),
        (b"A\r\n0123456789\r\n0\r\n\r\n", b"0123456789"),
        (b"a\r\n0123456789\r\n0\r\n\r\n", b"0123456789"),
        (b"0005\r\nhello\r\n0\r\n\r\n", b"hello"),
        (b"5;name=value\r\nhello\r\n0\r\n\r\n", b"hello"),
        (b"5 ;ext\r\nhello\r\n0;x\r\n\r\n", b"hello"),
        (b"5\r\nhello\r\n0\r\nX-Trailer: 1\r\nY: 2\r\n\r\n", b"hello"),
        (b"3\r\n\r\n\r\r\n0\r\n\r\n", b"\r\n\r"),
    ];

    #[test]
    fn decodes_valid_bodies() {
        for (input, want) in GOOD {
            let (body, rest, done) = decode_pieces(&[input]).unwrap();
            assert!(done, "{:?}", String::from_utf8_lossy(input));
            assert_eq!(&body[..], *want);
            assert!(rest.is_empty());
        }
    }

    #[test]
    fn every_split_point_gives_the_same_result() {
        for (input, want) in GOOD {
            for split in 0..=input.len() {
                let (a, b) = input.split_at(split);
                let (body, rest, done) = decode_pieces(&[a, b]).unwrap();
                assert!(
                    done,
                    "split {split} of {:?}",
                    String::from_utf8_lossy(input)
                );
                assert_eq!(&body[..], *want, "split {split}");
                assert!(rest.is_empty());
            }
            // And one byte at a time.
            let bytes: Vec<&[u8]> = input.chunks(1).collect();
            let (body, _, done) = decode_pieces(&bytes).unwrap();
            assert!(done);
            assert_eq!(&body[..], *want);
        }
    }

    #[test]
    fn every_split_point_rejects_the_same_way() {
        for (input, want) in BAD {
            for split in 0..=input.len() {
                let (a, b) = input.split_at(split);
                assert_eq!(decode_pieces(&[a, b]), Err(*want), "split {split}");
            }
        }
    }

    #[test]
    fn leaves_following_bytes_alone() {
        let (body, rest, done) =
            decode_pieces(&[b"2\r\nhi\r\n0\r\n\r\nGET / HTTP/1.1\r\n"]).unwrap();
        assert!(done);
        assert_eq!(body, b"hi");
        assert_eq!(rest, b"GET / HTTP/1.1\r\n");
    }

    #[test]
    fn incomplete_input_needs_more() {
        for input in [
            &b""[..],
            b"5",
            b"5\r",
            b"5\r\nhel",
            b"5\r\nhello\r\n",
            b"0\r\n\r",
        ] {
            assert_eq!(decode_all(input), Ok(None), "{:?}", input);
        }
    }

    const BAD: &[(&[u8], ChunkedError)] = &[
        (b"\r\n", ChunkedError::Malformed),                 // no size
        (b"g\r\n", ChunkedError::Malformed),                // not hex
        (b"-1\r\n", ChunkedError::Malformed),               // sign
        (b"+1\r\nx\r\n0\r\n\r\n", ChunkedError::Malformed), // sign
        (b"0x5\r\nhello\r\n0\r\n\r\n", ChunkedError::Malformed),
        (b"5\nhello\r\n0\r\n\r\n", ChunkedError::Malformed), // bare LF
        (b"5\r\rhello", ChunkedError::Malformed),
        (b"5\r\nhelloXX0\r\n\r\n", ChunkedError::Malformed), // no CRLF after data
        (b"5\r\nhello\n0\r\n\r\n", ChunkedError::Malformed),
        (b"5\r\nhello\r\n0\r\n\n", ChunkedError::Malformed),
        (b"5;a\nb\r\nhello\r\n0\r\n\r\n", ChunkedError::Malformed),
        (b"0\r\nX: 1\n\r\n", ChunkedError::Malformed),
        (b"5 5\r\nhello\r\n0\r\n\r\n", ChunkedError::Malformed),
        (b"11111111111111111\r\n", ChunkedError::Malformed), // 17 digits
        (b"00000000000000001\r\n", ChunkedError::Malformed), // 17 digits
    ];

    #[test]
    fn rejects_bad_framing() {
        for (input, want) in BAD {
            assert_eq!(
                decode_all(input),
                Err(*want),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn max_size_fits_u64() {
        let mut dec = ChunkedDecoder::new();
        let step = dec.decode(b"ffffffffffffffff\r\nab").unwrap();
        assert_eq!(step.event, Event::Data(18..20));
    }

    #[test]
    fn bounds_extensions_and_trailers() {
        let mut input = b"1;".to_vec();
        input.extend(std::iter::repeat_n(b'a', DEFAULT_MAX_EXTENSION_BYTES + 1));
        assert_eq!(decode_all(&input), Err(ChunkedError::ExtensionsTooLong));

        // Many small chunks each with an extension: the bound is per message.
        let mut input = Vec::new();
        for _ in 0..(DEFAULT_MAX_EXTENSION_BYTES / 8 + 1) {
            input.extend_from_slice(b"1;abcdefgh\r\nx\r\n");
        }
        assert_eq!(decode_all(&input), Err(ChunkedError::ExtensionsTooLong));

        let mut input = b"0\r\n".to_vec();
        for _ in 0..(DEFAULT_MAX_TRAILER_BYTES / 8 + 1) {
            input.extend_from_slice(b"X: abc\r\n");
        }
        assert_eq!(decode_all(&input), Err(ChunkedError::TrailersTooLarge));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(input in proptest::collection::vec(any::<u8>(), 0..512), split in 0usize..512) {
            let split = split.min(input.len());
            let (a, b) = input.split_at(split);
            let _ = decode_pieces(&[a, b]);
        }

        #[test]
        fn encode_then_decode_round_trips(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..40), 0..8), split in 0usize..400) {
            let mut wire = Vec::new();
            let mut want = Vec::new();
            for c in &chunks {
                wire.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
                wire.extend_from_slice(c);
                wire.extend_from_slice(b"\r\n");
                want.extend_from_slice(c);
            }
            wire.extend_from_slice(b"0\r\n\r\n");
            let split = split.min(wire.len());
            let (a, b) = wire.split_at(split);
            let (body, rest, done) = decode_pieces(&[a, b]).unwrap();
            prop_assert!(done);
            prop_assert_eq!(body, want);
            prop_assert!(rest.is_empty());
        }
    }
}
