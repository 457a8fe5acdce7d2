//! Attention over a cached prefix that several query tokens of one batch have in common
//! (cascade attention), on the CPU.
//!
//! In the customer-service shape every request starts with the same system prompt, so prefix
//! caching gives every sequence the same leading blocks, and most of each token's attention
//! is over those blocks. Done per (token, kv head), each key is loaded for two query heads;
//! done here, the prefix's keys and values meet a tile of [`ROWS`] query rows (any tokens,
//! any heads of one kv head) at once, which turns the work into small matrix products that
//! run near the machine's multiply-add rate.
//!
//! For each row this produces the prefix's partial softmax state (max score, sum of
//! exponentials, unnormalised output); `cpu::attend_item` attends over the rest of the context
//! and merges the two. The merge is exact: the shared part is the same physical blocks at the
//! same positions in every member's table, and every member token sees all of it.
//!
//! This module knows the batch only through [`ForwardBatch`] and the cache through block ids.

use super::super::fast_math::MulAdd;
use super::cpu::{exp_sum, load8, max8, HeadBlocks};
use super::{AttentionShape, KvElem};
use crate::model::ForwardBatch;

/// Query rows per tile: with two 8-key (or 8-column) chunks, 12 accumulators, two loaded
/// vectors and one broadcast fill 15 of the 16 AVX2 registers.
pub(super) const ROWS: usize = 6;

/// Values kept per row of partial results: max, sum, then `head_dim` outputs.
const STATE: usize = 2;

/// A run of leading blocks shared by the tokens of one or more sequences.
pub(super) struct PrefixGroup {
    /// The shared blocks, in table order.
    pub(super) blocks: Vec<u32>,
    /// Batch indices of the tokens that take the prefix from this group.
    pub(super) tokens: Vec<u32>,
    /// Index of this group's first tile in [`SharedPrefixes::tiles`].
    first_tile: usize,
    /// Tiles per kv head: `tokens × query heads per kv head` rows, [`ROWS`] to a tile.
    tiles_per_head: usize,
}

/// Where the tiles' results are: tile `i` covers rows `i * ROWS..` of the partial results.
#[derive(Clone, Copy)]
pub(super) struct Tile {
    group: u32,
    kv_head: u32,
    /// First row within the group's rows for this kv head.
    row: u32,
}

/// The batch's shared prefixes and which token belongs to which.
#[derive(Default)]
pub(super) struct SharedPrefixes {
    pub(super) groups: Vec<PrefixGroup>,
    /// Per batch token: its group and its rank among the group's tokens, if any.
    membership: Vec<Option<(u32, u32)>>,
    pub(super) tiles: Vec<Tile>,
}

impl SharedPrefixes {
    /// Groups the batch's sequences by the cached blocks they have in common and keeps, for
    /// each group, the whole blocks every member shares that lie before every member's first
    /// new token. A group needs at least two tokens: for a lone decode token the per-item
    /// kernel already loads each key once for all its heads.
    pub(super) fn find(batch: &ForwardBatch, shape: AttentionShape) -> Self {
        let bs = shape.block_size;
        if !bs.is_multiple_of(8) || !shape.head_dim.is_multiple_of(8) || batch.max_blocks == 0 {
            return Self::default();
        }
        // Each sequence's cached whole blocks before its first new token; only sequences
        // with at least one.
        let cached = |s: usize| {
            let n = (first_new(batch, s) / bs).min(batch.max_blocks);
            &batch.block_tables[s * batch.max_blocks..][..n]
        };
        let mut seqs: Vec<usize> = (0..batch.num_seqs())
            .filter(|&s| !cached(s).is_empty())
            .collect();
        // Sorted by their cached blocks, sequences with a common prefix sit together, and
        // `common[i]` is what neighbours `i` and `i + 1` share.
        seqs.sort_unstable_by(|&a, &b| cached(a).cmp(cached(b)));
        let common: Vec<usize> = seqs
            .windows(2)
            .map(|w| {
                let (a, b) = (cached(w[0]), cached(w[1]));
                a.iter().zip(b).take_while(|(x, y)| x == y).count()
            })
            .collect();
        let mut out = Self {
            membership: vec![None; batch.num_tokens()],
            ..Self::default()
        };
        // A run ends before a neighbour that shares less than half of what the run shares so
        // far, or at most half of what it shares with the one after it: a prompt that has only
        // its first block in common with the others must not cut theirs down to that block.
        let mut start = 0;
        while start < seqs.len() {
            let mut shared = cached(seqs[start]).len();
            let mut end = start + 1;
            while end < seqs.len() {
                let link = common[end - 1];
                let next = common.get(end).copied().unwrap_or(0);
                if link == 0 || 2 * link < shared || 2 * link <= next {
                    break;
                }
                shared = shared.min(link);
                end += 1;
            }
            let blocks = &cached(seqs[start])[..shared];
            out.add_group(batch, shape, &seqs[start..end], blocks);
            start = end;
        }
        out
    }

