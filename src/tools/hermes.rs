//! Hermes / Qwen2.5 calls: `<tool_call>\n{"name": …, "arguments": {…}}\n</tool_call>` blocks,
//! anywhere in the output; text outside them is content.

use super::output::Output;
use super::scan::{self, Found};
use serde_json::Value;

pub(super) const OPEN: &str = "<tool_call>";
pub(super) const CLOSE: &str = "</tool_call>";

#[derive(Debug, Default)]
pub(super) struct Scanner {
    /// Text not yet given out: a possible start of `OPEN`, or the body of an open block.
    held: String,
    in_call: bool,
    /// How far `held` was searched for `CLOSE`.
    searched: usize,
}

impl Scanner {
    pub(super) fn push(&mut self, text: &str, out: &mut Output) {
        self.held.push_str(text);
        loop {
            if !self.in_call {
                match scan::find(&self.held, OPEN) {
                    Found::At(at) => {
                        out.content(&self.held[..at]);
                        self.held.replace_range(..at + OPEN.len(), "");
                        self.in_call = true;
                        self.searched = 0;
                    }
                    Found::Before(safe) => {
                        out.content(&self.held[..safe]);
                        self.held.replace_range(..safe, "");
                        return;
                    }
                }
            } else {
                let Some(end) = scan::find_from(&self.held, CLOSE, self.searched) else {
                    self.searched = self.held.len();
                    return;
                };
                let body = &self.held[..end];
                match parse_call(body) {
                    Some((name, arguments)) => out.call(name, arguments),
                    // As vLLM's parser: a block that is no call is left as the model wrote it.
                    None => out.content(&format!("{OPEN}{body}{CLOSE}")),
                }
                self.held.replace_range(..end + CLOSE.len(), "");
                self.in_call = false;
            }
        }
    }

    pub(super) fn finish(&mut self, out: &mut Output) {
        let rest = std::mem::take(&mut self.held);
        if self.in_call {
            out.content(OPEN);
        }
        out.content(&rest);
    }
}

/// A block's body: `{"name": "…", "arguments": {…}}`, whitespace around it allowed.
fn parse_call(body: &str) -> Option<(String, String)> {
    let Value::Object(mut call) = serde_json::from_str(body.trim()).ok()? else {
        return None;
    };
    let Value::String(name) = call.remove("name")? else {
        return None;
    };
    let arguments = super::arguments_text(&call.remove("arguments")?)?;
    Some((name, arguments))
}
