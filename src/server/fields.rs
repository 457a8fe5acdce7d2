//! Request fields that OpenAI or vLLM define and Distillery does not implement: each one that
//! would change what is generated or returned is refused (400 naming it) unless it holds its
//! inert value; the informational ones are accepted and do nothing.
//!
//! Owns the two lists; knows nothing of how the fields it does implement are used. A field
//! that neither lists nor any server defines is ignored, as OpenAI ignores it.

use serde_json::{Map, Value};

use super::error::ApiError;

/// Which endpoint a request came to (some fields exist on one only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

/// A field we refuse, and the value at which it asks for nothing (it may be sent then).
pub struct Refused {
    pub field: &'static str,
    pub inert: Inert,
    pub why: &'static str,
}

#[derive(Clone, Copy, Debug)]
pub enum Inert {
    /// Only `null` (or absence) asks for nothing.
    Null,
    /// `null`, `false`.
    False,
    /// `null`, `true`.
    True,
    /// `null`, `""`.
    EmptyString,
    /// `null`, `[]`, `{}`.
    Empty,
    /// `null` or this number.
    Number(f64),
    /// `null` or this string.
    Str(&'static str),
    /// `null` or a list of exactly these strings.
    Strings(&'static [&'static str]),
}

impl Inert {
    fn holds(self, v: &Value) -> bool {
        match (self, v) {
            (_, Value::Null) => true,
            (Self::False, Value::Bool(false)) => true,
            (Self::True, Value::Bool(true)) => true,
            (Self::EmptyString, Value::String(s)) => s.is_empty(),
            (Self::Empty, Value::Array(a)) => a.is_empty(),
            (Self::Empty, Value::Object(o)) => o.is_empty(),
            (Self::Number(n), Value::Number(x)) => x.as_f64() == Some(n),
            (Self::Str(s), Value::String(x)) => x == s,
            (Self::Strings(want), Value::Array(a)) => {
                a.len() == want.len() && a.iter().zip(want).all(|(x, w)| x.as_str() == Some(*w))
            }
            _ => false,
        }
    }
}

/// Refused on both endpoints.
pub const REFUSED: &[Refused] = &[
    Refused {
        field: "guided_whitespace_pattern",
        inert: Inert::Null,
        why: "JSON is written compact (structured_outputs.disable_any_whitespace: false allows \
              any whitespace)",
    },
    Refused {
        field: "use_beam_search",
        inert: Inert::False,
        why: "beam search is not implemented",
    },
    Refused {
        field: "length_penalty",
        inert: Inert::Number(1.0),
        why: "length_penalty applies to beam search, which is not implemented",
    },
    Refused {
        field: "include_stop_str_in_output",
        inert: Inert::False,
        why: "the matched stop string is never included",
    },
    Refused {
        field: "allowed_token_ids",
        inert: Inert::Null,
        why: "restricting the vocabulary is not implemented",
    },
    Refused {
        field: "bad_words",
        inert: Inert::Empty,
        why: "bad_words is not implemented",
    },
    Refused {
        field: "logits_processors",
        inert: Inert::Empty,
        why: "custom logits processors are not supported",
    },
    Refused {
        field: "truncate_prompt_tokens",
        inert: Inert::Null,
        why: "prompts are never truncated: a prompt too long is refused",
    },
    Refused {
        field: "spaces_between_special_tokens",
        inert: Inert::True,
        why: "special tokens are always decoded as the tokenizer joins them",
    },
    Refused {
        field: "return_tokens_as_token_ids",
        inert: Inert::False,
        why: "tokens are returned as text",
    },
    Refused {
        field: "prompt_embeds",
        inert: Inert::Null,
        why: "prompt embeddings are not accepted",
    },
    Refused {
        field: "cache_salt",
        inert: Inert::EmptyString,
        why: "per-tenant prefix-cache isolation is not implemented",
    },
    Refused {
        field: "priority",
        inert: Inert::Number(0.0),
        why: "requests are served first come, first served",
    },
    Refused {
        field: "kv_transfer_params",
        inert: Inert::Null,
        why: "disaggregated prefill is not supported",
    },
    Refused {
        field: "return_token_ids",
        inert: Inert::False,
        why: "token ids are not returned beside the text (logprobs name the tokens)",
    },
    Refused {
        field: "vllm_xargs",
        inert: Inert::Empty,
        why: "no extension arguments are read",
    },
    Refused {
        field: "mm_processor_kwargs",
        inert: Inert::Null,
        why: "the served models take text only",
    },
];

