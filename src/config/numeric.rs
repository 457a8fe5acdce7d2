//! The range of every numeric setting of `distillery serve`, and the one message that names a
//! refused value's flag, environment variable and config file key. Read by the file parser,
//! the flags' value parsers and [`ServeSettings::validate`] alike, so that a value means the
//! same wherever it is given.
//!
//! Knows setting names and numbers; knows nothing of what the settings do.

use super::{ServeSettings, WorkerCount, MAX_DATA_PARALLEL};

/// One numeric setting: its names (file key, flag, environment variable), the range in which
/// it means something, and what its edge values mean.
#[derive(Debug)]
pub struct NumericSetting {
    /// The config file's key.
    pub key: &'static str,
    /// The flag, without its dashes.
    pub flag: &'static str,
    pub min: f64,
    pub max: f64,
    /// Whole numbers only.
    pub integer: bool,
    /// What a special value means, for the message and the docs (empty: nothing special).
    pub note: &'static str,
    /// 0 is allowed below `min` (it means "off", see `note`).
    pub zero_is_off: bool,
}

const DAY_SECS: f64 = 86_400.0;
/// Shorter deadlines than this are typos: no client sends its headers in less.
const MIN_TIMEOUT_SECS: f64 = 0.1;

/// Every numeric setting of `distillery serve`, checked at start-up whichever way it was given.
/// The upper bounds are past any machine this daemon runs on: beyond them a value is a typo
/// (and an allocation or a timer that would abort the process).
pub const NUMERIC_SETTINGS: &[NumericSetting] = &[
    NumericSetting {
        key: "port",
        flag: "port",
        min: 0.0,
        max: 65535.0,
        integer: true,
        note: "0 picks a free port",
        zero_is_off: false,
    },
    NumericSetting {
        key: "gpu_memory_utilization",
        flag: "gpu-memory-utilization",
        min: 0.0,
        max: 1.0,
        integer: false,
        note: "0 sizes the KV pool from kv_cache_memory",
        zero_is_off: false,
    },
    NumericSetting {
        key: "max_num_seqs",
        flag: "max-num-seqs",
        min: 1.0,
        max: 65536.0,
        integer: true,
        note: "",
        zero_is_off: false,
    },
    NumericSetting {
        key: "max_num_batched_tokens",
        flag: "max-num-batched-tokens",
        min: 1.0,
        max: 1048576.0,
        integer: true,
        note: "",
        zero_is_off: false,
    },
    NumericSetting {
        key: "max_waiting_requests",
        flag: "max-waiting-requests",
        min: 1.0,
        max: 16777216.0,
        integer: true,
        note: "",
        zero_is_off: false,
    },
    NumericSetting {
        key: "max_queued_prompt_tokens",
        flag: "max-queued-prompt-tokens",
        min: 1.0,
        max: 4294967296.0,
        integer: true,
        note: "",
        zero_is_off: false,
    },
    NumericSetting {
        key: "kv_cache_memory",
        flag: "kv-cache-memory",
        min: 1.0,
        max: 17592186044416.0,
        integer: true,
        note: "bytes: at least one KV block per replica, at most 16 TiB and, on the CPU, the \
               machine's memory",
        zero_is_off: false,
    },
    NumericSetting {
        key: "block_size",
        flag: "block-size",
        min: 1.0,
        max: 256.0,
        integer: true,
        note: "a power of two",
        zero_is_off: false,
    },
    NumericSetting {
        key: "max_model_len",
        flag: "max-model-len",
        min: 1.0,
        max: 16777216.0,
        integer: true,
        note: "at most the model's max_position_embeddings",
        zero_is_off: false,
    },
    NumericSetting {
        key: "data_parallel_size",
        flag: "data-parallel-size",
        min: 1.0,
        max: MAX_DATA_PARALLEL as f64,
        integer: true,
        note: "",
        zero_is_off: false,
    },
    NumericSetting {
        key: "tokenizer_workers",
        flag: "tokenizer-workers",
        min: 1.0,
        max: 1024.0,
        integer: true,
        note: "or auto: one per core",
        zero_is_off: false,
    },
    NumericSetting {
        key: "max_body_bytes",
        flag: "max-body-bytes",
        min: 1024.0,
        max: 1073741824.0,
        integer: true,
        note: "",
        zero_is_off: false,
    },
    NumericSetting {
        key: "body_read_timeout_secs",
        flag: "body-read-timeout",
        min: MIN_TIMEOUT_SECS,
        max: DAY_SECS,
        integer: false,
        note: "",
        zero_is_off: false,
    },
    NumericSetting {
        key: "header_read_timeout_secs",
        flag: "header-read-timeout",
        min: MIN_TIMEOUT_SECS,
        max: DAY_SECS,
        integer: false,
        note: "",
        zero_is_off: false,
    },
    NumericSetting {
        key: "keep_alive_timeout_secs",
        flag: "keep-alive-timeout",
        min: MIN_TIMEOUT_SECS,
        max: DAY_SECS,
        integer: false,
        note: "0 closes a connection after each response; otherwise at least 0.1",
        zero_is_off: true,
    },
    NumericSetting {
        key: "max_connections",
        flag: "max-connections",
        min: 1.0,
        max: 1048576.0,
        integer: true,
        note: "lowered to what the open-files limit allows",
        zero_is_off: false,
    },
    NumericSetting {
        key: "shutdown_grace_secs",
        flag: "shutdown-grace",
        min: 0.0,
        max: DAY_SECS,
        integer: false,
        note: "0 exits at once",
        zero_is_off: false,
    },
    NumericSetting {
        key: "reasoning_budget",
        flag: "reasoning-budget",
        min: -1.0,
        max: 16777216.0,
        integer: true,
        note: "-1 is unbounded, 0 no thinking",
        zero_is_off: false,
    },
];

