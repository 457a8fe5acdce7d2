//! Where a format's scanner puts what it recognised, as deltas, under the one whitespace
//! rule that whole and streamed parsing share.

use super::ToolDelta;

/// Whitespace at the end of the content so far is held back, and dropped when a call follows
/// it, when the output ends after a call, or when the output held nothing else: the newlines
/// models write around calls are layout, not an answer. Kept when more content follows, or
/// at the end of an output without calls.
#[derive(Debug, Default)]
pub(super) struct Output {
    deltas: Vec<ToolDelta>,
    held: String,
    wrote_content: bool,
    calls: usize,
}

impl Output {
    pub(super) fn content(&mut self, text: &str) {
        let kept = text.trim_end();
        if kept.is_empty() {
            self.held.push_str(text);
            return;
        }
        let mut sent = std::mem::take(&mut self.held);
        sent.push_str(kept);
        self.held.push_str(&text[kept.len()..]);
        self.wrote_content = true;
        self.send(sent);
    }

    pub(super) fn call(&mut self, name: String, arguments: String) {
        self.held.clear();
        let index = self.calls;
        self.calls += 1;
        self.deltas.push(ToolDelta::CallStart { index, name });
        self.deltas.push(ToolDelta::Arguments {
            index,
            fragment: arguments,
        });
    }

    pub(super) fn finish(&mut self) {
        let held = std::mem::take(&mut self.held);
        if self.calls == 0 && self.wrote_content && !held.is_empty() {
            self.send(held);
        }
    }

    pub(super) fn take(&mut self) -> Vec<ToolDelta> {
        std::mem::take(&mut self.deltas)
    }

    /// One Content delta per push, however many pieces the scanner found.
    fn send(&mut self, text: String) {
        match self.deltas.last_mut() {
            Some(ToolDelta::Content(last)) => last.push_str(&text),
            _ => self.deltas.push(ToolDelta::Content(text)),
        }
    }
}
