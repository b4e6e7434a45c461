//! Metering: the `model` and `usage` of a response, read as the body passes
//! through without buffering it.
//!
//! [`JsonScanner`] is a tiny streaming JSON tokenizer that tracks only
//! nesting and strings, and captures the values of the top-level keys
//! `model` and `usage` (each capture bounded); [`SseScanner`] feeds it the
//! `data:` lines of an event stream, one event at a time, so the final
//! chunk's `usage` of an OpenAI stream (`stream_options.include_usage`) is
//! found. Memory per response is constant. Malformed input yields nothing,
//! never an error: metering must not break forwarding.

use serde::Deserialize;

/// Longest captured value (`usage` object or `model` string) in bytes.
const MAX_CAPTURE: usize = 4096;
/// Longest model name kept (longer ones are not metered by name).
const MAX_MODEL: usize = 128;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    /// Anthropic's `cache_read_input_tokens`: apart from (not in) the prompt tokens.
    pub cache_read_tokens: u64,
    /// Anthropic's `cache_creation_input_tokens`: apart from (not in) the prompt tokens.
    pub cache_creation_tokens: u64,
}

/// What a response said about itself.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Metering {
    pub model: Option<String>,
    pub usage: Option<Usage>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Model,
    Usage,
    /// `response` (OpenAI Responses events) or `message` (Anthropic's `message_start`): an
    /// object whose own `model` and `usage` are read one level down.
    Nest,
}

/// Where the scanner is inside the top-level object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Top {
    /// Before the document's first byte.
    Start,
    ExpectKey,
    InKey,
    ExpectColon(Option<Field>),
    ExpectValue(Option<Field>),
    InValue,
    /// The document is not an object, or it ended.
    Ignore,
}

pub struct JsonScanner {
    depth: u32,
    in_string: bool,
    escaped: bool,
    top: Top,
    key: [u8; 8],
    key_len: usize,
    capture: Option<Field>,
    buf: Vec<u8>,
    /// The depth whose keys are read: 1, or 2 inside a [`Field::Nest`] object.
    level: u32,
    /// The next `{` opens a [`Field::Nest`] object.
    entering: bool,
    pub found: Metering,
}

impl Default for JsonScanner {
    fn default() -> Self {
        Self::new()
    }
}

impl JsonScanner {
    pub fn new() -> Self {
        Self {
            depth: 0,
            in_string: false,
            escaped: false,
            top: Top::Start,
            key: [0; 8],
            key_len: 0,
            capture: None,
            buf: Vec::new(),
            level: 1,
            entering: false,
            found: Metering::default(),
        }
    }

    /// Starts a new document; what was found so far is kept.
    pub fn reset(&mut self) {
        self.depth = 0;
        self.in_string = false;
        self.escaped = false;
        self.top = Top::Start;
        self.capture = None;
        self.level = 1;
        self.entering = false;
    }

    pub fn feed(&mut self, data: &[u8]) {
        let mut i = 0;
        while i < data.len() {
            // Fast path: skip the inside of strings nobody captures.
            if self.in_string && !self.escaped && self.capture.is_none() && self.top != Top::InKey {
                match data[i..].iter().position(|&b| b == b'"' || b == b'\\') {
                    Some(p) => i += p,
                    None => return,
                }
            }
            self.byte(data[i]);
            i += 1;
        }
    }

