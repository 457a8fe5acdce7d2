//! Reasoning ("thinking") output of R1-style students: which tokens open and close it, how a
//! choice's output splits into reasoning and answer, and the thinking budget.
//!
//! Owns the `<think>`/`</think>` state machine ([`ThinkTracker`]), the per-request plan
//! ([`Reasoning::plan`]: the budget in force, the prompt's end-of-thinking text for budget 0,
//! the steer that forces that text once a budget is spent) and the settings behind them. It
//! works on token ids, never on text, so a `</think>` inside the model's prose cannot fool it.
//!
//! It must not know HTTP, JSON or the engine's scheduling: the server asks it for a plan and
//! feeds its tracker the tokens it receives; the engine runs its [`budget::ThinkingBudget`]
//! through the general forced-token seam ([`crate::engine::steer`]) without knowing why.

mod budget;
mod settings;
mod tracker;

pub use budget::ThinkingBudget;
pub use settings::{Effort, EffortBudgets, ReasoningParserChoice, ReasoningSettings};
pub use tracker::{Phase, ThinkTokens, ThinkTracker, TokenRole};

use std::sync::Arc;

use crate::engine::SteerFactory;
use crate::tokenizer::Tokenizer;

/// The text the R1 family writes around its reasoning.
pub const THINK_START: &str = "<think>";
pub const THINK_END: &str = "</think>";

/// The reasoning parser of a served model, resolved once at start-up.
#[derive(Clone, Debug)]
pub struct Reasoning {
    tokens: ThinkTokens,
    /// The server's budget for requests that set none; `None` is unbounded.
    default_budget: Option<usize>,
    /// `--reasoning-budget-message`, tokenized once.
    end_ids: Arc<[u32]>,
    effort: EffortBudgets,
}

/// What one chat request does about reasoning.
#[derive(Clone)]
pub struct ReasoningPlan {
    pub tokens: ThinkTokens,
    /// The budget in force; `None` is unbounded.
    pub budget: Option<usize>,
    /// Ids appended to the prompt (budget 0 while the prompt is inside `<think>`).
    pub prompt_suffix: Arc<[u32]>,
    /// Where the output starts, once `prompt_suffix` is appended.
    pub start: Phase,
    /// Forces the end-of-thinking text once the budget is spent; `None` when nothing is to be
    /// forced.
    pub steer: Option<SteerFactory>,
}

impl ReasoningPlan {
    /// A fresh tracker for one choice's output.
    pub fn tracker(&self) -> ThinkTracker {
        ThinkTracker::new(self.tokens, self.start)
    }
}

impl Reasoning {
    /// The parser `settings` asks for, for this tokenizer: `Ok(None)` when it is off (`none`,
    /// or `auto` on a model without `<think>`/`</think>` tokens or a template that never
    /// writes `<think>`); an error when `deepseek_r1` is forced on a tokenizer that lacks the
    /// tokens or the budget message cannot end a thought.
    pub fn resolve(
        settings: &ReasoningSettings,
        tokenizer: &Tokenizer,
    ) -> Result<Option<Self>, String> {
        let ids = (
            tokenizer.token_to_id(THINK_START),
            tokenizer.token_to_id(THINK_END),
        );
        let tokens = match (settings.parser, ids) {
            (ReasoningParserChoice::None, _) => return Ok(None),
            (ReasoningParserChoice::DeepseekR1, (Some(start), Some(end))) => {
                ThinkTokens { start, end }
            }
            (ReasoningParserChoice::DeepseekR1, _) => {
                return Err(format!(
                    "--reasoning-parser deepseek_r1 needs {THINK_START} and {THINK_END} as \
                     single tokens, and this model's tokenizer lacks them (use auto or none)"
                ))
            }
            (ReasoningParserChoice::Auto, (Some(start), Some(end))) => {
                let thinks = tokenizer
                    .chat_template()
                    .is_some_and(|t| t.source().contains(THINK_START));
                if !thinks {
                    return Ok(None);
                }
                ThinkTokens { start, end }
            }
            (ReasoningParserChoice::Auto, _) => return Ok(None),
        };
        let end_ids = tokenizer
            .encode(&settings.budget_message, false)
            .map_err(|e| format!("--reasoning-budget-message: {e}"))?;
        if !end_ids.contains(&tokens.end) {
            return Err(format!(
                "--reasoning-budget-message {:?} must contain {THINK_END}, which ends the \
                 reasoning",
                settings.budget_message
            ));
        }
        Ok(Some(Self {
            tokens,
            default_budget: settings.default_budget(),
            end_ids: end_ids.into(),
            effort: settings.effort,
        }))
    }

    pub fn tokens(&self) -> ThinkTokens {
        self.tokens
    }

    pub fn default_budget(&self) -> Option<usize> {
        self.default_budget
    }

    pub fn effort_budgets(&self) -> EffortBudgets {
        self.effort
    }

    /// The budget-message ids forced when a budget runs out.
    pub fn end_ids(&self) -> &[u32] {
        &self.end_ids
    }

    /// The budget for a request: its `max_reasoning_tokens`, else its `reasoning_effort`, else
    /// the server's default.
    pub fn budget_for(
        &self,
        max_reasoning_tokens: Option<usize>,
        effort: Option<Effort>,
    ) -> Option<usize> {
        match (max_reasoning_tokens, effort) {
            (Some(n), _) => Some(n),
            (None, Some(e)) => self.effort.budget(e),
            (None, None) => self.default_budget,
        }
    }

    /// How a request with `prompt` and `budget` is served.
    pub fn plan(&self, prompt: &[u32], budget: Option<usize>) -> ReasoningPlan {
        let start = ThinkTracker::phase_after(self.tokens, prompt);
        let thinking = start == Phase::Thinking;
        let (prompt_suffix, start): (Arc<[u32]>, Phase) = match budget {
            // No thinking at all: the thought is over before the model writes anything.
            Some(0) if thinking => (self.end_ids.clone(), Phase::Answering),
            _ => (Arc::from(&[][..]), start),
        };
        let steer = match budget {
            Some(b) if b > 0 && start == Phase::Thinking => Some(ThinkingBudget::factory(
                self.tokens,
                start,
                b,
                self.end_ids.clone(),
            )),
            _ => None,
        };
        ReasoningPlan {
            tokens: self.tokens,
            budget,
            prompt_suffix,
            start,
            steer,
        }
    }
}
