//! Tool-call wire formats of the model families: for each format, the grammar that admits
//! only well-formed calls to a request's tools, and the parsing of a model's output into
//! content and calls, whole or streamed as deltas.
//!
//! Pure text. This module must not know HTTP, OpenAI's request and response shapes beyond the
//! tool spec (a name and a JSON schema), the engine, or tokens: where a format's marker is a
//! single token of some vocabulary, the caller says so through a predicate
//! ([`ToolFormat::call_grammar_with`]).
//!
//! Whole and streamed parsing are one scanner per format, fed either all at once or delta by
//! delta, so both give the same content and calls for any split of the output.

mod deepseek;
mod grammar;
mod hermes;
mod llama3_json;
mod output;
mod scan;

#[cfg(test)]
mod grammar_tests;
#[cfg(test)]
mod tests;

use output::Output;

/// One function tool as the request gave it.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolSpec {
    pub name: String,
    /// The JSON schema of the arguments; `{"type": "object"}` when the request gave none.
    pub parameters: serde_json::Value,
}

/// The ways model families write tool calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolFormat {
    /// DeepSeek V3 / R1-Distill: `<｜tool▁calls▁begin｜>` … fenced JSON … `<｜tool▁calls▁end｜>`.
    Deepseek,
    /// Hermes, Qwen2.5: `<tool_call>\n{"name": …, "arguments": …}\n</tool_call>` blocks.
    Hermes,
    /// Llama 3.1/3.2 JSON tool calling: the whole output is `{"name": …, "parameters": …}`.
    Llama3Json,
}

