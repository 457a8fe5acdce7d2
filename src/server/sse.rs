//! Server-Sent Events in OpenAI's exact framing: `data: <json>\n\n` per event and
//! `data: [DONE]\n\n` at the end.

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use futures_util::Stream;

pub fn event(json: &str) -> Bytes {
    let mut s = String::with_capacity(json.len() + 8);
    s.push_str("data: ");
    s.push_str(json);
    s.push_str("\n\n");
    Bytes::from(s)
}

pub fn done() -> Bytes {
    Bytes::from_static(b"data: [DONE]\n\n")
}

/// An error after streaming began: the error envelope as one event, then the end marker.
pub fn error_then_done(json: &str) -> Bytes {
    let mut out = event(json).to_vec();
    out.extend_from_slice(&done());
    Bytes::from(out)
}

/// The end of a stream: the usage chunk (when asked for), then the end marker.
pub fn finish(usage_chunk: Option<Bytes>) -> Bytes {
    let mut out = usage_chunk.map(|b| b.to_vec()).unwrap_or_default();
    out.extend_from_slice(&done());
    Bytes::from(out)
}

pub fn response(body: impl Stream<Item = Bytes> + Send + 'static) -> Response {
    use futures_util::StreamExt;
    let mut res = Response::new(Body::from_stream(
        body.map(Ok::<_, std::convert::Infallible>),
    ));
    *res.status_mut() = StatusCode::OK;
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Tell nginx-style proxies not to buffer the stream.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    res
}