    fn byte(&mut self, b: u8) {
        if self.capture.is_some()
            && !(self.depth == self.level && !self.in_string && (b == b',' || b == b'}'))
        {
            if self.buf.len() >= MAX_CAPTURE {
                self.capture = None;
            } else {
                self.buf.push(b);
            }
        }
        if self.in_string {
            if self.escaped {
                self.escaped = false;
                self.key_byte(b);
            } else if b == b'\\' {
                self.escaped = true;
                self.key_byte(b);
            } else if b == b'"' {
                self.in_string = false;
                if self.depth == self.level && self.top == Top::InKey {
                    self.top = Top::ExpectColon(self.matched_key());
                }
            } else {
                self.key_byte(b);
            }
            return;
        }
        if b.is_ascii_whitespace() {
            return;
        }
        if self.depth == self.level {
            if let Top::ExpectValue(field) = self.top {
                self.top = Top::InValue;
                match field {
                    Some(Field::Nest) => self.entering = b == b'{',
                    Some(f) => {
                        self.buf.clear();
                        self.buf.push(b);
                        self.capture = Some(f);
                    }
                    None => {}
                }
            }
        }
        match b {
            b'"' => {
                self.in_string = true;
                if self.depth == self.level && self.top == Top::ExpectKey {
                    self.top = Top::InKey;
                    self.key_len = 0;
                }
            }
            b'{' | b'[' => {
                if self.depth == 0 {
                    self.top = if b == b'{' && self.top == Top::Start {
                        Top::ExpectKey
                    } else {
                        Top::Ignore
                    };
                }
                self.depth = self.depth.saturating_add(1);
                if std::mem::take(&mut self.entering) {
                    self.level = 2;
                    self.top = Top::ExpectKey;
                }
            }
            b'}' | b']' => {
                if self.depth == self.level {
                    self.finish_capture();
                    if self.level == 2 {
                        // Back in the top-level object, after the nested value.
                        self.level = 1;
                        self.top = Top::InValue;
                    } else {
                        self.top = Top::Ignore;
                    }
                }
                self.depth = self.depth.saturating_sub(1);
            }
            b',' if self.depth == self.level => {
                self.finish_capture();
                if self.top == Top::InValue {
                    self.top = Top::ExpectKey;
                }
            }
            b':' if self.depth == self.level => {
                if let Top::ExpectColon(field) = self.top {
                    self.top = Top::ExpectValue(field);
                }
            }
            _ => {}
        }
    }

    fn key_byte(&mut self, b: u8) {
        if self.depth == self.level && self.top == Top::InKey {
            if self.key_len < self.key.len() {
                self.key[self.key_len] = b;
            }
            self.key_len += 1;
        }
    }

    fn matched_key(&self) -> Option<Field> {
        let key = self.key.get(..self.key_len)?;
        match key {
            b"model" if self.found.model.is_none() => Some(Field::Model),
            b"usage" => Some(Field::Usage),
            b"response" | b"message" if self.level == 1 => Some(Field::Nest),
            _ => None,
        }
    }

