//! Every engine knob in one place, with defaults chosen for the reference workload: many
//! short chat requests sharing one system prompt.
//!
//! Knows settings; knows nothing of HTTP or tensors. (The server's settings join this module
//! when the daemon lands; precedence will be file < `DISTILLERY_*` env < flags.)

use serde::Deserialize;

use crate::reasoning::{EffortBudgets, ReasoningParserChoice, ReasoningSettings};

mod numeric;
pub use numeric::{NumericSetting, NUMERIC_SETTINGS};

/// More engine replicas than this is a typo, not a machine.
pub const MAX_DATA_PARALLEL: usize = 256;

/// How large the KV cache is.
#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KvCacheSize {
    /// A byte budget for all layers' K and V.
    Bytes(usize),
    /// An exact number of blocks (tests and benchmarks).
    Blocks(usize),
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// Tokens per KV block.
    pub block_size: usize,
    /// Most sequences in one step's batch.
    pub max_num_seqs: usize,
    /// Most tokens (decode tokens plus prefill chunks) in one step.
    pub max_num_batched_tokens: usize,
    pub kv_cache: KvCacheSize,
    /// What the cache stores (`auto`: the model's compute dtype).
    pub kv_cache_dtype: crate::model::KvCacheDtype,
    pub enable_prefix_caching: bool,
    /// Context limit; `None` takes the model's `max_position_embeddings`.
    pub max_model_len: Option<usize>,
    /// Independent engine replicas (each its own thread, scheduler and share of the KV
    /// budget) that requests are spread over; the limits above apply to each.
    pub data_parallel_size: usize,
    /// The seed of the prefix cache's block hashes (vLLM's `PYTHONHASHSEED` in its
    /// `sha256_cbor` scheme: `engine::block_hash`).
    pub prefix_caching_hash_seed: String,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            // Prefix caching reuses whole blocks, so every request recomputes the shared
            // prompt's last partial block: 8 halves that against vLLM's 16 (7% less CPU per
            // customer-service request, BENCHMARKS.md). On a GPU 16 may batch better.
            block_size: 8,
            // Short requests at high rate: a wide batch keeps per-step overhead amortised.
            max_num_seqs: 256,
            // Enough for a burst of ~150-token prompts to prefill together without starving
            // decodes for long; chunked prefill takes care of longer prompts.
            max_num_batched_tokens: 2048,
            kv_cache: KvCacheSize::Bytes(1 << 30),
            kv_cache_dtype: crate::model::KvCacheDtype::Auto,
            enable_prefix_caching: true,
            max_model_len: None,
            data_parallel_size: 1,
            prefix_caching_hash_seed: crate::engine::block_hash::DEFAULT_SEED.into(),
        }
    }
}

impl EngineConfig {
    /// Checks relations between knobs; the error names the knob.
    pub fn validate(&self) -> Result<(), String> {
        if self.block_size == 0 || !self.block_size.is_power_of_two() || self.block_size > 256 {
            return Err(format!(
                "block_size must be a power of two between 1 and 256, got {}",
                self.block_size
            ));
        }
        if self.max_num_seqs == 0 {
            return Err("max_num_seqs must be at least 1".into());
        }
        if !(1..=MAX_DATA_PARALLEL).contains(&self.data_parallel_size) {
            return Err(format!(
                "data_parallel_size must be between 1 and {MAX_DATA_PARALLEL}, got {}",
                self.data_parallel_size
            ));
        }
        if self.max_num_batched_tokens < self.max_num_seqs.min(64) {
            return Err(format!(
                "max_num_batched_tokens ({}) is too small for max_num_seqs ({})",
                self.max_num_batched_tokens, self.max_num_seqs
            ));
        }
        Ok(())
    }
}

/// `--log-format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

/// `--load-format`: read the checkpoint, or make random weights for the config (benchmarks).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LoadFormat {
    Auto,
    Dummy,
}