    /// Adds the group of `members` (sequence indices) sharing `blocks`, if it has two tokens.
    fn add_group(
        &mut self,
        batch: &ForwardBatch,
        shape: AttentionShape,
        members: &[usize],
        blocks: &[u32],
    ) {
        let tokens: Vec<u32> = members
            .iter()
            .flat_map(|&s| batch.query_start[s]..batch.query_start[s + 1])
            .collect();
        if tokens.len() < 2 {
            return;
        }
        let group = self.groups.len() as u32;
        for (rank, &t) in tokens.iter().enumerate() {
            self.membership[t as usize] = Some((group, rank as u32));
        }
        let group_heads = shape.num_heads / shape.num_kv_heads;
        let tiles_per_head = (tokens.len() * group_heads).div_ceil(ROWS);
        let first_tile = self.tiles.len();
        for kv_head in 0..shape.num_kv_heads as u32 {
            self.tiles.extend((0..tiles_per_head).map(|i| Tile {
                group,
                kv_head,
                row: (i * ROWS) as u32,
            }));
        }
        self.groups.push(PrefixGroup {
            blocks: blocks.to_vec(),
            tokens,
            first_tile,
            tiles_per_head,
        });
    }

    /// The group of batch token `t` and the index of its first row (query head 0 of kv head
    /// `kv_head`) in the partial results.
    #[inline]
    pub(super) fn rows_of(
        &self,
        t: usize,
        kv_head: usize,
        group_heads: usize,
    ) -> Option<(&PrefixGroup, usize)> {
        let (g, rank) = self.membership.get(t).copied().flatten()?;
        let group = &self.groups[g as usize];
        let row = (group.first_tile + kv_head * group.tiles_per_head) * ROWS
            + rank as usize * group_heads;
        Some((group, row))
    }

    /// Floats of partial results per tile.
    pub(super) fn tile_len(head_dim: usize) -> usize {
        ROWS * (STATE + head_dim)
    }
}

/// Position of sequence `s`'s first new token: everything before it is in the cache.
fn first_new(batch: &ForwardBatch, s: usize) -> usize {
    let new = (batch.query_start[s + 1] - batch.query_start[s]) as usize;
    batch.context_lens[s] as usize - new
}

/// The prefix state of one row: max score, sum of exponentials, unnormalised output.
pub(super) fn row_state(partials: &[f32], row: usize, head_dim: usize) -> (f32, f32, &[f32]) {
    let r = &partials[row * (STATE + head_dim)..][..STATE + head_dim];
    (r[0], r[1], &r[STATE..])
}

/// Scratch one thread reuses across tiles; only grows.
#[derive(Default)]
pub(super) struct TileScratch {
    q: Vec<f32>,
    scores: Vec<f32>,
}

/// What a tile reads.
pub(super) struct TileInputs<'a, Q, T> {
    pub(super) shape: AttentionShape,
    pub(super) scale: f32,
    pub(super) q: &'a [Q],
    pub(super) cache: &'a [T],
}

