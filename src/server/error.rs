//! Errors in OpenAI's envelope, `{"error": {"message", "type", "param", "code"}}`, with the
//! status codes OpenAI's SDKs and load balancers act on.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::engine::SubmitError;
use crate::metrics::RejectReason;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds a client should wait before retrying (503 only).
    pub retry_after: Option<u32>,
}

#[derive(Serialize)]
struct Envelope<'a> {
    error: Body<'a>,
}

#[derive(Serialize)]
pub(crate) struct Body<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
            retry_after: None,
        }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn model_not_found(model: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{model}` does not exist."),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
            retry_after: None,
        }
    }

    pub fn unauthorized() -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            message: "Incorrect API key provided.".into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key"),
            retry_after: None,
        }
    }

    pub fn overloaded(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: Some("server_overloaded"),
            retry_after: Some(1),
        }
    }

    pub fn internal(message: impl Into<String>, request_id: &str) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: format!("{} (request id {request_id})", message.into()),
            kind: "server_error",
            param: None,
            code: Some("internal_error"),
            retry_after: None,
        }
    }

    /// A body over `--max-body-bytes`.
    pub fn too_large(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("request_too_large"),
            retry_after: None,
        }
    }

    /// A body not received within `--body-read-timeout`.
    pub fn body_timeout(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::REQUEST_TIMEOUT,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("request_timeout"),
            retry_after: None,
        }
    }

    pub fn not_found(path: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("no route for {path}"),
            kind: "invalid_request_error",
            param: None,
            code: Some("not_found"),
            retry_after: None,
        }
    }

    /// How the metrics count this error when it answers a request: a refusal by reason, or
    /// `None` for a failure of ours (500), which is not the client's doing.
    pub fn reject_reason(&self) -> Option<RejectReason> {
        match self.status.as_u16() {
            503 => Some(RejectReason::Overloaded),
            401 => Some(RejectReason::Unauthorized),
            _ if self.code == Some("context_length_exceeded") => Some(RejectReason::TooLong),
            400..=499 => Some(RejectReason::Invalid),
            _ => None,
        }
    }

    /// The JSON body alone (also the payload of an error event inside a stream).
    pub fn to_json(&self) -> String {
        super::json::to_string(&Envelope {
            error: Body {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.code,
            },
        })
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        Self::from_submit(e, "messages")
    }
}

impl ApiError {
    /// A refused submission; `prompt_field` is `prompt` or `messages`, whichever the endpoint
    /// takes, so `param` points at what the client sent.
    pub fn from_submit(e: SubmitError, prompt_field: &str) -> Self {
        match &e {
            SubmitError::ContextLength { .. } | SubmitError::TooLargeForCache { .. } => {
                ApiError::invalid(e.to_string(), Some(prompt_field))
                    .with_code("context_length_exceeded")
            }
            SubmitError::EmptyPrompt => ApiError::invalid(e.to_string(), Some("prompt")),
            SubmitError::TokenOutOfVocab(_) => ApiError::invalid(e.to_string(), Some("prompt")),
            SubmitError::ZeroChoices => ApiError::invalid(e.to_string(), Some("n")),
            SubmitError::Sampling(m) => ApiError::invalid(m.clone(), None),
            SubmitError::EngineStopped => ApiError::overloaded(
                "the engine is not running: the server is shutting down or stopped after an \
                 internal error",
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut res = (self.status, self.to_json()).into_response();
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(secs) = self.retry_after {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        // Read by the counting middleware: every refusal, whichever layer made it (auth, body
        // limit, fallback, handler), passes through one place on its way out.
        if let Some(reason) = self.reject_reason() {
            res.extensions_mut().insert(reason);
        }
        res
    }
}
