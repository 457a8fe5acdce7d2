//! Constrained decoding: a per-choice hook that says which tokens may come next.
//!
//! A [`Constraint`] (a compiled grammar, in practice) is asked for the set of allowed tokens
//! before each sample point of its choice, and told every token the choice emits. The
//! engine applies the set to the row after the stop-rule mask and before logit bias,
//! penalties and truncation, so every sampling mode stays valid; logprobs still describe the
//! model's raw row. Tokens the constraint alone allows may be queued as forced tokens (the
//! [`super::steer`] queue), which skip the mask and the draw. A constraint that is complete
//! ends its choice with `stop`.
//!
//! The masks of a step's constrained choices are computed in parallel with one another and
//! with the step's forward pass; a step with no constrained choice does none of this.
//!
//! The engine knows nothing of what the constraint is (JSON schema, regex, tool calls) nor of
//! reasoning: a constraint that starts after `</think>` says so through [`Constraint::is_active`].

use std::collections::VecDeque;
use std::sync::Arc;

/// Allowed tokens, one bit per id (bit `i % 32` of word `i / 32`). Ids past its end are
/// not allowed.
#[derive(Clone, Debug, Default)]
pub struct TokenMask {
    pub words: Vec<u32>,
}

impl TokenMask {
    pub fn allows(&self, id: u32) -> bool {
        self.words
            .get(id as usize / 32)
            .is_some_and(|w| w & (1 << (id % 32)) != 0)
    }

    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// Whether every allowed id is among `ids` (the mask leaves nothing else).
    pub fn only_within(&self, ids: &[u32]) -> bool {
        let allowed: u32 = self.words.iter().map(|w| w.count_ones()).sum();
        let mut inside: Vec<u32> = ids.iter().copied().filter(|&id| self.allows(id)).collect();
        inside.sort_unstable();
        inside.dedup();
        inside.len() as u32 == allowed
    }

    /// The allowed id with the largest logit (the first on ties), without touching the row:
    /// greedy decoding under a mask reads only the allowed entries.
    pub fn argmax(&self, logits: &[f32]) -> Option<u32> {
        let mut best: Option<(u32, f32)> = None;
        for (w, &word) in self.words.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let id = w * 32 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let Some(&l) = logits.get(id) else {
                    return best.map(|b| b.0);
                };
                let l = if l.is_nan() { f32::NEG_INFINITY } else { l };
                if best.is_none_or(|(_, b)| l > b) {
                    best = Some((id as u32, l));
                }
            }
        }
        best.map(|b| b.0)
    }

    /// Sets every logit the mask does not allow to -inf.
    pub fn apply(&self, logits: &mut [f32]) {
        for (w, chunk) in logits.chunks_mut(32).enumerate() {
            match self.words.get(w).copied().unwrap_or(0) {
                u32::MAX => {}
                0 => chunk.fill(f32::NEG_INFINITY),
                word => {
                    for (bit, l) in chunk.iter_mut().enumerate() {
                        if word & (1 << bit) == 0 {
                            *l = f32::NEG_INFINITY;
                        }
                    }
                }
            }
        }
    }
}

/// What a constraint says after seeing a token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// More tokens may (or must) follow.
    Open,
    /// Complete: nothing may follow, the choice ends with `stop`.
    Done,
}

/// The constraint of one choice. Runs on the engine's threads: [`Self::fill_mask`] of several
/// choices may run at once (each on its own constraint), so it must not block on shared state.
pub trait Constraint: Send {
    /// The choice starts: tokens pushed onto `forced` are its first ones (what the grammar
    /// alone allows from its start).
    fn begin(&mut self, _forced: &mut VecDeque<u32>) -> Result<(), String> {
        Ok(())
    }
    /// Whether the next sample point is constrained (a constraint may start later in the
    /// output, e.g. after the reasoning).
    fn is_active(&self) -> bool;
    /// Prepares the next sample point: either queues onto `forced` the tokens the constraint
    /// alone allows from here (then `mask` is not read), or writes the allowed tokens into
    /// `mask`. Runs beside the forward pass, in parallel with other choices'.
    fn fill_mask(&mut self, mask: &mut TokenMask, forced: &mut VecDeque<u32>)
        -> Result<(), String>;
    /// The forced half of [`Self::fill_mask`] alone: queues the tokens the constraint alone
    /// allows from here, if any.
    fn force(&mut self, forced: &mut VecDeque<u32>) -> Result<(), String>;
    /// Whether `token` may come next: one token checked, not the whole mask (greedy decoding
    /// asks this of the model's best token first, and needs the mask only when it is refused).
    fn allows(&mut self, token: u32) -> Result<bool, String>;
    /// `token` was appended to the output (sampled or forced, active or not). Tokens pushed
    /// onto `forced` are emitted next without sampling; they are observed here in turn.
    fn observe(&mut self, token: u32, forced: &mut VecDeque<u32>) -> Result<Progress, String>;
}

/// Makes the constraint of each choice (its index is the argument).
pub type ConstraintFactory = Arc<dyn Fn(usize) -> Box<dyn Constraint> + Send + Sync>;