    fn finish_capture(&mut self) {
        let Some(field) = self.capture.take() else {
            return;
        };
        match field {
            Field::Model => {
                if let Ok(m) = serde_json::from_slice::<String>(&self.buf) {
                    if !m.is_empty() && m.len() <= MAX_MODEL {
                        self.found.model = Some(m);
                    }
                }
            }
            Field::Usage => {
                #[derive(Deserialize)]
                struct Wire {
                    prompt_tokens: Option<u64>,
                    completion_tokens: Option<u64>,
                    total_tokens: Option<u64>,
                    // Responses and Messages name them so.
                    input_tokens: Option<u64>,
                    output_tokens: Option<u64>,
                    cache_read_input_tokens: Option<u64>,
                    cache_creation_input_tokens: Option<u64>,
                }
                if let Ok(Some(w)) = serde_json::from_slice::<Option<Wire>>(&self.buf) {
                    // A later usage object updates what it names and keeps the rest: Anthropic's
                    // `message_delta` carries the final output tokens, `message_start` the input.
                    let prev = self.found.usage.unwrap_or_default();
                    let prompt = w
                        .prompt_tokens
                        .or(w.input_tokens)
                        .unwrap_or(prev.prompt_tokens);
                    let completion = w
                        .completion_tokens
                        .or(w.output_tokens)
                        .unwrap_or(prev.completion_tokens);
                    self.found.usage = Some(Usage {
                        prompt_tokens: prompt,
                        completion_tokens: completion,
                        // Cache tokens are recorded apart and never added in (Anthropic's
                        // input_tokens already excludes them).
                        total_tokens: w.total_tokens.unwrap_or(prompt.saturating_add(completion)),
                        cache_read_tokens: w
                            .cache_read_input_tokens
                            .unwrap_or(prev.cache_read_tokens),
                        cache_creation_tokens: w
                            .cache_creation_input_tokens
                            .unwrap_or(prev.cache_creation_tokens),
                    });
                }
            }
            Field::Nest => {}
        }
        self.buf.clear();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    /// At a line start, `matched` bytes of `data:` seen so far.
    Start {
        matched: u8,
    },
    /// After `data:`: one optional space, then the value.
    AfterColon,
    Data,
    Skip,
}

/// Feeds the `data:` lines of a `text/event-stream` body to a
/// [`JsonScanner`], one event (blank-line delimited) per document.
pub struct SseScanner {
    line: Line,
    last_cr: bool,
    json: JsonScanner,
    /// Events with data other than `[DONE]` (for the ledger's estimate).
    events: u64,
    data_seen: bool,
}

impl Default for SseScanner {
    fn default() -> Self {
        Self::new()
    }
}

impl SseScanner {
    pub fn new() -> Self {
        Self {
            line: Line::Start { matched: 0 },
            last_cr: false,
            json: JsonScanner::new(),
            events: 0,
            data_seen: false,
        }
    }

    pub fn found(&self) -> &Metering {
        &self.json.found
    }

    pub fn into_found(self) -> Metering {
        self.json.found
    }

    pub fn feed(&mut self, data: &[u8]) {
        const PREFIX: &[u8] = b"data:";
        let mut i = 0;
        while i < data.len() {
            let b = data[i];
            match self.line {
                Line::Start { matched } => {
                    if b == b'\n' && self.last_cr {
                        // The LF of a CRLF that already ended the line.
                    } else if b == b'\n' || b == b'\r' {
                        if matched == 0 {
                            // Blank line: the event is complete.
                            self.json.reset();
                            if std::mem::take(&mut self.data_seen) {
                                self.events += 1;
                            }
                        }
                        self.line = Line::Start { matched: 0 };
                    } else if b == PREFIX[usize::from(matched)] {
                        self.line = if usize::from(matched) + 1 == PREFIX.len() {
                            Line::AfterColon
                        } else {
                            Line::Start {
                                matched: matched + 1,
                            }
                        };
                    } else {
                        self.line = Line::Skip;
                        continue;
                    }
                    self.last_cr = b == b'\r';
                    i += 1;
                }
                Line::AfterColon => {
                    self.line = Line::Data;
                    if b == b' ' {
                        i += 1;
                    }
                }
                Line::Data | Line::Skip => {
                    let rest = &data[i..];
                    let end = rest.iter().position(|&c| c == b'\n' || c == b'\r');
                    let body = &rest[..end.unwrap_or(rest.len())];
                    if self.line == Line::Data {
                        self.json.feed(body);
                        if !body.is_empty() && body != b"[DONE]" {
                            self.data_seen = true;
                        }
                    }
                    match end {
                        Some(p) => {
                            if self.line == Line::Data {
                                // Lines of one event join with a newline.
                                self.json.feed(b"\n");
                            }
                            self.last_cr = rest[p] == b'\r';
                            self.line = Line::Start { matched: 0 };
                            i += p + 1;
                        }
                        None => i = data.len(),
                    }
                }
            }
        }
    }
}

/// Which scanner a response body goes through.
pub enum Scanner {
    Json(Box<JsonScanner>),
    Sse(Box<SseScanner>),
    Off,
}

impl Scanner {
    pub fn feed(&mut self, data: &[u8]) {
        match self {
            Scanner::Json(s) => s.feed(data),
            Scanner::Sse(s) => s.feed(data),
            Scanner::Off => {}
        }
    }