impl NumericSetting {
    pub fn named(key: &str) -> Option<&'static NumericSetting> {
        NUMERIC_SETTINGS.iter().find(|n| n.key == key)
    }

    pub fn env(&self) -> String {
        format!(
            "DISTILLERY_{}",
            self.flag.replace('-', "_").to_ascii_uppercase()
        )
    }

    fn range(&self) -> String {
        let kind = if self.integer {
            "an integer"
        } else {
            "a number"
        };
        let note = if self.note.is_empty() {
            String::new()
        } else {
            format!("; {}", self.note)
        };
        format!("{kind} from {} to {}{note}", self.min, self.max)
    }

    /// The error for `given`, naming every way to set it.
    pub fn refuse(&self, given: &str) -> String {
        format!(
            "{} = {given} is refused: it must be {} (flag --{}, environment {}, config \
             file key {})",
            self.key,
            self.range(),
            self.flag,
            self.env(),
            self.key
        )
    }

    pub(super) fn check(&self, value: Option<f64>) -> Result<(), String> {
        let Some(v) = value else { return Ok(()) };
        let whole = !self.integer || v.fract() == 0.0;
        let in_range = (v >= self.min || (self.zero_is_off && v == 0.0)) && v <= self.max;
        if v.is_finite() && whole && in_range {
            return Ok(());
        }
        Err(self.refuse(&v.to_string()))
    }

    /// Parses a flag's or variable's text with `parse` and checks its range.
    pub fn parse_with<T>(
        &self,
        text: &str,
        parse: impl Fn(&str) -> Result<T, String>,
        as_f64: impl Fn(&T) -> f64,
    ) -> Result<T, String> {
        let refuse = || self.refuse(text.trim());
        let v = parse(text.trim()).map_err(|_| refuse())?;
        self.check(Some(as_f64(&v))).map_err(|_| refuse())?;
        Ok(v)
    }
}

impl ServeSettings {
    /// The value of the numeric setting `key` (see [`NUMERIC_SETTINGS`]); `None` when unset.
    pub(super) fn numeric(&self, key: &str) -> Option<f64> {
        let v = match key {
            "port" => self.port as f64,
            "gpu_memory_utilization" => self.gpu_memory_utilization,
            "max_num_seqs" => self.max_num_seqs as f64,
            "max_num_batched_tokens" => self.max_num_batched_tokens as f64,
            "max_waiting_requests" => self.max_waiting_requests as f64,
            "max_queued_prompt_tokens" => self.max_queued_prompt_tokens as f64,
            "kv_cache_memory" => self.kv_cache_memory as f64,
            "block_size" => self.block_size as f64,
            "max_model_len" => self.max_model_len? as f64,
            "data_parallel_size" => match self.data_parallel_size {
                WorkerCount::Auto => return None,
                WorkerCount::Fixed(n) => n as f64,
            },
            "tokenizer_workers" => match self.tokenizer_workers {
                WorkerCount::Auto => return None,
                WorkerCount::Fixed(n) => n as f64,
            },
            "max_body_bytes" => self.max_body_bytes as f64,
            "body_read_timeout_secs" => self.body_read_timeout_secs,
            "header_read_timeout_secs" => self.header_read_timeout_secs,
            "keep_alive_timeout_secs" => self.keep_alive_timeout_secs,
            "max_connections" => self.max_connections as f64,
            "shutdown_grace_secs" => self.shutdown_grace_secs,
            "reasoning_budget" => self.reasoning_budget as f64,
            _ => return None,
        };
        Some(v)
    }
}
