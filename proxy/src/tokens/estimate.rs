//! A chat request's worst case in tokens (SPEC §11), before it is sent.
//!
//! **Prompt: an upper bound, never below what the provider counts.** OpenAI's
//! tokenizers (and every byte-level BPE) turn at least one byte of text into
//! each token, so a text's UTF-8 byte length bounds its token count. The
//! bound adds, per message, the bytes of every string in it (role, name,
//! content, content parts' text, tool calls and their arguments) plus
//! [`PER_MESSAGE`] for the chat format's framing and [`PER_NAME`] with a name
//! (OpenAI's own counting: 3 and 1); [`REPLY_PRIMING`] for the assistant's
//! reply header (OpenAI: 3); the
//! JSON bytes of `tools` / `functions` / `response_format` (the provider
//! renders them into the prompt; JSON is longer than what it renders); and
//! [`IMAGE_TOKENS`] per image or audio part instead of its (base64) bytes.
//! A body that is not a JSON object with `messages` is bounded by its whole
//! length. Tested against `tiktoken-rs` (cl100k and o200k) on a corpus.
//!
//! **Output**: `max_completion_tokens`, else `max_tokens`, else `None` (the
//! limiter then reserves `IBEX_DEFAULT_OUTPUT_RESERVE` or what remains,
//! whichever is smaller). `n` choices multiply the output.
//!
//! Known limit of the bound: an image part is counted as [`IMAGE_TOKENS`]
//! (gpt-4o's high-detail maximum); a model pricing images higher (gpt-4o-mini
//! counts them ×33) can use more, and is settled as used.

use serde_json::Value;

/// Framing tokens per message (OpenAI's chat format: 3).
pub const PER_MESSAGE: u64 = 3;
/// One more for a message with a `name` (OpenAI: 1).
pub const PER_NAME: u64 = 1;
/// The assistant reply's header (OpenAI: 3).
pub const REPLY_PRIMING: u64 = 3;
/// One image or audio part (gpt-4o, detail high, 2048×768 tiles: 85 + 8·170).
pub const IMAGE_TOKENS: u64 = 1_445;

/// What a request may cost at most.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Worst {
    /// The request's `model`, for its price.
    pub model: Option<String>,
    /// Upper bound of the prompt's tokens.
    pub prompt: u64,
    /// The output the request allows (`max_*tokens` × `n`), if it says.
    pub output: Option<u64>,
    /// The `n` choices asked for (1 when absent), multiplying a default output.
    pub choices: u64,
}

fn string_bytes(v: &Value) -> u64 {
    match v {
        Value::String(s) => s.len() as u64,
        Value::Array(items) => items.iter().map(string_bytes).sum(),
        Value::Object(map) => map.iter().map(|(_, v)| string_bytes(v)).sum(),
        _ => 0,
    }
}

fn content_bytes(content: &Value) -> u64 {
    match content {
        Value::Array(parts) => parts
            .iter()
            .map(|part| match part.get("type").and_then(Value::as_str) {
                Some("image_url" | "input_image" | "input_audio" | "image" | "file") => {
                    IMAGE_TOKENS
                }
                _ => string_bytes(part),
            })
            .sum(),
        other => string_bytes(other),
    }
}

fn message_bound(m: &Value) -> u64 {
    let Value::Object(map) = m else {
        return PER_MESSAGE + string_bytes(m);
    };
    let mut n = PER_MESSAGE;
    for (key, value) in map {
        if key == "name" {
            n += PER_NAME;
        }
        n += if key == "content" {
            content_bytes(value)
        } else {
            string_bytes(value)
        };
    }
    n
}

fn count_field(v: &Value, key: &str) -> Option<u64> {
    v.get(key).and_then(Value::as_u64)
}

