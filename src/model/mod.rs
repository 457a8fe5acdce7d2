//! The model runtime: Hugging Face folders in, logits out.
//!
//! Owns loading (`config.json`, safetensors, hub ids), the decoder forward over a flattened
//! batch, the paged KV cache memory and its attention operators per device. Knows nothing of
//! requests, scheduling, sampling or HTTP: the engine hands it a [`ForwardBatch`] and a
//! [`KvCache`] and gets logits back.

pub mod batch;
pub mod builtin;
pub mod config;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod decoder;
pub mod dummy;
mod error;
mod fast_math;
pub mod generation_defaults;
pub mod gguf;
pub mod half_matmul;
mod int_rows;
#[cfg(test)]
mod kernel_test_values;
mod kquant_tiles;
pub mod kv_cache;
pub mod paged_attention;
pub mod q4_k_vnni;
pub mod q6_k_vnni;
pub mod q8_0_avx2;
pub mod quant;
mod rope;
pub mod source;
mod swiglu;
pub mod weights;

pub use batch::ForwardBatch;
pub use config::{Architecture, ModelConfig};
pub use decoder::{argmax_rows, Decoder};
pub use error::ModelError;
pub use generation_defaults::GenerationDefaults;
pub use kv_cache::{KvCache, KvCacheDtype};
pub use quant::Quantization;
use rope::RopeTables;

use candle_core::{DType, Device, Tensor};
use std::path::Path;

/// `--dtype`: what the weights, activations and KV cache are computed in; on the CPU `bf16`
/// and `f16` mean half-precision weight matrices around f32 activations and KV cache
/// (`Decoder` converts it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DTypeChoice {
    /// The config's `torch_dtype` on a GPU. On the CPU: bf16 (f16) weight matrices for a
    /// bf16 (f16) checkpoint where the CPU has a SIMD kernel for them (AVX-512F, or
    /// AVX2+FMA; half of f32's bytes per token; f32 under a block `--quantization`), else f32.
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
            // A half-precision checkpoint keeps its values either way (widening to f32 is
            // exact), and decoding reads half the bytes.
            Self::Auto if device.is_cpu() => match config.torch_dtype.as_deref() {
                Some("bfloat16") if half_matmul::fast_on_this_cpu(half_matmul::Half::Bf16) => {
                    DType::BF16
                }
                Some("float16") if half_matmul::fast_on_this_cpu(half_matmul::Half::F16) => {
                    DType::F16
                }
                _ => DType::F32,
            },
            Self::Auto => match config.torch_dtype.as_deref() {
                Some("float16") => DType::F16,
                Some("float32") => DType::F32,
                _ => DType::BF16,
            },
        }
    }

    /// The choice `--quantization q` leaves: the block formats quantize f32 weights, so
    /// `auto` means f32 under them; under `bf16` and `f16` it stays (a half-precision
    /// checkpoint's matrices are then taken as they are, or rounded to the other half
    /// format); an explicit choice is kept (and checked by [`Quantization::check`]).
    pub fn under(self, q: Quantization) -> Self {
        match (self, q) {
            (Self::Auto, Quantization::None | Quantization::Bf16 | Quantization::F16) => Self::Auto,
            (Self::Auto, _) => Self::F32,
            (other, _) => other,
        }
    }
}

/// `--device`: `cpu`, or `cuda` / `cuda:N` (CUDA device N; the binary needs the `cuda`
/// feature). Parsed from text so that flags, `DISTILLERY_DEVICE` and the config file agree.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum DeviceChoice {
    #[default]
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Self::Cuda(n)),
                _ => Err(format!(
                    "unknown device {s:?}: expected cpu, cuda or cuda:N (N a device number)"
                )),
            },
        }
    }
}

impl TryFrom<String> for DeviceChoice {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceChoice {
    /// Whether this binary was built with the `cuda` feature.
    pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

    /// Opens the device, with an error that says what to do when it cannot be had.
    pub fn open(self) -> Result<Device, ModelError> {
        device(match self {
            Self::Cpu => None,
            Self::Cuda(n) => Some(n),
        })
    }
}

/// The CPU, or CUDA device N when built with the `cuda` feature.
pub fn device(cuda_ordinal: Option<usize>) -> Result<Device, ModelError> {
    match cuda_ordinal {
        None => Ok(Device::Cpu),
        Some(n) if !DeviceChoice::CUDA_BUILT => Err(ModelError::Resolve(format!(
            "--device cuda:{n}: this distillery binary was built without CUDA support; \
             build it with `deploy/cuda-build.sh` (cargo build --release --features cuda) \
             or use --device cpu"
        ))),
        Some(n) => Device::new_cuda(n).map_err(|e| {
            ModelError::Resolve(format!(
                "cannot open CUDA device {n}: {e} (is an NVIDIA GPU with a CUDA 13 driver \
                 present, and CUDA_VISIBLE_DEVICES not hiding it? --device cpu runs without one)"
            ))
        }),
    }
}

/// Free and total bytes of the memory of `device`, when it is a CUDA device.
pub fn device_memory(device: &Device) -> Option<(usize, usize)> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        return dev.cuda_stream().context().mem_get_info().ok();
    }
    let _ = device;
    None
}

/// The greedy id of each row of f32 `[rows, vocab]` logits computed on their device, so that
/// only the ids cross to the host; `None` on the CPU (where the host sampler's argmax reads
/// the rows in place) or without a kernel for the device. Same ties as the host `argmax`.
pub fn argmax_rows_on_device(logits: &Tensor) -> candle_core::Result<Option<Vec<u32>>> {
    #[cfg(feature = "cuda")]
    if logits.device().is_cuda() && logits.dtype() == DType::F32 {
        return cuda::argmax_rows(logits);
    }
    let _ = logits;
    Ok(None)
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
    Decoder::new(config, weights, device)
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
    Decoder::new(config, weights, device)
}
