//! `POST /tokenize` and `POST /detokenize`, as vLLM offers them.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};

use super::chat::{template_tools, to_template_messages, turn_ending};
use crate::server::error::ApiError;
use crate::server::json;
use crate::server::protocol::{
    DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse,
};
use crate::server::state::AppState;
use crate::tokenizer::RenderArgs;

pub async fn tokenize(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    match tokenize_inner(st, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn tokenize_inner(
    st: Arc<AppState>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let body = json::body(body)?;
    // The body's size stands for the work: it holds the prompt or the messages.
    let size = body.len();
    let req: TokenizeRequest = json::parse(&body)?;
    st.check_model(req.model.as_deref())?;
    let tokenizer = st.tokenizer.clone();
    let tokens = match (req.prompt, req.messages) {
        (Some(prompt), None) => {
            let special = req.add_special_tokens.unwrap_or(true);
            st.preprocess
                .run(size, move || tokenizer.encode(&prompt, special))
                .await?
        }
        (None, Some(messages)) => {
            let messages = to_template_messages(&messages)?;
            let (gen, continue_final) =
                turn_ending(req.add_generation_prompt, req.continue_final_message)?;
            let tools = template_tools(&req.tools);
            let extra = req.chat_template_kwargs;
            // As chat: the template writes the special tokens unless asked otherwise.
            let special = req.add_special_tokens.unwrap_or(false);
            st.preprocess
                .run(size, move || {
                    let args = RenderArgs {
                        add_generation_prompt: gen,
                        continue_final_message: continue_final,
                        tools: tools.as_ref(),
                        extra: extra.as_ref(),
                    };
                    let text = tokenizer.render_chat(&messages, args)?;
                    tokenizer.encode(&text, special)
                })
                .await?
        }
        _ => {
            return Err(ApiError::invalid(
                "give exactly one of prompt or messages",
                Some("prompt"),
            ))
        }
    }
    .map_err(|e| ApiError::invalid(e.to_string(), Some("prompt")))?;
    Ok(json::response(&TokenizeResponse {
        count: tokens.len(),
        max_model_len: st.max_model_len,
        tokens,
    }))
}

pub async fn detokenize(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let run = async {
        let body = json::body(body)?;
        let size = body.len();
        let req: DetokenizeRequest = json::parse(&body)?;
        st.check_model(req.model.as_deref())?;
        if let Some(&t) = req.tokens.iter().find(|&&t| t as usize >= st.vocab_size) {
            return Err(ApiError::invalid(
                format!(
                    "token id {t} is outside the vocabulary of {}",
                    st.vocab_size
                ),
                Some("tokens"),
            ));
        }
        let tokenizer = st.tokenizer.clone();
        let prompt = st
            .preprocess
            .run(size, move || tokenizer.decode(&req.tokens, false))
            .await?
            .map_err(|e| ApiError::invalid(e.to_string(), Some("tokens")))?;
        Ok(json::response(&DetokenizeResponse { prompt }))
    };
    run.await.unwrap_or_else(|e: ApiError| e.into_response())
}
