//! Structured outputs: a request's JSON schema, regex, choice list, Lark grammar or tool-call
//! format, compiled by llguidance into a token parser whose mask constrains decoding.
//!
//! Owns the grammar each kind of request becomes ([`GrammarSpec`]), compilation with a
//! bounded cache keyed by the grammar's text ([`Grammars`]; the tokenizer is the server's
//! one, so it is part of every key implicitly), and the per-choice constraint that the engine
//! runs through its [`crate::engine::constraint`] seam ([`GrammarConstraint`]): the mask of
//! allowed tokens, the tokens the grammar alone allows (forced), the end of the grammar, and
//! a gate that holds the constraint off until the reasoning is over.
//!
//! It must not know HTTP or OpenAI's field names (the server maps its fields onto a
//! [`GrammarSpec`] and names the field in errors), the engine's scheduling, or text beyond
//! the grammar's own.

mod compiler;
mod constraint;
mod strict;

pub use compiler::{Compiled, GrammarError, Grammars, MAX_GRAMMAR_BYTES};
pub use constraint::{Gate, GrammarConstraint};
pub use strict::closed_objects;

use serde_json::Value;

/// What a request constrains its output to.
#[derive(Clone, Debug, PartialEq)]
pub enum GrammarSpec {
    /// A JSON schema (`json_object` is `{"type": "object"}`).
    JsonSchema(Value),
    /// A regular expression the whole output matches.
    Regex(String),
    /// One of these strings exactly.
    Choice(Vec<String>),
    /// A grammar in llguidance's Lark syntax (tool calls are written as one).
    Lark(String),
}

/// Why a request is constrained, for the metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    JsonSchema,
    JsonObject,
    Regex,
    Choice,
    Grammar,
    ToolCall,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::JsonSchema => "json_schema",
            Self::JsonObject => "json_object",
            Self::Regex => "regex",
            Self::Choice => "choice",
            Self::Grammar => "grammar",
            Self::ToolCall => "tool_call",
        }
    }
}

impl GrammarSpec {
    /// `json_object`: any JSON object.
    pub fn json_object() -> Self {
        Self::JsonSchema(serde_json::json!({"type": "object"}))
    }

    /// Roughly how large the grammar's source is.
    pub fn source_len(&self) -> usize {
        match self {
            Self::JsonSchema(_) => self.key().len(),
            Self::Regex(r) => r.len(),
            Self::Choice(c) => c.iter().map(|s| s.len() + 3).sum(),
            Self::Lark(g) => g.len(),
        }
    }

    /// The text the cache keys on and the size limit applies to.
    pub(crate) fn key(&self) -> String {
        match self {
            Self::JsonSchema(v) => format!("json:{v}"),
            Self::Regex(r) => format!("regex:{r}"),
            Self::Choice(c) => format!("choice:{}", Value::from(c.clone())),
            Self::Lark(g) => format!("lark:{g}"),
        }
    }
}

/// A JSON string literal, as Lark and JSON both write one.
pub fn quoted(s: &str) -> String {
    Value::from(s).to_string()
}

#[cfg(test)]
mod tests;
