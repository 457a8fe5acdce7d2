//! Receiving a request's body: a size limit whose 413 reaches the client, a deadline for the
//! whole body (not an idle timer that every byte resets), and the moment a request becomes
//! *in flight* on its connection ([`super::connection`]).
//!
//! Knows bodies and their timing; knows nothing of what a route does with the bytes.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Version};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body::Frame;
use http_body_util::BodyExt;

use super::connection::{ConnHandle, InFlight};
use super::error::ApiError;

/// A body over the limit is still read, up to this many bytes in all, before the 413 goes
/// out: closing with unread bytes makes the kernel answer with a reset, and a client that
/// gets a reset instead of the 413 reports a network error and uploads again.
pub const DISCARD_LIMIT: usize = 64 << 20;

#[derive(Clone, Copy, Debug)]
pub struct BodyLimits {
    pub max_bytes: usize,
    /// From the end of the headers to the body's last byte.
    pub deadline: Duration,
}

/// Buffers the body within [`BodyLimits`], then marks the request in flight for as long as
/// its response body lives.
pub async fn receive(State(limits): State<Arc<BodyLimits>>, req: Request, next: Next) -> Response {
    let conn = req.extensions().get::<ConnHandle>().cloned();
    let (parts, body) = req.into_parts();
    let version = parts.version;
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let deadline = tokio::time::Instant::now() + limits.deadline;
    if let Some(len) = declared.filter(|&n| n > limits.max_bytes as u64) {
        // With `Expect: 100-continue` the body is never polled, so no `100 Continue` is sent
        // and an honest client sends nothing more; without it, take what fits in the discard
        // bound so that the answer is not lost in a reset.
        let expects = parts
            .headers
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        if !expects && len <= DISCARD_LIMIT as u64 {
            let _ = tokio::time::timeout_at(deadline, discard(body, DISCARD_LIMIT)).await;
        }
        return closing(too_large(limits.max_bytes), version);
    }
    let bytes = match tokio::time::timeout_at(deadline, collect(body, limits.max_bytes)).await {
        Ok(Ok(b)) => b,
        Ok(Err(Collect::TooLarge(rest))) => {
            let _ = tokio::time::timeout_at(deadline, discard(rest, DISCARD_LIMIT)).await;
            return closing(too_large(limits.max_bytes), version);
        }
        // The client broke off: there is no one to answer, but the response must be one.
        Ok(Err(Collect::Failed(e))) => {
            return closing(
                ApiError::invalid(format!("the request body could not be read: {e}"), None),
                version,
            )
        }
        Err(_) => {
            return closing(
                ApiError::body_timeout(format!(
                    "the request body did not arrive within {:.1} s (--body-read-timeout)",
                    limits.deadline.as_secs_f64()
                )),
                version,
            )
        }
    };
    let in_flight = conn.as_ref().map(ConnHandle::admit);
    let res = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    match in_flight {
        Some(guard) => res.map(|b| {
            Body::new(Tracked {
                inner: b,
                _guard: guard,
            })
        }),
        None => res,
    }
}

fn too_large(limit: usize) -> ApiError {
    ApiError::too_large(format!(
        "the request body is larger than the limit of {limit} bytes (--max-body-bytes)"
    ))
}

/// The error, with an HTTP/1 connection closed after it: what is left of the body is not
/// read. (HTTP/2 has no such header; hyper resets just the stream.)
fn closing(e: ApiError, version: Version) -> Response {
    let mut res = e.into_response();
    if version < Version::HTTP_2 {
        res.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    res
}

enum Collect {
    /// Over the limit; the unread rest of the body.
    TooLarge(Body),
    Failed(axum::Error),
}

/// The whole body; a body that arrives in one frame (a short request's) is passed on without a
/// copy or an allocation.
async fn collect(mut body: Body, limit: usize) -> Result<Bytes, Collect> {
    let mut first: Option<Bytes> = None;
    let mut joined: Vec<u8> = Vec::new();
    let mut len = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(Collect::Failed)?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        len += data.len();
        if len > limit {
            return Err(Collect::TooLarge(body));
        }
        match first.take() {
            None if joined.is_empty() => first = Some(data),
            earlier => {
                if let Some(e) = earlier {
                    joined.extend_from_slice(&e);
                }
                joined.extend_from_slice(&data);
            }
        }
    }
    Ok(first.unwrap_or_else(|| Bytes::from(joined)))
}

/// Reads and drops up to `bound` bytes of what is left of `body`.
async fn discard(mut body: Body, bound: usize) {
    let mut seen = 0usize;
    while let Some(Ok(frame)) = body.frame().await {
        if let Ok(data) = frame.into_data() {
            seen += data.len();
            if seen > bound {
                return;
            }
        }
    }
}

/// A response body that keeps its request in flight until it is done or dropped.
struct Tracked {
    inner: Body,
    _guard: InFlight,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
