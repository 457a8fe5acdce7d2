//! OpenAI's wire types as OpenAI and vLLM accept and return them. A wrong type is an error
//! naming the field (see `json.rs`). Fields with no member here land in each request's `other`
//! map, where `fields.rs` refuses those that would change the answer and lets the rest be.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// `prompt`: a string, strings, token ids, or lists of token ids.
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum StopSpec {
    One(String),
    Many(Vec<String>),
}

impl StopSpec {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

#[derive(Deserialize, Debug, Clone, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
    /// vLLM's: usage (so far) on every chunk, not only at the end.
    #[serde(default)]
    pub continuous_usage_stats: bool,
}

/// Sampling fields shared by both endpoints.
#[derive(Deserialize, Debug, Clone, Default)]
pub struct SamplingFields {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub n: Option<u32>,
    pub stop: Option<StopSpec>,
    pub stop_token_ids: Option<Vec<u32>>,
    /// Any signed 64-bit integer (vLLM's range); its bits seed the generator.
    pub seed: Option<i64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub logit_bias: Option<HashMap<String, f32>>,
    pub ignore_eos: Option<bool>,
    pub min_tokens: Option<u32>,
    pub skip_special_tokens: Option<bool>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
}

#[derive(Deserialize, Debug, Clone)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: Prompt,
    pub max_tokens: Option<u32>,
    /// Completions: how many top logprobs per token (0..=20).
    pub logprobs: Option<u32>,
    pub echo: Option<bool>,
    /// vLLM's: the top-N logprobs of every prompt token (`choices[].prompt_logprobs`).
    pub prompt_logprobs: Option<u32>,
    /// Sample this many and return the `n` with the highest cumulative logprob.
    pub best_of: Option<u32>,
    /// Whether the tokenizer adds its special tokens (BOS) to a text prompt (default true).
    pub add_special_tokens: Option<bool>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
    /// Every other field, for `fields::check` (after the flattened sampling fields took theirs).
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

/// Message content: a string, or text parts.
#[derive(Deserialize, Serialize, Debug, Clone)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize, Serialize, Debug, Clone)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

/// One chat message. Only a JSON object is a message: serde's derive would also take an array
/// as the fields in order (`["user", "hi"]`), which no client means.
#[derive(Debug, Clone)]
pub struct ChatMessageIn {
    pub role: String,
    pub content: Option<Content>,
    /// An assistant turn's calls, passed to the template as sent.
    pub tool_calls: Option<serde_json::Value>,
    /// A `tool` turn's answer to a call.
    pub tool_call_id: Option<String>,
    pub name: Option<String>,
    /// An earlier answer's reasoning, as vLLM returned it (either name).
    pub reasoning_content: Option<String>,
    pub reasoning: Option<String>,
}

#[derive(Deserialize)]
struct ChatMessageFields {
    role: String,
    #[serde(default)]
    content: Option<Content>,
    #[serde(default)]
    tool_calls: Option<serde_json::Value>,
    #[serde(default)]
    tool_call_id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    reasoning_content: Option<String>,
    #[serde(default)]
    reasoning: Option<String>,
}

impl<'de> Deserialize<'de> for ChatMessageIn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Object;
        impl<'de> serde::de::Visitor<'de> for Object {
            type Value = ChatMessageFields;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a message object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                ChatMessageFields::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }
        let m = d.deserialize_map(Object)?;
        Ok(Self {
            role: m.role,
            content: m.content,
            tool_calls: m.tool_calls,
            tool_call_id: m.tool_call_id,
            name: m.name,
            reasoning_content: m.reasoning_content,
            reasoning: m.reasoning,
        })
    }
}