/// `--metrics-compat`: which other servers' metric names `/metrics` also exports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum MetricsCompat {
    /// Only the native `distillery:*` family.
    None,
    /// Also vLLM v1's `vllm:*` names, so its dashboards and autoscalers work unchanged.
    Vllm,
}

/// `--tool-call-parser`: the format tool calls are written in, and so parsed and constrained.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum ToolCallParserChoice {
    /// The format the chat template writes calls in, if it writes any.
    Auto,
    /// DeepSeek V3 / R1-Distill: `<｜tool▁calls▁begin｜>…`.
    Deepseek,
    /// Qwen2.5 / Hermes: `<tool_call>{…}</tool_call>`.
    Hermes,
    /// Llama 3.x: a JSON object with `name` and `parameters`.
    #[value(name = "llama3_json")]
    #[serde(rename = "llama3_json")]
    Llama3Json,
    /// Off: tools reach the template, the output is never parsed into calls.
    None,
}

/// `--get-load-format`: the shape of `GET /get_load`, where the routers in front disagree.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum GetLoadFormat {
    /// SGLang's: an array with one `{dp_rank, num_reqs, num_waiting_reqs, num_tokens}` per
    /// replica (sglang-router reads no other shape: it takes any other as the lowest load).
    Sglang,
    /// vllm-router's: `{"load": N}` (it falls back on its own counts for any other shape).
    Vllm,
}

/// `--generation-config`: where requests' omitted sampling fields come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GenerationConfigChoice {
    /// The model folder's `generation_config.json` (vLLM's default).
    Auto,
    /// OpenAI's defaults only (`vllm`, or `none`).
    Vllm,
    /// This folder's `generation_config.json`.
    Folder(std::path::PathBuf),
}

impl std::str::FromStr for GenerationConfigChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "vllm" | "none" => Ok(Self::Vllm),
            "" => Err("generation_config is auto, vllm, none or a folder".into()),
            path => Ok(Self::Folder(path.into())),
        }
    }
}

