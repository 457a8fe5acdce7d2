//! `GET /v1/models`, `/v1/models/{id}`, `/tokenizer_info`, `/health`, `/ready`, `/version`, `/openapi.json`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::server::error::ApiError;
use crate::server::json;
use crate::server::protocol::{ModelCard, ModelList};
use crate::server::state::AppState;

fn card(st: &AppState) -> ModelCard {
    ModelCard {
        id: st.model_name.clone(),
        object: "model",
        created: st.started,
        owned_by: "distillery",
        root: st.model_root.clone(),
        parent: None,
        max_model_len: st.max_model_len,
        sampling_defaults: st.sampling_defaults,
        reasoning_parser: st.reasoning.as_ref().map(|_| "deepseek_r1"),
    }
}

pub async fn models(State(st): State<Arc<AppState>>) -> Response {
    json::response(&ModelList {
        object: "list",
        data: vec![card(&st)],
    })
}

/// `GET /v1/models/{*id}`: the served model, or OpenAI's 404 envelope. An id may hold
/// slashes (`Qwen/Qwen2.5-0.5B`), sent unencoded.
pub async fn model(State(st): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    if id == st.model_name {
        json::response(&card(&st))
    } else {
        ApiError::model_not_found(&id).into_response()
    }
}

/// vLLM's `GET /tokenizer_info`: the tokenizer's configuration, as a remote tokenizer
/// (lm-eval's `tokenizer_backend=remote`) needs it to tokenize through `/tokenize`.
pub async fn tokenizer_info(State(st): State<Arc<AppState>>) -> Response {
    let tk = &st.tokenizer;
    let mut info = match tk.config() {
        serde_json::Value::Object(m) => m.clone(),
        _ => serde_json::Map::new(),
    };
    // The decoder's table is long and is the tokenizer's business, not the client's.
    info.remove("added_tokens_decoder");
    let mut set = |k: &str, v: serde_json::Value| {
        info.insert(k.to_string(), v);
    };
    if !tk
        .config()
        .get("tokenizer_class")
        .is_some_and(|v| v.is_string())
    {
        set("tokenizer_class", "PreTrainedTokenizerFast".into());
    }
    set("eos_token", tk.eos_token().into());
    set("bos_token", tk.bos_token().into());
    set("eos_token_id", tk.eos_token_id().into());
    set("vocab_size", tk.vocab_size().into());
    set("model_max_length", st.max_model_len.into());
    set(
        "chat_template",
        tk.chat_template().map(|t| t.source().to_string()).into(),
    );
    json::response(&serde_json::Value::Object(info))
}

/// Liveness: the process answers and at least one engine replica still runs (one that
/// panicked stops; when none is left, only a restart helps).
pub async fn health(State(st): State<Arc<AppState>>) -> StatusCode {
    if st.engine.is_alive() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// Readiness: the model is loaded (it is, or the server would not be listening), an engine
/// replica runs, and the server is not draining. Load balancers stop routing here the moment a drain begins.
pub async fn ready(State(st): State<Arc<AppState>>) -> Response {
    if st.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response()
    } else if !st.engine.is_alive() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "no engine replica is running",
        )
            .into_response()
    } else {
        (StatusCode::OK, "ready").into_response()
    }
}

pub async fn version() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "version": env!("CARGO_PKG_VERSION") }))
}

pub async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("../openapi.json"),
    )
        .into_response()
}
