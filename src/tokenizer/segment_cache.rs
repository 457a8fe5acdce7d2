//! Reuses the token ids of a prompt's leading turns. A chat prompt is the template's render of
//! every message, and the customer-service case sends the same system turn thousands of times
//! a second; encoding it again each time was most of the tokenizer's work.
//!
//! `tokenizers` cuts special added tokens (`</s>`, `<|im_end|>`, …) out of the text before it
//! normalises and pre-tokenises, so the text after one is encoded without regard to what came
//! before. A prompt therefore splits into *segments*, each ending just after a special token,
//! whose ids concatenate to the ids of the whole. This cache keeps the ids of prompt prefixes
//! that end at such a boundary, so only the new turns are encoded.
//!
//! That independence is a property of the tokenizer's configuration, not a promise, so the
//! first few prompts that split are also encoded whole and compared; one mismatch turns the
//! cache off for good (with a warning) and every prompt is then encoded whole.
//!
//! Owns the prefix table; knows nothing of chat templates or of which turn is which.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::Hasher;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use aho_corasick::{AhoCorasick, MatchKind};

/// Prompts encoded both ways before the split is trusted.
const CHECKS: u8 = 8;
/// Once trusted, one split prompt in this many is still encoded both ways, so a boundary the
/// first prompts did not show (special-token text inside a message) is checked too.
const RECHECK_EVERY: u64 = 256;
/// A prompt with more boundaries than this is encoded whole: a chat has a few per turn, and
/// a body full of special tokens must not cost one cached prefix each.
const MAX_BOUNDS: usize = 64;
/// Longest prefix kept; a longer one is encoded each time.
const MAX_PREFIX_BYTES: usize = 64 << 10;
/// Prefixes kept; the least recently used goes first.
const MAX_ENTRIES: usize = 1024;
/// Bytes of prefix text kept, all entries together.
const MAX_BYTES: usize = 16 << 20;

const CHECKING: u8 = 0;
const TRUSTED: u8 = CHECKS;
const OFF: u8 = u8::MAX;

struct Entry {
    text: Box<str>,
    ids: Arc<[u32]>,
    used: u64,
}

#[derive(Default)]
struct Table {
    /// Keyed by the hash of the prefix text; the text itself is compared on a hit.
    entries: HashMap<u64, Entry>,
    bytes: usize,
    clock: u64,
}

pub struct SegmentCache {
    /// Every added token matched by content (leftmost-longest, as `tokenizers` does), so a
    /// token inside a longer added token is not mistaken for a boundary.
    matcher: AhoCorasick,
    /// Per pattern: whether the text after it starts a segment.
    is_boundary: Vec<bool>,
    /// Per pattern: its id, where its text is no other token's; a piece that is exactly
    /// that text (the generation prompt's `<|assistant|>`, say) needs no encoding.
    token_id: Vec<Option<u32>>,
    /// How many prompts have been checked, or `TRUSTED`, or `OFF`.
    state: AtomicU8,
    /// Split prompts seen, for the sampled re-check.
    splits: AtomicU64,
    table: Mutex<Table>,
}

