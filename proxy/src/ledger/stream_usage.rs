//! Metering streams right (SPEC §10): a streamed chat or completions request that did not ask for
//! `stream_options.include_usage` gets it added before forwarding ([`ask_for_usage`]: only that
//! field is written, every other byte of the body is the client's), and the provider's extra
//! usage-only chunk is removed from the client's stream ([`strip_usage_chunk`]), so the client
//! sees the stream it asked for while the ledger still reads the provider's numbers (the usage
//! scanner sees the upstream's bytes before this filter).

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::http::BodyStream;

/// Longest event held while looking for its end; a longer one passes through unfiltered.
const MAX_EVENT: usize = 64 * 1024;

#[derive(Deserialize)]
struct Probe<'a> {
    #[serde(default)]
    stream: Option<serde_json::Value>,
    #[serde(borrow, default)]
    stream_options: Option<&'a RawValue>,
}

/// `Some(new body)` when `body` is a streamed request without `include_usage: true`.
/// Anything unexpected (not JSON, duplicate keys, `stream_options` not an object) → `None`:
/// the body goes as the client sent it.
pub fn ask_for_usage(body: &[u8]) -> Option<Bytes> {
    // Most chat bodies are not streams: skip the parse unless the key is there at all.
    memchr::memmem::find(body, b"\"stream\"")?;
    let probe: Probe<'_> = serde_json::from_slice(body).ok()?;
    if probe.stream != Some(serde_json::Value::Bool(true)) {
        return None;
    }
    let Some(raw) = probe.stream_options else {
        // No stream_options: insert it first in the top-level object.
        let open = body.iter().position(|&b| b == b'{')?;
        let mut out = BytesMut::with_capacity(body.len() + 40);
        out.extend_from_slice(&body[..=open]);
        out.extend_from_slice(br#""stream_options":{"include_usage":true},"#);
        out.extend_from_slice(&body[open + 1..]);
        return Some(out.freeze());
    };
    let mut options: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(raw.get()).ok()?;
    if options.get("include_usage") == Some(&serde_json::Value::Bool(true)) {
        return None;
    }
    options.insert("include_usage".into(), serde_json::Value::Bool(true));
    // Where the raw value sits in `body` (it borrows from it).
    let start = (raw.get().as_ptr() as usize).checked_sub(body.as_ptr() as usize)?;
    let end = start + raw.get().len();
    let mut out = BytesMut::with_capacity(body.len() + 24);
    out.extend_from_slice(body.get(..start)?);
    out.extend_from_slice(serde_json::to_string(&options).ok()?.as_bytes());
    out.extend_from_slice(body.get(end..)?);
    Some(out.freeze())
}

/// An OpenAI usage-only chunk: `"choices": []` and a `usage` object.
fn is_usage_only(event: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Chunk<'a> {
        #[serde(borrow)]
        choices: Option<Vec<&'a RawValue>>,
        #[serde(borrow)]
        usage: Option<&'a RawValue>,
    }
    let text = std::str::from_utf8(event).unwrap_or("");
    let data: String = text
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| d.strip_prefix(' ').unwrap_or(d))
        .collect::<Vec<_>>()
        .join("\n");
    match serde_json::from_str::<Chunk<'_>>(&data) {
        Ok(c) => {
            c.choices.is_some_and(|c| c.is_empty()) && c.usage.is_some_and(|u| u.get() != "null")
        }
        Err(_) => false,
    }
}

/// The end of the first complete event in `buf` (after its blank line), if any.
fn event_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i < buf.len() {
        if buf[i] == b'\n' {
            match buf.get(i + 1) {
                Some(b'\n') => return Some(i + 2),
                Some(b'\r') if buf.get(i + 2) == Some(&b'\n') => return Some(i + 3),
                _ => {}
            }
        }
        i += 1;
    }
    None
}

/// Splits the pieces into whole events and drops the usage-only one(s).
#[derive(Default)]
pub struct UsageStripper {
    pending: BytesMut,
}

impl UsageStripper {
    /// What of `piece` (with what was held) can go to the client now.
    pub fn push(&mut self, piece: &[u8]) -> Bytes {
        self.pending.extend_from_slice(piece);
        let mut out = BytesMut::new();
        while let Some(end) = event_end(&self.pending) {
            let event = self.pending.split_to(end);
            if !is_usage_only(&event) {
                out.extend_from_slice(&event);
            }
        }
        if self.pending.len() > MAX_EVENT {
            out.extend_from_slice(&self.pending.split());
        }
        out.freeze()
    }