/// The worst case of a chat request body.
pub fn worst_case(body: &[u8]) -> Worst {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return Worst {
            model: None,
            prompt: body.len() as u64 + REPLY_PRIMING,
            output: None,
            choices: 1,
        };
    };
    let Some(messages) = v.get("messages").and_then(Value::as_array) else {
        return Worst {
            model: None,
            prompt: body.len() as u64 + REPLY_PRIMING,
            output: None,
            choices: 1,
        };
    };
    let mut prompt: u64 = REPLY_PRIMING + messages.iter().map(message_bound).sum::<u64>();
    for key in ["tools", "functions", "response_format", "tool_choice"] {
        if let Some(t) = v.get(key) {
            prompt += t.to_string().len() as u64;
        }
    }
    let choices = count_field(&v, "n").unwrap_or(1).clamp(1, 128);
    let output = count_field(&v, "max_completion_tokens")
        .or_else(|| count_field(&v, "max_tokens"))
        .map(|o| o.saturating_mul(choices));
    Worst {
        model: v.get("model").and_then(Value::as_str).map(str::to_owned),
        prompt,
        output,
        choices,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_contents_and_reads_max_tokens() {
        let w = worst_case(
            br#"{"model":"m","messages":[{"role":"user","content":"hello"}],"max_tokens":10}"#,
        );
        assert_eq!(w.output, Some(10));
        // "user" (4) + "hello" (5) + framing.
        assert_eq!(w.prompt, 9 + PER_MESSAGE + REPLY_PRIMING, "{w:?}");
        assert_eq!(
            worst_case(br#"{"messages":[],"max_tokens":10}"#).prompt,
            REPLY_PRIMING
        );
        let w = worst_case(br#"{"messages":[],"max_completion_tokens":7,"max_tokens":99,"n":2}"#);
        assert_eq!((w.output, w.choices), (Some(14), 2));
        assert_eq!(worst_case(br#"{"messages":[]}"#).output, None);
    }

    #[test]
    fn images_count_as_a_fixed_bound_not_their_bytes() {
        let big = "A".repeat(100_000);
        let body = format!(
            r#"{{"messages":[{{"role":"user","content":[{{"type":"text","text":"hi"}},{{"type":"image_url","image_url":{{"url":"data:image/png;base64,{big}"}}}}]}}]}}"#
        );
        let w = worst_case(body.as_bytes());
        assert!(
            w.prompt >= IMAGE_TOKENS && w.prompt < IMAGE_TOKENS + 100,
            "{w:?}"
        );
    }

    #[test]
    fn not_json_is_bounded_by_its_length() {
        assert_eq!(worst_case(b"nope").prompt, 4 + REPLY_PRIMING);
    }

    /// The bound against real tokenizers (OpenAI's cl100k and o200k, shipped in
    /// `tiktoken-rs`), counted as OpenAI's cookbook counts a chat: every value's
    /// tokens, 3 per message, 1 per name, 3 for the reply.
    #[test]
    fn never_below_a_real_tokenizer_on_a_corpus() {
        let long = "The quick brown fox jumps over the lazy dog. ".repeat(40);
        let corpus = [
            "hello",
            long.as_str(),
            "fn main() { println!(\"{}\", (1..=10).map(|x| x * x).sum::<u32>()); }",
            "1234567890 3.14159265358979 0xDEADBEEF 2026-12-01T23:41:05Z",
            "    indented\n\t\ttabs\n\n\nblank lines      and   runs   of   spaces",
            "Ünïcödé façade — naïve café, “quotes” and ‘apostrophes’…",
            "日本語のテキストと中文文本以及한국어 텍스트",
            "emoji 🦀🚀👩‍👩‍👧‍👦🏳️‍🌈 and symbols ∑∫√∞≠≈",
            "<|endoftext|> <|im_start|> special-looking text",
            "",
            "a",
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            "{\"json\": [1, 2, {\"nested\": true}], \"k\": null}",
        ];
        let bpes = [
            tiktoken_rs::cl100k_base().unwrap(),
            tiktoken_rs::o200k_base().unwrap(),
        ];
        for (i, text) in corpus.iter().enumerate() {
            let messages = serde_json::json!([
                {"role": "system", "content": "You are terse."},
                {"role": "user", "name": format!("user{i}"), "content": text},
                {"role": "assistant", "content": [{"type": "text", "text": text}]},
            ]);
            let body = serde_json::json!({"model": "m", "messages": messages, "max_tokens": 5});
            let bound = worst_case(body.to_string().as_bytes()).prompt;
            for bpe in &bpes {
                let mut count = REPLY_PRIMING;
                for m in messages.as_array().unwrap() {
                    count += PER_MESSAGE;
                    for (k, v) in m.as_object().unwrap() {
                        let text = match v {
                            serde_json::Value::String(s) => s.clone(),
                            other => other[0]["text"].as_str().unwrap().to_owned(),
                        };
                        count += bpe.encode_with_special_tokens(&text).len() as u64;
                        if k == "name" {
                            count += PER_NAME;
                        }
                    }
                }
                assert!(bound >= count, "text {i}: bound {bound} < {count}");
            }
        }
    }
}
