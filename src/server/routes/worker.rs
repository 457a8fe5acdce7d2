//! The endpoints the routers in front of N replicas call on each worker (vllm-router, the
//! SGLang model gateway, llm-d's endpoint picker): who this worker is (`/server_info`,
//! `/model_info`), how loaded it is (`/get_load`, `/load`), what a request's prompt renders to
//! without generating (`/v1/chat/completions/render`, `/v1/completions/render`), a cache flush
//! (`/flush_cache`, `/reset_prefix_cache`) and a health check that runs the engine
//! (`/health_generate`).
//!
//! Owns the shapes those routers read (field names and types as their sources parse them);
//! knows nothing of how they route.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::chat::{requested_budget, template_tools, to_template_messages, turn_ending};
use super::completions::PromptIn;
use crate::config::GetLoadFormat;
use crate::engine::{
    Delivery, EngineEvent, EngineRequest, SamplingParams, StatsSnapshot, StopConditions,
};
use crate::server::error::ApiError;
use crate::server::json;
use crate::server::protocol::{ChatRequest, CompletionRequest};
use crate::server::state::AppState;
use crate::tokenizer::RenderArgs;

/// How long `/health_generate` waits for its one token before it calls the engine unhealthy.
const HEALTH_GENERATE_TIMEOUT: Duration = Duration::from_secs(20);

/// `GET /server_info` (SGLang's name; vllm-router asks `/get_server_info`). Every field has the
/// type the routers parse: the SGLang gateway drops all of them when one is mistyped.
pub async fn server_info(State(st): State<Arc<AppState>>) -> Response {
    let limits = st.engine.limits();
    let replicas = st.engine.num_replicas();
    let w = &st.worker;
    json::response(&json!({
        "model_id": st.model_name,
        "served_model_name": st.model_name,
        "model_path": st.model_root,
        "tokenizer_path": st.model_root,
        "instance_id": w.instance_id,
        "kv_block_size": limits.block_size,
        "dp_size": replicas,
        "tp_size": 1,
        "max_model_len": st.max_model_len,
        "max_total_tokens": limits.cache_tokens * replicas,
        "max_running_requests": w.max_num_seqs * replicas,
        "max_prefill_tokens": w.max_num_batched_tokens,
        "version": env!("CARGO_PKG_VERSION"),
    }))
}

/// `GET /kv_event_sources`: each replica's KV-cache event endpoints by rank, in the shape
/// vllm-router's discovery reads (an object keyed by the rank as a string, with the publisher,
/// encoding and schema version it checks). `{}` when events are off.
pub async fn kv_event_sources(State(st): State<Arc<AppState>>) -> Response {
    let sources: serde_json::Map<String, Value> = st
        .worker
        .kv_event_sources
        .iter()
        .enumerate()
        .map(|(rank, s)| {
            (
                rank.to_string(),
                json!({
                    "endpoint": s.endpoint,
                    "replay_endpoint": s.replay_endpoint,
                    "topic": s.topic,
                    "hwm": null,
                    "buffer_steps": crate::kv_events::REPLAY_BUFFER,
                    "publisher": "zmq",
                    "encoding": "msgpack",
                    "schema_version": 1,
                    "enable_kv_cache_events": true,
                }),
            )
        })
        .collect();
    json::response(&Value::Object(sources))
}

/// `GET /model_info` (alias `/get_model_info`), as SGLang serves it.
pub async fn model_info(State(st): State<Arc<AppState>>) -> Response {
    json::response(&json!({
        "model_path": st.model_root,
        "tokenizer_path": st.model_root,
        "served_model_name": st.model_name,
        "is_generation": true,
        "model_type": st.worker.model_type,
        "architectures": st.worker.architectures,
        "max_model_len": st.max_model_len,
        "vocab_size": st.vocab_size,
    }))
}

/// `GET /get_load`, in the shape `--get-load-format` names: the routers disagree on this path.
pub async fn get_load(State(st): State<Arc<AppState>>) -> Response {
    let block_size = st.engine.limits().block_size as u64;
    match st.worker.get_load_format {
        GetLoadFormat::Sglang => {
            let ranks: Vec<Value> = st
                .engine
                .replica_stats()
                .iter()
                .enumerate()
                .map(|(rank, s)| {
                    json!({
                        "dp_rank": rank,
                        "num_reqs": s.num_running + s.num_waiting,
                        "num_waiting_reqs": s.num_waiting,
                        "num_tokens": tokens_held(s, block_size),
                    })
                })
                .collect();
            json::response(&Value::Array(ranks))
        }
        GetLoadFormat::Vllm => json::response(&json!({ "load": requests(&st.engine.stats()) })),
    }
}

/// `GET /load`, vLLM's own: requests in the engine.
pub async fn load(State(st): State<Arc<AppState>>) -> Response {
    json::response(&json!({ "server_load": requests(&st.engine.stats()) }))
}

fn requests(s: &StatsSnapshot) -> u64 {
    s.num_running + s.num_waiting
}

/// Tokens the KV cache holds for running sequences (whole blocks).
fn tokens_held(s: &StatsSnapshot, block_size: u64) -> u64 {
    s.total_blocks.saturating_sub(s.free_blocks) * block_size
}

