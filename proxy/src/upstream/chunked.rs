//! Incremental decoder for chunked response bodies (RFC 9112 §7.1), fed as
//! bytes arrive. Data is split off the read buffer without copying. Strict:
//! CRLF line ends, at most 16 hex digits, chunk-extension and trailer lines
//! bounded, trailers read and dropped.
//!
//! Written here because `crate::http` had no chunked codec when the upstream
//! client was built; fold the two together once it has one.

use bytes::{Buf, Bytes, BytesMut};

/// Longest chunk-size line (size + extensions) and trailer section accepted.
const MAX_LINE: usize = 4096;
const MAX_TRAILERS: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading hex digits of a chunk size.
    Size {
        digits: u8,
    },
    /// After the digits: extensions or whitespace, up to CR.
    Ext,
    /// CR of the size line seen, LF expected.
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// At the start of a trailer line (or the final empty line).
    TrailerStart,
    TrailerLine,
    TrailerLf {
        last: bool,
    },
    Done,
}

/// What one call to [`ChunkedDecoder::next`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Data(Bytes),
    /// Everything in the buffer was framing; read more.
    NeedMore,
    /// The terminal chunk and trailers were consumed.
    Done,
}

#[derive(Debug)]
pub struct ChunkedDecoder {
    state: State,
    size: u64,
    /// Bytes of the current size line or of all trailers so far.
    line: usize,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkedDecoder {
    pub fn new() -> Self {
        Self {
            state: State::Size { digits: 0 },
            size: 0,
            line: 0,
        }
    }

    /// Consumes framing from the front of `buf` and returns the next piece of
    /// data, if any. Bytes after the terminal chunk are left in `buf`.
    pub fn next(&mut self, buf: &mut BytesMut) -> Result<Decoded, ChunkError> {
        loop {
            if self.state == State::Done {
                return Ok(Decoded::Done);
            }
            if self.state == State::Data {
                if buf.is_empty() {
                    return Ok(Decoded::NeedMore);
                }
                let n = usize::try_from(self.size)
                    .unwrap_or(usize::MAX)
                    .min(buf.len());
                self.size -= n as u64;
                if self.size == 0 {
                    self.state = State::DataCr;
                }
                return Ok(Decoded::Data(buf.split_to(n).freeze()));
            }
            let Some(&b) = buf.first() else {
                return Ok(Decoded::NeedMore);
            };
            buf.advance(1);
            self.step(b)?;
        }
    }

    fn step(&mut self, b: u8) -> Result<(), ChunkError> {
        self.state = match self.state {
            State::Size { digits } => {
                self.line += 1;
                match hex_value(b) {
                    Some(v) if digits < 16 => {
                        self.size = (self.size << 4) | u64::from(v);
                        State::Size { digits: digits + 1 }
                    }
                    None if digits > 0 && b == b'\r' => State::SizeLf,
                    None if digits > 0 && (b == b';' || b == b' ' || b == b'\t') => State::Ext,
                    _ => return Err(ChunkError),
                }
            }
            State::Ext => {
                self.line += 1;
                if self.line > MAX_LINE {
                    return Err(ChunkError);
                }
                match b {
                    b'\r' => State::SizeLf,
                    b'\n' => return Err(ChunkError),
                    b'\t' | b' '..=b'~' => State::Ext,
                    _ => return Err(ChunkError),
                }
            }
            State::SizeLf if b == b'\n' => {
                self.line = 0;
                if self.size == 0 {
                    State::TrailerStart
                } else {
                    State::Data
                }
            }
            State::DataCr if b == b'\r' => State::DataLf,
            State::DataLf if b == b'\n' => State::Size { digits: 0 },
            State::TrailerStart if b == b'\r' => State::TrailerLf { last: true },
            State::TrailerStart | State::TrailerLine => {
                self.line += 1;
                if self.line > MAX_TRAILERS || b == b'\n' {
                    return Err(ChunkError);
                }
                if b == b'\r' {
                    State::TrailerLf { last: false }
                } else {
                    State::TrailerLine
                }
            }
            State::TrailerLf { last: true } if b == b'\n' => State::Done,
            State::TrailerLf { last: false } if b == b'\n' => State::TrailerStart,
            _ => return Err(ChunkError),
        };
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `raw` in pieces of `step` bytes; returns the data and whether
    /// the body completed, plus what was left after it.
    fn decode(raw: &[u8], step: usize) -> Result<(Vec<u8>, bool, Vec<u8>), ChunkError> {
        let mut d = ChunkedDecoder::new();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for (i, piece) in raw.chunks(step).enumerate() {
            buf.extend_from_slice(piece);
            loop {
                match d.next(&mut buf)? {
                    Decoded::Data(b) => out.extend_from_slice(&b),
                    Decoded::NeedMore => break,
                    Decoded::Done => {
                        let mut rest = buf.to_vec();
                        rest.extend_from_slice(&raw[((i + 1) * step).min(raw.len())..]);
                        return Ok((out, true, rest));
                    }
                }
            }
        }
        Ok((out, false, buf.to_vec()))
    }

    #[test]
    fn decodes_at_every_split() {
        let raw = b"5\r\nhello\r\n1;ext=\"v\"\r\n \r\nA\r\n0123456789\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        for step in 1..raw.len() {
            let (data, done, rest) = decode(raw, step).unwrap();
            assert_eq!(data, b"hello 0123456789", "step {step}");
            assert!(done);
            assert_eq!(rest, b"NEXT");
        }
    }

    #[test]
    fn incomplete_is_not_done() {
        let (data, done, _) = decode(b"5\r\nhel", 100).unwrap();
        assert_eq!((data.as_slice(), done), (&b"hel"[..], false));
    }

    #[test]
    fn refuses_malformed_framing() {
        for raw in [
            &b"\r\n"[..],
            b"g\r\n",
            b"5\nhello\r\n",
            b"5\r\nhelloXX",
            b"5\r\nhello\n0\r\n\r\n",
            b"11111111111111111\r\n",
            b"-1\r\n",
            b"0x5\r\n",
            b"0\r\nX: 1\n\r\n",
            b"5;\x01\r\n",
        ] {
            assert_eq!(decode(raw, 100).err(), Some(ChunkError), "{:?}", raw);
        }
        let mut long = b"1;".to_vec();
        long.extend(std::iter::repeat_n(b'a', MAX_LINE));
        assert_eq!(decode(&long, 100).err(), Some(ChunkError));
    }
}