    /// Whatever is left at the end (an unterminated last event passes as it is).
    pub fn finish(&mut self) -> Bytes {
        self.pending.split().freeze()
    }
}

/// The client's view of an upstream event stream without the usage-only chunk.
pub fn strip_usage_chunk(upstream: BodyStream) -> BodyStream {
    let state = (upstream, UsageStripper::default(), false);
    Box::pin(futures::stream::unfold(
        state,
        |(mut up, mut strip, done)| async move {
            if done {
                return None;
            }
            loop {
                match up.next().await {
                    Some(Ok(piece)) => {
                        let out = strip.push(&piece);
                        if !out.is_empty() {
                            return Some((Ok(out), (up, strip, false)));
                        }
                    }
                    Some(Err(e)) => return Some((Err(e), (up, strip, true))),
                    None => {
                        let rest = strip.finish();
                        return (!rest.is_empty()).then_some((Ok(rest), (up, strip, true)));
                    }
                }
            }
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_is_asked_for_by_rewriting_only_that_field() {
        let body = b"{\"model\": \"m\",  \"stream\": true, \"messages\": []}\n";
        let out = ask_for_usage(body).expect("rewritten");
        assert_eq!(
            &out[..],
            b"{\"stream_options\":{\"include_usage\":true},\"model\": \"m\",  \"stream\": true, \"messages\": []}\n"
        );
        let body = br#"{"stream":true,"stream_options":{"include_usage":false, "x":1},"m":2}"#;
        let out = ask_for_usage(body).expect("rewritten");
        assert_eq!(
            &out[..],
            br#"{"stream":true,"stream_options":{"include_usage":true,"x":1},"m":2}"#
        );
        let out = ask_for_usage(br#"{"stream":true,"stream_options":{}}"#).expect("rewritten");
        assert_eq!(
            &out[..],
            br#"{"stream":true,"stream_options":{"include_usage":true}}"#
        );
        for unchanged in [
            &br#"{"stream":true,"stream_options":{"include_usage":true}}"#[..],
            br#"{"stream":false}"#,
            br#"{"model":"m"}"#,
            br#"{"stream":true,"stream":true}"#,
            br#"{"stream":true,"stream_options":7}"#,
            b"not json",
        ] {
            assert_eq!(
                ask_for_usage(unchanged),
                None,
                "{:?}",
                String::from_utf8_lossy(unchanged)
            );
        }
    }

    #[test]
    fn the_usage_only_chunk_is_dropped_whatever_the_piece_boundaries() {
        let events = [
            "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2,\"total_tokens\":3}}\r\n\r\n",
            "data: [DONE]\n\n",
        ];
        let all: String = events.concat();
        let want = format!("{}{}", events[0], events[2]);
        for split in 1..all.len() {
            let mut s = UsageStripper::default();
            let mut got = Vec::new();
            got.extend_from_slice(&s.push(&all.as_bytes()[..split]));
            got.extend_from_slice(&s.push(&all.as_bytes()[split..]));
            got.extend_from_slice(&s.finish());
            assert_eq!(
                String::from_utf8(got).expect("utf8"),
                want,
                "split at {split}"
            );
        }
        // A chunk with choices and usage (some providers) is the client's.
        let mut s = UsageStripper::default();
        let both = "data: {\"choices\":[{\"delta\":{}}],\"usage\":{\"total_tokens\":3}}\n\n";
        assert_eq!(&s.push(both.as_bytes())[..], both.as_bytes());
    }

    #[test]
    fn a_completions_stream_loses_only_its_usage_only_chunk() {
        let text = "data: {\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"choices\":[{\"index\":0,\"text\":\"a\",\"finish_reason\":\"stop\"}],\"usage\":null}\n\n";
        let usage = "data: {\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2,\"total_tokens\":5}}\n\n";
        let done = "data: [DONE]\n\n";
        let mut s = UsageStripper::default();
        let mut got = Vec::new();
        for e in [text, usage, done] {
            got.extend_from_slice(&s.push(e.as_bytes()));
        }
        got.extend_from_slice(&s.finish());
        assert_eq!(
            String::from_utf8(got).expect("utf8"),
            format!("{text}{done}")
        );
        let body = br#"{"model":"m","prompt":"x","stream":true}"#;
        assert_eq!(
            &ask_for_usage(body).expect("asked")[..],
            br#"{"stream_options":{"include_usage":true},"model":"m","prompt":"x","stream":true}"#
        );
    }
}
