//! Requests and answers of the constrained-decoding tests (structured outputs, tool calls):
//! bodies for either route, sampled settings, two tools with bounded arguments, a real
//! JSON-schema validator.

use jsonschema::Validator;
use serde_json::{json, Value};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Chat,
    Completions,
}

impl Route {
    pub fn path(self) -> &'static str {
        match self {
            Route::Chat => "/v1/chat/completions",
            Route::Completions => "/v1/completions",
        }
    }

    /// A request of this route (one user message, or a prompt) with `fields` added.
    pub fn body(self, prompt: &str, fields: Value) -> Value {
        let mut body = match self {
            Route::Chat => json!({"messages": [{"role": "user", "content": prompt}]}),
            Route::Completions => json!({ "prompt": prompt }),
        };
        merge(&mut body, fields);
        body
    }

    /// Each choice's text and finish reason, in index order.
    pub fn outputs(self, v: &Value) -> Vec<(String, String)> {
        let mut choices: Vec<&Value> = v["choices"].as_array().expect("choices").iter().collect();
        choices.sort_by_key(|c| c["index"].as_u64().expect("index"));
        choices
            .iter()
            .map(|c| {
                let text = match self {
                    Route::Chat => &c["message"]["content"],
                    Route::Completions => &c["text"],
                };
                (
                    text.as_str()
                        .unwrap_or_else(|| panic!("no text in {c}"))
                        .to_string(),
                    c["finish_reason"]
                        .as_str()
                        .expect("finish_reason")
                        .to_string(),
                )
            })
            .collect()
    }
}

/// Adds `fields`' keys to the object `body`.
pub fn merge(body: &mut Value, fields: Value) {
    let Value::Object(fields) = fields else {
        panic!("fields must be an object: {fields}")
    };
    let body = body.as_object_mut().expect("an object body");
    body.extend(fields);
}

/// Temperature 1 over the whole vocabulary (the models' generation configs say 0.6 and a
/// top_p), `n` choices from `seed`.
pub fn sampled(seed: u64, n: usize, max_tokens: usize) -> Value {
    json!({"temperature": 1.0, "top_p": 1.0, "seed": seed, "n": n, "max_tokens": max_tokens})
}

/// A JSON-schema validator of `schema`, which must be valid.
pub fn validator(schema: &Value) -> Validator {
    jsonschema::validator_for(schema)
        .unwrap_or_else(|e| panic!("the test's schema is not a valid JSON schema: {e}: {schema}"))
}

/// Two tools whose arguments are bounded (a random model ends bounded values).
pub fn tools() -> Value {
    json!([
        {"type": "function", "function": {
            "name": "get_weather", "description": "The weather in a city.",
            "parameters": {"type": "object",
                "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 10},
                               "unit": {"enum": ["celsius", "fahrenheit"]},
                               "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                "required": ["city"], "additionalProperties": false}}},
        {"type": "function", "function": {
            "name": "lookup_order",
            "parameters": {"type": "object",
                "properties": {"order_id": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"},
                               "items": {"type": "array", "maxItems": 2,
                                         "items": {"type": "object",
                                                   "properties": {"sku": {"type": "string", "maxLength": 6},
                                                                  "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
                                                   "required": ["sku", "qty"],
                                                   "additionalProperties": false}},
                               "express": {"type": "boolean"}},
                "required": ["order_id"], "additionalProperties": false}}}
    ])
}
