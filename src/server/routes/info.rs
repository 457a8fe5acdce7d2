//! `GET /v1/models`, `/health`, `/ready`, `/version`, `/openapi.json`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::server::protocol::{ModelCard, ModelList};
use crate::server::state::AppState;

pub async fn models(State(st): State<Arc<AppState>>) -> Json<ModelList> {
    Json(ModelList {
        object: "list",
        data: vec![ModelCard {
            id: st.model_name.clone(),
            object: "model",
            created: st.started,
            owned_by: "distillery",
            max_model_len: st.max_model_len,
            sampling_defaults: st.sampling_defaults,
            reasoning_parser: st.reasoning.as_ref().map(|_| "deepseek_r1"),
        }],
    })
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
