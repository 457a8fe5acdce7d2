//! The flattened batch one forward pass consumes: every scheduled sequence contributes a run of
//! consecutive tokens (a prefill chunk, or one decode token), and all runs are concatenated.
//!
//! This is the whole contract between the engine and the model: the engine fills it (reusing
//! its buffers from step to step), the model reads it. It knows nothing of requests.

use super::ModelError;

#[derive(Clone, Debug, Default)]
pub struct ForwardBatch {
    /// `[T]` token ids of all sequences' new tokens, concatenated.
    pub token_ids: Vec<u32>,
    /// `[T]` the position of each token within its own sequence.
    pub positions: Vec<u32>,
    /// `[T]` the cache slot (`block * block_size + offset`) each token's K/V is written to.
    pub slot_mapping: Vec<u32>,
    /// `[S + 1]` where each sequence's tokens start in the flattened batch; the last entry is T.
    pub query_start: Vec<u32>,
    /// `[S]` tokens in the cache for each sequence once this step's tokens are written.
    pub context_lens: Vec<u32>,
    /// `[S * max_blocks]` each sequence's block table, padded to `max_blocks` entries.
    pub block_tables: Vec<u32>,
    pub max_blocks: usize,
    /// Return logits for every token rather than only each sequence's last one.
    pub all_logits: bool,
    /// Sequences (ascending indices) that get a row of logits for every token of their run,
    /// not only the last: a prompt being scored. The others pay nothing for them.
    pub every_token: Vec<usize>,
}

impl ForwardBatch {
    pub fn clear(&mut self) {
        self.token_ids.clear();
        self.positions.clear();
        self.slot_mapping.clear();
        self.query_start.clear();
        self.context_lens.clear();
        self.block_tables.clear();
        self.max_blocks = 0;
        self.all_logits = false;
        self.every_token.clear();
    }

    /// Marks the sequence pushed last as one whose every token gets logits.
    pub fn score_every_token_of_last(&mut self) {
        if let Some(last) = self.num_seqs().checked_sub(1) {
            self.every_token.push(last);
        }
    }

    /// How many rows of logits sequence `i` gets: its run's length, or one.
    pub fn logit_rows_of(&self, i: usize) -> usize {
        if self.all_logits || self.every_token.binary_search(&i).is_ok() {
            (self.query_start[i + 1] - self.query_start[i]) as usize
        } else {
            1
        }
    }

    /// The token rows that get logits, in order; `None` for every row.
    pub fn logit_rows(&self) -> Option<Vec<u32>> {
        if self.all_logits {
            return None;
        }
        // Only a step that scores a prompt needs room for more than a row per sequence.
        let extra = if self.every_token.is_empty() {
            0
        } else {
            self.num_tokens()
        };
        let mut rows = Vec::with_capacity(self.num_seqs() + extra);
        let mut marked = self.every_token.iter().peekable();
        for (i, w) in self.query_start.windows(2).enumerate() {
            if marked.next_if_eq(&&i).is_some() {
                rows.extend(w[0]..w[1]);
            } else {
                rows.push(w[1] - 1);
            }
        }
        Some(rows)
    }

    pub fn num_seqs(&self) -> usize {
        self.context_lens.len()
    }

    pub fn num_tokens(&self) -> usize {
        self.token_ids.len()
    }

    /// Appends one sequence's run of tokens. `block_table` must already cover
    /// `start_pos + tokens.len()` positions; `block_size` maps positions to slots.
    /// Block tables are re-padded when a longer one arrives, so callers may add sequences in
    /// any order.
    pub fn push_sequence(
        &mut self,
        tokens: &[u32],
        start_pos: usize,
        block_table: &[u32],
        block_size: usize,
    ) {
        if self.query_start.is_empty() {
            self.query_start.push(0);
        }
        for (i, &token) in tokens.iter().enumerate() {
            let pos = start_pos + i;
            self.token_ids.push(token);
            self.positions.push(pos as u32);
            let block = block_table
                .get(pos / block_size)
                .copied()
                .unwrap_or(u32::MAX);
            self.slot_mapping
                .push(block.saturating_mul(block_size as u32) + (pos % block_size) as u32);
        }
        self.query_start.push(self.token_ids.len() as u32);
        self.context_lens.push((start_pos + tokens.len()) as u32);
        if block_table.len() > self.max_blocks {
            self.repad(block_table.len());
        }
        self.block_tables.extend_from_slice(block_table);
        self.block_tables
            .resize(self.num_seqs() * self.max_blocks, u32::MAX);
    }