impl SegmentCache {
    /// `None` when the tokenizer has no special token to split at.
    pub fn new(tokenizer: &tokenizers::Tokenizer) -> Option<Self> {
        let mut added: Vec<_> = tokenizer
            .get_added_tokens_decoder()
            .into_iter()
            // Normalised tokens are matched on normalised text, which this cannot see.
            .filter(|(_, t)| !t.normalized && !t.content.is_empty())
            .collect();
        added.sort_by(|a, b| a.1.content.cmp(&b.1.content));
        let mut token_id: Vec<Option<u32>> = Vec::with_capacity(added.len());
        for (i, (id, t)) in added.iter().enumerate() {
            if i > 0 && added[i - 1].1.content == t.content {
                if let Some(last) = token_id.last_mut() {
                    *last = None;
                }
            } else {
                token_id.push(Some(*id));
            }
        }
        let mut added: Vec<_> = added.into_iter().map(|(_, t)| t).collect();
        added.dedup_by(|a, b| a.content == b.content);
        // A boundary needs a token that always matches where its text is and takes nothing
        // from the text after it: no word-boundary rule, no stripping of what follows.
        let is_boundary: Vec<bool> = added
            .iter()
            .map(|t| t.special && !t.single_word && !t.rstrip)
            .collect();
        // Pieces must encode the same wherever they sit. A single-word token matches at a
        // piece's start as at a word boundary, which it may not be inside the whole text;
        // Metaspace prepending `▁` only to the first piece of the text would prepend it to
        // every piece.
        let offset_dependent = added.iter().any(|t| t.single_word)
            || tokenizer.to_string(false).is_ok_and(|json| {
                json.contains("\"Metaspace\"") && json.contains("\"prepend_scheme\":\"first\"")
            });
        if offset_dependent || !is_boundary.contains(&true) {
            return None;
        }
        let matcher = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(added.iter().map(|t| t.content.as_str()))
            .ok()?;
        Some(Self {
            matcher,
            is_boundary,
            token_id,
            state: AtomicU8::new(CHECKING),
            splits: AtomicU64::new(0),
            table: Mutex::new(Table::default()),
        })
    }

    /// The ids of `text`; `encode` encodes a piece of text on its own (no special tokens
    /// added around it).
    pub fn encode<E>(
        &self,
        text: &str,
        encode: impl Fn(&str) -> Result<Vec<u32>, E>,
    ) -> Result<Vec<u32>, E> {
        let state = self.state.load(Ordering::Relaxed);
        if state == OFF {
            return encode(text);
        }
        let bounds: Vec<usize> = self
            .matcher
            .find_iter(text)
            .filter(|m| self.is_boundary[m.pattern().as_usize()])
            .map(|m| m.end())
            .filter(|&end| end < text.len())
            .take(MAX_BOUNDS + 1)
            .collect();
        if bounds.is_empty() || bounds.len() > MAX_BOUNDS {
            return encode(text);
        }
        let hashes = prefix_hashes(text, &bounds);
        let (start, mut ids) = self.longest_cached(text, &bounds, &hashes);
        let mut fresh = Vec::new();
        let mut from = start.map_or(0, |i| bounds[i]);
        let encode_piece = |piece: &str| match self.single_token(piece) {
            Some(id) => Ok(vec![id]),
            None => encode(piece),
        };
        for (i, &end) in bounds.iter().enumerate().skip(start.map_or(0, |i| i + 1)) {
            ids.extend(encode_piece(&text[from..end])?);
            from = end;
            // The last boundary closes the newest turn, which is unlikely to come again.
            if i + 1 < bounds.len() && end <= MAX_PREFIX_BYTES {
                fresh.push((i, ids.len()));
            }
        }
        ids.extend(encode_piece(&text[from..])?);
        let sampled = self
            .splits
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(RECHECK_EVERY);
        if (state != TRUSTED || sampled) && !self.check(text, &ids, &encode)? {
            return encode(text);
        }
        if !fresh.is_empty() {
            // Copied before the lock is taken: other prompts look up while this one stores.
            let entries: Vec<(u64, Box<str>, Arc<[u32]>)> = fresh
                .into_iter()
                .map(|(i, n)| (hashes[i], text[..bounds[i]].into(), ids[..n].into()))
                .collect();
            let mut table = self.lock();
            for (hash, prefix, prefix_ids) in entries {
                table.insert(hash, prefix, prefix_ids);
            }
        }
        Ok(ids)
    }

    /// The id of `piece` when it is exactly one added token's text.
    fn single_token(&self, piece: &str) -> Option<u32> {
        let m = self.matcher.find(piece)?;
        (m.start() == 0 && m.end() == piece.len())
            .then(|| self.token_id[m.pattern().as_usize()])
            .flatten()
    }

