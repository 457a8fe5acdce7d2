//! `distillery serve`: resolve settings (file < `DISTILLERY_*` env < flags), load the model,
//! start the engine thread and the HTTP server.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::UnboundedReceiver;

use anyhow::{Context, Result};
use clap::Args;

use distillery::config::KvCacheSize;
use distillery::config::{
    parse_bytes, GenerationConfigChoice, GetLoadFormat, InvalidSettings, LoadFormat, LogFormat,
    MetricsCompat, NumericSetting, ServeSettings, ToolCallParserChoice, WorkerCount,
};
use distillery::kv_events;
use distillery::metrics::{Metrics, MetricsOptions};
use distillery::model::{self, DTypeChoice, DeviceChoice, GenerationDefaults, KvCache};
use distillery::reasoning::{EffortBudgets, Reasoning, ReasoningParserChoice};
use distillery::server::{
    self, ConnectionLimits, ModelBehaviour, SamplingDefaults, ServerOptions, WorkerInfo,
};
use distillery::tokenizer::Tokenizer;
use distillery::tools::ToolFormat;
use distillery::{engine, model::Decoder};

mod load;
pub use load::resolve_replicas;
use load::{load, Loaded};

/// Every flag can also be set as `DISTILLERY_<NAME>` or in the config file.
#[derive(Args, Debug, Default)]
pub struct ServeArgs {
    /// TOML settings file (see config/default.toml for every key).
    #[arg(long, env = "DISTILLERY_CONFIG")]
    config: Option<PathBuf>,
    /// A local folder, a Hugging Face hub id (org/name), or builtin:tiny [default: builtin:tiny]
    #[arg(long, env = "DISTILLERY_MODEL")]
    model: Option<String>,
    /// The model name clients send [default: the folder name or hub id]
    #[arg(long, env = "DISTILLERY_SERVED_MODEL_NAME")]
    served_model_name: Option<String>,
    /// [default: 0.0.0.0]
    #[arg(long, env = "DISTILLERY_HOST")]
    host: Option<String>,
    /// [default: 8000; 0 picks a free port]
    #[arg(long, allow_negative_numbers = true, env = "DISTILLERY_PORT", value_parser = checked::<u16>("port"))]
    port: Option<u16>,
    /// An accepted bearer key; repeat for several (env: comma-separated).
    #[arg(long = "api-key", env = "DISTILLERY_API_KEYS", value_delimiter = ',')]
    api_keys: Vec<String>,
    /// auto: the config's torch_dtype on a GPU; on the CPU bf16/f16 weight matrices for a
    /// bf16/f16 checkpoint (f32 under a block --quantization), else f32 [default: auto]
    #[arg(long, env = "DISTILLERY_DTYPE", value_enum)]
    dtype: Option<DTypeChoice>,
    /// cpu, cuda or cuda:N (needs a build with --features cuda) [default: cpu]
    #[arg(long, env = "DISTILLERY_DEVICE")]
    device: Option<DeviceChoice>,
    /// Store the projection weights quantized and multiply them with int8 kernels, or in half
    /// precision (CPU): none, q8_0, q4_0, q4_k, q6_k, bf16, f16 [default: none]
    #[arg(long, env = "DISTILLERY_QUANTIZATION", value_enum)]
    quantization: Option<model::Quantization>,
    /// On CUDA: fraction of the GPU's memory to use; the KV pool gets what the weights and
    /// activations leave (0: size it from --kv-cache-memory) [default: 0.9]
    #[arg(long, allow_negative_numbers = true, env = "DISTILLERY_GPU_MEMORY_UTILIZATION", value_parser = checked::<f64>("gpu_memory_utilization"))]
    gpu_memory_utilization: Option<f64>,
    #[arg(long, env = "DISTILLERY_LOAD_FORMAT", value_enum)]
    load_format: Option<LoadFormat>,
    /// Sequences in one engine step [default: 256]
    #[arg(long, allow_negative_numbers = true, env = "DISTILLERY_MAX_NUM_SEQS", value_parser = checked::<usize>("max_num_seqs"))]
    max_num_seqs: Option<usize>,
    /// Tokens in one engine step [default: 2048]
    #[arg(long, allow_negative_numbers = true, env = "DISTILLERY_MAX_NUM_BATCHED_TOKENS", value_parser = checked::<usize>("max_num_batched_tokens"))]
    max_num_batched_tokens: Option<usize>,
    /// Requests waiting for their first token before new ones get 503 [default: 1024]
    #[arg(long, allow_negative_numbers = true, env = "DISTILLERY_MAX_WAITING_REQUESTS", value_parser = checked::<usize>("max_waiting_requests"))]
    max_waiting_requests: Option<usize>,
    /// Prompt tokens waiting before new requests get 503 [default: 1048576]
    #[arg(long, allow_negative_numbers = true, env = "DISTILLERY_MAX_QUEUED_PROMPT_TOKENS", value_parser = checked::<usize>("max_queued_prompt_tokens"))]
    max_queued_prompt_tokens: Option<usize>,
    /// KV cache budget, e.g. 1GiB or 536870912 [default: 1GiB]
    #[arg(long, allow_negative_numbers = true, env = "DISTILLERY_KV_CACHE_MEMORY", value_parser = bytes("kv_cache_memory"))]
    kv_cache_memory: Option<usize>,
    /// What the KV cache stores: auto (the model's compute dtype), or on the CPU for an f32
    /// model bf16 / f16 (half the bytes per token) [default: auto]
    #[arg(long, env = "DISTILLERY_KV_CACHE_DTYPE", value_enum)]
    kv_cache_dtype: Option<model::KvCacheDtype>,
    /// Tokens per KV block [default: 8]
    #[arg(long, allow_negative_numbers = true, env = "DISTILLERY_BLOCK_SIZE", value_parser = checked::<usize>("block_size"))]
    block_size: Option<usize>,
    /// No log line per request (metrics still count them); for thousands of requests a second
    #[arg(long, env = "DISTILLERY_DISABLE_LOG_REQUESTS",
          value_parser = clap::builder::FalseyValueParser::new())]
    disable_log_requests: bool,
    /// Reuse computed KV blocks of shared prompt prefixes (the default).
    #[arg(long, overrides_with = "no_enable_prefix_caching")]
    enable_prefix_caching: bool,
    #[arg(long, overrides_with = "enable_prefix_caching")]
    no_enable_prefix_caching: bool,
    /// Context limit [default: the model's max_position_embeddings]
    #[arg(long, allow_negative_numbers = true, env = "DISTILLERY_MAX_MODEL_LEN", value_parser = checked::<usize>("max_model_len"))]
    max_model_len: Option<usize>,
    /// Engine replicas on the CPU, each with its own thread, scheduler and share of the KV
    /// budget: auto (one per core for models whose steps are overhead-bound, else one with
    /// every core) or a count [default: auto]
    #[arg(long, allow_negative_numbers = true, env = "DISTILLERY_DATA_PARALLEL_SIZE", value_parser = workers("data_parallel_size"))]
    data_parallel_size: Option<WorkerCount>,
    /// Threads for template rendering and tokenization: auto (one per core) or a count; long
    /// prompts never take every thread [default: auto]
    #[arg(long, allow_negative_numbers = true, env = "DISTILLERY_TOKENIZER_WORKERS", value_parser = workers("tokenizer_workers"))]
    tokenizer_workers: Option<WorkerCount>,
    /// Largest request body; bigger gets 413 [default: 4194304]
    #[arg(long, allow_negative_numbers = true, env = "DISTILLERY_MAX_BODY_BYTES", value_parser = bytes("max_body_bytes"))]
    max_body_bytes: Option<usize>,
    /// Seconds from the end of a request's headers to the last byte of its body; slower
    /// uploads get 408 [default: 30]
    #[arg(long, env = "DISTILLERY_BODY_READ_TIMEOUT", allow_negative_numbers = true,
          value_parser = checked::<f64>("body_read_timeout_secs"))]
    body_read_timeout: Option<f64>,
    /// Seconds from a request's first byte (a new connection's accept) to the end of its
    /// headers; slower connections are closed [default: 10]
    #[arg(long, env = "DISTILLERY_HEADER_READ_TIMEOUT", allow_negative_numbers = true,
          value_parser = checked::<f64>("header_read_timeout_secs"))]
    header_read_timeout: Option<f64>,
    /// Seconds an idle keep-alive connection stays open; 0 closes after each response
    /// [default: 75]
    #[arg(long, env = "DISTILLERY_KEEP_ALIVE_TIMEOUT", allow_negative_numbers = true,
          value_parser = checked::<f64>("keep_alive_timeout_secs"))]
    keep_alive_timeout: Option<f64>,
    /// Connections held at once; more wait in the listen backlog (lowered to what the
    /// open-files limit allows) [default: 16384]
    #[arg(long, env = "DISTILLERY_MAX_CONNECTIONS", allow_negative_numbers = true,
          value_parser = checked::<usize>("max_connections"))]
    max_connections: Option<usize>,
    /// Seconds in-flight requests may run after SIGTERM [default: 30]
    #[arg(long, allow_negative_numbers = true, env = "DISTILLERY_SHUTDOWN_GRACE", value_parser = checked::<f64>("shutdown_grace_secs"))]
    shutdown_grace: Option<f64>,
    /// A CORS origin to allow (`*` for any); repeatable.
    #[arg(
        long = "cors-allow-origin",
        env = "DISTILLERY_CORS_ALLOW_ORIGINS",
        value_delimiter = ','
    )]
    cors_allow_origins: Vec<String>,
    #[arg(long, env = "DISTILLERY_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,
    /// Also export /metrics under another server's names (vllm), or not (none) [default: vllm]
    #[arg(long, env = "DISTILLERY_METRICS_COMPAT", value_enum)]
    metrics_compat: Option<MetricsCompat>,
    /// Sampling defaults for requests that omit them: auto (the model's
    /// generation_config.json), vllm or none (OpenAI's), or a folder holding one [default: auto]
    #[arg(long, env = "DISTILLERY_GENERATION_CONFIG")]
    generation_config: Option<GenerationConfigChoice>,
    /// Split <think>…</think> reasoning from the answer: auto (when the model has the tokens
    /// and its template writes <think>), deepseek_r1, none [default: auto]
    #[arg(long, env = "DISTILLERY_REASONING_PARSER", value_enum)]
    reasoning_parser: Option<ReasoningParserChoice>,
    /// Reasoning tokens a chat request may spend before the end of thinking is forced; -1 is
    /// unbounded, 0 no thinking [default: -1]
    #[arg(
        long,
        env = "DISTILLERY_REASONING_BUDGET",
        allow_negative_numbers = true,
        value_parser = checked::<i64>("reasoning_budget")
    )]
    reasoning_budget: Option<i64>,
    /// The text forced when a reasoning budget is spent; must contain </think> [default: "\n</think>\n\n"]
    #[arg(long, env = "DISTILLERY_REASONING_BUDGET_MESSAGE")]
    reasoning_budget_message: Option<String>,
    /// The budget of each reasoning_effort, e.g. low=512,medium=2048,high=-1
    /// [default: low=512,medium=2048,high=8192]
    #[arg(long, env = "DISTILLERY_REASONING_EFFORT_BUDGETS", value_parser = EffortBudgets::parse)]
    reasoning_effort_budgets: Option<EffortBudgets>,
    /// The tool-call format: auto (the one the chat template writes), deepseek, hermes,
    /// llama3_json, none [default: auto]
    #[arg(long, env = "DISTILLERY_TOOL_CALL_PARSER", value_enum)]
    tool_call_parser: Option<ToolCallParserChoice>,
    /// The shape of GET /get_load: sglang (one entry per replica, for sglang-router) or vllm
    /// ({"load": N}, for vllm-router's power_of_two) [default: sglang]
    #[arg(long, env = "DISTILLERY_GET_LOAD_FORMAT", value_enum)]
    get_load_format: Option<GetLoadFormat>,
    /// Publish KV-cache events (vLLM's format) on this ZMQ endpoint, e.g. tcp://*:5557
    /// (replica N on port + N) [default: off]
    #[arg(long, env = "DISTILLERY_KV_EVENTS_ENDPOINT")]
    kv_events_endpoint: Option<String>,
    /// Answer subscribers' replay requests for missed events here (ZMQ ROUTER), e.g.
    /// tcp://*:5558 (replica N on port + N) [default: none]
    #[arg(long, env = "DISTILLERY_KV_EVENTS_REPLAY_ENDPOINT")]
    kv_events_replay_endpoint: Option<String>,
    /// The ZMQ topic of the KV-cache events [default: ""]
    #[arg(long, env = "DISTILLERY_KV_EVENTS_TOPIC")]
    kv_events_topic: Option<String>,
    /// The seed of the prefix cache's block hashes (vLLM's PYTHONHASHSEED, sha256_cbor)
    /// [default: "0"]
    #[arg(long, env = "DISTILLERY_PREFIX_CACHING_HASH_SEED")]
    prefix_caching_hash_seed: Option<String>,
}

