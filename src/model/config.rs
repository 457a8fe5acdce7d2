//! The architecture description of a Hugging Face causal LM folder: `config.json` plus the
//! end-of-sequence ids of `generation_config.json`.
//!
//! Owns parsing and validation of those files into one flat [`ModelConfig`]. Knows nothing of
//! weights, tensors or requests: a config that parses here is one the decoder can build.

use serde::Deserialize;
use std::path::Path;

use super::ModelError;

/// The families the decoder implements. They differ in flags (qkv bias, tied embeddings), not
/// in structure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Qwen2,
}

impl Architecture {
    /// transformers' class name, as `config.json` lists it in `architectures`.
    pub fn hf_name(self) -> &'static str {
        match self {
            Self::Llama => "LlamaForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
        }
    }

    /// transformers' `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
        }
    }

    fn from_hf(name: &str) -> Option<Self> {
        match name {
            "LlamaForCausalLM" => Some(Self::Llama),
            "Qwen2ForCausalLM" => Some(Self::Qwen2),
            _ => None,
        }
    }
}

/// How rotary frequencies are rescaled for long contexts.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions are divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Llama 3.1's frequency-dependent rescaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub bos_token_id: Option<u32>,
    /// Every id that ends generation, from `config.json` and `generation_config.json` together.
    pub eos_token_ids: Vec<u32>,
    /// `torch_dtype` as written (`"bfloat16"`, `"float32"`, ...), used by `--dtype auto`.
    pub torch_dtype: Option<String>,
}

/// `eos_token_id` is an int or a list of ints in HF configs.
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<u32> {
        match self {
            Self::One(id) => vec![id],
            Self::Many(ids) => ids,
        }
    }
}

#[derive(Deserialize, Debug)]
struct RawRopeScaling {
    #[serde(alias = "type")]
    rope_type: Option<String>,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<usize>,
}

#[derive(Deserialize, Debug)]
struct RawConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    rope_theta: f64,
    rope_scaling: Option<RawRopeScaling>,
    #[serde(default = "default_max_positions")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    attention_bias: Option<bool>,
    hidden_act: Option<String>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<OneOrMany>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
    /// Qwen2's switch for sliding-window attention, which the kernels do not implement, and
    /// what decides whether any layer would use it.
    use_sliding_window: Option<bool>,
    sliding_window: Option<usize>,
    max_window_layers: Option<usize>,
    /// A quantized checkpoint's method; the loader reads plain float weights only.
    quantization_config: Option<serde_json::Value>,
}

fn default_rope_theta() -> f64 {
    10_000.0
}

fn default_max_positions() -> usize {
    2048
}

#[derive(Deserialize, Debug, Default)]
struct RawGenerationConfig {
    eos_token_id: Option<OneOrMany>,
}

