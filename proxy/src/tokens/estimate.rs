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

//!
//! **One parse.** The body is read once, borrowed, without building a
//! `serde_json::Value`: the visitors below sum the strings' bytes as they go,
//! and the same pass finds the top-level `model` and its span, which the
//! router uses for the route and an alias ([`Worst::model_span`]).

use std::fmt;
use std::ops::Range;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

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
    /// Where `model`'s JSON string is in the body; `None` with `model`.
    pub model_span: Option<Range<usize>>,
    /// The body was read as a JSON object (else `model` is `None` and the
    /// bound is the body's length).
    pub parsed: bool,
    /// Upper bound of the prompt's tokens.
    pub prompt: u64,
    /// The output the request allows (`max_*tokens` × `n`), if it says.
    pub output: Option<u64>,
    /// The `n` choices asked for (1 when absent), multiplying a default output.
    pub choices: u64,
}

/// The UTF-8 bytes of every string in a value (object keys not counted).
struct StrBytes(u64);

impl<'de> Deserialize<'de> for StrBytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrBytesVisitor).map(StrBytes)
    }
}

struct StrBytesVisitor;

impl<'de> Visitor<'de> for StrBytesVisitor {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
        Ok(v.len() as u64)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<u64, E> {
        Ok(0)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<u64, E> {
        Ok(0)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<u64, E> {
        Ok(0)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<u64, E> {
        Ok(0)
    }

    fn visit_unit<E: de::Error>(self) -> Result<u64, E> {
        Ok(0)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<u64, A::Error> {
        let mut n = 0u64;
        while let Some(StrBytes(b)) = seq.next_element()? {
            n = n.saturating_add(b);
        }
        Ok(n)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<u64, A::Error> {
        let mut n = 0u64;
        while map.next_key::<IgnoredAny>()?.is_some() {
            n = n.saturating_add(map.next_value::<StrBytes>()?.0);
        }
        Ok(n)
    }
}

/// An object key, as far as the bound cares.
enum Key {
    Name,
    Content,
    Type,
    Other,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
                Ok(match v {
                    "name" => Key::Name,
                    "content" => Key::Content,
                    "type" => Key::Type,
                    _ => Key::Other,
                })
            }
        }
        d.deserialize_str(V)
    }
}

/// A `type` value: its bytes, and whether it names an image/audio/file part.
struct PartType(u64, bool);

impl<'de> Deserialize<'de> for PartType {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = PartType;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PartType, E> {
                let media = matches!(
                    v,
                    "image_url" | "input_image" | "input_audio" | "image" | "file"
                );
                Ok(PartType(v.len() as u64, media))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<PartType, E> {
                Ok(PartType(0, false))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<PartType, E> {
                Ok(PartType(0, false))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<PartType, E> {
                Ok(PartType(0, false))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<PartType, E> {
                Ok(PartType(0, false))
            }
            fn visit_unit<E: de::Error>(self) -> Result<PartType, E> {
                Ok(PartType(0, false))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<PartType, A::Error> {
                StrBytesVisitor.visit_seq(seq).map(|n| PartType(n, false))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<PartType, A::Error> {
                StrBytesVisitor.visit_map(map).map(|n| PartType(n, false))
            }
        }
        d.deserialize_any(V)
    }
}

/// One content part: [`IMAGE_TOKENS`] when its `type` (the last one) names
/// an image, audio or file, else its strings' bytes.
struct Part(u64);

impl<'de> Deserialize<'de> for Part {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Part;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Part, A::Error> {
                let (mut n, mut media) = (0u64, false);
                while let Some(key) = map.next_key::<Key>()? {
                    let bytes = if let Key::Type = key {
                        let t = map.next_value::<PartType>()?;
                        media = t.1;
                        t.0
                    } else {
                        map.next_value::<StrBytes>()?.0
                    };
                    n = n.saturating_add(bytes);
                }
                Ok(Part(if media { IMAGE_TOKENS } else { n }))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Part, E> {
                StrBytesVisitor.visit_str(v).map(Part)
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Part, E> {
                Ok(Part(0))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Part, E> {
                Ok(Part(0))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Part, E> {
                Ok(Part(0))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Part, E> {
                Ok(Part(0))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Part, E> {
                Ok(Part(0))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Part, A::Error> {
                StrBytesVisitor.visit_seq(seq).map(Part)
            }
        }
        d.deserialize_any(V)
    }
}

/// A message's `content`: an array of parts ([`Part`]), or any value's bytes.
struct Content(u64);

impl<'de> Deserialize<'de> for Content {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Content;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Content, A::Error> {
                let mut n = 0u64;
                while let Some(Part(b)) = seq.next_element()? {
                    n = n.saturating_add(b);
                }
                Ok(Content(n))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Content, E> {
                StrBytesVisitor.visit_str(v).map(Content)
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Content, E> {
                Ok(Content(0))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Content, E> {
                Ok(Content(0))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Content, E> {
                Ok(Content(0))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Content, E> {
                Ok(Content(0))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Content, E> {
                Ok(Content(0))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Content, A::Error> {
                StrBytesVisitor.visit_map(map).map(Content)
            }
        }
        d.deserialize_any(V)
    }
}

/// One message's bound: [`PER_MESSAGE`], [`PER_NAME`] with a name, its
/// content ([`Content`]) and every other string's bytes.
struct Message(u64);

impl<'de> Deserialize<'de> for Message {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Message;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Message, A::Error> {
                let mut n = PER_MESSAGE;
                while let Some(key) = map.next_key::<Key>()? {
                    let bytes = match key {
                        Key::Content => map.next_value::<Content>()?.0,
                        Key::Name => PER_NAME.saturating_add(map.next_value::<StrBytes>()?.0),
                        _ => map.next_value::<StrBytes>()?.0,
                    };
                    n = n.saturating_add(bytes);
                }
                Ok(Message(n))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Message, E> {
                Ok(Message(PER_MESSAGE + v.len() as u64))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Message, E> {
                Ok(Message(PER_MESSAGE))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Message, E> {
                Ok(Message(PER_MESSAGE))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Message, E> {
                Ok(Message(PER_MESSAGE))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Message, E> {
                Ok(Message(PER_MESSAGE))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Message, E> {
                Ok(Message(PER_MESSAGE))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Message, A::Error> {
                StrBytesVisitor
                    .visit_seq(seq)
                    .map(|n| Message(PER_MESSAGE.saturating_add(n)))
            }
        }
        d.deserialize_any(V)
    }
}

/// `messages`: `Some(bound)` of an array of messages, `None` of anything
/// else (the body is then bounded by its length).
struct Messages(Option<u64>);

impl<'de> Deserialize<'de> for Messages {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Messages;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Messages, A::Error> {
                let mut n = 0u64;
                while let Some(Message(b)) = seq.next_element()? {
                    n = n.saturating_add(b);
                }
                Ok(Messages(Some(n)))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Messages, E> {
                Ok(Messages(None))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Messages, E> {
                Ok(Messages(None))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Messages, E> {
                Ok(Messages(None))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Messages, E> {
                Ok(Messages(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Messages, E> {
                Ok(Messages(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Messages, E> {
                Ok(Messages(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Messages, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Messages(None))
            }
        }
        d.deserialize_any(V)
    }
}

/// The fields of a request body the bound and the router read, borrowed.
/// The last of a repeated field wins (as a `serde_json::Value` reads it),
/// except `model`: named twice it is `None` (which one a provider would
/// read is not ours to guess — the router's rule).
#[derive(Default)]
struct Body<'a> {
    model: Option<&'a RawValue>,
    models: u32,
    messages: Option<Messages>,
    tools: Option<&'a RawValue>,
    functions: Option<&'a RawValue>,
    response_format: Option<&'a RawValue>,
    tool_choice: Option<&'a RawValue>,
    n: Option<&'a RawValue>,
    max_tokens: Option<&'a RawValue>,
    max_completion_tokens: Option<&'a RawValue>,
}

/// A top-level key of a request body.
enum Field {
    Model,
    Messages,
    Tools,
    Functions,
    ResponseFormat,
    ToolChoice,
    N,
    MaxTokens,
    MaxCompletionTokens,
    Other,
}

impl<'de> Deserialize<'de> for Field {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Field;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Field, E> {
                Ok(match v {
                    "model" => Field::Model,
                    "messages" => Field::Messages,
                    "tools" => Field::Tools,
                    "functions" => Field::Functions,
                    "response_format" => Field::ResponseFormat,
                    "tool_choice" => Field::ToolChoice,
                    "n" => Field::N,
                    "max_tokens" => Field::MaxTokens,
                    "max_completion_tokens" => Field::MaxCompletionTokens,
                    _ => Field::Other,
                })
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Body<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Body<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Body<'a>, A::Error> {
                let mut b = Body::default();
                while let Some(field) = map.next_key::<Field>()? {
                    let slot = match field {
                        Field::Messages => {
                            b.messages = Some(map.next_value()?);
                            continue;
                        }
                        Field::Other => {
                            map.next_value::<IgnoredAny>()?;
                            continue;
                        }
                        Field::Model => {
                            b.models += 1;
                            &mut b.model
                        }
                        Field::Tools => &mut b.tools,
                        Field::Functions => &mut b.functions,
                        Field::ResponseFormat => &mut b.response_format,
                        Field::ToolChoice => &mut b.tool_choice,
                        Field::N => &mut b.n,
                        Field::MaxTokens => &mut b.max_tokens,
                        Field::MaxCompletionTokens => &mut b.max_completion_tokens,
                    };
                    *slot = Some(map.next_value::<&'a RawValue>()?);
                }
                Ok(b)
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

/// A count field: a JSON unsigned integer, else absent.
fn count_field(raw: Option<&RawValue>) -> Option<u64> {
    raw.and_then(|r| r.get().parse::<u64>().ok())
}

/// The whole body's length as the bound (not a JSON object with `messages`).
fn whole(body: &[u8], parsed: bool, model: Option<(String, Range<usize>)>) -> Worst {
    let (model, model_span) = model.map_or((None, None), |(m, s)| (Some(m), Some(s)));
    Worst {
        model,
        model_span,
        parsed,
        prompt: body.len() as u64 + REPLY_PRIMING,
        output: None,
        choices: 1,
    }
}

/// The worst case of a chat request body.
pub fn worst_case(body: &[u8]) -> Worst {
    // A struct also deserialises from an array: only an object is a request.
    if body.trim_ascii_start().first() != Some(&b'{') {
        return whole(body, false, None);
    }
    let Ok(v) = serde_json::from_slice::<Body<'_>>(body) else {
        return whole(body, false, None);
    };
    let model = v.model.filter(|_| v.models == 1).and_then(|raw| {
        let model: String = serde_json::from_str(raw.get()).ok()?;
        let start = (raw.get().as_ptr() as usize).checked_sub(body.as_ptr() as usize)?;
        Some((model, start..start + raw.get().len()))
    });
    let Some(Messages(Some(messages))) = v.messages else {
        return whole(body, true, model);
    };
    let mut prompt = REPLY_PRIMING.saturating_add(messages);
    // The provider renders these into the prompt; their JSON text is longer.
    for raw in [v.tools, v.functions, v.response_format, v.tool_choice]
        .into_iter()
        .flatten()
    {
        prompt = prompt.saturating_add(raw.get().len() as u64);
    }
    let choices = count_field(v.n).unwrap_or(1).clamp(1, 128);
    let output = count_field(v.max_completion_tokens)
        .or_else(|| count_field(v.max_tokens))
        .map(|o| o.saturating_mul(choices));
    let (model, model_span) = model.map_or((None, None), |(m, s)| (Some(m), Some(s)));
    Worst {
        model,
        model_span,
        parsed: true,
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

    /// The bound as it was computed over a `serde_json::Value` (before the
    /// one-pass visitors): the visitors must give the same figures.
    fn by_value(body: &[u8]) -> (u64, Option<u64>, u64) {
        use serde_json::Value;
        fn string_bytes(v: &Value) -> u64 {
            match v {
                Value::String(s) => s.len() as u64,
                Value::Array(items) => items.iter().map(string_bytes).sum(),
                Value::Object(map) => map.values().map(string_bytes).sum(),
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
        let whole = (body.len() as u64 + REPLY_PRIMING, None, 1);
        let Ok(v) = serde_json::from_slice::<Value>(body) else {
            return whole;
        };
        let Some(messages) = v.get("messages").and_then(Value::as_array) else {
            return whole;
        };
        let mut prompt = REPLY_PRIMING + messages.iter().map(message_bound).sum::<u64>();
        for key in ["tools", "functions", "response_format", "tool_choice"] {
            if let Some(t) = v.get(key) {
                prompt += t.to_string().len() as u64;
            }
        }
        let count = |k: &str| v.get(k).and_then(Value::as_u64);
        let choices = count("n").unwrap_or(1).clamp(1, 128);
        let output = count("max_completion_tokens")
            .or_else(|| count("max_tokens"))
            .map(|o| o.saturating_mul(choices));
        (prompt, output, choices)
    }

    #[test]
    fn one_pass_gives_the_values_figures_and_the_routers_model() {
        let bodies = [
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hello"}],"max_tokens":10}"#,
            r#"{"messages":[{"role":"system","content":"be terse","name":"sys"},{"role":"user","content":[{"type":"text","text":"caf\u00e9 \"q\""},{"type":"image_url","image_url":{"url":"http://x/y.png"}},{"image_url":{"url":"u"},"type":"input_audio"}]}],"model":"m","n":3}"#,
            r#"{"model":"m","messages":[{"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{\"a\":1}"}}]},{"role":"tool","tool_call_id":"c1","content":"42"}],"tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}],"tool_choice":"auto","response_format":{"type":"json_object"},"max_completion_tokens":7,"max_tokens":99}"#,
            r#"{"model":"m","messages":["bare string",5,true,null,["nested",{"k":"v"}]],"max_tokens":-1,"n":1.5}"#,
            r#"{"model":"m","messages":[{"content":{"odd":"object content"},"role":"user","extra":[1,"two",{"three":"3"}]}],"max_tokens":"10"}"#,
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"a"},"loose part",{"type":["image_url"]}]}]}"#,
            r#"{"model":"a","model":"b","messages":[],"max_tokens":1,"max_tokens":2}"#,
            r#"{"model":5,"messages":{"not":"an array"}}"#,
            r#"{"model":"m"}"#,
            r#"{"model":"m","messages":[]} trailing"#,
            r#"[{"model":"m","messages":[]}]"#,
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"n":1000}"#,
            "",
            "{",
        ];
        for body in bodies {
            let w = worst_case(body.as_bytes());
            assert_eq!(
                (w.prompt, w.output, w.choices),
                by_value(body.as_bytes()),
                "{body}"
            );
            let routed = crate::upstream::router::request_model(body.as_bytes());
            assert_eq!(
                w.model.clone().zip(w.model_span.clone()),
                routed,
                "model of {body}"
            );
        }
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
