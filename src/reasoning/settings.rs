//! The reasoning settings an operator gives (`--reasoning-parser`, `--reasoning-budget`,
//! `--reasoning-budget-message`, `--reasoning-effort-budgets`) and their parsing.

use serde::{Deserialize, Deserializer};

/// `--reasoning-parser`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum ReasoningParserChoice {
    /// On when the tokenizer has `<think>` and `</think>` as tokens and the chat template
    /// writes `<think>`.
    Auto,
    /// DeepSeek-R1's `<think>…</think>`, required to be there.
    #[value(name = "deepseek_r1")]
    DeepseekR1,
    /// Off: all output is content.
    None,
}

/// A request's `reasoning_effort`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effort {
    Low,
    Medium,
    High,
}

impl Effort {
    pub const NAMES: [&'static str; 3] = ["low", "medium", "high"];

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "low" => Some(Self::Low),
            "medium" => Some(Self::Medium),
            "high" => Some(Self::High),
            _ => None,
        }
    }
}

/// The budget of each `reasoning_effort` (`None`: unbounded).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EffortBudgets {
    pub low: Option<usize>,
    pub medium: Option<usize>,
    pub high: Option<usize>,
}

impl Default for EffortBudgets {
    /// R1 students often think for thousands of tokens; `low` leaves room for a short plan,
    /// `high` for a long derivation.
    fn default() -> Self {
        Self {
            low: Some(512),
            medium: Some(2048),
            high: Some(8192),
        }
    }
}

impl EffortBudgets {
    pub fn budget(&self, effort: Effort) -> Option<usize> {
        match effort {
            Effort::Low => self.low,
            Effort::Medium => self.medium,
            Effort::High => self.high,
        }
    }

    /// `low=512,medium=2048,high=-1`: any subset, the rest keep their defaults; -1 is
    /// unbounded.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut out = Self::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, value) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?} is not name=tokens (e.g. low=512)"))?;
            let value = parse_budget(value.trim())?;
            match Effort::parse(name.trim()) {
                Some(Effort::Low) => out.low = value,
                Some(Effort::Medium) => out.medium = value,
                Some(Effort::High) => out.high = value,
                None => {
                    return Err(format!(
                        "unknown effort {name:?}; expected one of {:?}",
                        Effort::NAMES
                    ))
                }
            }
        }
        Ok(out)
    }
}

impl std::fmt::Display for EffortBudgets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |b: Option<usize>| b.map_or("-1".to_string(), |n| n.to_string());
        write!(
            f,
            "low={},medium={},high={}",
            show(self.low),
            show(self.medium),
            show(self.high)
        )
    }
}

impl<'de> Deserialize<'de> for EffortBudgets {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A budget as the operator writes it: tokens, or -1 for unbounded.
pub fn parse_budget(s: &str) -> Result<Option<usize>, String> {
    let n: i64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a token count (-1: unbounded)"))?;
    match n {
        -1 => Ok(None),
        n if n >= 0 => Ok(Some(n as usize)),
        n => Err(format!(
            "a reasoning budget is -1 (unbounded) or at least 0, got {n}"
        )),
    }
}

/// Everything the operator says about reasoning.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReasoningSettings {
    pub parser: ReasoningParserChoice,
    /// Budget for requests that set none: -1 unbounded.
    pub budget: i64,
    /// Forced to end a thought whose budget is spent; must contain `</think>`.
    pub budget_message: String,
    pub effort: EffortBudgets,
}

impl Default for ReasoningSettings {
    fn default() -> Self {
        Self {
            parser: ReasoningParserChoice::Auto,
            budget: -1,
            budget_message: "\n</think>\n\n".into(),
            effort: EffortBudgets::default(),
        }
    }
}

impl ReasoningSettings {
    pub fn validate(&self) -> Result<(), String> {
        if self.budget < -1 {
            return Err(format!(
                "reasoning_budget must be -1 (unbounded) or at least 0, got {}",
                self.budget
            ));
        }
        Ok(())
    }

    pub fn default_budget(&self) -> Option<usize> {
        usize::try_from(self.budget).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effort_budgets_parse_any_subset_and_minus_one_is_unbounded() {
        let b = EffortBudgets::parse("low=16, high=-1").unwrap();
        assert_eq!(b.low, Some(16));
        assert_eq!(b.medium, EffortBudgets::default().medium);
        assert_eq!(b.high, None);
        assert_eq!(EffortBudgets::parse(&b.to_string()).unwrap(), b);
        assert!(EffortBudgets::parse("extreme=5")
            .unwrap_err()
            .contains("extreme"));
        assert!(EffortBudgets::parse("low=-2").is_err());
        assert!(EffortBudgets::parse("low").is_err());
    }
}