impl ServeArgs {
    /// The file (if any), then every flag or variable that was given.
    pub fn settings(&self) -> Result<ServeSettings> {
        let mut s = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| InvalidSettings(format!("reading {}: {e}", path.display())))?;
                ServeSettings::from_toml(&text)
                    .map_err(|e| InvalidSettings(format!("{}: {e}", path.display())))?
            }
            None => ServeSettings::default(),
        };
        macro_rules! take {
            ($($f:ident),*) => { $( if let Some(v) = self.$f.clone() { s.$f = v; } )* };
        }
        take!(
            model,
            host,
            port,
            dtype,
            device,
            quantization,
            gpu_memory_utilization,
            load_format,
            max_num_seqs,
            max_num_batched_tokens
        );
        take!(
            max_waiting_requests,
            max_queued_prompt_tokens,
            kv_cache_memory,
            kv_cache_dtype,
            block_size
        );
        take!(
            data_parallel_size,
            tokenizer_workers,
            max_body_bytes,
            max_connections,
            log_format,
            metrics_compat
        );
        take!(
            generation_config,
            reasoning_parser,
            reasoning_budget,
            reasoning_budget_message,
            reasoning_effort_budgets,
            tool_call_parser,
            get_load_format,
            kv_events_topic,
            prefix_caching_hash_seed
        );
        if self.served_model_name.is_some() {
            s.served_model_name = self.served_model_name.clone();
        }
        if self.max_model_len.is_some() {
            s.max_model_len = self.max_model_len;
        }
        if self.kv_events_endpoint.is_some() {
            s.kv_events_endpoint = self.kv_events_endpoint.clone();
        }
        if self.kv_events_replay_endpoint.is_some() {
            s.kv_events_replay_endpoint = self.kv_events_replay_endpoint.clone();
        }
        for (flag, key) in [
            (self.shutdown_grace, &mut s.shutdown_grace_secs),
            (self.body_read_timeout, &mut s.body_read_timeout_secs),
            (self.header_read_timeout, &mut s.header_read_timeout_secs),
            (self.keep_alive_timeout, &mut s.keep_alive_timeout_secs),
        ] {
            if let Some(v) = flag {
                *key = v;
            }
        }
        if !self.api_keys.is_empty() {
            s.api_keys = self.api_keys.clone();
        }
        if !self.cors_allow_origins.is_empty() {
            s.cors_allow_origins = self.cors_allow_origins.clone();
        }
        if self.enable_prefix_caching {
            s.enable_prefix_caching = true;
        }
        if self.disable_log_requests {
            s.disable_log_requests = true;
        }
        if self.no_enable_prefix_caching {
            s.enable_prefix_caching = false;
        }
        if let Ok(v) = std::env::var("DISTILLERY_ENABLE_PREFIX_CACHING") {
            if !self.enable_prefix_caching && !self.no_enable_prefix_caching {
                s.enable_prefix_caching = matches!(v.as_str(), "1" | "true" | "yes" | "on");
            }
        }
        s.validate().map_err(InvalidSettings)?;
        Ok(s)
    }
}

