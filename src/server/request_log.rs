//! One structured log line per request: id, outcome, tokens in/out, queue time, TTFT, total.
//! On by default, as an access log; `--disable-log-requests` turns it off where thousands of
//! requests a second make the lines cost more than they tell (~7% of the daemon's CPU in the
//! customer-service benchmark). Metrics count every request either way.

use std::sync::Arc;
use std::time::Instant;

use super::error::ApiError;
use super::output::Outputs;

/// Whether requests are logged; decided once at start-up.
#[derive(Clone, Copy, Debug)]
pub struct RequestLog {
    pub enabled: bool,
}

/// The request's `x-request-id` (the client's, or one made up), which the HTTP layer puts in
/// the request's extensions and echoes in the response, so nginx's log joins ours.
#[derive(Clone, Debug)]
pub struct RequestId(pub Arc<str>);

impl RequestLog {
    /// The logger for one request.
    pub fn for_request(self, request_id: Option<RequestId>) -> RequestLogger {
        RequestLogger {
            enabled: self.enabled,
            request_id: request_id.map_or_else(|| Arc::from(""), |r| r.0),
        }
    }
}

/// Logs one request's outcome, under its `request_id` (the header's) and `id` (the
/// response's).
#[derive(Clone, Debug)]
pub struct RequestLogger {
    enabled: bool,
    request_id: Arc<str>,
}

impl RequestLogger {
    pub fn finished(&self, id: &str, outputs: &Outputs, arrival: Instant, model: &str) {
        if self.enabled {
            finished(&self.request_id, id, outputs, arrival, model);
        }
    }

    pub fn rejected(&self, id: &str, e: &ApiError) {
        if self.enabled {
            rejected(&self.request_id, id, e);
        }
    }
}

fn finished(request_id: &str, id: &str, outputs: &Outputs, arrival: Instant, model: &str) {
    let ms = |t: Option<Instant>| t.map(|t| t.duration_since(arrival).as_secs_f64() * 1e3);
    let queue_ms = outputs
        .times
        .engine
        .and_then(|t| t.first_scheduled)
        .map(|s| s.duration_since(arrival).as_secs_f64() * 1e3);
    tracing::info!(
        request_id,
        id,
        model,
        status = 200,
        prompt_tokens = outputs.usage.prompt_tokens,
        completion_tokens = outputs.usage.completion_tokens,
        queue_ms,
        ttft_ms = ms(outputs.times.first_token),
        total_ms = arrival.elapsed().as_secs_f64() * 1e3,
        "request finished"
    );
}

fn rejected(request_id: &str, id: &str, e: &ApiError) {
    tracing::info!(
        request_id,
        id,
        status = e.status.as_u16(),
        code = e.code,
        error = %e.message,
        "request rejected"
    );
}
