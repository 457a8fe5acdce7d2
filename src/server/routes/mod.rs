//! The HTTP routes, one file per family.

pub mod chat;
pub mod completions;
pub mod info;
pub mod tokenize;
pub mod worker;