/// A numeric flag's parser: the value and its range checked as the config file's are, with a
/// message naming the flag, the variable and the file key.
fn checked<T>(key: &'static str) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync
where
    T: std::str::FromStr + Copy + Into<NumericValue> + Send + Sync + 'static,
{
    move |text: &str| match NumericSetting::named(key) {
        Some(n) => n.parse_with(
            text,
            |t| t.parse::<T>().map_err(|_| String::new()),
            |v| (*v).into().0,
        ),
        None => text
            .trim()
            .parse::<T>()
            .map_err(|_| format!("{text:?}: not a number")),
    }
}

/// A byte size flag (`512MiB`, `2GB`, bytes), range-checked.
fn bytes(key: &'static str) -> impl Fn(&str) -> Result<usize, String> + Clone + Send + Sync {
    move |text: &str| match NumericSetting::named(key) {
        Some(n) => n.parse_with(text, parse_bytes, |v| *v as f64),
        None => parse_bytes(text),
    }
}

/// `auto` or a range-checked count.
fn workers(
    key: &'static str,
) -> impl Fn(&str) -> Result<WorkerCount, String> + Clone + Send + Sync {
    move |text: &str| match text.trim().parse::<WorkerCount>() {
        Ok(WorkerCount::Auto) => Ok(WorkerCount::Auto),
        _ => checked::<usize>(key)(text).map(WorkerCount::Fixed),
    }
}

/// A flag's value as the range table compares it.
struct NumericValue(f64);

impl From<usize> for NumericValue {
    fn from(v: usize) -> Self {
        Self(v as f64)
    }
}
impl From<u16> for NumericValue {
    fn from(v: u16) -> Self {
        Self(v as f64)
    }
}
impl From<i64> for NumericValue {
    fn from(v: i64) -> Self {
        Self(v as f64)
    }
}
impl From<f64> for NumericValue {
    fn from(v: f64) -> Self {
        Self(v)
    }
}

/// The sampling defaults `--generation-config` asks for.
fn sampling_defaults(
    s: &ServeSettings,
    model_dir: Option<&std::path::Path>,
) -> Result<SamplingDefaults> {
    let g = match (&s.generation_config, model_dir) {
        (GenerationConfigChoice::Vllm, _) | (GenerationConfigChoice::Auto, None) => {
            GenerationDefaults::default()
        }
        (GenerationConfigChoice::Auto, Some(dir)) => GenerationDefaults::from_dir(dir)?,
        (GenerationConfigChoice::Folder(dir), _) => {
            anyhow::ensure!(
                dir.join(model::generation_defaults::FILE).is_file(),
                "--generation-config {}: no {} there",
                dir.display(),
                model::generation_defaults::FILE
            );
            GenerationDefaults::from_dir(dir)?
        }
    };
    Ok(SamplingDefaults {
        temperature: g.temperature,
        top_p: g.top_p,
        top_k: g.top_k,
        min_p: g.min_p,
        repetition_penalty: g.repetition_penalty,
    })
}

/// The model's reasoning parser and sampling defaults, logged as they will be in force.
fn behaviour(
    s: &ServeSettings,
    tokenizer: &Tokenizer,
    model_dir: Option<&std::path::Path>,
    eos_token_ids: &[u32],
) -> Result<ModelBehaviour> {
    let sampling_defaults = sampling_defaults(s, model_dir)?;
    if sampling_defaults == SamplingDefaults::default() {
        tracing::info!("sampling defaults: OpenAI's (temperature 1, top_p 1)");
    } else {
        tracing::info!(
            defaults = %serde_json::to_string(&sampling_defaults).unwrap_or_default(),
            "sampling defaults from the model's generation config, for requests that omit \
             them (--generation-config vllm for OpenAI's)"
        );
    }
    let reasoning = Reasoning::resolve(&s.reasoning(), tokenizer).map_err(InvalidSettings)?;
    match &reasoning {
        Some(r) => tracing::info!(
            parser = "deepseek_r1",
            think_start = r.tokens().start,
            think_end = r.tokens().end,
            budget = r.default_budget().map_or(-1, |b| b as i64),
            effort_budgets = %r.effort_budgets(),
            budget_message_tokens = r.end_ids().len(),
            "reasoning parser on: chat output is split into reasoning and content"
        ),
        None => tracing::info!("reasoning parser off: all output is content"),
    }
    let tool_format = tool_format(s.tool_call_parser, tokenizer);
    match tool_format {
        Some(f) => tracing::info!(format = f.name(), "tool calls parsed and constrained"),
        None => tracing::info!(
            "no tool-call format: tools reach the template, tool_choice other than none is \
             refused (--tool-call-parser)"
        ),
    }
    Ok(ModelBehaviour {
        reasoning,
        sampling_defaults,
        model_root: s.model.clone(),
        tool_format,
        eos_token_ids: eos_token_ids.to_vec(),
        worker: WorkerInfo::default(),
    })
}

/// `--tool-call-parser`: `auto` reads the format off the chat template.
fn tool_format(choice: ToolCallParserChoice, tokenizer: &Tokenizer) -> Option<ToolFormat> {
    match choice {
        ToolCallParserChoice::Auto => tokenizer
            .chat_template()
            .and_then(|t| ToolFormat::detect(t.source())),
        ToolCallParserChoice::Deepseek => Some(ToolFormat::Deepseek),
        ToolCallParserChoice::Hermes => Some(ToolFormat::Hermes),
        ToolCallParserChoice::Llama3Json => Some(ToolFormat::Llama3Json),
        ToolCallParserChoice::None => None,
    }
}

/// The settings whose range depends on the model or the machine.
fn check_against_model(s: &ServeSettings, decoder: &Decoder) -> Result<(), InvalidSettings> {
    let max_pos = decoder.config().max_position_embeddings;
    if let Some(len) = s.max_model_len.filter(|&l| l > max_pos) {
        return Err(InvalidSettings(format!(
            "max_model_len = {len} is more than the model's max_position_embeddings ({max_pos}) \
             (flag --max-model-len, environment DISTILLERY_MAX_MODEL_LEN, config file key \
             max_model_len)"
        )));
    }
    let kv_dtype = s
        .kv_cache_dtype
        .resolve(decoder.dtype(), decoder.device())
        .map_err(|e| {
            InvalidSettings(format!(
                "{e} (flag --kv-cache-dtype, environment DISTILLERY_KV_CACHE_DTYPE, config file \
                 key kv_cache_dtype)"
            ))
        })?;
    let on_cpu = model::device_memory(decoder.device()).is_none();
    let per_replica = s.kv_cache_memory / s.replicas().max(1);
    let blocks = KvCache::blocks_for_budget(decoder.config(), s.block_size, kv_dtype, per_replica);
    if on_cpu && blocks == 0 {
        return Err(InvalidSettings(format!(
            "kv_cache_memory = {} holds no KV block of {} tokens for each of the {} replicas \
             (flag --kv-cache-memory, environment DISTILLERY_KV_CACHE_MEMORY, config file key \
             kv_cache_memory)",
            s.kv_cache_memory,
            s.block_size,
            s.replicas()
        )));
    }
    if let Some(total) = on_cpu.then(physical_memory).flatten() {
        if s.kv_cache_memory as u64 > total {
            return Err(InvalidSettings(format!(
                "kv_cache_memory = {} is more than this machine's memory ({total} bytes) (flag \
                 --kv-cache-memory, environment DISTILLERY_KV_CACHE_MEMORY, config file key \
                 kv_cache_memory)",
                s.kv_cache_memory
            )));
        }
    }
    Ok(())
}

/// The machine's memory in bytes (`MemTotal` of /proc/meminfo), where it can be read.
fn physical_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The engine's settings; on a CUDA device the KV pool is sized from
/// `gpu_memory_utilization` now that the weights are loaded (unless that is 0).
fn engine_config(s: &ServeSettings, decoder: &Decoder) -> Result<distillery::config::EngineConfig> {
    let mut config = s.engine_config();
    if s.gpu_memory_utilization == 0.0 {
        return Ok(config);
    }
    let Some((free, total)) = model::device_memory(decoder.device()) else {
        return Ok(config); // the CPU: --kv-cache-memory
    };
    let reserve = KvCache::activation_reserve(
        decoder.config(),
        s.max_num_batched_tokens,
        s.max_num_seqs,
        decoder.dtype(),
    );
    let bytes = KvCache::budget_from_utilization(free, total, s.gpu_memory_utilization, reserve)
        .map_err(anyhow::Error::msg)?;
    tracing::info!(
        device = %s.device,
        free_gib = free as f64 / (1u64 << 30) as f64,
        total_gib = total as f64 / (1u64 << 30) as f64,
        utilization = s.gpu_memory_utilization,
        reserve_gib = reserve as f64 / (1u64 << 30) as f64,
        kv_gib = bytes as f64 / (1u64 << 30) as f64,
        "KV pool sized from --gpu-memory-utilization"
    );
    config.kv_cache = KvCacheSize::Bytes(bytes);
    Ok(config)
}

pub fn run(s: ServeSettings) -> Result<()> {
    let Loaded {
        decoder,
        tokenizer,
        name: default_name,
        dir,
    } = load(&s)?;
    let mut behaviour = behaviour(
        &s,
        &tokenizer,
        dir.as_deref(),
        &decoder.config().eos_token_ids,
    )?;
    let architecture = decoder.config().architecture;
    behaviour.worker = WorkerInfo {
        model_type: architecture.model_type().into(),
        architectures: vec![architecture.hf_name().into()],
        max_num_seqs: s.max_num_seqs,
        max_num_batched_tokens: s.max_num_batched_tokens,
        get_load_format: s.get_load_format,
        ..WorkerInfo::default()
    };
    // An empty name (e.g. `DISTILLERY_SERVED_MODEL_NAME=` in a manifest) means "not set".
    let model_name = s
        .served_model_name
        .clone()
        .filter(|n| !n.trim().is_empty())
        .unwrap_or(default_name);
    check_against_model(&s, &decoder)?;
    let device_is_cpu = decoder.device().is_cpu();
    let engine_config = engine_config(&s, &decoder)?;
    let mut cores = engine::build_replicas(decoder, &engine_config)?;
    // Built here, before the engine threads start, so that they record their steps into the
    // same registry the server renders; both get it passed in, nothing is global.
    let limits = cores.first().context("no engine replica")?.limits();
    let total_blocks: usize = cores
        .iter()
        .map(|c| c.limits().cache_tokens / limits.block_size.max(1))
        .sum();
    let metrics = Arc::new(
        Metrics::new(&MetricsOptions {
            model_name: model_name.clone(),
            vllm_compat: s.metrics_compat == MetricsCompat::Vllm,
            max_model_len: limits.max_model_len,
            block_size: limits.block_size,
            num_gpu_blocks: total_blocks,
            enable_prefix_caching: s.enable_prefix_caching,
            cache_dtype: s.kv_cache_dtype.name(),
        })
        .context("building the metric set")?,
    );
    for core in &mut cores {
        core.set_step_observer(Some(server::step_observer(&metrics)));
    }
    let publishers = kv_event_publishers(&s, &mut cores, limits.block_size, device_is_cpu)?;
    behaviour.worker.kv_event_sources = publishers.iter().map(|(p, _)| p.source.clone()).collect();
    let engine = engine::start_replicas(cores)?;
    let opts = ServerOptions {
        host: s.host.clone(),
        port: s.port,
        served_model_name: model_name,
        api_keys: s.api_keys.clone(),
        max_waiting_requests: s.max_waiting_requests,
        max_queued_prompt_tokens: s.max_queued_prompt_tokens,
        tokenizer_workers: s.tokenizer_workers.resolve(),
        max_body_bytes: s.max_body_bytes,
        // validate() bounded every one of these to a day.
        body_read_timeout: Duration::from_secs_f64(s.body_read_timeout_secs),
        connections: ConnectionLimits {
            header_read_timeout: Duration::from_secs_f64(s.header_read_timeout_secs),
            keep_alive_timeout: Duration::from_secs_f64(s.keep_alive_timeout_secs),
            max_connections: s.max_connections,
        },
        shutdown_grace: Duration::from_secs_f64(s.shutdown_grace_secs),
        cors_allow_origins: s.cors_allow_origins.clone(),
        log_requests: !s.disable_log_requests,
        behaviour,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("distillery-http")
        .build()?;
    runtime.block_on(async move {
        for (publisher, batches) in publishers {
            publisher.start(batches).await.map_err(InvalidSettings)?;
        }
        server::serve(opts, engine, Arc::new(tokenizer), metrics).await
    })
}

/// With `--kv-events-endpoint`: a channel from each replica to its publisher (replica N on
/// the endpoint's port + N), the publishers not started yet (they need the runtime).
fn kv_event_publishers(
    s: &ServeSettings,
    cores: &mut [engine::EngineCore],
    block_size: usize,
    device_is_cpu: bool,
) -> Result<
    Vec<(
        kv_events::Publisher,
        UnboundedReceiver<engine::KvEventBatch>,
    )>,
> {
    let Some(endpoint) = s.kv_events_endpoint.as_deref() else {
        if s.kv_events_replay_endpoint.is_some() {
            return Err(InvalidSettings(
                "--kv-events-replay-endpoint needs --kv-events-endpoint".into(),
            )
            .into());
        }
        return Ok(Vec::new());
    };
    if !s.enable_prefix_caching {
        return Err(InvalidSettings(
            "--kv-events-endpoint reports the prefix cache: it needs prefix caching on".into(),
        )
        .into());
    }
    cores
        .iter_mut()
        .enumerate()
        .map(|(rank, core)| {
            let source = kv_events::source_for_rank(
                endpoint,
                s.kv_events_replay_endpoint.as_deref(),
                &s.kv_events_topic,
                rank,
            )
            .map_err(InvalidSettings)?;
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            core.set_kv_event_sink(tx);
            let publisher = kv_events::Publisher {
                source,
                rank,
                block_size,
                // The cache the engine computes from: the device tier, whatever the device
                // (routers read "CPU" as blocks offloaded to host memory and credit them less).
                medium: if device_is_cpu { "DEVICE" } else { "GPU" },
            };
            Ok((publisher, rx))
        })
        .collect()
}