impl<'de> Deserialize<'de> for GenerationConfigChoice {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Everything `distillery serve` can be told, as read from `config/default.toml` (or
/// `--config FILE`); `DISTILLERY_*` variables and flags override it field by field.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeSettings {
    pub model: String,
    pub served_model_name: Option<String>,
    pub host: String,
    pub port: u16,
    pub api_keys: Vec<String>,
    pub dtype: crate::model::DTypeChoice,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: crate::model::DeviceChoice,
    /// Weight-only quantization of the projections (`none`, `q8_0`, `q4_0`, `q4_k`, `q6_k`,
    /// `bf16`, `f16`).
    pub quantization: crate::model::Quantization,
    /// On a CUDA device, the fraction of its memory this process may use (weights, activations
    /// and the KV pool, which gets the rest); 0 sizes the pool from `kv_cache_memory` instead.
    pub gpu_memory_utilization: f64,
    pub load_format: LoadFormat,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub max_waiting_requests: usize,
    pub max_queued_prompt_tokens: usize,
    /// KV cache budget in bytes (accepts suffixes in flags: `512MiB`, `2GB`).
    pub kv_cache_memory: usize,
    pub kv_cache_dtype: crate::model::KvCacheDtype,
    pub block_size: usize,
    pub enable_prefix_caching: bool,
    pub max_model_len: Option<usize>,
    /// Engine replicas: `auto` chooses from the model's shape and the cores
    /// ([`auto_replicas`]); the daemon resolves it before any thread starts.
    pub data_parallel_size: WorkerCount,
    pub tokenizer_workers: WorkerCount,
    pub max_body_bytes: usize,
    /// From the end of a request's headers to its body's last byte (a deadline, not an idle
    /// timer).
    pub body_read_timeout_secs: f64,
    /// From a request's first byte (a new connection's accept) to the end of its headers.
    pub header_read_timeout_secs: f64,
    /// How long a connection with nothing in flight stays open; 0 closes after each response.
    pub keep_alive_timeout_secs: f64,
    /// Connections held at once (further ones wait in the listen backlog).
    pub max_connections: usize,
    pub shutdown_grace_secs: f64,
    pub cors_allow_origins: Vec<String>,
    pub log_format: LogFormat,
    /// No log line per request (`--disable-log-requests`, as vLLM names it).
    pub disable_log_requests: bool,
    pub metrics_compat: MetricsCompat,
    pub generation_config: GenerationConfigChoice,
    pub reasoning_parser: ReasoningParserChoice,
    /// Reasoning tokens before the end of thinking is forced; -1 unbounded.
    pub reasoning_budget: i64,
    pub reasoning_budget_message: String,
    pub reasoning_effort_budgets: EffortBudgets,
    pub tool_call_parser: ToolCallParserChoice,
    pub get_load_format: GetLoadFormat,
    /// The seed of the prefix cache's block hashes (vLLM's `PYTHONHASHSEED`).
    pub prefix_caching_hash_seed: String,
    /// Where KV-cache events are published (ZMQ PUB), e.g. `tcp://*:5557`; none: off.
    pub kv_events_endpoint: Option<String>,
    /// Where a subscriber asks for the events it missed (ZMQ ROUTER); none: no replay.
    pub kv_events_replay_endpoint: Option<String>,
    /// The ZMQ topic of every event message.
    pub kv_events_topic: String,
}

impl Default for ServeSettings {
    fn default() -> Self {
        let engine = EngineConfig::default();
        let reasoning = ReasoningSettings::default();
        Self {
            model: "builtin:tiny".into(),
            served_model_name: None,
            host: "0.0.0.0".into(),
            port: 8000,
            api_keys: Vec::new(),
            dtype: crate::model::DTypeChoice::Auto,
            quantization: crate::model::Quantization::None,
            device: crate::model::DeviceChoice::Cpu,
            // vLLM's default: leaves room for the CUDA context and allocator slack.
            gpu_memory_utilization: 0.9,
            load_format: LoadFormat::Auto,
            max_num_seqs: engine.max_num_seqs,
            max_num_batched_tokens: engine.max_num_batched_tokens,
            // At 5000 req/s a queue of 1024 is ~200 ms of work: beyond it, shed load.
            max_waiting_requests: 1024,
            max_queued_prompt_tokens: 1 << 20,
            kv_cache_memory: 1 << 30,
            kv_cache_dtype: engine.kv_cache_dtype,
            block_size: engine.block_size,
            enable_prefix_caching: engine.enable_prefix_caching,
            max_model_len: None,
            data_parallel_size: WorkerCount::Auto,
            tokenizer_workers: WorkerCount::Auto,
            max_body_bytes: 4 << 20,
            body_read_timeout_secs: 30.0,
            // Ample for any real client on any network; a slowloris socket is gone in 10 s.
            header_read_timeout_secs: 10.0,
            // Longer than the idle timeouts of the load balancers in front (AWS ALB 60 s), so
            // that the balancer, not the daemon, closes an idle pooled connection: otherwise a
            // request can be sent on a connection the daemon is just closing.
            keep_alive_timeout_secs: 75.0,
            max_connections: 16384,
            shutdown_grace_secs: 30.0,
            cors_allow_origins: Vec::new(),
            log_format: LogFormat::Pretty,
            disable_log_requests: false,
            // Operators arrive with vLLM dashboards; the copies cost a few lines per scrape.
            metrics_compat: MetricsCompat::Vllm,
            generation_config: GenerationConfigChoice::Auto,
            reasoning_parser: reasoning.parser,
            reasoning_budget: reasoning.budget,
            reasoning_budget_message: reasoning.budget_message,
            reasoning_effort_budgets: reasoning.effort,
            tool_call_parser: ToolCallParserChoice::Auto,
            // The shape whose misreading does harm (see GetLoadFormat::Sglang).
            get_load_format: GetLoadFormat::Sglang,
            prefix_caching_hash_seed: engine.prefix_caching_hash_seed.clone(),
            kv_events_endpoint: None,
            kv_events_replay_endpoint: None,
            kv_events_topic: String::new(),
        }
    }
}

impl ServeSettings {
    pub fn from_toml(text: &str) -> Result<Self, String> {
        // Numbers are checked against their ranges first, so that `max_model_len = -1` gets the
        // same message as the flag, not serde's "expected usize".
        let table: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
        for n in NUMERIC_SETTINGS {
            let value = match table.get(n.key) {
                Some(toml::Value::Integer(i)) => Some(*i as f64),
                Some(toml::Value::Float(f)) => Some(*f),
                _ => None,
            };
            if let Some(v) = value {
                n.check(Some(v))?;
            }
        }
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// The checks that need no model, so a bad setting fails before minutes of loading.
    pub fn validate(&self) -> Result<(), String> {
        for n in NUMERIC_SETTINGS {
            n.check(self.numeric(n.key))?;
        }
        self.engine_config().validate()?;
        self.reasoning().validate()?;
        if self.replicas() > 1 && self.device != crate::model::DeviceChoice::Cpu {
            return Err(format!(
                "data_parallel_size {} is for CPU serving; on {} one engine batches best",
                self.replicas(),
                self.device
            ));
        }
        Ok(())
    }

    /// The engine replicas, once `auto` is resolved (1 before: what a check may assume).
    pub fn replicas(&self) -> usize {
        match self.data_parallel_size {
            WorkerCount::Fixed(n) => n,
            WorkerCount::Auto => 1,
        }
    }

    pub fn reasoning(&self) -> ReasoningSettings {
        ReasoningSettings {
            parser: self.reasoning_parser,
            budget: self.reasoning_budget,
            budget_message: self.reasoning_budget_message.clone(),
            effort: self.reasoning_effort_budgets,
        }
    }

    pub fn engine_config(&self) -> EngineConfig {
        EngineConfig {
            block_size: self.block_size,
            max_num_seqs: self.max_num_seqs,
            max_num_batched_tokens: self.max_num_batched_tokens,
            kv_cache: KvCacheSize::Bytes(self.kv_cache_memory),
            kv_cache_dtype: self.kv_cache_dtype,
            enable_prefix_caching: self.enable_prefix_caching,
            max_model_len: self.max_model_len,
            data_parallel_size: self.replicas(),
            prefix_caching_hash_seed: self.prefix_caching_hash_seed.clone(),
        }
    }
}

/// A setting that cannot work, found before or while the model loads: the daemon exits 2.
#[derive(Debug, thiserror::Error)]
#[error("invalid settings: {0}")]
pub struct InvalidSettings(pub String);

/// Below this many multiply-adds per token (projections and output head), a step's fixed
/// costs (scheduling, sampling, HTTP) outweigh its arithmetic: such a model serves more
/// requests as one engine replica per core, each with one thread, than as one replica whose
/// ops are split across the cores; above it the split matmuls win. Measured on 2 vCPUs
/// (BENCHMARKS.md, "Replicas by default"): tiny-llama-v512 (0.1 M) and tiny-random-llama
/// (2.1 M) gain from two replicas, bench-llama-25m (23 M) loses.
pub const OVERHEAD_BOUND_MACS: usize = 8_000_000;

/// `--data-parallel-size auto` on the CPU: a replica per core (at most [`MAX_DATA_PARALLEL`])
/// for a model under [`OVERHEAD_BOUND_MACS`] per token, else one replica with every core.
pub fn auto_replicas(macs_per_token: usize, cores: usize) -> usize {
    if macs_per_token < OVERHEAD_BOUND_MACS {
        cores.clamp(1, MAX_DATA_PARALLEL)
    } else {
        1
    }
}

/// Counts that `auto` leaves to the daemon: tokenizer threads one per core; engine replicas
/// from the model's shape ([`auto_replicas`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkerCount {
    /// One per core.
    Auto,
    Fixed(usize),
}

impl WorkerCount {
    pub fn resolve(self) -> usize {
        match self {
            Self::Auto => std::thread::available_parallelism().map_or(1, |n| n.get()),
            Self::Fixed(n) => n,
        }
    }
}

impl std::str::FromStr for WorkerCount {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "auto" => Ok(Self::Auto),
            n => n
                .parse()
                .map(Self::Fixed)
                .map_err(|_| format!("{s:?} is neither `auto` nor a count")),
        }
    }
}

