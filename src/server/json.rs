//! Request bodies parsed so that a wrong type is a 400 naming the field, as OpenAI answers,
//! and malformed JSON a 400 saying where it broke; response bodies written so that no reader
//! that splits lines on Unicode's separators can break one.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// Characters that JSON allows raw in strings but that line-oriented readers (Python's
/// `str.splitlines`, httpx's `aiter_lines`) take for line breaks, splitting an SSE event.
const LINE_BREAKERS: [(char, &str); 3] = [
    ('\u{2028}', "\\u2028"),
    ('\u{2029}', "\\u2029"),
    ('\u{85}', "\\u0085"),
];

/// `value` as JSON with U+2028, U+2029 and U+0085 escaped. They can only occur inside
/// strings, where the escape means the same character, so a plain replace is exact.
pub fn to_string<T: serde::Serialize + ?Sized>(value: &T) -> String {
    let mut s = serde_json::to_string(value).unwrap_or_default();
    // All three start with a byte of 0xC2 or 0xE2: most texts skip the replacing entirely.
    if s.bytes().any(|b| b == 0xC2 || b == 0xE2) {
        for (c, escaped) in LINE_BREAKERS {
            if s.contains(c) {
                s = s.replace(c, escaped);
            }
        }
    }
    s
}

/// A 200 with `value` as its JSON body, written by [`to_string`].
pub fn response<T: serde::Serialize + ?Sized>(value: &T) -> axum::response::Response {
    use axum::response::IntoResponse;
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        to_string(value),
    )
        .into_response()
}

/// The body, or the OpenAI-shaped error for one that could not be read (413 when over the
/// size limit).
pub fn body(read: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    read.map_err(|r| {
        if r.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            return ApiError::too_large(r.body_text());
        }
        let mut e = ApiError::invalid(r.body_text(), None);
        e.status = r.status();
        e
    })
}

pub fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    match serde_path_to_error::deserialize::<_, T>(&mut de) {
        // `end` refuses anything but whitespace after the value (`{...} x`, `{...}{...}`).
        Ok(v) => de.end().map(|()| v).map_err(unparsable),
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner();
            // serde_json also says "trailing characters" (a syntax error) of a struct given as
            // too long an array; only bytes that are no JSON at all are a parse error.
            if (inner.is_syntax() || inner.is_eof())
                && serde_json::from_slice::<serde::de::IgnoredAny>(body).is_err()
            {
                return Err(unparsable(inner));
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
/// fields on their own finds which one was wrong. Only a field's path counts: on its own the
/// struct also takes a sequence (`[1.0, ...]`), whose positions name nothing the client sent.
fn flattened_field(body: &Bytes) -> Option<String> {
    let mut de = serde_json::Deserializer::from_slice(body);
    match serde_path_to_error::deserialize::<_, super::protocol::SamplingFields>(&mut de) {
        Err(e) => {
            let path = e.path().to_string();
            let named = !path.is_empty() && path != "." && !path.starts_with('[');
            named.then_some(path)
        }
        Ok(_) => None,
    }
}

fn unparsable(e: serde_json::Error) -> ApiError {
    ApiError::invalid(
        format!("We could not parse the JSON body of your request: {e}"),
        None,
    )
}

/// serde names a missing or repeated field only in its message ("missing field `prompt`").
/// Other messages quote the offending value the same way ("invalid type: integer `3`"),
/// which names no field.
fn field_from_message(message: &str) -> Option<String> {
    let rest = message
        .strip_prefix("missing field `")
        .or_else(|| message.strip_prefix("duplicate field `"))?;
    Some(rest[..rest.find('`')?].to_string())
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
    fn a_quoted_value_is_no_field_name() {
        // A flattened field's error has no path; its message quotes the value in backticks.
        let body = Bytes::from_static(br#"{"prompt":"hi","n":5.5}"#);
        let err = parse::<CompletionRequest>(&body).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("n"), "{}", err.message);
        for body in ["3", "true", "-1.5", r#"[""]"#, "[1.0, 2]"] {
            let err = parse::<CompletionRequest>(&Bytes::from(body)).unwrap_err();
            assert_eq!(err.param, None, "{body}: {}", err.message);
        }
    }

    #[test]
    fn a_too_long_struct_array_is_a_wrong_value_not_broken_json() {
        let body = Bytes::from_static(br#"{"messages":[["user","hi",null]]}"#);
        let err = parse::<crate::server::protocol::ChatRequest>(&body).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("messages[0]"), "{}", err.message);
    }

    #[test]
    fn refuses_bytes_after_the_body() {
        for body in [r#"{"prompt":"hi"} x"#, r#"{"prompt":"a"}{"prompt":"b"}"#] {
            let err = parse::<CompletionRequest>(&Bytes::from(body)).unwrap_err();
            assert!(err.message.contains("parse"), "{body}: {}", err.message);
        }
        assert!(parse::<CompletionRequest>(&Bytes::from_static(b"{\"prompt\":\"hi\"}\n ")).is_ok());
    }

    #[test]
    fn names_a_missing_field_and_rejects_broken_json() {
        let err = parse::<CompletionRequest>(&Bytes::from_static(br#"{"model":"m"}"#)).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("prompt"), "{}", err.message);
        let err = parse::<CompletionRequest>(&Bytes::from_static(b"{\"model\":")).unwrap_err();
        assert!(err.message.contains("parse"), "{}", err.message);
    }
}

#[cfg(test)]
mod line_breaker_tests {
    #[test]
    fn unicode_line_separators_are_escaped_and_mean_the_same() {
        let text = "a\u{2028}b\u{2029}c\u{85}d é";
        let out = super::to_string(&serde_json::json!({ "t": text }));
        assert!(!out.contains('\u{2028}') && !out.contains('\u{2029}') && !out.contains('\u{85}'));
        assert!(out.contains("\\u2028") && out.contains("\\u0085"));
        let back: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(back["t"], text);
    }
}
