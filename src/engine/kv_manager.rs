//! Maps sequences to KV blocks: prefix-cache lookup for new prompts, growing block tables as
//! sequences advance, hashing blocks as they fill, and giving blocks back.
//!
//! A full block is identified by the hash of (its parent block's hash, its token ids), so equal
//! hashes mean equal content at equal positions ([`super::block_hash`]: vLLM's scheme). When
//! asked, it also records what the index gains and loses, in order, as [`KvEvent`]s. Knows
//! tokens and block ids; knows nothing of sampling, requests' channels or tensors.

use super::block_hash::BlockHasher;
use super::block_pool::{BlockHash, BlockId, BlockPool};
use super::kv_events::KvEvent;

/// The blocks one sequence holds and how many of them are hashed (full and registered).
#[derive(Debug, Default, Clone)]
pub struct SeqBlocks {
    pub table: Vec<BlockId>,
    hashes: Vec<BlockHash>,
}

impl SeqBlocks {
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}

/// Prefix-cache lookups, in tokens, since start-up.
#[derive(Debug, Default, Clone, Copy)]
pub struct PrefixCacheCounters {
    pub queries: u64,
    pub hits: u64,
}

pub struct KvManager {
    pool: BlockPool,
    block_size: usize,
    prefix_caching: bool,
    hasher: BlockHasher,
    pub counters: PrefixCacheCounters,
    /// What the index gained and lost since the last [`Self::take_events`], when recorded.
    events: Option<Vec<KvEvent>>,
}

impl KvManager {
    pub fn new(num_blocks: usize, block_size: usize, prefix_caching: bool) -> Self {
        Self::with_hasher(
            num_blocks,
            block_size,
            prefix_caching,
            BlockHasher::default(),
        )
    }

    pub fn with_hasher(
        num_blocks: usize,
        block_size: usize,
        prefix_caching: bool,
        hasher: BlockHasher,
    ) -> Self {
        Self {
            pool: BlockPool::new(num_blocks),
            block_size,
            prefix_caching,
            hasher,
            counters: PrefixCacheCounters::default(),
            events: None,
        }
    }

    /// Records the index's changes from now on, for [`Self::take_events`].
    pub fn record_events(&mut self) {
        self.pool.record_removals();
        self.events.get_or_insert_with(Vec::new);
    }

