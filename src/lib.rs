//! Distillery: an OpenAI-compatible serving daemon for small distilled student LLMs.
//!
//! Dependencies point one way: `server` → `engine` → `model`; `tokenizer` is used by the
//! server (and the one-shot generator); results travel back as events over channels.

pub mod config;
pub mod engine;
pub mod model;
pub mod server;
pub mod tokenizer;