impl<'de> Deserialize<'de> for WorkerCount {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Count(usize),
            Word(String),
        }
        match Raw::deserialize(d)? {
            Raw::Count(n) => Ok(Self::Fixed(n)),
            Raw::Word(w) => w.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// Parses a byte size such as `1073741824`, `512MiB`, `2GB`, `64k`.
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 1073741824, 512MiB, 2GB)"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" => 1024.0 * 1024.0,
        "g" | "gb" => 1e9,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        other => return Err(format!("unknown size unit {other:?}")),
    };
    Ok((value * mult) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_replicas_split_overhead_bound_models_and_keep_compute_bound_ones_whole() {
        // tiny-llama-v512 ~0.1 M multiply-adds per token, tiny-random-llama ~2.1 M,
        // bench-llama-25m ~23 M, R1-Distill-Qwen-1.5B ~1.8 G.
        assert_eq!(auto_replicas(120_000, 2), 2);
        assert_eq!(auto_replicas(2_100_000, 16), 16);
        assert_eq!(auto_replicas(23_000_000, 2), 1);
        assert_eq!(auto_replicas(1_800_000_000, 64), 1);
        assert_eq!(auto_replicas(0, 0), 1);
        assert_eq!(auto_replicas(0, 10_000), MAX_DATA_PARALLEL);
    }

    #[test]
    fn the_shipped_default_toml_matches_the_built_in_defaults() {
        let text = include_str!("../config/default.toml");
        let parsed = ServeSettings::from_toml(text).unwrap();
        let d = ServeSettings::default();
        assert_eq!(parsed.model, d.model);
        assert_eq!(parsed.port, d.port);
        assert_eq!(parsed.max_num_seqs, d.max_num_seqs);
        assert_eq!(parsed.kv_cache_memory, d.kv_cache_memory);
        assert_eq!(parsed.max_waiting_requests, d.max_waiting_requests);
        assert_eq!(parsed.metrics_compat, d.metrics_compat);
        assert_eq!(parsed.device, d.device);
        assert_eq!(parsed.gpu_memory_utilization, d.gpu_memory_utilization);
        assert_eq!(parsed.generation_config, d.generation_config);
        assert_eq!(parsed.reasoning(), d.reasoning());
        assert_eq!(parsed.tokenizer_workers, d.tokenizer_workers);
        assert_eq!(parsed.header_read_timeout_secs, d.header_read_timeout_secs);
        assert_eq!(parsed.body_read_timeout_secs, d.body_read_timeout_secs);
        assert_eq!(parsed.keep_alive_timeout_secs, d.keep_alive_timeout_secs);
        assert_eq!(parsed.max_connections, d.max_connections);
        assert_eq!(parsed.shutdown_grace_secs, d.shutdown_grace_secs);
    }

    #[test]
    fn reasoning_settings_parse_and_are_checked() {
        let s = ServeSettings::from_toml(
            "reasoning_parser = \"deepseek_r1\"\nreasoning_budget = 64\n\
             reasoning_effort_budgets = \"low=8\"\ngeneration_config = \"vllm\"",
        )
        .unwrap();
        assert_eq!(s.reasoning_parser, ReasoningParserChoice::DeepseekR1);
        assert_eq!(s.reasoning().default_budget(), Some(64));
        assert_eq!(s.reasoning_effort_budgets.low, Some(8));
        assert_eq!(s.generation_config, GenerationConfigChoice::Vllm);
        let e = ServeSettings::from_toml("reasoning_budget = -2").unwrap_err();
        assert!(e.contains("reasoning_budget"), "{e}");
        assert!(ServeSettings::from_toml("reasoning_parser = \"qwen3\"").is_err());
        assert!(ServeSettings::from_toml("reasoning_effort_budgets = \"huge=1\"").is_err());
    }

    #[test]
    fn replica_counts_are_checked_before_any_model_is_loaded() {
        let e = ServeSettings::from_toml("data_parallel_size = 0").unwrap_err();
        assert!(e.contains("data_parallel_size"), "{e}");
        let s = ServeSettings::from_toml("data_parallel_size = 2\ndevice = \"cuda\"").unwrap();
        assert!(s.validate().unwrap_err().contains("CPU"));
        let s = ServeSettings::from_toml("data_parallel_size = 2").unwrap();
        assert_eq!(s.validate(), Ok(()));
    }

    #[test]
    fn devices_parse_from_the_config_file() {
        use crate::model::DeviceChoice;
        let s = ServeSettings::from_toml("device = \"cuda:1\"").unwrap();
        assert_eq!(s.device, DeviceChoice::Cuda(1));
        let s = ServeSettings::from_toml("device = \"cuda\"").unwrap();
        assert_eq!(s.device, DeviceChoice::Cuda(0));
        assert!(ServeSettings::from_toml("device = \"tpu\"").is_err());
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_bytes("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("2GB").unwrap(), 2_000_000_000);
        assert_eq!(parse_bytes("1024").unwrap(), 1024);
        assert!(parse_bytes("lots").is_err());
    }

    #[test]
    fn every_numeric_setting_is_read_and_its_defaults_are_in_range() {
        let mut s = ServeSettings {
            max_model_len: Some(4096),
            tokenizer_workers: WorkerCount::Fixed(2),
            data_parallel_size: WorkerCount::Fixed(2),
            ..ServeSettings::default()
        };
        for n in NUMERIC_SETTINGS {
            assert!(
                s.numeric(n.key).is_some(),
                "{} is not read by numeric()",
                n.key
            );
        }
        assert_eq!(s.validate(), Ok(()));
        // Out of range, in the file or after the merge, each names all three ways to set it.
        s.max_connections = 0;
        let e = s.validate().unwrap_err();
        for name in [
            "--max-connections",
            "DISTILLERY_MAX_CONNECTIONS",
            "key max_connections",
        ] {
            assert!(e.contains(name), "{e} does not name {name}");
        }
        let e = ServeSettings::from_toml("shutdown_grace_secs = -1.0").unwrap_err();
        assert!(e.contains("--shutdown-grace"), "{e}");
        let e = ServeSettings::from_toml("keep_alive_timeout_secs = 0.001").unwrap_err();
        assert!(e.contains("--keep-alive-timeout"), "{e}");
        let s = ServeSettings::from_toml("keep_alive_timeout_secs = 0").unwrap();
        assert_eq!(s.validate(), Ok(()), "0 turns keep-alive off");
        let e = ServeSettings::from_toml("header_read_timeout_secs = 0.01").unwrap_err();
        assert!(e.contains("--header-read-timeout"), "{e}");
        let e = ServeSettings::from_toml("max_model_len = 0").unwrap_err();
        assert!(e.contains("DISTILLERY_MAX_MODEL_LEN"), "{e}");
        let s = ServeSettings::from_toml("tokenizer_workers = \"auto\"").unwrap();
        assert_eq!(s.tokenizer_workers, WorkerCount::Auto);
        let s = ServeSettings::from_toml("tokenizer_workers = 3").unwrap();
        assert_eq!(s.tokenizer_workers, WorkerCount::Fixed(3));
    }

    #[test]
    fn unknown_keys_in_a_config_file_are_errors() {
        assert!(ServeSettings::from_toml("prot = 8000").is_err());
    }
}
