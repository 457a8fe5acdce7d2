//! Streaming text out of generated ids without re-decoding the whole sequence.
//!
//! The vLLM/TGI window technique: keep the ids from `prefix_offset` on, decode
//! `[prefix_offset, read_offset)` (text already emitted) and `[prefix_offset, end)`,
//! and emit the difference. Decoding with a little context matters because decoders
//! are not concatenative (Llama's strips one leading space per decode call; byte-level
//! and byte-fallback tokens only become characters together).

use std::sync::Arc;

use super::{Tokenizer, TokenizerError};

/// Prompt ids kept as context when continuing a prompt (vLLM uses 5).
const PROMPT_CONTEXT: usize = 5;

/// Ids held while the text ends in U+FFFD before the settled part is emitted anyway,
/// so that bytes that never form a character still stream out.
const MAX_HELD: usize = 4;

/// The ids after a split that may still be an incomplete character: a UTF-8
/// character has at most 4 bytes, so an incomplete one at most 3.
const MAX_CHAR_TOKENS: usize = 3;

/// Held ids after which everything is flushed, so the decoded window stays small even
/// through long runs of skipped special tokens or undecodable bytes.
const MAX_WINDOW: usize = 64;

const REPLACEMENT: char = '\u{FFFD}';

/// Incremental detokenizer for one sequence. Holds an `Arc<Tokenizer>`, so it borrows
/// nothing and can live in a per-request task or state struct.
#[derive(Debug, Clone)]
pub struct IncrementalDetokenizer {
    tokenizer: Arc<Tokenizer>,
    skip_special_tokens: bool,
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDetokenizer {
    pub fn new(tokenizer: Arc<Tokenizer>, skip_special_tokens: bool) -> Self {
        Self {
            tokenizer,
            skip_special_tokens,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    /// Continues a prompt: its last ids give the first generated token its context
    /// (e.g. the leading space a Llama token gets after a word). Only the tail is kept.
    pub fn with_prompt_context(mut self, prompt_ids: &[u32]) -> Self {
        let tail = &prompt_ids[prompt_ids.len().saturating_sub(PROMPT_CONTEXT)..];
        self.ids = tail.to_vec();
        self.prefix_offset = 0;
        self.read_offset = self.ids.len();
        self
    }

    /// Adds one generated id; returns the text it completes, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>, TokenizerError> {
        self.ids.push(id);
        let emitted = self.decode(self.prefix_offset, self.read_offset)?;
        let text = self.decode(self.prefix_offset, self.ids.len())?;
        let held = self.ids.len() - self.read_offset;
        let incomplete = text.ends_with(REPLACEMENT);
        if held > MAX_WINDOW && text == emitted {
            // An id that changes nothing (a skipped special token): forget it rather
            // than flush, so the next token still gets the real text as context.
            self.ids.pop();
            return Ok(None);
        }
        if (text.len() > emitted.len() && !incomplete) || held > MAX_WINDOW {
            return Ok(self.flush(&emitted, &text));
        }
        if incomplete && held > MAX_HELD {
            return self.emit_settled(&emitted, &text);
        }
        // No new text (e.g. a skipped special token): keep the window, so the next
        // token is still decoded after real text.
        Ok(None)
    }

    /// Flushes held-back text (e.g. bytes that never completed a character).
    pub fn finish(&mut self) -> Result<Option<String>, TokenizerError> {
        if self.read_offset == self.ids.len() {
            return Ok(None);
        }
        let emitted = self.decode(self.prefix_offset, self.read_offset)?;
        let text = self.decode(self.prefix_offset, self.ids.len())?;
        Ok(self.flush(&emitted, &text))
    }

    /// Emits everything held: `text` is the window's text, `emitted` its emitted part.
    fn flush(&mut self, emitted: &str, text: &str) -> Option<String> {
        self.advance(self.ids.len());
        let delta = new_suffix(emitted, text);
        (!delta.is_empty()).then(|| delta.to_owned())
    }

    /// Too many ids are held and the text still ends in U+FFFD: emit what is settled.
    /// A split `s` is settled when its text is a strict prefix of the full text and
    /// leaves the last `MAX_CHAR_TOKENS` ids held: their bytes may still start a
    /// character (byte-fallback decoders render every byte of an incomplete run as
    /// U+FFFD, so the prefix test alone is not enough). The next window
    /// `[read_offset, s)` must also stay a prefix of `[read_offset, end)`.
    fn emit_settled(
        &mut self,
        emitted: &str,
        text: &str,
    ) -> Result<Option<String>, TokenizerError> {
        let end = self.ids.len();
        let tail = self.decode(self.read_offset, end)?;
        for split in (self.read_offset + 1..=end.saturating_sub(MAX_CHAR_TOKENS)).rev() {
            let head = self.decode(self.prefix_offset, split)?;
            if head.len() <= emitted.len() || head.len() >= text.len() {
                continue;
            }
            if !text.starts_with(&head) || !head.starts_with(emitted) {
                continue;
            }
            if !tail.starts_with(&self.decode(self.read_offset, split)?) {
                continue;
            }
            let delta = head[emitted.len()..].to_owned();
            self.advance(split);
            return Ok(Some(delta));
        }
        Ok(None)
    }

    /// Marks `[read_offset, new_read)` as emitted and drops ids no window needs.
    fn advance(&mut self, new_read: usize) {
        self.prefix_offset = self.read_offset;
        self.read_offset = new_read;
        self.ids.drain(..self.prefix_offset);
        self.read_offset -= self.prefix_offset;
        self.prefix_offset = 0;
    }

    fn decode(&self, start: usize, end: usize) -> Result<String, TokenizerError> {
        self.tokenizer
            .decode(&self.ids[start..end], self.skip_special_tokens)
    }
}

/// The part of `text` after what was already emitted. If the decoder rewrote
/// emitted text (a byte-fallback run that turned invalid re-renders every byte
/// as U+FFFD), emit from the first difference: nothing can be taken back.
fn new_suffix<'a>(emitted: &str, text: &'a str) -> &'a str {
    if let Some(rest) = text.strip_prefix(emitted) {
        return rest;
    }
    let common = emitted
        .char_indices()
        .zip(text.chars())
        .find(|((_, a), b)| a != b)
        .map_or(emitted.len().min(text.len()), |((i, _), _)| i);
    text.get(common..).unwrap_or_default()
}