    /// Complete `data:` events seen (0 for a whole JSON body).
    pub fn events(&self) -> u64 {
        match self {
            Scanner::Sse(s) => s.events,
            _ => 0,
        }
    }

    pub fn take(&mut self) -> Metering {
        match std::mem::replace(self, Scanner::Off) {
            Scanner::Json(s) => s.found,
            Scanner::Sse(s) => s.into_found(),
            Scanner::Off => Metering::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMPLETION: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","model":"gpt-4o-mini",
        "choices":[{"index":0,"message":{"role":"assistant","content":"a \"usage\": {\"x\":1}, \\"},
        "usage":{"prompt_tokens":99}}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19,
                  "prompt_tokens_details": {"cached_tokens": 0}},
        "system_fingerprint": null}"#;

    fn json_all_splits(doc: &str) -> Metering {
        let mut first = None;
        for step in 1..=doc.len() {
            let mut s = JsonScanner::new();
            for piece in doc.as_bytes().chunks(step) {
                s.feed(piece);
            }
            match &first {
                None => first = Some(s.found),
                Some(f) => assert_eq!(f, &s.found, "step {step}"),
            }
        }
        first.unwrap()
    }

    #[test]
    fn reads_top_level_usage_and_model_only() {
        let m = json_all_splits(COMPLETION);
        assert_eq!(m.model.as_deref(), Some("gpt-4o-mini"));
        assert_eq!(
            m.usage,
            Some(Usage {
                prompt_tokens: 12,
                completion_tokens: 7,
                total_tokens: 19,
                ..Default::default()
            })
        );
    }

    #[test]
    fn missing_or_null_usage_is_none_and_garbage_is_harmless() {
        assert_eq!(json_all_splits(r#"{"model":"m","usage":null}"#).usage, None);
        assert_eq!(
            json_all_splits(r#"{"object":"list","data":[]}"#),
            Metering::default()
        );
        for junk in [
            "[1,2]",
            "not json",
            "{\"usage\":",
            "}}}{{{\"",
            "{\"usage\":{\"prompt_tokens\":-1}}",
        ] {
            assert_eq!(json_all_splits(junk).usage, None, "{junk}");
        }
        let total = json_all_splits(r#"{"usage":{"prompt_tokens":2,"completion_tokens":3}}"#);
        assert_eq!(total.usage.map(|u| u.total_tokens), Some(5));
    }

    #[test]
    fn oversized_capture_is_dropped() {
        let big = format!(
            r#"{{"usage":{{"pad":"{}","prompt_tokens":1}}}}"#,
            "x".repeat(MAX_CAPTURE)
        );
        assert_eq!(json_all_splits(&big).usage, None);
    }

    #[test]
    fn reads_usage_from_the_final_sse_chunk() {
        let stream = "data: {\"id\":\"c\",\"model\":\"gpt-4o\",\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\r\n\r\n\
                      : keep-alive comment\n\n\
                      event: x\ndata: {\"model\":\"gpt-4o\",\"choices\":[],\r\ndata: \"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4,\"total_tokens\":7}}\n\n\
                      data: [DONE]\n\n";
        for step in 1..=stream.len() {
            let mut s = SseScanner::new();
            for piece in stream.as_bytes().chunks(step) {
                s.feed(piece);
            }
            let found = s.found();
            assert_eq!(found.model.as_deref(), Some("gpt-4o"), "step {step}");
            assert_eq!(
                found.usage,
                Some(Usage {
                    prompt_tokens: 3,
                    completion_tokens: 4,
                    total_tokens: 7,
                    ..Default::default()
                }),
                "step {step}"
            );
        }
    }

    #[test]
    fn sse_without_usage_finds_none() {
        let mut s = SseScanner::new();
        s.feed(b"data: {\"model\":\"m\",\"choices\":[]}\n\ndata: [DONE]\n\n");
        assert_eq!(s.found().usage, None);
        assert_eq!(s.found().model.as_deref(), Some("m"));
    }

    #[test]
    fn responses_usage_is_read_from_the_nested_response() {
        // A whole Responses body: usage at the top with input/output names.
        let body = r#"{"id":"resp_1","object":"response","model":"gpt-4o","output":[{"type":"message","content":[{"type":"output_text","text":"hi \"usage\": 1"}]}],"usage":{"input_tokens":9,"input_tokens_details":{"cached_tokens":0},"output_tokens":4,"total_tokens":13}}"#;
        let m = json_all_splits(body);
        assert_eq!(m.model.as_deref(), Some("gpt-4o"));
        let u = m.usage.unwrap();
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.total_tokens),
            (9, 4, 13)
        );
        // The streamed final event nests the response, usage and model one level down.
        let stream = "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"r\",\"model\":\"gpt-4o\",\"usage\":null}}\n\n\
                      event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi\"}\n\n\
                      event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"r\",\"model\":\"gpt-4o\",\"output\":[{\"content\":[{\"text\":\"Hi\"}]}],\"usage\":{\"input_tokens\":5,\"output_tokens\":2,\"total_tokens\":7}},\"sequence_number\":3}\n\n";
        for step in [1, 2, 7, stream.len()] {
            let mut s = SseScanner::new();
            for piece in stream.as_bytes().chunks(step) {
                s.feed(piece);
            }
            let m = s.into_found();
            assert_eq!(m.model.as_deref(), Some("gpt-4o"), "step {step}");
            let u = m.usage.unwrap();
            assert_eq!(
                (u.prompt_tokens, u.completion_tokens, u.total_tokens),
                (5, 2, 7)
            );
        }
    }

    #[test]
    fn messages_usage_takes_input_from_the_start_output_from_the_last_delta_and_cache_apart() {
        let stream = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"model\":\"claude-x\",\"content\":[],\"usage\":{\"input_tokens\":25,\"cache_creation_input_tokens\":7,\"cache_read_input_tokens\":100,\"output_tokens\":1}}}\n\n\
                      event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello\"}}\n\n\
                      event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":15}}\n\n\
                      event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        for step in [1, 3, stream.len()] {
            let mut s = SseScanner::new();
            for piece in stream.as_bytes().chunks(step) {
                s.feed(piece);
            }
            let m = s.into_found();
            assert_eq!(m.model.as_deref(), Some("claude-x"));
            assert_eq!(
                m.usage,
                Some(Usage {
                    prompt_tokens: 25,
                    completion_tokens: 15,
                    // Cache tokens are not added in: they are recorded apart.
                    total_tokens: 40,
                    cache_read_tokens: 100,
                    cache_creation_tokens: 7,
                }),
                "step {step}"
            );
        }
        // A whole Messages body.
        let body = r#"{"id":"msg_1","type":"message","model":"claude-x","content":[{"type":"text","text":"hi"}],"usage":{"input_tokens":3,"cache_read_input_tokens":2,"cache_creation_input_tokens":0,"output_tokens":4}}"#;
        let u = json_all_splits(body).usage.unwrap();
        assert_eq!(
            (
                u.prompt_tokens,
                u.completion_tokens,
                u.total_tokens,
                u.cache_read_tokens
            ),
            (3, 4, 7, 2)
        );
        // An error body's nested message is not a nest to read.
        let err = r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
        assert_eq!(json_all_splits(err), Metering::default());
        // A top-level "message" that is a string is skipped.
        let m = json_all_splits(r#"{"message":"x","model":"m","usage":{"prompt_tokens":1}}"#);
        assert_eq!(m.model.as_deref(), Some("m"));
        assert_eq!(m.usage.map(|u| u.prompt_tokens), Some(1));
    }
}
