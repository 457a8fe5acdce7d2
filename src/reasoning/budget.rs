//! The thinking budget: once a choice has written its budget of reasoning tokens without
//! closing the thought, the end-of-thinking text is forced and the model goes on to answer.

use std::collections::VecDeque;
use std::sync::Arc;

use super::tracker::{Phase, ThinkTokens, ThinkTracker, TokenRole};
use crate::engine::{Steer, SteerFactory};

/// One choice's budget, run by the engine as its steer.
pub struct ThinkingBudget {
    tracker: ThinkTracker,
    budget: usize,
    end_ids: Arc<[u32]>,
    /// The end text has been queued; it is never queued twice.
    spent: bool,
}

impl ThinkingBudget {
    pub fn new(tokens: ThinkTokens, start: Phase, budget: usize, end_ids: Arc<[u32]>) -> Self {
        Self {
            tracker: ThinkTracker::new(tokens, start),
            budget,
            end_ids,
            spent: false,
        }
    }

    /// A budget per choice, each starting at `start`.
    pub fn factory(
        tokens: ThinkTokens,
        start: Phase,
        budget: usize,
        end_ids: Arc<[u32]>,
    ) -> SteerFactory {
        Arc::new(move |_choice| Box::new(Self::new(tokens, start, budget, end_ids.clone())))
    }
}

impl Steer for ThinkingBudget {
    fn observe(&mut self, token: u32, forced: &mut VecDeque<u32>) {
        let role = self.tracker.push(token);
        if self.spent || role != TokenRole::Reasoning {
            return;
        }
        if self.tracker.phase() == Phase::Thinking && self.tracker.reasoning_tokens() >= self.budget
        {
            self.spent = true;
            forced.extend(self.end_ids.iter().copied());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: ThinkTokens = ThinkTokens { start: 10, end: 11 };

    fn run(budget: usize, sampled: &[u32]) -> Vec<u32> {
        let mut b = ThinkingBudget::new(T, Phase::Thinking, budget, Arc::from(&[5, 11, 6][..]));
        let mut forced = VecDeque::new();
        let mut out = Vec::new();
        let mut sampled = sampled.iter().copied();
        while out.len() < 12 {
            let Some(t) = forced.pop_front().or_else(|| sampled.next()) else {
                break;
            };
            out.push(t);
            b.observe(t, &mut forced);
        }
        out
    }

    #[test]
    fn the_end_text_follows_the_last_budgeted_token_once() {
        assert_eq!(run(2, &[1, 2, 3, 4]), [1, 2, 5, 11, 6, 3, 4]);
    }

    #[test]
    fn a_thought_that_ends_within_budget_is_left_alone() {
        assert_eq!(run(3, &[1, 11, 2, 3, 4]), [1, 11, 2, 3, 4]);
    }

    #[test]
    fn markers_do_not_spend_the_budget() {
        assert_eq!(run(2, &[10, 1, 2, 3]), [10, 1, 2, 5, 11, 6, 3]);
    }
}