#[derive(Deserialize, Debug, Clone)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub messages: Vec<ChatMessageIn>,
    pub max_tokens: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<u32>,
    pub echo: Option<bool>,
    pub add_generation_prompt: Option<bool>,
    /// Function tools, given to the chat template as transformers' `tools=`.
    pub tools: Option<Vec<serde_json::Value>>,
    /// `false` leaves the reasoning out of the response (it is still generated).
    pub include_reasoning: Option<bool>,
    /// This request's thinking budget in tokens (0: no thinking).
    pub max_reasoning_tokens: Option<u32>,
    /// `low`, `medium` or `high`: a budget from `--reasoning-effort-budgets`.
    pub reasoning_effort: Option<String>,
    /// vLLM's: the top-N logprobs of every prompt token (top-level `prompt_logprobs`).
    pub prompt_logprobs: Option<u32>,
    /// Leave the last (assistant) message open and continue it, instead of starting a new
    /// turn; needs `add_generation_prompt: false`.
    pub continue_final_message: Option<bool>,
    /// Extra variables for the chat template (e.g. `enable_thinking`).
    pub chat_template_kwargs: Option<serde_json::Map<String, serde_json::Value>>,
    /// Whether the tokenizer adds special tokens to the rendered prompt (default false: the
    /// template writes them, as vLLM assumes).
    pub add_special_tokens: Option<bool>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

#[derive(Serialize, Debug, Clone, Copy, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
    /// With a reasoning parser on: how many of the completion tokens were reasoning.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion_tokens_details: Option<CompletionTokensDetails>,
}

#[derive(Serialize, Debug, Clone, Copy, Default)]
pub struct CompletionTokensDetails {
    pub reasoning_tokens: usize,
}

#[derive(Serialize, Debug, Clone, Copy, Default)]
pub struct PromptTokensDetails {
    pub cached_tokens: usize,
}

/// Completions-style logprobs (`logprobs` integer). An echoed prompt's first token has a
/// `null` logprob and `null` top logprobs, as OpenAI and vLLM send it.
#[derive(Serialize, Debug, Clone, Default)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<Option<f32>>,
    pub top_logprobs: Vec<Option<TopLogprobMap>>,
    /// Characters (not bytes) of the returned text before each token.
    pub text_offset: Vec<usize>,
}

impl CompletionLogprobs {
    pub fn extend(&mut self, more: Self) {
        self.tokens.extend(more.tokens);
        self.token_logprobs.extend(more.token_logprobs);
        self.top_logprobs.extend(more.top_logprobs);
        self.text_offset.extend(more.text_offset);
    }
}

/// `{token text: logprob}` best first. Tokens whose text is the same are merged, keeping the
/// best logprob (a JSON object cannot hold a key twice).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TopLogprobMap(pub Vec<(String, f32)>);

impl TopLogprobMap {
    /// From entries already ordered best first.
    pub fn from_ordered(entries: impl IntoIterator<Item = (String, f32)>) -> Self {
        let mut out: Vec<(String, f32)> = Vec::new();
        for (text, lp) in entries {
            if !out.iter().any(|(t, _)| *t == text) {
                out.push((text, lp));
            }
        }
        Self(out)
    }
}

impl Serialize for TopLogprobMap {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

/// vLLM's `prompt_logprobs`: per prompt token, `null` for the first, else the token itself
/// and the top N, keyed by token id, in rank order.
pub type PromptLogprobs = Vec<Option<PromptLogprobMap>>;

#[derive(Debug, Clone, Default)]
pub struct PromptLogprobMap(pub Vec<(u32, PromptLogprobEntry)>);

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct PromptLogprobEntry {
    pub logprob: f32,
    pub rank: u32,
    pub decoded_token: String,
}

impl Serialize for PromptLogprobMap {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(&k.to_string(), v)?;
        }
        m.end()
    }
}

#[derive(Serialize, Debug, Clone)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<PromptLogprobs>,
}

#[derive(Serialize, Debug, Clone)]
pub struct CompletionResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// Chat-style logprobs entry.
#[derive(Serialize, Debug, Clone)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<ChatTopLogprob>,
}

#[derive(Serialize, Debug, Clone)]
pub struct ChatTopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

#[derive(Serialize, Debug, Clone, Default)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

