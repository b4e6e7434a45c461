//! Byte helpers for the hot path, written once: decimal numbers without the
//! `fmt` machinery or an allocation, and case-insensitive prefixes (header
//! names, schemes, media types are ASCII-case-insensitive).

/// `n` in decimal, on the stack.
pub struct Decimal {
    bytes: [u8; 20],
    start: usize,
}

impl Decimal {
    #[inline]
    pub fn new(mut n: u64) -> Self {
        let mut d = Decimal {
            bytes: [0; 20],
            start: 20,
        };
        loop {
            d.start -= 1;
            d.bytes[d.start] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                return d;
            }
        }
    }

    #[inline]
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[self.start..]
    }
}

/// Appends `n` in decimal.
#[inline]
pub fn push_decimal(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(Decimal::new(n).as_bytes());
}

/// True when `s` starts with `prefix`, ignoring ASCII case.
#[inline]
pub fn starts_with_ignore_case(s: &[u8], prefix: &[u8]) -> bool {
    s.len() >= prefix.len() && s[..prefix.len()].eq_ignore_ascii_case(prefix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_are_written_in_decimal() {
        for n in [0u64, 1, 9, 10, 64, 1234, u64::MAX] {
            assert_eq!(Decimal::new(n).as_bytes(), n.to_string().as_bytes());
            let mut out = b"x".to_vec();
            push_decimal(&mut out, n);
            assert_eq!(out, format!("x{n}").into_bytes());
        }
    }

    #[test]
    fn prefixes_ignore_ascii_case_only() {
        assert!(starts_with_ignore_case(b"X-IBEX-Agent-ID", b"x-ibex-"));
        assert!(starts_with_ignore_case(
            b"text/event-stream; charset=utf-8",
            b"TEXT/EVENT-STREAM"
        ));
        assert!(!starts_with_ignore_case(b"x-ibe", b"x-ibex-"));
        assert!(!starts_with_ignore_case("é".as_bytes(), "É".as_bytes()));
        assert!(starts_with_ignore_case(b"", b""));
    }
}
