//! A chat answer's tool calls in OpenAI's shapes: the message's `tool_calls` once the answer
//! is whole, or per streamed chunk the `delta.tool_calls` pieces (the first of a call with
//! its `index`, `id`, `type` and name, then fragments of its arguments).
//!
//! The parsing is [`crate::tools`]'; this file names the calls and shapes them.

use super::protocol::{ChatDelta, FunctionCallOut, FunctionDelta, ToolCallDelta, ToolCallOut};
use crate::tools::{ToolDelta, ToolFormat, ToolStream};

/// OpenAI's ids are opaque; vLLM's read `chatcmpl-tool-…`.
pub fn call_id() -> String {
    format!("chatcmpl-tool-{:032x}", rand::random::<u128>())
}

/// A whole answer: its content (`None` when it was only calls) and its calls.
pub fn split_answer(format: ToolFormat, text: &str) -> (Option<String>, Vec<ToolCallOut>) {
    let parsed = format.parse(text);
    if parsed.calls.is_empty() {
        return (Some(text.to_string()), Vec::new());
    }
    let calls = parsed
        .calls
        .into_iter()
        .map(|c| ToolCallOut {
            id: call_id(),
            kind: "function",
            function: FunctionCallOut {
                name: c.name,
                arguments: c.arguments,
            },
        })
        .collect();
    (parsed.content, calls)
}

/// One streamed choice's calls.
pub struct StreamedCalls {
    stream: ToolStream,
    /// Calls started so far.
    pub started: usize,
}

/// What one text delta becomes.
#[derive(Debug, Default, PartialEq)]
pub struct ChunkParts {
    pub content: String,
    pub calls: Vec<ToolCallDelta>,
}

impl ChunkParts {
    pub fn is_empty(&self) -> bool {
        self.content.is_empty() && self.calls.is_empty()
    }

    /// As a chunk's delta: the content and the calls, each only when there is some.
    pub fn into_delta(self) -> ChatDelta {
        ChatDelta {
            content: (!self.content.is_empty()).then_some(self.content),
            tool_calls: (!self.calls.is_empty()).then_some(self.calls),
            ..ChatDelta::default()
        }
    }
}

impl StreamedCalls {
    pub fn new(format: ToolFormat) -> Self {
        Self {
            stream: format.streamer(),
            started: 0,
        }
    }

    pub fn push(&mut self, text: &str) -> ChunkParts {
        let deltas = self.stream.push(text);
        self.shape(deltas)
    }

    /// The answer ended: what was held back.
    pub fn finish(&mut self) -> ChunkParts {
        let deltas = self.stream.finish();
        self.shape(deltas)
    }

    fn shape(&mut self, deltas: Vec<ToolDelta>) -> ChunkParts {
        let mut parts = ChunkParts::default();
        for d in deltas {
            match d {
                ToolDelta::Content(t) => parts.content.push_str(&t),
                ToolDelta::CallStart { index, name } => {
                    self.started = self.started.max(index + 1);
                    parts.calls.push(ToolCallDelta {
                        index,
                        id: Some(call_id()),
                        kind: Some("function"),
                        function: FunctionDelta {
                            name: Some(name),
                            arguments: String::new(),
                        },
                    });
                }
                ToolDelta::Arguments { index, fragment } => parts.calls.push(ToolCallDelta {
                    index,
                    id: None,
                    kind: None,
                    function: FunctionDelta {
                        name: None,
                        arguments: fragment,
                    },
                }),
            }
        }
        parts
    }
}
