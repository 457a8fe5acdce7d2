//! The pool of KV blocks: reference counts, the free queue, and the prefix-cache index.
//!
//! A block whose reference count drops to zero goes to the back of the free queue but keeps its
//! content hash, so a later request with the same prefix can take it back (a hit) until it
//! reaches the front and is reused for something else (LRU eviction). The queue is an
//! intrusive doubly linked list so a hit can pull a block out of the middle in O(1).
//!
//! Knows block ids and hashes; knows nothing of sequences, tokens or tensors.

use std::collections::HashMap;

pub use super::block_hash::BlockHash;

pub type BlockId = u32;

const NONE: u32 = u32::MAX;

#[derive(Clone, Debug)]
struct Block {
    ref_count: u32,
    hash: Option<BlockHash>,
    prev: u32,
    next: u32,
}

pub struct BlockPool {
    blocks: Vec<Block>,
    head: u32,
    tail: u32,
    num_free: usize,
    /// Free blocks that still hold indexed content (kept as a count: scanning is O(blocks)).
    num_cached_free: usize,
    cached: HashMap<BlockHash, BlockId>,
    /// Hashes that left the index (evicted or forgotten) since the last
    /// [`Self::take_removed`], kept only when someone mirrors the index (KV events).
    removed: Option<Vec<BlockHash>>,
}

impl BlockPool {
    pub fn new(num_blocks: usize) -> Self {
        let n = num_blocks as u32;
        let blocks = (0..n)
            .map(|i| Block {
                ref_count: 0,
                hash: None,
                prev: if i == 0 { NONE } else { i - 1 },
                next: if i + 1 == n { NONE } else { i + 1 },
            })
            .collect();
        Self {
            blocks,
            head: if n == 0 { NONE } else { 0 },
            tail: if n == 0 { NONE } else { n - 1 },
            num_free: num_blocks,
            num_cached_free: 0,
            cached: HashMap::new(),
            removed: None,
        }
    }

    /// Every hash in the index.
    pub fn indexed_hashes(&self) -> Vec<BlockHash> {
        self.cached.keys().copied().collect()
    }

    /// Keeps the hashes that leave the index from now on, for [`Self::take_removed`].
    pub fn record_removals(&mut self) {
        self.removed.get_or_insert_with(Vec::new);
    }

