//! Forced tokens: a per-choice hook that may put the next tokens of a choice in front of the
//! sampler.
//!
//! A [`Steer`] sees every token its choice emits, in order, and may queue tokens to come next.
//! A queued token is not sampled: at the choice's next sample point it is taken as the token
//! (and its logprob is the model's own, when logprobs are asked for), then written to the KV
//! cache by the next forward like any other. Without logprobs the rest of the queue goes out
//! in the same step (jump forward) and the next forward computes it as one chunk. Queued tokens are part of the output: they count
//! towards `max_tokens`, take part in stop checks and penalties, and survive preemption by
//! recompute because the queue and the steer live in the sequence. Each choice of an `n > 1`
//! request gets its own steer.
//!
//! The engine knows nothing of why tokens are forced: the reasoning budget
//! (`crate::reasoning`) queues its end-of-thinking text here; a grammar can queue the tokens
//! it alone allows.

use std::collections::VecDeque;
use std::sync::Arc;

use super::constraint::{Constrained, ConstraintFactory, Pick, Progress, TokenMask};

/// Decides the forced tokens of one choice. Runs on the engine thread, once per emitted token:
/// it must be cheap and must not block.
pub trait Steer: Send {
    /// `token` was just appended to the choice's output (sampled or forced). Tokens pushed
    /// onto `forced` are emitted next, before anything is sampled again.
    fn observe(&mut self, token: u32, forced: &mut VecDeque<u32>);
}

/// Makes the steer of each choice (its index is the argument).
pub type SteerFactory = Arc<dyn Fn(usize) -> Box<dyn Steer> + Send + Sync>;

/// A choice's forced-token state and its constraint, kept in its sequence.
#[derive(Default)]
pub(super) struct Steering {
    steer: Option<Box<dyn Steer>>,
    constraint: Option<Constrained>,
    forced: VecDeque<u32>,
}

impl Steering {
    pub(super) fn new(
        factory: Option<&SteerFactory>,
        constraint: Option<&ConstraintFactory>,
        choice: usize,
    ) -> Self {
        let mut forced = VecDeque::new();
        let constraint = constraint.map(|f| Constrained::new(f(choice), &mut forced));
        Self {
            steer: factory.map(|f| f(choice)),
            constraint,
            forced,
        }
    }

    /// Its next sample point is constrained and not forced: a mask is needed.
    pub(super) fn needs_mask(&self) -> bool {
        self.forced.is_empty() && self.constraint.as_ref().is_some_and(|c| c.is_active())
    }

    /// Prepares the coming sample point of a constrained choice: its forced tokens or its
    /// mask. The step does it ahead, beside the forward; the sample point does what is left.
    pub(super) fn prepare_mask(&mut self, with_mask: bool) {
        if let Some(c) = self.constraint.as_mut() {
            c.prepare(&mut self.forced, with_mask);
        }
    }

    /// Greedy decoding of a prepared sample point with nothing forced (`best` is the row's
    /// argmax): `None` when unconstrained.
    pub(super) fn greedy(&mut self, logits: &[f32], best: u32) -> Result<Option<Pick>, String> {
        match self.constraint.as_mut() {
            Some(c) if c.is_active() => c.greedy(logits, best).map(Some),
            Some(c) => c.mask().map(|_| None),
            None => Ok(None),
        }
    }

    /// The allowed tokens at this sample point (once prepared and nothing forced): `Ok(None)`
    /// when unconstrained.
    pub(super) fn mask(&self) -> Result<Option<&TokenMask>, String> {
        match self.constraint.as_ref() {
            Some(c) => c.mask(),
            None => Ok(None),
        }
    }

    /// Constrained now, or may be later in the output (a device-side argmax would skip it).
    pub(super) fn has_constraint(&self) -> bool {
        self.constraint.is_some()
    }

    /// The token to emit instead of sampling, if one is queued.
    pub(super) fn next_forced(&mut self) -> Option<u32> {
        self.forced.pop_front()
    }

    pub(super) fn has_forced(&self) -> bool {
        !self.forced.is_empty()
    }

    /// Tells the steer and the constraint of the token just emitted. The steer's forced
    /// tokens come first: the constraint sees them as they are emitted.
    pub(super) fn observe(&mut self, token: u32) -> Result<Progress, String> {
        if let Some(steer) = self.steer.as_mut() {
            steer.observe(token, &mut self.forced);
        }
        match self.constraint.as_mut() {
            Some(c) => c.observe(token, &mut self.forced),
            None => Ok(Progress::Open),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Forces `then` once after seeing `after`.
    struct After {
        after: u32,
        then: Vec<u32>,
    }

    impl Steer for After {
        fn observe(&mut self, token: u32, forced: &mut VecDeque<u32>) {
            if token == self.after {
                forced.extend(self.then.drain(..));
            }
        }
    }

    #[test]
    fn queued_tokens_come_out_in_order_and_are_observed_too() {
        let factory: SteerFactory = Arc::new(|_| {
            Box::new(After {
                after: 7,
                then: vec![1, 2],
            })
        });
        let mut s = Steering::new(Some(&factory), None, 0);
        assert_eq!(s.next_forced(), None);
        s.observe(7).unwrap();
        assert!(s.has_forced());
        let a = s.next_forced().unwrap();
        s.observe(a).unwrap();
        let b = s.next_forced().unwrap();
        s.observe(b).unwrap();
        assert_eq!((a, b), (1, 2));
        assert_eq!(s.next_forced(), None);
        // The steer gave its tokens away: seeing 7 again forces nothing.
        s.observe(7).unwrap();
        assert_eq!(s.next_forced(), None);
    }

    #[test]
    fn no_factory_means_nothing_is_ever_forced() {
        let mut s = Steering::new(None, None, 3);
        s.observe(7).unwrap();
        assert!(!s.has_forced());
    }
}
