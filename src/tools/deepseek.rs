//! DeepSeek V3 / R1-Distill calls: a section
//! `<｜tool▁calls▁begin｜>` CALL (`\n` CALL)* `<｜tool▁calls▁end｜>`, each CALL
//! `<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\nARGS\n```<｜tool▁call▁end｜>`.
//! Text before and after a section is content. (Fullwidth ｜ U+FF5C, ▁ U+2581.)

use super::output::Output;
use super::scan::{self, Found};

pub(super) const CALLS_BEGIN: &str = "<｜tool▁calls▁begin｜>";
pub(super) const CALLS_END: &str = "<｜tool▁calls▁end｜>";
pub(super) const CALL_BEGIN: &str = "<｜tool▁call▁begin｜>";
pub(super) const CALL_END: &str = "<｜tool▁call▁end｜>";
pub(super) const SEP: &str = "<｜tool▁sep｜>";

#[derive(Debug, Default)]
enum State {
    #[default]
    Text,
    /// Inside a section, between calls.
    Section,
    /// After `CALL_BEGIN`, before its `CALL_END`.
    Call,
}

#[derive(Debug, Default)]
pub(super) struct Scanner {
    /// Text not yet given out: a possible start of a marker, or the body of an open call.
    held: String,
    state: State,
    /// The section's text not yet accounted for: its `CALLS_BEGIN` (content, should no call
    /// follow) and the whitespace after it or after the last call.
    pending: String,
    section_has_call: bool,
    /// How far `held` was searched for `CALL_END`.
    searched: usize,
}

impl Scanner {
    pub(super) fn push(&mut self, text: &str, out: &mut Output) {
        self.held.push_str(text);
        while self.step(out) {}
    }

    /// Takes one step; false when more text is needed.
    fn step(&mut self, out: &mut Output) -> bool {
        match self.state {
            State::Text => match scan::find(&self.held, CALLS_BEGIN) {
                Found::At(at) => {
                    out.content(&self.held[..at]);
                    self.held.replace_range(..at + CALLS_BEGIN.len(), "");
                    self.pending = CALLS_BEGIN.to_string();
                    self.section_has_call = false;
                    self.state = State::Section;
                    true
                }
                Found::Before(safe) => {
                    out.content(&self.held[..safe]);
                    self.held.replace_range(..safe, "");
                    false
                }
            },
            State::Section => {
                let space = self.held.len() - self.held.trim_start().len();
                self.pending.push_str(&self.held[..space]);
                self.held.replace_range(..space, "");
                if let Some(rest) = self.held.strip_prefix(CALL_BEGIN) {
                    self.held = rest.to_string();
                    self.searched = 0;
                    self.state = State::Call;
                    true
                } else if let Some(rest) = self.held.strip_prefix(CALLS_END) {
                    self.held = rest.to_string();
                    let pending = std::mem::take(&mut self.pending);
                    if !self.section_has_call {
                        out.content(&format!("{pending}{CALLS_END}"));
                    }
                    self.state = State::Text;
                    true
                } else if self.held.is_empty()
                    || CALL_BEGIN.starts_with(self.held.as_str())
                    || CALLS_END.starts_with(self.held.as_str())
                {
                    false
                } else {
                    // The section ended without its closing marker: what follows is content.
                    out.content(&std::mem::take(&mut self.pending));
                    self.state = State::Text;
                    true
                }
            }
            State::Call => {
                let Some(end) = scan::find_from(&self.held, CALL_END, self.searched) else {
                    self.searched = self.held.len();
                    return false;
                };
                let body = &self.held[..end];
                match parse_call(body) {
                    Some((name, arguments)) => {
                        self.pending.clear();
                        self.section_has_call = true;
                        out.call(name, arguments);
                    }
                    None => {
                        let pending = std::mem::take(&mut self.pending);
                        out.content(&format!("{pending}{CALL_BEGIN}{body}{CALL_END}"));
                    }
                }
                self.held.replace_range(..end + CALL_END.len(), "");
                self.state = State::Section;
                true
            }
        }
    }

    pub(super) fn finish(&mut self, out: &mut Output) {
        let pending = std::mem::take(&mut self.pending);
        let rest = std::mem::take(&mut self.held);
        match self.state {
            State::Text => out.content(&rest),
            State::Section => out.content(&format!("{pending}{rest}")),
            State::Call => out.content(&format!("{pending}{CALL_BEGIN}{rest}")),
        }
    }
}

/// A call's body, between its markers: `TYPE<｜tool▁sep｜>NAME\n```json\nARGS\n````.
/// Whitespace around the name and the arguments is not held against it.
fn parse_call(body: &str) -> Option<(String, String)> {
    let (_type, rest) = body.split_once(SEP)?;
    let (name, rest) = rest.split_once("```json")?;
    let name = name.trim();
    if name.is_empty() {
        return None;
    }
    let arguments = rest.trim_end().strip_suffix("```")?;
    let value = serde_json::from_str(arguments.trim()).ok()?;
    Some((name.to_string(), super::arguments_text(&value)?))
}
