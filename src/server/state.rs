//! What every handler shares: the engine handle, the tokenizer, the queue bounds, the
//! tokenization pool, the metric set and the drain flag. Built once at start-up; no globals.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use super::admission::Admission;
use super::error::ApiError;
use super::preprocess::PreprocessPool;
use super::request_log::RequestLog;
use super::validate::SamplingDefaults;
use crate::config::GetLoadFormat;
use crate::engine::EngineHandle;
use crate::metrics::Metrics;
use crate::reasoning::Reasoning;
use crate::structured::Grammars;
use crate::tokenizer::Tokenizer;
use crate::tools::ToolFormat;

/// What the served model brings to every request besides its weights.
#[derive(Clone, Debug, Default)]
pub struct ModelBehaviour {
    /// Its reasoning parser, when it thinks in `<think>…</think>`.
    pub reasoning: Option<Reasoning>,
    pub sampling_defaults: SamplingDefaults,
    /// What the model was loaded from (a folder or a hub id), as `/v1/models` shows it.
    pub model_root: String,
    /// The format its tool calls are written in (`--tool-call-parser`), if any.
    pub tool_format: Option<ToolFormat>,
    /// Every id that ends a choice (a finished grammar allows them all).
    pub eos_token_ids: Vec<u32>,
    /// What the routers in front read about this worker.
    pub worker: WorkerInfo,
}

/// What `/server_info`, `/model_info` and `/get_load` tell a router (vllm-router, the SGLang
/// gateway) about this worker, besides what the engine and the tokenizer say.
#[derive(Clone, Debug)]
pub struct WorkerInfo {
    /// transformers' `model_type` and `architectures` of the served model.
    pub model_type: String,
    pub architectures: Vec<String>,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    /// Unique per process: a router tells restarted or duplicated workers apart by it.
    pub instance_id: String,
    pub get_load_format: GetLoadFormat,
    /// Where each replica publishes its KV-cache events (empty: off), by rank.
    pub kv_event_sources: Vec<crate::kv_events::Source>,
}

impl Default for WorkerInfo {
    fn default() -> Self {
        Self {
            model_type: String::new(),
            architectures: Vec::new(),
            max_num_seqs: 0,
            max_num_batched_tokens: 0,
            instance_id: format!("distillery-{:016x}", rand::random::<u64>()),
            get_load_format: GetLoadFormat::Sglang,
            kv_event_sources: Vec::new(),
        }
    }
}

/// The model name the SGLang gateway (sglang-router) writes into a request that named none:
/// such a request is served like one without `model`.
pub const UNNAMED_MODEL: &str = "unknown";

pub struct AppState {
    pub engine: EngineHandle,
    pub reasoning: Option<Reasoning>,
    pub sampling_defaults: SamplingDefaults,
    pub model_root: String,
    pub tool_format: Option<ToolFormat>,
    pub worker: WorkerInfo,
    /// Compiles and caches the grammars of structured outputs and tool calls.
    pub grammars: Arc<Grammars>,
    pub tokenizer: Arc<Tokenizer>,
    pub model_name: String,
    pub max_model_len: usize,
    pub vocab_size: usize,
    pub admission: Arc<Admission>,
    pub preprocess: PreprocessPool,
    pub api_keys: Vec<String>,
    pub metrics: Arc<Metrics>,
    pub request_log: RequestLog,
    pub draining: AtomicBool,
    /// Open connections and those closed at a deadline, for `/metrics`.
    pub connections: Arc<super::connection::ConnectionStats>,
    pub started: u64,
    next_id: AtomicU64,
}

impl AppState {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        engine: EngineHandle,
        tokenizer: Arc<Tokenizer>,
        model_name: String,
        admission: Arc<Admission>,
        preprocess: PreprocessPool,
        api_keys: Vec<String>,
        metrics: Arc<Metrics>,
        request_log: RequestLog,
        behaviour: ModelBehaviour,
    ) -> Self {
        let limits = engine.limits();
        let grammars = Arc::new(Grammars::new(
            tokenizer.clone(),
            &behaviour.eos_token_ids,
            limits.vocab_size,
            Some(metrics.grammar().clone()),
        ));
        Self {
            tool_format: behaviour.tool_format,
            worker: behaviour.worker,
            grammars,
            reasoning: behaviour.reasoning,
            sampling_defaults: behaviour.sampling_defaults,
            model_root: behaviour.model_root,
            max_model_len: limits.max_model_len,
            vocab_size: limits.vocab_size,
            engine,
            tokenizer,
            model_name,
            admission,
            preprocess,
            api_keys,
            metrics,
            request_log,
            draining: AtomicBool::new(false),
            connections: Arc::default(),
            started: unix_now(),
            next_id: AtomicU64::new(rand::random::<u32>() as u64),
        }
    }

    /// A fresh id such as `cmpl-5f3a...`.
    pub fn next_id(&self, prefix: &str) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}-{n:016x}")
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Refuses new work while draining, and requests for a model we do not serve.
    pub fn check_model(&self, model: Option<&str>) -> Result<(), ApiError> {
        if self.is_draining() {
            return Err(ApiError::overloaded(
                "The server is shutting down; retry on another replica.",
            ));
        }
        match model {
            // The SGLang gateway forwards a request that named no model as "unknown".
            Some(m) if m != self.model_name && m != UNNAMED_MODEL => {
                Err(ApiError::model_not_found(m))
            }
            _ => Ok(()),
        }
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
