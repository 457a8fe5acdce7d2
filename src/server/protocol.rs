//! OpenAI's wire types as OpenAI and vLLM accept and return them. Unknown request fields are
//! ignored (as OpenAI does); a wrong type is an error naming the field (see `json.rs`).

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
    pub seed: Option<u64>,
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
    #[serde(flatten)]
    pub sampling: SamplingFields,
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
    #[serde(flatten)]
    pub sampling: SamplingFields,
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

/// Completions-style logprobs (`logprobs` integer).
#[derive(Serialize, Debug, Clone, Default)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    pub top_logprobs: Vec<HashMap<String, f32>>,
    pub text_offset: Vec<usize>,
}

#[derive(Serialize, Debug, Clone)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<&'static str>,
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
    /// Present (as null until the last chunk) only with `stream_options.include_usage`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
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
