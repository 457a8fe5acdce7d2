//! One choice's grammar as the engine runs it: llguidance's matcher behind the engine's
//! [`Constraint`] seam.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
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
    compiled: Arc<Compiled>,
    state: State,
    /// The matcher took tokens (built lexer states): when the choice ends, it goes back to
    /// warm the template, whether the grammar completed or `max_tokens` cut it.
    worked: bool,
    /// Its lexer is its own copy (not the template's, shared).
    private: bool,
    mask_time: Option<Histogram>,
}

impl Compiled {
    /// A constraint per choice, starting from `starts` (see [`Compiled::starts`]; a choice
    /// without one copies the template itself).
    pub fn factory(
        self: &Arc<Self>,
        starts: Vec<(Matcher, bool)>,
        gate: Gate,
        mask_time: Option<Histogram>,
    ) -> ConstraintFactory {
        let compiled = self.clone();
        let starts = Mutex::new(starts.into_iter().map(Some).collect::<Vec<_>>());
        Arc::new(move |choice| {
            let start = starts
                .lock()
                .ok()
                .and_then(|mut s| s.get_mut(choice).and_then(Option::take))
                .unwrap_or_else(|| compiled.start());
            Box::new(GrammarConstraint::new(
                compiled.clone(),
                start,
                gate,
                mask_time.clone(),
            )) as Box<dyn Constraint>
        })
    }
}

impl GrammarConstraint {
    /// `start`: a matcher at the grammar's start, and whether its lexer is its own copy.
    pub fn new(
        compiled: Arc<Compiled>,
        (matcher, private): (Matcher, bool),
        gate: Gate,
        mask_time: Option<Histogram>,
    ) -> Self {
        Self {
            private,
            matcher,
            compiled,
            state: match gate {
                Gate::Open => State::Active,
                Gate::After(t) => State::Waiting(t),
            },
            worked: false,
            mask_time,
        }
    }

    /// Any of the model's end ids is the matcher's one.
    fn own_id(&self, token: u32) -> u32 {
        if self.compiled.eos_ids.contains(&token) {
            self.compiled.eos
        } else {
            token
        }
    }

    fn check(&self) -> Result<(), String> {
        match self.matcher.get_error() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Constraint for GrammarConstraint {
    fn is_active(&self) -> bool {
        matches!(self.state, State::Active)
    }

    fn force(&mut self, forced: &mut VecDeque<u32>) -> Result<(), String> {
        // What the grammar alone allows from here goes in without a mask or a draw.
        if !self.matcher.is_stopped() {
            forced.extend(self.matcher.compute_ff_tokens());
        }
        self.check()
    }

    fn allows(&mut self, token: u32) -> Result<bool, String> {
        let token = self.own_id(token);
        let ok = self
            .matcher
            .validate_tokens(&[token])
            .map_err(|e| e.to_string())?;
        Ok(ok == 1)
    }

    fn fill_mask(
        &mut self,
        mask: &mut TokenMask,
        forced: &mut VecDeque<u32>,
    ) -> Result<(), String> {
        let start = Instant::now();
        self.force(forced)?;
        if forced.is_empty() {
            // A stopped grammar (complete from its start) allows only the end.
            let vob = self
                .matcher
                .compute_mask_or_eos()
                .map_err(|e| e.to_string())?;
            mask.words.clear();
            mask.words.extend_from_slice(vob.as_slice());
            if vob.is_allowed(self.compiled.eos) {
                for &id in self.compiled.eos_ids.iter() {
                    let w = id as usize / 32;
                    if w >= mask.words.len() {
                        mask.words.resize(w + 1, 0);
                    }
                    mask.words[w] |= 1 << (id % 32);
                }
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
                    self.state = if forced.is_empty() {
                        State::Active
                    } else {
                        State::Draining
                    };
                }
                Ok(Progress::Open)
            }
            State::Draining => {
                if forced.is_empty() {
                    self.state = State::Active;
                }
                Ok(Progress::Open)
            }
            State::Active => {
                let token = self.own_id(token);
                self.worked = true;
                self.matcher
                    .consume_token(token)
                    .map_err(|e| e.to_string())?;
                self.check()?;
                if self.matcher.is_stopped() {
                    return Ok(Progress::Done);
                }
                Ok(Progress::Open)
            }
        }
    }
}

impl Drop for GrammarConstraint {
    fn drop(&mut self) {
        // A shared lexer is the template's already.
        if self.worked && self.private && !self.matcher.is_error() {
            let placeholder = Matcher::new(Err(anyhow::anyhow!("handed back")));
            self.compiled
                .offer(std::mem::replace(&mut self.matcher, placeholder));
        }
    }
}