impl ModelConfig {
    /// Reads `config.json` and, when present, `generation_config.json` from a model folder.
    pub fn from_dir(dir: &Path) -> Result<Self, ModelError> {
        let config_path = dir.join("config.json");
        let text =
            std::fs::read_to_string(&config_path).map_err(|e| ModelError::io(&config_path, e))?;
        let generation_path = dir.join("generation_config.json");
        let generation = match std::fs::read_to_string(&generation_path) {
            Ok(text) => Some(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(ModelError::io(&generation_path, e)),
        };
        Self::from_json(&text, generation.as_deref()).map_err(|message| ModelError::Config {
            path: config_path,
            message,
        })
    }

    /// Parses the two JSON texts; the error is a sentence naming the offending field.
    pub fn from_json(config: &str, generation_config: Option<&str>) -> Result<Self, String> {
        let raw: RawConfig = serde_json::from_str(config).map_err(|e| e.to_string())?;
        let generation: RawGenerationConfig = match generation_config {
            Some(text) => {
                serde_json::from_str(text).map_err(|e| format!("generation_config.json: {e}"))?
            }
            None => RawGenerationConfig::default(),
        };
        let declared = raw.architectures.clone().unwrap_or_default();
        let architecture = declared
            .iter()
            .find_map(|name| Architecture::from_hf(name))
            .or(match raw.model_type.as_deref() {
                Some("llama") => Some(Architecture::Llama),
                Some("qwen2") => Some(Architecture::Qwen2),
                _ => None,
            })
            .ok_or_else(|| {
                format!(
                    "unsupported architecture {:?} (model_type {:?}); supported: LlamaForCausalLM, Qwen2ForCausalLM",
                    declared, raw.model_type
                )
            })?;
        if let Some(act) = raw.hidden_act.as_deref() {
            if act != "silu" {
                return Err(format!(
                    "unsupported hidden_act {act:?}; only \"silu\" is implemented"
                ));
            }
        }
        // transformers slides the window on layers from max_window_layers (28 by default) on,
        // and only with a window size: otherwise every layer attends fully, as ours do.
        let windowed_layers = raw
            .num_hidden_layers
            .saturating_sub(raw.max_window_layers.unwrap_or(28));
        if raw.use_sliding_window == Some(true)
            && raw.sliding_window.is_some()
            && windowed_layers > 0
        {
            return Err(format!(
                "use_sliding_window is true ({windowed_layers} layers from max_window_layers on \
                 use a window), but sliding-window attention is not implemented: those layers \
                 would attend to the whole context and the outputs would differ from the model's"
            ));
        }
        if let Some(q) = &raw.quantization_config {
            let method = q
                .get("quant_method")
                .and_then(|m| m.as_str())
                .unwrap_or("unknown");
            return Err(format!(
                "quantization_config (quant_method {method:?}) cannot be honoured: only \
                 unquantized safetensors (f32, f16, bf16) are loaded; use the unquantized \
                 checkpoint"
            ));
        }
        let heads = raw.num_attention_heads;
        let kv_heads = raw.num_key_value_heads.unwrap_or(heads);
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(format!(
                "num_attention_heads ({heads}) must be a positive multiple of num_key_value_heads ({kv_heads})"
            ));
        }
        let head_dim = match raw.head_dim {
            Some(d) => d,
            None if raw.hidden_size.is_multiple_of(heads) => raw.hidden_size / heads,
            None => {
                return Err(format!(
                    "hidden_size ({}) is not divisible by num_attention_heads ({heads})",
                    raw.hidden_size
                ))
            }
        };
        if head_dim % 2 != 0 {
            return Err(format!(
                "head_dim ({head_dim}) must be even for rotary embeddings"
            ));
        }
        let rope_scaling = parse_rope_scaling(raw.rope_scaling, raw.max_position_embeddings)?;
        let mut eos_token_ids = raw
            .eos_token_id
            .map(OneOrMany::into_vec)
            .unwrap_or_default();
        for id in generation
            .eos_token_id
            .map(OneOrMany::into_vec)
            .unwrap_or_default()
        {
            if !eos_token_ids.contains(&id) {
                eos_token_ids.push(id);
            }
        }
        Ok(Self {
            architecture,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps,
            rope_theta: raw.rope_theta,
            rope_scaling,
            max_position_embeddings: raw.max_position_embeddings,
            tie_word_embeddings: raw.tie_word_embeddings,
            // Qwen2 always has q/k/v biases; Llama has them only when `attention_bias` says so.
            attention_bias: raw
                .attention_bias
                .unwrap_or(architecture == Architecture::Qwen2),
            bos_token_id: raw.bos_token_id,
            eos_token_ids,
            torch_dtype: raw.torch_dtype.or(raw.dtype),
        })
    }

    /// Multiply-adds one token's forward spends in the projections and the output head (not
    /// attention over the context, nor the norms): what decides whether a CPU step is bound
    /// by arithmetic or by its fixed costs.
    pub fn macs_per_token(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let layer = h * (q + 2 * kv) + q * h + 3 * h * self.intermediate_size;
        self.num_hidden_layers * layer + self.vocab_size * h
    }