    /// The longest prefix in the table: its boundary's index and its ids.
    fn longest_cached(
        &self,
        text: &str,
        bounds: &[usize],
        hashes: &[u64],
    ) -> (Option<usize>, Vec<u32>) {
        let mut table = self.lock();
        table.clock += 1;
        let now = table.clock;
        for i in (0..bounds.len()).rev() {
            if let Some(e) = table.entries.get_mut(&hashes[i]) {
                if *e.text == text[..bounds[i]] {
                    e.used = now;
                    let mut ids = Vec::with_capacity(e.ids.len() + 64);
                    ids.extend_from_slice(&e.ids);
                    return (Some(i), ids);
                }
            }
        }
        (None, Vec::new())
    }

    /// Compares `split` with the whole text's encoding while the split is not yet trusted;
    /// false (and the cache off) if they differ.
    fn check<E>(
        &self,
        text: &str,
        split: &[u32],
        encode: &impl Fn(&str) -> Result<Vec<u32>, E>,
    ) -> Result<bool, E> {
        if encode(text)? == split {
            let _ = self
                .state
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                    (s < TRUSTED).then_some(s + 1)
                });
            return Ok(true);
        }
        self.state.store(OFF, Ordering::Relaxed);
        self.lock().entries.clear();
        tracing::warn!(
            "this tokenizer encodes text differently after a special token depending on what \
             precedes it; prompts will be encoded whole (slower, not wrong)"
        );
        Ok(false)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        // The table is a cache: a panic elsewhere while it was held leaves nothing to repair.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_on(&self) -> bool {
        self.state.load(Ordering::Relaxed) != OFF
    }
}

impl Table {
    fn insert(&mut self, hash: u64, text: Box<str>, ids: Arc<[u32]>) {
        if text.len() > MAX_PREFIX_BYTES || self.entries.contains_key(&hash) {
            return;
        }
        while self.entries.len() >= MAX_ENTRIES || self.bytes + text.len() > MAX_BYTES {
            let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.used)
                .map(|(&k, _)| k)
            else {
                break;
            };
            if let Some(e) = self.entries.remove(&oldest) {
                self.bytes -= e.text.len();
            }
        }
        self.clock += 1;
        self.bytes += text.len();
        self.entries.insert(
            hash,
            Entry {
                text,
                ids,
                used: self.clock,
            },
        );
    }
}