    /// The index's changes since the last call, in the order they happened.
    pub fn take_events(&mut self) -> Vec<KvEvent> {
        self.note_removals();
        self.events.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Moves the pool's removals into the event log (before anything stored after them).
    fn note_removals(&mut self) {
        if let Some(events) = self.events.as_mut() {
            let removed = self.pool.take_removed();
            if !removed.is_empty() {
                events.push(KvEvent::Removed { hashes: removed });
            }
        }
    }

    fn block_hash(&self, parent: Option<&BlockHash>, tokens: &[u32]) -> BlockHash {
        self.hasher.hash(parent, tokens)
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.pool.num_blocks()
    }

    pub fn num_free_blocks(&self) -> usize {
        self.pool.num_free()
    }

    pub fn num_cached_free_blocks(&self) -> usize {
        self.pool.num_cached_free()
    }

    /// Drops the prefix cache's content in every block no sequence holds (`/flush_cache`);
    /// returns how many blocks lost theirs.
    pub fn forget_free_cached(&mut self) -> usize {
        self.note_removals();
        let n = self.pool.forget_free_cached();
        self.note_removals();
        n
    }

    /// Every hash the index holds (tests compare a mirror built from the events with it).
    pub fn indexed_hashes(&self) -> Vec<BlockHash> {
        self.pool.indexed_hashes()
    }

    /// Fraction of blocks held by live sequences (cached-but-free blocks count as free).
    pub fn usage(&self) -> f64 {
        let total = self.pool.num_blocks().max(1);
        (total - self.pool.num_free()) as f64 / total as f64
    }

    /// Claims the longest cached prefix of `tokens` for an empty sequence and returns how many
    /// tokens it covers. At least one token is always left to compute, because the step that
    /// computes a prompt's last token is the one that yields its first logits.
    pub fn claim_prefix(&mut self, seq: &mut SeqBlocks, tokens: &[u32]) -> usize {
        self.claim_prefix_or_miss(seq, tokens).0
    }

    /// As [`Self::claim_prefix`], also returning the hash of the first full block that missed
    /// (so the scheduler can see whether another sequence is computing it right now).
    pub fn claim_prefix_or_miss(
        &mut self,
        seq: &mut SeqBlocks,
        tokens: &[u32],
    ) -> (usize, Option<BlockHash>) {
        debug_assert!(seq.is_empty());
        if !self.prefix_caching || tokens.is_empty() {
            return (0, None);
        }
        self.counters.queries += tokens.len() as u64;
        let max_blocks = (tokens.len() - 1) / self.block_size;
        let mut parent: Option<BlockHash> = None;
        let mut miss = None;
        for chunk in tokens.chunks_exact(self.block_size).take(max_blocks) {
            let hash = self.block_hash(parent.as_ref(), chunk);
            match self.pool.take_cached(hash) {
                Some(id) => {
                    seq.table.push(id);
                    seq.hashes.push(hash);
                    parent = Some(hash);
                }
                None => {
                    miss = Some(hash);
                    break;
                }
            }
        }
        let hit = seq.table.len() * self.block_size;
        self.counters.hits += hit as u64;
        (hit, miss)
    }

    /// Undoes a claim whose sequence will not run this step after all, without counting the
    /// lookup (it will be repeated).
    pub fn unclaim(&mut self, seq: &mut SeqBlocks, tokens: usize, hit: usize) {
        self.counters.queries -= tokens as u64;
        self.counters.hits -= hit as u64;
        self.free(seq);
    }

    /// Adds to `out` the hashes of the full blocks of `tokens[..upto]` that `seq` has not
    /// registered yet: the blocks it will have computed once its prefill is done.
    pub fn pending_hashes(
        &self,
        seq: &SeqBlocks,
        tokens: &[u32],
        upto: usize,
        out: &mut std::collections::HashSet<BlockHash>,
    ) {
        if !self.prefix_caching {
            return;
        }
        let mut parent = seq.hashes.last().copied();
        for i in seq.hashes.len()..upto / self.block_size {
            let hash = self.block_hash(
                parent.as_ref(),
                &tokens[i * self.block_size..(i + 1) * self.block_size],
            );
            out.insert(hash);
            parent = Some(hash);
        }
    }

    /// Shares the first `blocks` blocks of `from` with an empty `seq` (n > 1 choices of one
    /// prompt). Returns the tokens covered.
    pub fn fork_prefix(&mut self, seq: &mut SeqBlocks, from: &SeqBlocks, blocks: usize) -> usize {
        debug_assert!(seq.is_empty());
        let blocks = blocks.min(from.table.len());
        for &id in &from.table[..blocks] {
            self.pool.share(id);
        }
        seq.table.extend_from_slice(&from.table[..blocks]);
        let hashed = blocks.min(from.hashes.len());
        seq.hashes.extend_from_slice(&from.hashes[..hashed]);
        blocks * self.block_size
    }

    /// Grows `seq`'s table to hold `num_tokens` tokens; all or nothing.
    pub fn reserve(&mut self, seq: &mut SeqBlocks, num_tokens: usize) -> bool {
        let needed = num_tokens.div_ceil(self.block_size);
        let extra = needed.saturating_sub(seq.table.len());
        if extra > self.pool.num_free() {
            return false;
        }
        for _ in 0..extra {
            match self.pool.allocate() {
                Some(id) => seq.table.push(id),
                None => return false, // unreachable: num_free was checked
            }
        }
        true
    }

    /// Registers the blocks of `seq` that are now full of computed tokens (`tokens[..computed]`)
    /// so later prompts can reuse them.
    pub fn register_full_blocks(&mut self, seq: &mut SeqBlocks, tokens: &[u32], computed: usize) {
        if !self.prefix_caching {
            return;
        }
        let full = (computed / self.block_size).min(seq.table.len());
        if seq.hashes.len() >= full {
            return;
        }
        self.note_removals();
        while seq.hashes.len() < full {
            let i = seq.hashes.len();
            let parent = i.checked_sub(1).map(|p| seq.hashes[p]);
            let block = &tokens[i * self.block_size..(i + 1) * self.block_size];
            let hash = self.block_hash(parent.as_ref(), block);
            let indexed = self.pool.register(seq.table[i], hash);
            seq.hashes.push(hash);
            if let (true, Some(events)) = (indexed, self.events.as_mut()) {
                // Blocks stored one after another in a chain go out as one event.
                match events.last_mut() {
                    Some(KvEvent::Stored {
                        hashes, token_ids, ..
                    }) if parent.is_some() && hashes.last() == parent.as_ref() => {
                        hashes.push(hash);
                        token_ids.extend_from_slice(block);
                    }
                    _ => events.push(KvEvent::Stored {
                        hashes: vec![hash],
                        parent,
                        token_ids: block.to_vec(),
                    }),
                }
            }
        }
    }

    /// Gives every block of `seq` back. Tail blocks are released first so that, among a
    /// sequence's cached blocks, the ones least likely to be shared are evicted first.
    pub fn free(&mut self, seq: &mut SeqBlocks) {
        for &id in seq.table.iter().rev() {
            self.pool.release(id);
        }
        seq.table.clear();
        seq.hashes.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_prompt_with_same_prefix_hits_full_blocks_only() {
        let mut kv = KvManager::new(8, 4, true);
        let prompt: Vec<u32> = (0..10).collect();
        let mut a = SeqBlocks::default();
        assert_eq!(kv.claim_prefix(&mut a, &prompt), 0);
        assert!(kv.reserve(&mut a, 10));
        kv.register_full_blocks(&mut a, &prompt, 10);
        let mut b = SeqBlocks::default();
        assert_eq!(kv.claim_prefix(&mut b, &prompt), 8);
        assert_eq!(&b.table[..], &a.table[..2]);
        // The same prefix at block granularity but different later tokens: still 2 blocks.
        let mut other: Vec<u32> = (0..8).collect();
        other.extend([99, 98, 97]);
        let mut c = SeqBlocks::default();
        assert_eq!(kv.claim_prefix(&mut c, &other), 8);
        kv.free(&mut a);
        kv.free(&mut b);
        kv.free(&mut c);
        assert_eq!(kv.num_free_blocks(), 8);
        assert_eq!(kv.counters.hits, 16);
    }

    #[test]
    fn a_prompt_of_exactly_full_blocks_keeps_its_last_token_to_compute() {
        let mut kv = KvManager::new(4, 4, true);
        let prompt: Vec<u32> = (0..8).collect();
        let mut a = SeqBlocks::default();
        kv.claim_prefix(&mut a, &prompt);
        assert!(kv.reserve(&mut a, 8));
        kv.register_full_blocks(&mut a, &prompt, 8);
        let mut b = SeqBlocks::default();
        assert_eq!(kv.claim_prefix(&mut b, &prompt), 4);
    }

    #[test]
    fn reserve_is_all_or_nothing() {
        let mut kv = KvManager::new(2, 4, false);
        let mut a = SeqBlocks::default();
        assert!(!kv.reserve(&mut a, 9));
        assert!(a.is_empty());
        assert_eq!(kv.num_free_blocks(), 2);
    }
}