    /// Query heads that share one key/value head.
    pub fn gqa_group(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }
}

fn parse_rope_scaling(
    raw: Option<RawRopeScaling>,
    max_positions: usize,
) -> Result<RopeScaling, String> {
    let Some(raw) = raw else {
        return Ok(RopeScaling::None);
    };
    let factor = || {
        raw.factor
            .filter(|f| *f > 0.0)
            .ok_or_else(|| "rope_scaling.factor must be a positive number".to_string())
    };
    match raw.rope_type.as_deref() {
        None | Some("default") => Ok(RopeScaling::None),
        Some("linear") => Ok(RopeScaling::Linear { factor: factor()? }),
        Some("llama3") => Ok(RopeScaling::Llama3 {
            factor: factor()?,
            low_freq_factor: raw.low_freq_factor.unwrap_or(1.0),
            high_freq_factor: raw.high_freq_factor.unwrap_or(4.0),
            original_max_position_embeddings: raw
                .original_max_position_embeddings
                .unwrap_or(max_positions),
        }),
        Some(other) => Err(format!(
            "unsupported rope_scaling type {other:?}; supported: linear, llama3"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA: &str = r#"{"architectures":["LlamaForCausalLM"],"vocab_size":100,"hidden_size":64,
        "intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,
        "rms_norm_eps":1e-5,"eos_token_id":2,
        "rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,
        "original_max_position_embeddings":8192}}"#;

    #[test]
    fn merges_eos_ids_from_both_files() {
        let c = ModelConfig::from_json(LLAMA, Some(r#"{"eos_token_id":[2,7]}"#)).unwrap();
        assert_eq!(c.eos_token_ids, vec![2, 7]);
        assert_eq!(c.head_dim, 16);
        assert!(!c.attention_bias);
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
    }

    #[test]
    fn rejects_unknown_architecture_by_name() {
        let text = LLAMA.replace("LlamaForCausalLM", "MambaForCausalLM");
        let err = ModelConfig::from_json(&text, None).unwrap_err();
        assert!(err.contains("MambaForCausalLM"), "{err}");
    }

    #[test]
    fn rejects_bad_gqa_ratio() {
        let text = LLAMA.replace("\"num_key_value_heads\":2", "\"num_key_value_heads\":3");
        assert!(ModelConfig::from_json(&text, None).is_err());
    }

    #[test]
    fn refuses_what_the_loader_cannot_honour_by_name() {
        let with = |extra: &str| LLAMA.replacen('{', &format!("{{{extra},"), 1);
        let slide = r#""use_sliding_window":true,"sliding_window":4,"max_window_layers":1"#;
        let err = ModelConfig::from_json(&with(slide), None).unwrap_err();
        assert!(err.contains("use_sliding_window"), "{err}");
        // No layer at or past max_window_layers, or no window: full attention everywhere.
        for fine in [
            r#""use_sliding_window":true,"sliding_window":4,"max_window_layers":2"#,
            r#""use_sliding_window":true,"sliding_window":null"#,
            r#""use_sliding_window":null"#,
        ] {
            ModelConfig::from_json(&with(fine), None).unwrap();
        }
        ModelConfig::from_json(
            &with(r#""use_sliding_window":false,"sliding_window":4096"#),
            None,
        )
        .unwrap();
        let awq = r#""quantization_config":{"quant_method":"awq","bits":4}"#;
        let err = ModelConfig::from_json(&with(awq), None).unwrap_err();
        assert!(
            err.contains("quantization_config") && err.contains("awq"),
            "{err}"
        );
        let yarn = LLAMA.replace("\"rope_type\":\"llama3\"", "\"rope_type\":\"yarn\"");
        let err = ModelConfig::from_json(&yarn, None).unwrap_err();
        assert!(err.contains("yarn"), "{err}");
    }
}
