//! `GET /metrics`, and the glue between the metric set and what it measures: the engine's
//! live figures read at scrape time, the engine's step observer, and refusals counted by
//! reason as responses leave.
//!
//! The metric set itself (names, buckets, rendering) is `crate::metrics`, which knows nothing
//! of the engine or of HTTP; this file is the only place that knows both sides.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::state::AppState;
use crate::engine::{StepObserver, StepReport};
use crate::metrics::{LiveFigures, Metrics, RejectReason, StepMetrics};

/// Prometheus text exposition, version 0.0.4.
pub async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    // Relaxed loads of the engine's atomics: the engine thread is never waited on.
    let s = st.engine.stats();
    let live = LiveFigures {
        running: s.num_running,
        waiting: s.num_waiting,
        total_blocks: s.total_blocks,
        free_blocks: s.free_blocks,
        cached_free_blocks: s.cached_free_blocks,
        queued_prompt_tokens: st.admission.queued_prompt_tokens() as u64,
        tokenizer_jobs_queued: st.preprocess.queued() as u64,
        tokenizer_jobs_abandoned: st.preprocess.abandoned(),
        http_connections_open: st.connections.open(),
        http_connections_timed_out: st.connections.timed_out(),
        prompt_tokens: s.prompt_tokens,
        generation_tokens: s.generation_tokens,
        preemptions: s.num_preemptions,
        prefix_cache_queries: s.prefix_cache_queries,
        prefix_cache_hits: s.prefix_cache_hits,
        finished_stop: s.finished_stop,
        finished_length: s.finished_length,
        finished_abort: s.finished_abort,
    };
    match st.metrics.render(&live) {
        Ok(text) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], text).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "rendering /metrics failed");
            (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
        }
    }
}

/// Counts every refusal on its way out (see [`crate::server::ApiError::reject_reason`]).
pub async fn count_rejections(
    State(st): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    let res = next.run(req).await;
    if let Some(&reason) = res.extensions().get::<RejectReason>() {
        st.metrics.requests().rejected(reason);
    }
    res
}

/// The engine's view of the step histograms: it records each step that ran a batch.
pub fn step_observer(metrics: &Metrics) -> Arc<dyn StepObserver> {
    Arc::new(StepHistograms(metrics.steps()))
}

struct StepHistograms(StepMetrics);

impl StepObserver for StepHistograms {
    fn on_step(&self, s: &StepReport) {
        self.0
            .observe(s.num_seqs, s.num_tokens, s.schedule, s.forward, s.sample);
    }
}
