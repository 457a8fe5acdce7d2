//! One choice's grammar as the engine runs it: llguidance's matcher behind the engine's
//! [`Constraint`] seam.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use llguidance::Matcher;
use prometheus::Histogram;

use super::Compiled;
use crate::engine::{Constraint, ConstraintFactory, Progress, TokenMask};

/// When the grammar starts to apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    /// From the first output token.
    Open,
    /// After this token (the end of the reasoning), and after any tokens already forced
    /// behind it (a thinking budget's closing text): the reasoning is free, the answer is
    /// constrained.
    After(u32),
}

enum State {
    Waiting(u32),
    /// The gate token was seen; forced tokens queued before it are still coming out.
    Draining,
    Active,
}

pub struct GrammarConstraint {
    matcher: Matcher,
    state: State,
    eos_ids: Arc<[u32]>,
    /// The matcher's own end-of-sequence id (any of `eos_ids` stands for it).
    eos: u32,
    mask_time: Option<Histogram>,
}

impl Compiled {
    /// A constraint per choice, each starting from a copy of the compiled parser.
    pub fn factory(
        self: &Arc<Self>,
        gate: Gate,
        mask_time: Option<Histogram>,
    ) -> ConstraintFactory {
        let compiled = self.clone();
        Arc::new(move |_choice| {
            Box::new(GrammarConstraint::new(&compiled, gate, mask_time.clone()))
                as Box<dyn Constraint>
        })
    }
}

impl GrammarConstraint {
    pub fn new(compiled: &Compiled, gate: Gate, mask_time: Option<Histogram>) -> Self {
        let parser = compiled.parser.deep_clone();
        let eos = parser.token_env.tok_trie().eos_token();
        Self {
            matcher: Matcher::new(Ok(parser)),
            state: match gate {
                Gate::Open => State::Active,
                Gate::After(t) => State::Waiting(t),
            },
            eos_ids: compiled.eos_ids.clone(),
            eos,
            mask_time,
        }
    }

    fn check(&self) -> Result<(), String> {
        match self.matcher.get_error() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Queues what the grammar alone allows next, unless tokens are already queued (they
    /// are what it forced last time, or a steer's: each is observed in turn).
    fn force(&mut self, forced: &mut VecDeque<u32>) -> Result<Progress, String> {
        if self.matcher.is_stopped() {
            self.check()?;
            return Ok(Progress::Done);
        }
        if forced.is_empty() {
            forced.extend(self.matcher.compute_ff_tokens());
        }
        self.check()?;
        Ok(Progress::Open)
    }
}

impl Constraint for GrammarConstraint {
    fn begin(&mut self, forced: &mut VecDeque<u32>) -> Result<(), String> {
        if self.is_active() {
            self.force(forced)?;
        }
        Ok(())
    }

    fn is_active(&self) -> bool {
        matches!(self.state, State::Active)
    }

    fn fill_mask(&mut self, mask: &mut TokenMask) -> Result<(), String> {
        let start = Instant::now();
        // A grammar complete from the start (or a stopped one) allows only the end.
        let vob = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| e.to_string())?;
        mask.words.clear();
        mask.words.extend_from_slice(vob.as_slice());
        if vob.is_allowed(self.eos) {
            for &id in self.eos_ids.iter() {
                let w = id as usize / 32;
                if w >= mask.words.len() {
                    mask.words.resize(w + 1, 0);
                }
                mask.words[w] |= 1 << (id % 32);
            }
        }
        if let Some(h) = &self.mask_time {
            h.observe(start.elapsed().as_secs_f64());
        }
        Ok(())
    }

    fn observe(&mut self, token: u32, forced: &mut VecDeque<u32>) -> Result<Progress, String> {
        match self.state {
            State::Waiting(end) => {
                if token == end {
                    self.state = State::Draining;
                    if forced.is_empty() {
                        self.state = State::Active;
                        return self.force(forced);
                    }
                }
                Ok(Progress::Open)
            }
            State::Draining => {
                if forced.is_empty() {
                    self.state = State::Active;
                    return self.force(forced);
                }
                Ok(Progress::Open)
            }
            State::Active => {
                let token = if self.eos_ids.contains(&token) {
                    self.eos
                } else {
                    token
                };
                self.matcher
                    .consume_token(token)
                    .map_err(|e| e.to_string())?;
                self.force(forced)
            }
        }
    }
}