    /// The hashes that left the index since the last call, oldest first.
    pub fn take_removed(&mut self) -> Vec<BlockHash> {
        self.removed
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks with no user: free outright or holding evictable cached content.
    pub fn num_free(&self) -> usize {
        self.num_free
    }

    /// Free blocks that still hold reusable cached content.
    pub fn num_cached_free(&self) -> usize {
        self.num_cached_free
    }

    fn unlink(&mut self, id: BlockId) {
        let (prev, next) = {
            let b = &self.blocks[id as usize];
            (b.prev, b.next)
        };
        if prev == NONE {
            self.head = next;
        } else {
            self.blocks[prev as usize].next = next;
        }
        if next == NONE {
            self.tail = prev;
        } else {
            self.blocks[next as usize].prev = prev;
        }
        let b = &mut self.blocks[id as usize];
        b.prev = NONE;
        b.next = NONE;
        self.num_free -= 1;
    }

    fn push_back(&mut self, id: BlockId) {
        let b = &mut self.blocks[id as usize];
        b.prev = self.tail;
        b.next = NONE;
        if self.tail == NONE {
            self.head = id;
        } else {
            self.blocks[self.tail as usize].next = id;
        }
        self.tail = id;
        self.num_free += 1;
    }

    /// Takes the least recently freed block, evicting its cached content. `None` when full.
    pub fn allocate(&mut self) -> Option<BlockId> {
        let id = self.head;
        if id == NONE {
            return None;
        }
        self.unlink(id);
        let b = &mut self.blocks[id as usize];
        b.ref_count = 1;
        if let Some(hash) = b.hash.take() {
            // A block carries a hash only while it is the index entry for it.
            self.cached.remove(&hash);
            self.num_cached_free -= 1;
            if let Some(removed) = self.removed.as_mut() {
                removed.push(hash);
            }
        }
        Some(id)
    }

    /// Takes one more reference to the cached block with `hash`, if there is one.
    pub fn take_cached(&mut self, hash: BlockHash) -> Option<BlockId> {
        let id = *self.cached.get(&hash)?;
        if self.blocks[id as usize].ref_count == 0 {
            self.unlink(id);
            self.num_cached_free -= 1;
        }
        self.blocks[id as usize].ref_count += 1;
        Some(id)
    }

    /// Adds a reference to a block already in use (a forked sequence sharing a prompt block).
    pub fn share(&mut self, id: BlockId) {
        let b = &mut self.blocks[id as usize];
        debug_assert!(b.ref_count > 0, "sharing a free block");
        b.ref_count += 1;
    }

    /// Records that `id` now holds full content with `hash`. If another block already holds the
    /// same content, that one stays the cache entry and `id` is simply not indexed. Returns
    /// whether the index gained `hash`.
    pub fn register(&mut self, id: BlockId, hash: BlockHash) -> bool {
        if self.blocks[id as usize].hash.is_some() {
            return false;
        }
        if let std::collections::hash_map::Entry::Vacant(e) = self.cached.entry(hash) {
            e.insert(id);
            self.blocks[id as usize].hash = Some(hash);
            return true;
        }
        false
    }

    /// Drops one reference. Blocks that become unused join the back of the free queue, so
    /// the most recently used content is evicted last.
    pub fn release(&mut self, id: BlockId) {
        let b = &mut self.blocks[id as usize];
        debug_assert!(b.ref_count > 0, "double free of block {id}");
        b.ref_count = b.ref_count.saturating_sub(1);
        if b.ref_count == 0 {
            if b.hash.is_none() {
                // Uncached blocks are worthless once free: reuse them before cached ones.
                self.push_front(id);
            } else {
                self.num_cached_free += 1;
                self.push_back(id);
            }
        }
    }

    /// Forgets the content of every free cached block (they become plain free blocks, taken
    /// before any other on the next allocation); blocks in use keep theirs. Returns how many
    /// were forgotten.
    pub fn forget_free_cached(&mut self) -> usize {
        let mut forgotten = 0;
        let mut id = self.head;
        while id != NONE {
            let b = &mut self.blocks[id as usize];
            let next = b.next;
            if let Some(hash) = b.hash.take() {
                self.cached.remove(&hash);
                forgotten += 1;
                if let Some(removed) = self.removed.as_mut() {
                    removed.push(hash);
                }
            }
            id = next;
        }
        self.num_cached_free -= forgotten;
        forgotten
    }

    fn push_front(&mut self, id: BlockId) {
        let b = &mut self.blocks[id as usize];
        b.prev = NONE;
        b.next = self.head;
        if self.head == NONE {
            self.tail = id;
        } else {
            self.blocks[self.head as usize].prev = id;
        }
        self.head = id;
        self.num_free += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(n: u8) -> BlockHash {
        [n; 32]
    }

    #[test]
    fn evicts_least_recently_freed_cached_block_first() {
        let mut pool = BlockPool::new(3);
        let a = pool.allocate().unwrap();
        let b = pool.allocate().unwrap();
        let c = pool.allocate().unwrap();
        assert!(pool.allocate().is_none());
        pool.register(a, h(10));
        pool.register(b, h(20));
        pool.release(a);
        pool.release(b);
        pool.release(c); // uncached: goes to the front
        assert_eq!(pool.num_free(), 3);
        assert_eq!(pool.allocate(), Some(c));
        pool.record_removals();
        assert_eq!(pool.allocate(), Some(a)); // evicts hash 10
        assert_eq!(pool.take_removed(), vec![h(10)]);
        assert_eq!(pool.take_cached(h(10)), None);
        assert_eq!(pool.take_cached(h(20)), Some(b));
        assert_eq!(pool.num_free(), 0);
    }

    #[test]
    fn forgetting_drops_free_cached_content_and_keeps_blocks_in_use() {
        let mut pool = BlockPool::new(3);
        pool.record_removals();
        let (a, b) = (pool.allocate().unwrap(), pool.allocate().unwrap());
        assert!(pool.register(a, h(10)));
        assert!(pool.register(b, h(20)));
        pool.release(a);
        assert_eq!(pool.num_cached_free(), 1);
        assert_eq!(pool.forget_free_cached(), 1);
        assert_eq!(pool.take_removed(), vec![h(10)]);
        assert!(pool.take_removed().is_empty());
        assert_eq!((pool.num_cached_free(), pool.num_free()), (0, 2));
        assert_eq!(pool.take_cached(h(10)), None, "free content is gone");
        assert_eq!(pool.take_cached(h(20)), Some(b), "content in use stays");
    }

    #[test]
    fn a_hit_on_a_free_block_pulls_it_out_of_the_queue() {
        let mut pool = BlockPool::new(2);
        let a = pool.allocate().unwrap();
        pool.register(a, h(7));
        pool.release(a);
        assert_eq!(pool.num_cached_free(), 1);
        assert_eq!(pool.take_cached(h(7)), Some(a));
        assert_eq!(pool.num_free(), 1);
        let other = pool.allocate().unwrap();
        assert_ne!(other, a);
        assert!(pool.allocate().is_none());
    }
}
