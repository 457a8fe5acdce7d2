//! Decoding for byte-level BPE tokenizers (GPT-2 style: Qwen2, Llama 3, the R1-Distill
//! students) from a table of each id's bytes, built once at load.
//!
//! `tokenizers` decodes by cloning every id's token string, mapping each of its characters
//! back to a byte through a hash map and joining the lot; the incremental detokenizer does
//! that twice per generated token, which showed up as ~5% of the daemon. Here a decode is a
//! copy of table slices and one UTF-8 check. The table follows `tokenizers`' own rules (an
//! id's text is its added-token content or vocab entry; a token whose characters are not all
//! byte-level characters decodes as its raw text; special tokens skipped by their text), and
//! like `segment_cache` the first decodes (then one in 256) are also done by `tokenizers` and
//! compared: one mismatch turns the table off for good with a warning.
//!
//! Owns the byte table; knows nothing of streaming or of requests.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Decodes compared with `tokenizers` before the table is trusted.
const CHECKS: u64 = 64;
/// Once trusted, one decode in this many is still compared.
const RECHECK_EVERY: u64 = 256;

pub struct ByteDecoder {
    /// Every id's bytes, back to back; id `i`'s are `bytes[offsets[i]..offsets[i + 1]]`.
    bytes: Vec<u8>,
    offsets: Vec<u32>,
    kind: Vec<Kind>,
    on: AtomicBool,
    decodes: AtomicU64,
}

/// What an id contributes to a decoded text.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// No token has this id: dropped, as `tokenizers` does.
    Unknown,
    Ordinary,
    /// Dropped when special tokens are skipped.
    Special,
}

impl ByteDecoder {
    /// `None` unless the tokenizer's decoder is exactly `ByteLevel`.
    pub fn new(tokenizer: &tokenizers::Tokenizer) -> Option<Self> {
        if !matches!(
            tokenizer.get_decoder(),
            Some(tokenizers::DecoderWrapper::ByteLevel(_))
        ) {
            return None;
        }
        let chars = char_bytes();
        let ids = tokenizer
            .get_vocab(true)
            .values()
            .max()
            .map_or(0, |&m| m as usize + 1);
        let added = tokenizer.get_added_vocabulary();
        let mut out = Self {
            bytes: Vec::new(),
            offsets: Vec::with_capacity(ids + 1),
            kind: Vec::with_capacity(ids),
            on: AtomicBool::new(true),
            decodes: AtomicU64::new(0),
        };
        out.offsets.push(0);
        for id in 0..ids as u32 {
            let kind = match tokenizer.id_to_token(id) {
                None => Kind::Unknown,
                Some(token) => {
                    let mapped: Option<Vec<u8>> =
                        token.chars().map(|c| chars.get(&c).copied()).collect();
                    match mapped {
                        Some(b) => out.bytes.extend_from_slice(&b),
                        None => out.bytes.extend_from_slice(token.as_bytes()),
                    }
                    if added.is_special_token(&token) {
                        Kind::Special
                    } else {
                        Kind::Ordinary
                    }
                }
            };
            out.kind.push(kind);
            out.offsets.push(u32::try_from(out.bytes.len()).ok()?);
        }
        Some(out)
    }

    /// The text of `ids`, or `None` when the table is off or an id is beyond it (the caller
    /// then asks `tokenizers`). `check` is called with the result on the sampled decodes and
    /// returns `tokenizers`' text for them.
    pub fn decode(
        &self,
        ids: &[u32],
        skip_special_tokens: bool,
        check: impl FnOnce() -> Option<String>,
    ) -> Option<String> {
        if !self.on.load(Ordering::Relaxed) {
            return None;
        }
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            let id = id as usize;
            match self.kind.get(id).copied()? {
                Kind::Unknown => {}
                Kind::Special if skip_special_tokens => {}
                _ => bytes.extend_from_slice(
                    &self.bytes[self.offsets[id] as usize..self.offsets[id + 1] as usize],
                ),
            }
        }
        let text = match String::from_utf8(bytes) {
            Ok(text) => text,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        };
        let n = self.decodes.fetch_add(1, Ordering::Relaxed);
        if n < CHECKS || n.is_multiple_of(RECHECK_EVERY) {
            let want = check()?;
            if want != text {
                self.on.store(false, Ordering::Relaxed);
                tracing::warn!(
                    "byte-level decode table disagreed with the tokenizer on {ids:?} \
                     ({text:?} vs {want:?}); decoding through the tokenizer from now on"
                );
                return Some(want);
            }
        }
        Some(text)
    }

    pub fn is_on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// One id's own bytes (possibly part of a UTF-8 character); `None` beyond the table.
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        let id = id as usize;
        let (start, end) = (*self.offsets.get(id)?, *self.offsets.get(id + 1)?);
        Some(&self.bytes[start as usize..end as usize])
    }
}

/// GPT-2's byte-to-character map, inverted: printable Latin-1 bytes stand for themselves and
/// the rest are shifted to U+0100 and up, in byte order.
fn char_bytes() -> HashMap<char, u8> {
    let mut map = HashMap::with_capacity(256);
    let mut shifted = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let c = if printable {
            char::from(b)
        } else {
            shifted += 1;
            char::from_u32(255 + shifted).unwrap_or(char::REPLACEMENT_CHARACTER)
        };
        map.insert(c, b);
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn char_map_is_gpt2s() {
        let m = char_bytes();
        assert_eq!(m.len(), 256);
        assert_eq!(m[&'Ġ'], b' ');
        assert_eq!(m[&'Ċ'], b'\n');
        assert_eq!(m[&'A'], b'A');
        assert_eq!(m[&'ġ'], 0x7F);
        assert_eq!(m[&'ł'], 0xA0);
        assert_eq!(m[&'Ń'], 0xAD);
    }
}