/// Refused on chat only.
pub const REFUSED_CHAT: &[Refused] = &[
    Refused {
        field: "functions",
        inert: Inert::Empty,
        why: "the legacy functions field is not supported; send tools",
    },
    Refused {
        field: "function_call",
        inert: Inert::Str("none"),
        why: "the legacy function_call field is not supported",
    },
    Refused {
        field: "audio",
        inert: Inert::Null,
        why: "the served models take and give text only",
    },
    Refused {
        field: "modalities",
        inert: Inert::Strings(&["text"]),
        why: "the served models give text only",
    },
    Refused {
        field: "prediction",
        inert: Inert::Null,
        why: "predicted outputs are not implemented",
    },
    Refused {
        field: "web_search_options",
        inert: Inert::Null,
        why: "web search is not available",
    },
    Refused {
        field: "verbosity",
        inert: Inert::Null,
        why: "verbosity is not implemented",
    },
    Refused {
        field: "chat_template",
        inert: Inert::Null,
        why: "a per-request chat template is not accepted; the model's own is used",
    },
    Refused {
        field: "documents",
        inert: Inert::Empty,
        why: "documents are not passed to the template",
    },
];

/// Refused on completions only.
pub const REFUSED_COMPLETIONS: &[Refused] = &[Refused {
    field: "suffix",
    inert: Inert::EmptyString,
    why: "insertion (suffix) is not supported by the served models",
}];

/// Accepted and ignored: they describe the request, they do not change the answer.
pub const INFORMATIONAL: &[&str] = &[
    "user",
    "metadata",
    "store",
    "service_tier",
    "safety_identifier",
    "prompt_cache_key",
    "request_id",
];

/// Refuses the first field of `other` (the request's fields without a member of their own)
/// that asks for something not implemented.
pub fn check(other: &Map<String, Value>, endpoint: Endpoint) -> Result<(), ApiError> {
    if other.is_empty() {
        return Ok(());
    }
    let own = match endpoint {
        Endpoint::Chat => REFUSED_CHAT,
        Endpoint::Completions => REFUSED_COMPLETIONS,
    };
    for k in other.keys() {
        if !INFORMATIONAL.contains(&k.as_str()) {
            tracing::debug!(field = %k, "request field ignored");
        }
    }
    for r in REFUSED.iter().chain(own) {
        let Some(v) = other.get(r.field) else {
            continue;
        };
        if !r.inert.holds(v) {
            return Err(ApiError::invalid(
                format!(
                    "{} is not supported: {} (see the README's table of request fields)",
                    r.field, r.why
                ),
                Some(r.field),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn a_field_that_asks_for_something_is_refused_by_name() {
        let e = check(&fields(json!({"suffix": "x"})), Endpoint::Completions).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("suffix"));
        let e = check(
            &fields(json!({"guided_whitespace_pattern": "\\s*"})),
            Endpoint::Chat,
        )
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("guided_whitespace_pattern"));
        let e = check(&fields(json!({"use_beam_search": true})), Endpoint::Chat).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("use_beam_search"));
    }

    #[test]
    fn inert_values_and_informational_fields_pass() {
        for ok in [
            json!({"suffix": ""}),
            json!({"suffix": null}),
            json!({"use_beam_search": false}),
            json!({"length_penalty": 1.0}),
            json!({"response_format": {"type": "text"}}),
            json!({"spaces_between_special_tokens": true}),
            json!({"priority": 0}),
            json!({"user": "u", "metadata": {"a": "b"}, "store": false, "service_tier": "auto"}),
            json!({"some_field_no_server_defines": 3}),
        ] {
            check(&fields(ok.clone()), Endpoint::Completions).unwrap_or_else(|e| {
                panic!("{ok} refused: {}", e.message);
            });
        }
        check(&fields(json!({"tool_choice": "none"})), Endpoint::Chat).unwrap();
        check(&fields(json!({"modalities": ["text"]})), Endpoint::Chat).unwrap();
        assert!(check(
            &fields(json!({"modalities": ["text", "audio"]})),
            Endpoint::Chat
        )
        .is_err());
        // suffix is a completions field: a chat client sending it sends nothing we define.
        check(&fields(json!({"suffix": "x"})), Endpoint::Chat).unwrap();
        assert!(check(
            &fields(json!({"spaces_between_special_tokens": false})),
            Endpoint::Chat
        )
        .is_err());
    }
}
