//! The model runtime: Hugging Face folders in, logits out.
//!
//! Owns loading (`config.json`, safetensors, hub ids), the decoder forward over a flattened
//! batch, the paged KV cache memory and its attention operators per device. Knows nothing of
//! requests, scheduling, sampling or HTTP: the engine hands it a [`ForwardBatch`] and a
//! [`KvCache`] and gets logits back.

pub mod batch;
pub mod builtin;
pub mod config;
pub mod decoder;
pub mod dummy;
mod error;
pub mod kv_cache;
pub mod paged_attention;
mod rope;
pub mod source;
pub mod weights;

pub use batch::ForwardBatch;
pub use config::{Architecture, ModelConfig};
pub use decoder::{argmax_rows, Decoder};
pub use error::ModelError;
pub use kv_cache::KvCache;
use rope::RopeTables;

use candle_core::{DType, Device};
use std::path::Path;

/// `--dtype`: what the weights, activations and KV cache are computed in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DTypeChoice {
    /// The config's `torch_dtype` on a GPU; f32 on the CPU (CPU half precision is slow).
    #[default]
    Auto,
    F32,
    F16,
    Bf16,
}

impl DTypeChoice {
    pub fn resolve(self, config: &ModelConfig, device: &Device) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::Bf16 => DType::BF16,
            Self::Auto if device.is_cpu() => DType::F32,
            Self::Auto => match config.torch_dtype.as_deref() {
                Some("float16") => DType::F16,
                Some("float32") => DType::F32,
                _ => DType::BF16,
            },
        }
    }
}

/// `--device`: the CPU, or CUDA device N when built with the `cuda` feature.
pub fn device(cuda_ordinal: Option<usize>) -> Result<Device, ModelError> {
    match cuda_ordinal {
        None => Ok(Device::Cpu),
        Some(n) => Device::new_cuda(n).map_err(|e| {
            ModelError::Resolve(format!(
                "cannot open CUDA device {n}: {e} (was distillery built with --features cuda?)"
            ))
        }),
    }
}

/// Loads the decoder of a local model folder. Progress goes to stderr when it is a terminal.
pub fn load_decoder(
    dir: &Path,
    dtype: DTypeChoice,
    device: &Device,
) -> Result<Decoder, ModelError> {
    let config = ModelConfig::from_dir(dir)?;
    let dtype = dtype.resolve(&config, device);
    let files = weights::safetensors_files(dir)?;
    let total: u64 = files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum();
    let bar = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        indicatif::ProgressBar::new(total)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "loading weights {bar:40} {bytes}/{total_bytes} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let weights = weights::Weights::load(&files, dtype, device, |path, bytes| {
        bar.set_message(
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
        bar.inc(bytes);
    })?;
    bar.finish_and_clear();
    tracing::info!(
        model = %dir.display(),
        architecture = ?config.architecture,
        layers = config.num_hidden_layers,
        hidden = config.hidden_size,
        ?dtype,
        "model loaded"
    );
    Decoder::new(config, &weights, device)
}

/// `--load-format dummy`: the decoder of a model folder's `config.json` with random weights
/// instead of its safetensors, for benchmarking an architecture whose weights are not at hand.
pub fn load_decoder_dummy(
    dir: &Path,
    dtype: DTypeChoice,
    device: &Device,
) -> Result<Decoder, ModelError> {
    let config = ModelConfig::from_dir(dir)?;
    let dtype = dtype.resolve(&config, device);
    let weights = dummy::random_weights(&config, dtype, device, dummy::DUMMY_SEED)?;
    tracing::warn!(
        model = %dir.display(),
        architecture = ?config.architecture,
        ?dtype,
        "loaded with random weights (--load-format dummy): timings are real, output is not"
    );
    Decoder::new(config, &weights, device)
}