/// How a greedy sample point under a constraint came out.
pub(super) enum Pick {
    Token(u32),
    /// The constraint allows nothing more: the choice is done.
    Nothing,
}

/// A choice's constraint and the mask computed for its next sample point.
pub(super) struct Constrained {
    constraint: Box<dyn Constraint>,
    mask: TokenMask,
    /// `mask` is for the coming sample point.
    ready: bool,
    /// The coming sample point's forced tokens were looked for (none were found).
    forced_checked: bool,
    /// Why the constraint failed, once it has.
    failed: Option<String>,
}

impl Constrained {
    pub(super) fn new(mut constraint: Box<dyn Constraint>, forced: &mut VecDeque<u32>) -> Self {
        let failed = constraint.begin(forced).err();
        Self {
            constraint,
            mask: TokenMask::default(),
            ready: false,
            forced_checked: false,
            failed,
        }
    }

    pub(super) fn is_active(&self) -> bool {
        self.failed.is_none() && self.constraint.is_active()
    }

    /// Prepares the coming sample point, unless tokens are already queued for it: its
    /// forced tokens, or else (`with_mask`) its mask.
    pub(super) fn prepare(&mut self, forced: &mut VecDeque<u32>, with_mask: bool) {
        if self.ready || !forced.is_empty() || !self.is_active() {
            return;
        }
        let done = if with_mask {
            self.constraint.fill_mask(&mut self.mask, forced)
        } else if self.forced_checked {
            return;
        } else {
            self.constraint.force(forced)
        };
        match done {
            Ok(()) => {
                self.forced_checked = forced.is_empty();
                self.ready = with_mask && forced.is_empty();
            }
            Err(e) => self.failed = Some(e),
        }
    }

    /// Greedy decoding at a prepared sample point with nothing forced: the model's best
    /// token if the constraint allows it (one check), else the best of the mask.
    pub(super) fn greedy(&mut self, logits: &[f32], best: u32) -> Result<Pick, String> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if !self.ready {
            if self.constraint.allows(best)? {
                return Ok(Pick::Token(best));
            }
            let mut none = VecDeque::new();
            self.constraint.fill_mask(&mut self.mask, &mut none)?;
            if !none.is_empty() {
                return Err("a constraint forced tokens after saying it forced none".into());
            }
            self.ready = true;
        }
        Ok(match self.mask.argmax(logits) {
            _ if self.mask.is_empty() => Pick::Nothing,
            Some(t) => Pick::Token(t),
            None => Pick::Nothing,
        })
    }

    /// The mask for a sample point that [`Self::prepare`] prepared and nothing forced.
    pub(super) fn mask(&self) -> Result<Option<&TokenMask>, String> {
        match (&self.failed, self.is_active(), self.ready) {
            (Some(e), _, _) => Err(e.clone()),
            (None, false, _) => Ok(None),
            (None, true, true) => Ok(Some(&self.mask)),
            (None, true, false) => Err("a constrained sample point had no mask".into()),
        }
    }

    pub(super) fn observe(
        &mut self,
        token: u32,
        forced: &mut VecDeque<u32>,
    ) -> Result<Progress, String> {
        self.ready = false;
        self.forced_checked = false;
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        self.constraint.observe(token, forced).inspect_err(|e| {
            self.failed = Some(e.clone());
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mask_keeps_exactly_its_bits() {
        let mut mask = TokenMask { words: vec![0; 3] };
        for id in [0u32, 31, 32, 65] {
            mask.words[id as usize / 32] |= 1 << (id % 32);
        }
        let mut row = vec![1.0f32; 100];
        mask.apply(&mut row);
        for (i, l) in row.iter().enumerate() {
            let allowed = [0, 31, 32, 65].contains(&i);
            assert_eq!(l.is_finite(), allowed, "id {i}");
            assert_eq!(mask.allows(i as u32), allowed);
        }
        assert!(!mask.is_empty());
        assert!(TokenMask::default().is_empty());
        assert!(mask.only_within(&[65, 0, 31, 32, 0, 7]));
        assert!(!mask.only_within(&[0, 31, 32]));
    }

    #[test]
    fn the_masked_argmax_is_the_best_allowed_first_on_ties() {
        let mask = TokenMask {
            words: vec![0b1011_0000, 1],
        };
        let mut row = vec![0.0f32; 40];
        row[4] = f32::NAN;
        row[5] = 2.0;
        row[7] = 2.0;
        row[6] = 9.0; // not allowed
        row[32] = 1.0;
        assert_eq!(mask.argmax(&row), Some(5));
        row[32] = 3.0;
        assert_eq!(mask.argmax(&row), Some(32));
        assert_eq!(TokenMask::default().argmax(&row), None);
    }

    #[test]
    fn a_full_word_leaves_its_logits_alone() {
        let mask = TokenMask {
            words: vec![u32::MAX],
        };
        let mut row = vec![0.5f32; 40];
        mask.apply(&mut row);
        assert!(row[..32].iter().all(|&l| l == 0.5));
        assert!(row[32..].iter().all(|&l| l == f32::NEG_INFINITY));
    }
}
