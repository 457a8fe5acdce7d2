//! Llama 3.1/3.2 JSON tool calling: the whole output is `{"name": …, "parameters": {…}}`
//! (as vLLM's parser: `"arguments"` for `"parameters"`, an optional leading `<|python_tag|>`,
//! several objects joined by `;`). An output that starts otherwise is all content.

use super::output::Output;
use serde_json::Value;

pub(super) const PYTHON_TAG: &str = "<|python_tag|>";

#[derive(Debug, Default)]
enum Mode {
    /// Nothing but whitespace, or a beginning of `PYTHON_TAG`, so far.
    #[default]
    Undecided,
    Text,
    /// Calls, unless the rest says otherwise: held to the end, since text after a complete
    /// object can still make the whole output content.
    Calls,
}

#[derive(Debug, Default)]
pub(super) struct Scanner {
    held: String,
    mode: Mode,
}

impl Scanner {
    pub(super) fn push(&mut self, text: &str, out: &mut Output) {
        match self.mode {
            Mode::Text => out.content(text),
            Mode::Calls => self.held.push_str(text),
            Mode::Undecided => {
                self.held.push_str(text);
                let start = self.held.trim_start();
                if start.starts_with('{') || start.starts_with(PYTHON_TAG) {
                    self.mode = Mode::Calls;
                } else if !PYTHON_TAG.starts_with(start) {
                    self.mode = Mode::Text;
                    out.content(&std::mem::take(&mut self.held));
                }
            }
        }
    }

    pub(super) fn finish(&mut self, out: &mut Output) {
        let held = std::mem::take(&mut self.held);
        match self.mode {
            Mode::Calls => match parse_calls(&held) {
                Some(calls) => {
                    for (name, arguments) in calls {
                        out.call(name, arguments);
                    }
                }
                None => out.content(&held),
            },
            Mode::Undecided | Mode::Text => out.content(&held),
        }
    }
}

fn parse_calls(text: &str) -> Option<Vec<(String, String)>> {
    let text = text.trim_start();
    let mut rest = text.strip_prefix(PYTHON_TAG).unwrap_or(text);
    let mut calls = Vec::new();
    loop {
        rest = rest.trim_start();
        let mut values = serde_json::Deserializer::from_str(rest).into_iter::<Value>();
        let value = values.next()?.ok()?;
        let used = values.byte_offset();
        calls.push(parse_call(value)?);
        rest = rest[used..].trim_start();
        if rest.is_empty() {
            return Some(calls);
        }
        rest = rest.strip_prefix(';')?;
    }
}

fn parse_call(value: Value) -> Option<(String, String)> {
    let Value::Object(mut call) = value else {
        return None;
    };
    let Value::String(name) = call.remove("name")? else {
        return None;
    };
    let arguments = call
        .remove("parameters")
        .or_else(|| call.remove("arguments"))?;
    Some((name, super::arguments_text(&arguments)?))
}
