//! Request bodies parsed so that a wrong type is a 400 naming the field, as OpenAI answers,
//! and malformed JSON a 400 saying where it broke.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// The body, or the OpenAI-shaped error for one that could not be read (413 when over the
/// size limit).
pub fn body(read: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    read.map_err(|r| {
        let mut e = ApiError::invalid(r.body_text(), None);
        e.status = r.status();
        if e.status == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            e.code = Some("request_too_large");
        }
        e
    })
}

pub fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    match serde_path_to_error::deserialize::<_, T>(&mut de) {
        Ok(v) => Ok(v),
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if inner.is_syntax() || inner.is_eof() {
                return Err(ApiError::invalid(
                    format!("We could not parse the JSON body of your request: {inner}"),
                    None,
                ));
            }
            let field = if path == "." || path.is_empty() {
                field_from_message(&inner.to_string()).or_else(|| flattened_field(body))
            } else {
                Some(path)
            };
            let message = match &field {
                Some(f) => format!("Invalid value for '{f}': {inner}"),
                None => format!("Invalid request body: {inner}"),
            };
            Err(ApiError::invalid(message, field.as_deref()))
        }
    }
}

/// Fields merged in with `#[serde(flatten)]` lose their path; parsing the shared sampling
/// fields on their own finds which one was wrong.
fn flattened_field(body: &Bytes) -> Option<String> {
    let mut de = serde_json::Deserializer::from_slice(body);
    match serde_path_to_error::deserialize::<_, super::protocol::SamplingFields>(&mut de) {
        Err(e) if !e.path().to_string().is_empty() && e.path().to_string() != "." => {
            Some(e.path().to_string())
        }
        _ => None,
    }
}

/// serde names a missing field only in its message ("missing field `prompt`").
fn field_from_message(message: &str) -> Option<String> {
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    Some(message[start..start + len].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::protocol::CompletionRequest;

    #[test]
    fn names_the_field_with_the_wrong_type() {
        let body = Bytes::from_static(br#"{"model":"m","prompt":"hi","max_tokens":"ten"}"#);
        let err = parse::<CompletionRequest>(&body).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("max_tokens"), "{}", err.message);
    }

    #[test]
    fn names_a_wrong_flattened_sampling_field() {
        let body = Bytes::from_static(br#"{"prompt":"hi","temperature":"hot"}"#);
        let err = parse::<CompletionRequest>(&body).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("temperature"), "{}", err.message);
    }

    #[test]
    fn names_a_missing_field_and_rejects_broken_json() {
        let err = parse::<CompletionRequest>(&Bytes::from_static(br#"{"model":"m"}"#)).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("prompt"), "{}", err.message);
        let err = parse::<CompletionRequest>(&Bytes::from_static(b"{\"model\":")).unwrap_err();
        assert!(err.message.contains("parse"), "{}", err.message);
    }
}