/// The hash of `text[..b]` for every `b` in `bounds` (ascending), in one pass over the text.
fn prefix_hashes(text: &str, bounds: &[usize]) -> Vec<u64> {
    let mut hasher = DefaultHasher::new();
    let mut from = 0;
    bounds
        .iter()
        .map(|&b| {
            hasher.write(&text.as_bytes()[from..b]);
            from = b;
            hasher.clone().finish()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    fn tokenizer() -> tokenizers::Tokenizer {
        // A word-level model over whitespace-split words, with `</s>` as a special token.
        let json = r#"{
          "version": "1.0",
          "added_tokens": [
            {"id": 0, "content": "</s>", "single_word": false, "lstrip": false,
             "rstrip": false, "normalized": false, "special": true}
          ],
          "normalizer": null,
          "pre_tokenizer": {"type": "Whitespace"},
          "post_processor": null,
          "decoder": null,
          "model": {"type": "WordLevel", "vocab": {"</s>": 0, "[UNK]": 1, "sys": 2,
                    "be": 3, "kind": 4, "q": 5, "a": 6, "b": 7}, "unk_token": "[UNK]"}
        }"#;
        tokenizers::Tokenizer::from_bytes(json.as_bytes()).unwrap()
    }

    #[test]
    fn a_shared_prefix_is_encoded_once_and_the_ids_are_unchanged() {
        let tok = tokenizer();
        let cache = SegmentCache::new(&tok).unwrap();
        let pieces = RefCell::new(Vec::<String>::new());
        let encode = |s: &str| -> Result<Vec<u32>, ()> {
            pieces.borrow_mut().push(s.to_string());
            Ok(tok.encode_fast(s, false).unwrap().get_ids().to_vec())
        };
        let whole = |s: &str| tok.encode_fast(s, false).unwrap().get_ids().to_vec();
        let prompts = [
            "sys be kind</s>q a</s>b",
            "sys be kind</s>q b</s>a",
            "sys be kind</s>a</s>b",
        ];
        for _ in 0..CHECKS {
            for p in prompts {
                assert_eq!(cache.encode(p, encode).unwrap(), whole(p));
            }
        }
        assert_eq!(cache.state.load(Ordering::Relaxed), TRUSTED);
        pieces.borrow_mut().clear();
        assert_eq!(cache.encode(prompts[1], encode).unwrap(), whole(prompts[1]));
        // Only the turns after the cached system turn were encoded.
        assert_eq!(
            *pieces.borrow(),
            vec!["q b</s>".to_string(), "a".to_string()]
        );
    }

    #[test]
    fn a_tokenizer_that_disagrees_turns_the_cache_off() {
        let tok = tokenizer();
        let cache = SegmentCache::new(&tok).unwrap();
        // An encoder whose result depends on where the piece sits, as an offset-dependent
        // pre-tokenizer would: the split result then differs from the whole one.
        let encode = |s: &str| -> Result<Vec<u32>, ()> {
            let mut ids = tok.encode_fast(s, false).unwrap().get_ids().to_vec();
            if !s.starts_with("sys") {
                ids.push(7);
            }
            Ok(ids)
        };
        let text = "sys</s>q";
        let ids = cache.encode(text, encode).unwrap();
        assert_eq!(ids, encode(text).unwrap());
        assert!(!cache.is_on());
    }

    /// The test tokenizer with `</s>`'s `field` set to `value`.
    fn with_token_field(field: &str, value: bool) -> tokenizers::Tokenizer {
        let json = tokenizer().to_string(false).unwrap().replace(
            &format!("\"{field}\":{}", !value),
            &format!("\"{field}\":{value}"),
        );
        tokenizers::Tokenizer::from_bytes(json.as_bytes()).unwrap()
    }

    #[test]
    fn no_special_token_means_no_cache() {
        assert!(SegmentCache::new(&with_token_field("special", false)).is_none());
    }

    #[test]
    fn a_prompt_full_of_special_tokens_is_encoded_whole_and_caches_nothing() {
        let tok = tokenizer();
        let cache = SegmentCache::new(&tok).unwrap();
        let calls = RefCell::new(0usize);
        let encode = |s: &str| -> Result<Vec<u32>, ()> {
            *calls.borrow_mut() += 1;
            Ok(tok.encode_fast(s, false).unwrap().get_ids().to_vec())
        };
        let text = "q</s>".repeat(MAX_BOUNDS + 2) + "a";
        let ids = cache.encode(&text, encode).unwrap();
        assert_eq!(
            ids,
            tok.encode_fast(text.as_str(), false).unwrap().get_ids()
        );
        assert_eq!(*calls.borrow(), 1, "one whole encode");
        assert!(cache.lock().entries.is_empty());
    }

    #[test]
    fn single_word_tokens_rule_the_cache_out() {
        assert!(SegmentCache::new(&with_token_field("single_word", true)).is_none());
    }

    #[test]
    fn the_table_stays_within_its_entry_bound() {
        let mut table = Table::default();
        for i in 0..MAX_ENTRIES + 10 {
            table.insert(i as u64, "x".into(), Arc::from([1u32]));
        }
        assert_eq!(table.entries.len(), MAX_ENTRIES);
        // The oldest went first.
        assert!(
            !table.entries.contains_key(&0)
                && table.entries.contains_key(&(MAX_ENTRIES as u64 + 9))
        );
    }
}