#[derive(Serialize, Debug, Clone)]
pub struct ChatMessageOut {
    pub role: &'static str,
    /// `null` when a reasoning model never finished thinking (vLLM's shape).
    pub content: Option<String>,
    /// Present with a reasoning parser on (unless `include_reasoning: false`).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<ReasoningOut>,
    /// The calls parsed from the answer, when it made any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallOut>>,
}

/// One call in a response message.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct ToolCallOut {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionCallOut,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct FunctionCallOut {
    pub name: String,
    /// The arguments object as JSON text, as OpenAI sends it.
    pub arguments: String,
}

/// A streamed piece of one call: its first chunk has `id`, `type` and the name, the later
/// ones fragments of the arguments.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct ToolCallDelta {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    pub function: FunctionDelta,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct FunctionDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub arguments: String,
}

/// The reasoning under both of vLLM's names: `reasoning_content` (older clients, litellm)
/// and `reasoning` (vLLM's current name). The same text; `null` when there was none.
#[derive(Serialize, Debug, Clone, Default, PartialEq)]
pub struct ReasoningOut {
    pub reasoning_content: Option<String>,
    pub reasoning: Option<String>,
}

impl ReasoningOut {
    pub fn new(text: Option<String>) -> Self {
        Self {
            reasoning_content: text.clone(),
            reasoning: text,
        }
    }
}

#[derive(Serialize, Debug, Clone)]
pub struct ChatChoice {
    pub index: usize,
    pub message: ChatMessageOut,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Serialize, Debug, Clone)]
pub struct ChatResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<PromptLogprobs>,
}

#[derive(Serialize, Debug, Clone, Default)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
}

#[derive(Serialize, Debug, Clone)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: ChatDelta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Serialize, Debug, Clone)]
pub struct ChatChunk {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    /// Present only with `stream_options.include_usage`: null until the last chunk, or the
    /// usage so far on every chunk with `continuous_usage_stats`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
    /// On the first chunk, with `prompt_logprobs`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<PromptLogprobs>,
}

#[derive(Serialize, Debug, Clone)]
pub struct CompletionChunk {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

#[derive(Serialize, Debug, Clone)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    /// What the model was loaded from (vLLM: the model path or hub id).
    pub root: String,
    pub parent: Option<String>,
    pub max_model_len: usize,
    /// What a request that omits a sampling field gets (the model's generation config).
    pub sampling_defaults: super::validate::SamplingDefaults,
    /// `deepseek_r1` when the output is split into reasoning and content.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_parser: Option<&'static str>,
}

#[derive(Serialize, Debug, Clone)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

#[derive(Deserialize, Debug, Clone)]
pub struct TokenizeRequest {
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub messages: Option<Vec<ChatMessageIn>>,
    pub tools: Option<Vec<serde_json::Value>>,
    pub add_special_tokens: Option<bool>,
    pub add_generation_prompt: Option<bool>,
    /// With `messages`, as chat takes them, so the count is the one chat runs.
    pub continue_final_message: Option<bool>,
    pub chat_template_kwargs: Option<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Serialize, Debug, Clone)]
pub struct TokenizeResponse {
    pub count: usize,
    pub max_model_len: usize,
    pub tokens: Vec<u32>,
}

#[derive(Deserialize, Debug, Clone)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    pub tokens: Vec<u32>,
}

#[derive(Serialize, Debug, Clone)]
pub struct DetokenizeResponse {
    pub prompt: String,
}

#[cfg(test)]
mod tests {
    use super::TopLogprobMap;

    #[test]
    fn top_logprobs_keep_their_order_and_merge_equal_texts_by_the_best() {
        let m = TopLogprobMap::from_ordered([
            ("b".to_string(), -0.5),
            ("a".to_string(), -1.0),
            ("b".to_string(), -2.0),
            ("c".to_string(), -3.0),
        ]);
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(json, r#"{"b":-0.5,"a":-1.0,"c":-3.0}"#);
    }
}
