//! One script call's keys and arguments, written into one buffer (no
//! `format!` per key, no `to_string` per argument): the key texts of
//! [`super::script`] and decimal arguments, then sliced for
//! [`crate::ratelimit::eval::Runner::eval`].

use uuid::Uuid;

use crate::http::ascii::Decimal;

/// Where one reservation's keys are: its org, agent, minute, month and id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeySet {
    pub agent: Uuid,
    /// Unix minute of the reservation.
    pub minute: u64,
    /// `YYYYMM`.
    pub month: u32,
    /// The reservation's id: the worker's random prefix and a counter.
    pub rid: Rid,
}

/// A reservation id, unique across proxies: 64 random bits drawn once per
/// worker, and that worker's counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rid {
    pub prefix: u64,
    pub n: u64,
}

/// Key and argument bytes back to back; `ends[i]` closes part `i`.
pub struct CallBuf {
    buf: Vec<u8>,
    ends: Vec<usize>,
    keys: usize,
}

impl CallBuf {
    /// Room for `sets` reservations' keys and `args` arguments.
    pub fn new(sets: usize, args: usize) -> Self {
        Self {
            buf: Vec::with_capacity(sets * 6 * 70 + args * 12),
            ends: Vec::with_capacity(sets * 6 + args),
            keys: 0,
        }
    }

    fn end(&mut self) {
        self.ends.push(self.buf.len());
    }

    fn prefix(&mut self, org: &[u8]) {
        self.buf.extend_from_slice(b"ibex:tl:{");
        self.buf.extend_from_slice(org);
        self.buf.extend_from_slice(b"}:");
    }

    fn decimal(&mut self, n: u64) {
        self.buf.extend_from_slice(Decimal::new(n).as_bytes());
    }

    /// The six keys of [`super::script`], in order, of one reservation of
    /// `org` (its hyphenated text).
    pub fn keys(&mut self, org: &[u8], k: &KeySet) {
        let mut agent = [0u8; 36];
        let agent: &[u8] = k.agent.hyphenated().encode_lower(&mut agent).as_bytes();
        self.prefix(org);
        self.buf.extend_from_slice(b"m:");
        self.decimal(k.minute);
        self.end();
        self.prefix(org);
        self.buf.extend_from_slice(b"am:");
        self.buf.extend_from_slice(agent);
        self.buf.push(b':');
        self.decimal(k.minute);
        self.end();
        for kind in [&b"M:"[..], b"aM:", b"U:"] {
            self.prefix(org);
            self.buf.extend_from_slice(kind);
            if kind == b"aM:" {
                self.buf.extend_from_slice(agent);
                self.buf.push(b':');
            }
            self.decimal(u64::from(k.month));
            self.end();
        }
        self.prefix(org);
        self.buf.extend_from_slice(b"r:");
        let hex = |b: &mut Vec<u8>, mut v: u64, width: usize| {
            let mut out = [b'0'; 16];
            let mut i = 16;
            loop {
                i -= 1;
                out[i] = b"0123456789abcdef"[(v & 15) as usize];
                v >>= 4;
                if v == 0 && 16 - i >= width {
                    break;
                }
            }
            b.extend_from_slice(&out[i..]);
        };
        hex(&mut self.buf, k.rid.prefix, 16);
        hex(&mut self.buf, k.rid.n, 1);
        self.end();
        self.keys = self.ends.len();
    }

    /// One decimal argument.
    pub fn num(&mut self, n: u64) {
        self.decimal(n);
        self.end();
    }

    /// One signed decimal argument.
    pub fn int(&mut self, n: i64) {
        if n < 0 {
            self.buf.push(b'-');
        }
        self.decimal(n.unsigned_abs());
        self.end();
    }

    /// Every part so far; the first [`CallBuf::key_count`] are keys.
    pub fn parts(&self) -> Vec<&[u8]> {
        let mut start = 0;
        self.ends
            .iter()
            .map(|&end| {
                let part = &self.buf[start..end];
                start = end;
                part
            })
            .collect()
    }

    /// How many of the parts are keys (the parts up to the last key set).
    pub fn key_count(&self) -> usize {
        self.keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_the_scripts_texts() {
        let org = Uuid::from_u128(0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10);
        let agent = Uuid::from_u128(0xa1);
        let mut call = CallBuf::new(1, 2);
        let org_text = org.hyphenated().to_string();
        call.keys(
            org_text.as_bytes(),
            &KeySet {
                agent,
                minute: 29_936_141,
                month: 202_612,
                rid: Rid {
                    prefix: 0xab,
                    n: 0x1f,
                },
            },
        );
        call.num(42);
        call.int(-7);
        let parts: Vec<String> = call
            .parts()
            .iter()
            .map(|p| String::from_utf8(p.to_vec()).unwrap())
            .collect();
        let a = agent.hyphenated().to_string();
        let o = &org_text;
        assert_eq!(
            parts,
            [
                format!("ibex:tl:{{{o}}}:m:29936141"),
                format!("ibex:tl:{{{o}}}:am:{a}:29936141"),
                format!("ibex:tl:{{{o}}}:M:202612"),
                format!("ibex:tl:{{{o}}}:aM:{a}:202612"),
                format!("ibex:tl:{{{o}}}:U:202612"),
                format!("ibex:tl:{{{o}}}:r:00000000000000ab1f"),
                "42".to_owned(),
                "-7".to_owned(),
            ]
        );
        assert_eq!(call.key_count(), 6);
    }
}