impl ToolFormat {
    pub const NAMES: [&'static str; 3] = ["deepseek", "hermes", "llama3_json"];

    /// For `--tool-call-parser`.
    pub fn parse_name(s: &str) -> Option<Self> {
        match s {
            "deepseek" => Some(Self::Deepseek),
            "hermes" => Some(Self::Hermes),
            "llama3_json" => Some(Self::Llama3Json),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Deepseek => "deepseek",
            Self::Hermes => "hermes",
            Self::Llama3Json => "llama3_json",
        }
    }

    /// `auto`: the format a chat template writes calls in, if any. None when the template has
    /// no tool-call format.
    pub fn detect(chat_template: &str) -> Option<Self> {
        if chat_template.contains(deepseek::CALLS_BEGIN)
            || chat_template.contains(deepseek::CALL_BEGIN)
        {
            return Some(Self::Deepseek);
        }
        if chat_template.contains(hermes::OPEN) {
            return Some(Self::Hermes);
        }
        // Llama 3.1's template describes the JSON call in prose ("parameters") and replays
        // results under the `ipython` role; `<|python_tag|>` appears where built-in tools are on.
        let llama3 = chat_template.contains("<|start_header_id|>")
            && (chat_template.contains("\"parameters\"") || chat_template.contains("ipython"));
        if chat_template.contains(llama3_json::PYTHON_TAG) || llama3 {
            return Some(Self::Llama3Json);
        }
        None
    }

    /// A Lark grammar (llguidance's dialect) that admits exactly the well-formed calls of this
    /// format to `tools`, arguments valid for each tool's schema: one call, or one or more when
    /// `parallel`. Markers are written as text; see [`Self::call_grammar_with`] for a
    /// vocabulary where they are tokens. Err names the problem when a tool's schema can't be
    /// embedded (llguidance may still reject a schema it can't compile).
    pub fn call_grammar(self, tools: &[ToolSpec], parallel: bool) -> Result<String, String> {
        grammar::call_grammar(self, tools, parallel, &|_| false)
    }

    /// As [`Self::call_grammar`], but each marker for which `marker_is_token` holds is written
    /// as a token reference (`<tool_call>`) rather than as text. llguidance's token trie
    /// (toktrie_hf_tokenizers) treats every added token spelled `<…>` as special, so a text
    /// literal can never match it: for a vocabulary holding the marker as one token (Qwen2.5's
    /// `<tool_call>`, DeepSeek's `<｜tool▁calls▁begin｜>`), the text form would force the model
    /// to spell the marker out in pieces it never saw in training.
    pub fn call_grammar_with(
        self,
        tools: &[ToolSpec],
        parallel: bool,
        marker_is_token: &dyn Fn(&str) -> bool,
    ) -> Result<String, String> {
        grammar::call_grammar(self, tools, parallel, marker_is_token)
    }

    /// Splits a finished output into content and calls. Text that is not a well-formed call
    /// stays content. `content` is None when nothing but calls and whitespace was written.
    pub fn parse(self, text: &str) -> Parsed {
        let mut stream = self.streamer();
        let mut deltas = stream.push(text);
        deltas.extend(stream.finish());
        Parsed::from_deltas(deltas)
    }

    pub fn streamer(self) -> ToolStream {
        let scanner = match self {
            Self::Deepseek => Scanner::Deepseek(deepseek::Scanner::default()),
            Self::Hermes => Scanner::Hermes(hermes::Scanner::default()),
            Self::Llama3Json => Scanner::Llama3Json(llama3_json::Scanner::default()),
        };
        ToolStream {
            scanner,
            out: Output::default(),
            finished: false,
        }
    }
}

/// A finished output split into content and calls.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    pub content: Option<String>,
    pub calls: Vec<ParsedCall>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedCall {
    pub name: String,
    /// Compact JSON text (serde_json re-serialised) of the arguments object.
    pub arguments: String,
}

impl Parsed {
    fn from_deltas(deltas: Vec<ToolDelta>) -> Self {
        let mut content = String::new();
        let mut calls: Vec<ParsedCall> = Vec::new();
        for delta in deltas {
            match delta {
                ToolDelta::Content(text) => content.push_str(&text),
                ToolDelta::CallStart { name, .. } => calls.push(ParsedCall {
                    name,
                    arguments: String::new(),
                }),
                ToolDelta::Arguments { index, fragment } => {
                    if let Some(call) = calls.get_mut(index) {
                        call.arguments.push_str(&fragment);
                    }
                }
            }
        }
        Parsed {
            content: (!content.is_empty()).then_some(content),
            calls,
        }
    }
}

/// Incremental parsing of a streamed output, for OpenAI-style deltas.
#[derive(Debug)]
pub struct ToolStream {
    scanner: Scanner,
    out: Output,
    finished: bool,
}

#[derive(Debug)]
enum Scanner {
    Deepseek(deepseek::Scanner),
    Hermes(hermes::Scanner),
    Llama3Json(llama3_json::Scanner),
}

impl ToolStream {
    /// Feeds the next text delta; returns what can be sent now. Text that may be the start of
    /// a call marker is held back (like a stop string), so content is never sent and then
    /// retracted; so is whitespace, until it turns out not to border a call.
    pub fn push(&mut self, text: &str) -> Vec<ToolDelta> {
        if self.finished {
            return Vec::new();
        }
        match &mut self.scanner {
            Scanner::Deepseek(s) => s.push(text, &mut self.out),
            Scanner::Hermes(s) => s.push(text, &mut self.out),
            Scanner::Llama3Json(s) => s.push(text, &mut self.out),
        }
        self.out.take()
    }

    /// The output ended: flushes whatever is held back (an unterminated call is content, as in
    /// [`ToolFormat::parse`]). Later calls to `push` or `finish` return nothing.
    pub fn finish(&mut self) -> Vec<ToolDelta> {
        if self.finished {
            return Vec::new();
        }
        self.finished = true;
        match &mut self.scanner {
            Scanner::Deepseek(s) => s.finish(&mut self.out),
            Scanner::Hermes(s) => s.finish(&mut self.out),
            Scanner::Llama3Json(s) => s.finish(&mut self.out),
        }
        self.out.finish();
        self.out.take()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolDelta {
    Content(String),
    /// The first chunk of call `index` (0-based, in order): its name.
    CallStart {
        index: usize,
        name: String,
    },
    /// A fragment of call `index`'s arguments JSON string.
    Arguments {
        index: usize,
        fragment: String,
    },
}

/// The arguments as OpenAI carries them: compact JSON text of an object. None for anything
/// but an object, which no format calls well-formed.
fn arguments_text(value: &serde_json::Value) -> Option<String> {
    if !value.is_object() {
        return None;
    }
    serde_json::to_string(value).ok()
}
