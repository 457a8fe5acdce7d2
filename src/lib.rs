//! Distillery: an OpenAI-compatible serving daemon for small distilled student LLMs.
//!
//! Dependencies point one way: `server` → `engine` → `model`; `tokenizer` is used by the
//! server (and the one-shot generator); results travel back as events over channels.
//! `metrics` depends on none of them: the server (and, through a step observer the server
//! wires up, the engine thread) hand it plain numbers.

pub mod config;
pub mod engine;
pub mod kv_events;
pub mod metrics;
pub mod model;
pub mod reasoning;
pub mod server;
pub mod structured;
pub mod tokenizer;
pub mod tools;