/// `POST /v1/chat/completions/render`: the prompt a chat request would run, as text and as
/// the token ids the engine would compute (a reasoning model's forced end of thinking
/// included), without generating. Fields that only steer generation are not read.
pub async fn render_chat(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    match render_chat_inner(st, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn render_chat_inner(
    st: Arc<AppState>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let body = json::body(body)?;
    let size = body.len();
    let mut req: ChatRequest = json::parse(&body)?;
    st.check_model(req.model.as_deref())?;
    let (add_generation_prompt, continue_final_message) =
        turn_ending(req.add_generation_prompt, req.continue_final_message)?;
    let budget = requested_budget(&req, st.reasoning.as_ref())?;
    let messages = to_template_messages(&req.messages)?;
    let tools = template_tools(&req.tools);
    let extra = req.chat_template_kwargs.take();
    let special = req.add_special_tokens.unwrap_or(false);
    let tokenizer = st.tokenizer.clone();
    let (text, mut ids) = st
        .preprocess
        .run(size, move || {
            let text = tokenizer.render_chat(
                &messages,
                RenderArgs {
                    add_generation_prompt,
                    continue_final_message,
                    tools: tools.as_ref(),
                    extra: extra.as_ref(),
                },
            )?;
            let ids = tokenizer.encode(&text, special)?;
            Ok::<_, crate::tokenizer::TokenizerError>((text, ids))
        })
        .await?
        .map_err(|e| ApiError::invalid(e.to_string(), Some("messages")))?;
    let mut prompt = text;
    if let Some(plan) = st.reasoning.as_ref().map(|r| r.plan(&ids, budget)) {
        if !plan.prompt_suffix.is_empty() {
            let suffix = st
                .tokenizer
                .decode(&plan.prompt_suffix, false)
                .map_err(|e| ApiError::internal(e.to_string(), "render"))?;
            prompt.push_str(&suffix);
            ids.extend_from_slice(&plan.prompt_suffix);
        }
    }
    Ok(json::response(&rendered(&st, Some(prompt), ids)))
}

/// `POST /v1/completions/render`: one rendered prompt per prompt of the request, in order.
pub async fn render_completions(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    match render_completions_inner(st, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn render_completions_inner(
    st: Arc<AppState>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let body = json::body(body)?;
    let size = body.len();
    let req: CompletionRequest = json::parse(&body)?;
    st.check_model(req.model.as_deref())?;
    let special = req.add_special_tokens.unwrap_or(true);
    let prompts = PromptIn::all(req.prompt)?;
    let vocab = st.vocab_size;
    if let Some(t) = prompts.iter().find_map(|p| match p {
        PromptIn::Ids(ids) => ids.iter().find(|&&t| t as usize >= vocab).copied(),
        PromptIn::Text(_) => None,
    }) {
        return Err(ApiError::invalid(
            format!("token id {t} is outside the vocabulary (size {vocab})"),
            Some("prompt"),
        ));
    }
    let tokenizer = st.tokenizer.clone();
    let items = st
        .preprocess
        .run(size, move || {
            prompts
                .into_iter()
                .map(|p| match p {
                    PromptIn::Text(text) => {
                        let ids = tokenizer.encode(&text, special)?;
                        Ok((Some(text), ids))
                    }
                    PromptIn::Ids(ids) => Ok((None, ids)),
                })
                .collect::<Result<Vec<_>, crate::tokenizer::TokenizerError>>()
        })
        .await?
        .map_err(|e| ApiError::invalid(e.to_string(), Some("prompt")))?;
    let out: Vec<Value> = items
        .into_iter()
        .map(|(text, ids)| rendered(&st, text, ids))
        .collect();
    Ok(json::response(&Value::Array(out)))
}

/// vLLM's render answer: the routers read `token_ids`, and `features` (null: text only).
fn rendered(st: &AppState, prompt: Option<String>, token_ids: Vec<u32>) -> Value {
    json!({
        "model": st.model_name,
        "prompt": prompt,
        "num_tokens": token_ids.len(),
        "token_ids": token_ids,
        "features": null,
    })
}

/// `POST /flush_cache` (SGLang; vLLM's name is `/reset_prefix_cache`): every cached block no
/// request holds forgets its content, on every replica. Blocks in use keep theirs.
pub async fn flush_cache(State(st): State<Arc<AppState>>) -> Response {
    let dropped = st.engine.reset_prefix_cache().await;
    tracing::info!(blocks = dropped, "prefix cache flushed");
    json::response(&json!({ "flushed": true, "blocks_dropped": dropped }))
}

/// `GET /health_generate`: one token through the engine (the first vocabulary id as the
/// prompt, greedy). 200 once it comes out; 503 when the engine fails, stopped, or takes more
/// than [`HEALTH_GENERATE_TIMEOUT`], or the server drains.
pub async fn health_generate(State(st): State<Arc<AppState>>) -> Response {
    if st.is_draining() {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response();
    }
    let req = EngineRequest {
        prompt_ids: Arc::from(&[0u32][..]),
        params: SamplingParams::default(),
        stop: StopConditions {
            max_tokens: 1,
            ignore_eos: true,
            ..StopConditions::default()
        },
        n: 1,
        arrival: Instant::now(),
        delivery: Delivery::EachToken,
        steer: None,
        constraint: None,
    };
    let mut stream = match st.engine.submit(req) {
        Ok(s) => s,
        Err(e) => return (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    };
    let outcome = tokio::time::timeout(HEALTH_GENERATE_TIMEOUT, async {
        while let Some(event) = stream.recv().await {
            match event {
                EngineEvent::Finished { .. } => return Ok(()),
                EngineEvent::Error { message } => return Err(message),
                _ => {}
            }
        }
        Err("the engine stopped".to_string())
    })
    .await;
    match outcome {
        Ok(Ok(())) => (StatusCode::OK, "ok").into_response(),
        Ok(Err(message)) => (StatusCode::SERVICE_UNAVAILABLE, message).into_response(),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "no token within the health check's deadline",
        )
            .into_response(),
    }
}