    fn repad(&mut self, max_blocks: usize) {
        let old = self.max_blocks;
        let seqs = self.num_seqs() - 1; // the sequence being pushed is not in the table yet
        let mut padded = vec![u32::MAX; seqs * max_blocks];
        for s in 0..seqs {
            padded[s * max_blocks..s * max_blocks + old]
                .copy_from_slice(&self.block_tables[s * old..(s + 1) * old]);
        }
        self.block_tables = padded;
        self.max_blocks = max_blocks;
    }

    /// Checks the invariants the attention kernels rely on, so a bad batch is an error rather
    /// than an out-of-bounds read. `num_slots` is the cache's capacity in tokens.
    pub fn validate(&self, num_slots: usize, block_size: usize) -> Result<(), ModelError> {
        let t = self.num_tokens();
        let s = self.num_seqs();
        let bad = |m: String| Err(ModelError::Batch(m));
        if self.positions.len() != t || self.slot_mapping.len() != t {
            return bad(format!(
                "{t} tokens but {} positions and {} slots",
                self.positions.len(),
                self.slot_mapping.len()
            ));
        }
        if s == 0 || self.query_start.len() != s + 1 || self.query_start[s] as usize != t {
            return bad("query_start must have one entry per sequence plus the total".into());
        }
        if self.block_tables.len() != s * self.max_blocks {
            return bad("block_tables must be num_seqs * max_blocks long".into());
        }
        for i in 0..s {
            let q_len = (self.query_start[i + 1] as i64) - (self.query_start[i] as i64);
            let ctx = self.context_lens[i] as usize;
            if q_len <= 0 || q_len as usize > ctx {
                return bad(format!(
                    "sequence {i}: {q_len} new tokens with context {ctx}"
                ));
            }
            let needed = ctx.div_ceil(block_size);
            if needed > self.max_blocks {
                return bad(format!("sequence {i}: context {ctx} needs {needed} blocks"));
            }
            let table = &self.block_tables[i * self.max_blocks..i * self.max_blocks + needed];
            if table
                .iter()
                .any(|&b| (b as usize + 1) * block_size > num_slots)
            {
                return bad(format!(
                    "sequence {i}: block table points outside the cache"
                ));
            }
        }
        if self
            .slot_mapping
            .iter()
            .any(|&slot| slot as usize >= num_slots)
        {
            return bad("slot mapping points outside the cache".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_block_tables_when_a_longer_one_arrives() {
        let mut b = ForwardBatch::default();
        b.push_sequence(&[1], 0, &[5], 4);
        b.push_sequence(&[2, 3], 4, &[7, 9], 4);
        assert_eq!(b.max_blocks, 2);
        assert_eq!(b.block_tables, vec![5, u32::MAX, 7, 9]);
        assert_eq!(b.slot_mapping, vec![20, 36, 37]);
        assert_eq!(b.query_start, vec![0, 1, 3]);
        assert_eq!(b.context_lens, vec![1, 6]);
        b.validate(40, 4).unwrap();
        assert!(b.validate(36, 4).is_err());
    }

    #[test]
    fn a_scored_sequence_gets_every_row_and_the_others_their_last() {
        let mut b = ForwardBatch::default();
        b.push_sequence(&[1, 2], 0, &[0], 4);
        b.push_sequence(&[3, 4, 5], 0, &[1], 4);
        b.score_every_token_of_last();
        b.push_sequence(&[6], 2, &[2], 4);
        assert_eq!(b.logit_rows(), Some(vec![1, 2, 3, 4, 5]));
        assert_eq!(
            (0..3).map(|i| b.logit_rows_of(i)).collect::<Vec<_>>(),
            vec![1, 3, 1]
        );
        b.all_logits = true;
        assert_eq!(b.logit_rows(), None);
        b.clear();
        assert!(b.every_token.is_empty());
    }
}