/// Computes one tile's rows into `out` (`ROWS × (2 + head_dim)`).
#[inline(always)]
pub(super) fn run_tile<M: MulAdd, Q: KvElem, T: KvElem>(
    inp: &TileInputs<'_, Q, T>,
    prefixes: &SharedPrefixes,
    tile: Tile,
    scratch: &mut TileScratch,
    out: &mut [f32],
) {
    let AttentionShape {
        num_heads,
        num_kv_heads,
        head_dim,
        block_size,
    } = inp.shape;
    let group_heads = num_heads / num_kv_heads;
    let group = &prefixes.groups[tile.group as usize];
    let g = tile.kv_head as usize;
    let rows = group.tokens.len() * group_heads;
    // The tile's query rows, pre-scaled and transposed (`[head_dim][ROWS]`, so each
    // dimension's values for all rows are one fixed-size slice); rows past the group's end
    // are zero (their results are computed and never read).
    scratch.q.clear();
    scratch.q.resize(head_dim * ROWS, 0.0);
    for r in 0..ROWS {
        let row = tile.row as usize + r;
        if row < rows {
            let t = group.tokens[row / group_heads] as usize;
            let head = g * group_heads + row % group_heads;
            let q = &inp.q[(t * num_heads + head) * head_dim..][..head_dim];
            for (d, &x) in q.iter().enumerate() {
                scratch.q[d * ROWS + r] = x.to_f32() * inp.scale;
            }
        }
    }
    let heads = HeadBlocks::new(inp.cache, inp.shape, g);
    let n_keys = group.blocks.len() * block_size;
    if scratch.scores.len() < ROWS * n_keys {
        scratch.scores.resize(ROWS * n_keys, 0.0);
    }
    let scores = &mut scratch.scores[..ROWS * n_keys];
    // Scores, sixteen keys at a time (eight at the end of an odd count). Key `j` of a
    // dimension-major block sits at `d * block_size + j`.
    let chunk = |c: usize| {
        let p = c * 8;
        &heads.keys(group.blocks[p / block_size])[p % block_size..]
    };
    let chunks = n_keys / 8;
    let mut c = 0;
    while c + 2 <= chunks {
        let s = score_tile::<2, M, T>(&scratch.q, [chunk(c), chunk(c + 1)], block_size);
        for (r, s) in s.iter().enumerate() {
            for (k, s) in s.iter().enumerate() {
                scores[r * n_keys + (c + k) * 8..][..8].copy_from_slice(s);
            }
        }
        c += 2;
    }
    if c < chunks {
        let s = score_tile::<1, M, T>(&scratch.q, [chunk(c)], block_size);
        for (r, s) in s.iter().enumerate() {
            scores[r * n_keys + c * 8..][..8].copy_from_slice(&s[0]);
        }
    }
    for r in 0..ROWS {
        let row = &mut scores[r * n_keys..][..n_keys];
        let max = max8(row);
        let sum = exp_sum::<M>(row, max);
        out[r * (STATE + head_dim)] = max;
        out[r * (STATE + head_dim) + 1] = sum;
    }
    // Probabilities times values, sixteen output columns at a time (then eight).
    let mut col = 0;
    while col + 16 <= head_dim {
        let acc = value_tile::<2, M, T>(scores, &group.blocks, &heads, block_size, head_dim, col);
        store(out, &acc, head_dim, col);
        col += 16;
    }
    if col < head_dim {
        let acc = value_tile::<1, M, T>(scores, &group.blocks, &heads, block_size, head_dim, col);
        store(out, &acc, head_dim, col);
    }
}

#[inline(always)]
fn store<const C: usize>(
    out: &mut [f32],
    acc: &[[[f32; 8]; C]; ROWS],
    head_dim: usize,
    col: usize,
) {
    for (r, acc) in acc.iter().enumerate() {
        for (k, a) in acc.iter().enumerate() {
            out[r * (STATE + head_dim) + STATE + col + 8 * k..][..8].copy_from_slice(a);
        }
    }
}

/// Scores of `C` chunks of eight keys (`keys[c]` starts at the chunk's first key in dimension
/// row 0 of its block) against the tile's rows (`q`, `[head_dim][ROWS]`). Each key vector is
/// loaded once for all rows and each query element once for all chunks.
#[inline(always)]
fn score_tile<const C: usize, M: MulAdd, T: KvElem>(
    q: &[f32],
    keys: [&[T]; C],
    block_size: usize,
) -> [[[f32; 8]; C]; ROWS] {
    let mut acc = [[[0f32; 8]; C]; ROWS];
    // Dimension `d`'s row of each chunk is the `d`-th `block_size` step from its start.
    let mut rows = keys.map(|k| k.chunks(block_size));
    for qd in q.chunks_exact(ROWS) {
        let k: [[f32; 8]; C] = std::array::from_fn(|c| match rows[c].next() {
            Some(row) => load8(row),
            None => [0.0; 8],
        });
        for (acc, &qv) in acc.iter_mut().zip(qd) {
            for c in 0..C {
                for l in 0..8 {
                    acc[c][l] = M::mul_add(qv, k[c][l], acc[c][l]);
                }
            }
        }
    }
    acc
}

/// Output columns `col..col + 8 * C` of the tile's rows: the (unnormalised) probabilities in
/// `p` (`[ROWS][blocks × block_size]`) times the values. Each value vector is loaded once for
/// all rows.
#[inline(always)]
fn value_tile<const C: usize, M: MulAdd, T: KvElem>(
    p: &[f32],
    blocks: &[u32],
    heads: &HeadBlocks<'_, T>,
    block_size: usize,
    head_dim: usize,
    col: usize,
) -> [[[f32; 8]; C]; ROWS] {
    let mut acc = [[[0f32; 8]; C]; ROWS];
    let n_keys = blocks.len() * block_size;
    for (b, &block) in blocks.iter().enumerate() {
        let pb: [&[f32]; ROWS] =
            std::array::from_fn(|r| &p[r * n_keys + b * block_size..][..block_size]);
        for (j, row) in heads.values(block).chunks_exact(head_dim).enumerate() {
            let row = &row[col..][..8 * C];
            let v: [[f32; 8]; C] = std::array::from_fn(|k| load8(&row[8 * k..]));
            for (acc, pr) in acc.iter_mut().zip(&pb) {
                let pr = pr[j];
                for k in 0..C {
                    for l in 0..8 {
                        acc[k][l] = M::mul_add(pr, v[k][l], acc[k][l]);
                    }
                }
            }
        }
    }
    acc
}
