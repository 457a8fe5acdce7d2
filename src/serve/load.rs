//! Turning `--model` into weights and a tokenizer: a built-in toy, a folder or hub id of
//! safetensors, or a GGUF file, with `--quantization` applied; and `--data-parallel-size auto`
//! resolved from the model's shape. Knows nothing of the engine or the HTTP server.

use std::path::PathBuf;

use anyhow::Result;

use distillery::config::{LoadFormat, ServeSettings, WorkerCount};
use distillery::model::{self, builtin, source, DTypeChoice, Decoder, DeviceChoice};
use distillery::tokenizer::Tokenizer;

/// What `--model` resolved to.
pub(super) struct Loaded {
    pub decoder: Decoder,
    pub tokenizer: Tokenizer,
    pub name: String,
    /// The model folder (none for a built-in model).
    pub dir: Option<PathBuf>,
}

pub(super) fn load(s: &ServeSettings) -> Result<Loaded> {
    let device = s.device.open()?;
    let dtype = s.dtype.under(s.quantization);
    if let Some(name) = s.model.strip_prefix(builtin::BUILTIN_PREFIX) {
        let (decoder, tokenizer) = builtin::load(name, dtype, &device)?;
        let decoder = quantized(decoder, s.quantization)?;
        return Ok(Loaded {
            decoder,
            tokenizer,
            name: s.model.clone(),
            dir: None,
        });
    }
    let path = std::path::Path::new(&s.model);
    if model::gguf::is_gguf(path) {
        return load_gguf(s, path, &device);
    }
    let dir = source::resolve(&s.model, &source::HubOptions::from_env())?;
    let decoder = match s.load_format {
        LoadFormat::Auto => model::load_decoder(&dir, dtype, &device)?,
        LoadFormat::Dummy => model::load_decoder_dummy(&dir, dtype, &device)?,
    };
    let decoder = quantized(decoder, s.quantization)?;
    let tokenizer = Tokenizer::from_dir(&dir)?;
    // A hub id names itself; a folder is named by its last component.
    let name = if std::path::Path::new(&s.model).is_dir() {
        dir.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| s.model.clone())
    } else {
        s.model.clone()
    };
    Ok(Loaded {
        decoder,
        tokenizer,
        name,
        dir: Some(dir),
    })
}

/// `--data-parallel-size auto` resolved from the model's config (read, not loaded: a hub id
/// is fetched into its cache first) and the cores this process may use.
pub fn resolve_replicas(s: &mut ServeSettings) -> Result<()> {
    if s.data_parallel_size != WorkerCount::Auto {
        return Ok(());
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let replicas = if s.device != DeviceChoice::Cpu {
        1
    } else if s.model.starts_with(builtin::BUILTIN_PREFIX) {
        // The built-in models are toys: their steps are all overhead.
        distillery::config::auto_replicas(0, cores)
    } else {
        let path = std::path::Path::new(&s.model);
        let config = if model::gguf::is_gguf(path) {
            model::gguf::read_config(path)?
        } else {
            model::ModelConfig::from_dir(&source::resolve(
                &s.model,
                &source::HubOptions::from_env(),
            )?)?
        };
        distillery::config::auto_replicas(config.macs_per_token(), cores)
    };
    tracing::debug!(replicas, cores, "data_parallel_size auto");
    s.data_parallel_size = WorkerCount::Fixed(replicas);
    Ok(())
}

/// A GGUF file: its weights as stored, the tokenizer and chat template from its folder.
fn load_gguf(
    s: &ServeSettings,
    path: &std::path::Path,
    device: &candle_core::Device,
) -> Result<Loaded> {
    anyhow::ensure!(
        s.load_format == LoadFormat::Auto,
        "--load-format dummy reads a config.json folder, not a GGUF file"
    );
    anyhow::ensure!(
        matches!(s.dtype, DTypeChoice::Auto | DTypeChoice::F32),
        "a GGUF model computes in f32 between its stored matrices: --dtype {:?} does not apply",
        s.dtype
    );
    let dir = path
        .parent()
        .map(|p| {
            if p.as_os_str().is_empty() {
                std::path::Path::new(".")
            } else {
                p
            }
        })
        .unwrap_or(std::path::Path::new("."))
        .to_path_buf();
    anyhow::ensure!(
        dir.join("tokenizer.json").is_file(),
        "{}: a GGUF model's tokenizer is read from tokenizer.json (and its chat template from \
         tokenizer_config.json) in the same folder, and {} has none: put the original \
         model's tokenizer files beside the GGUF file",
        path.display(),
        dir.display()
    );
    let decoder = quantized(model::gguf::load_decoder(path, device)?, s.quantization)?;
    let tokenizer = Tokenizer::from_dir(&dir)?;
    let name = path
        .file_stem()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| s.model.clone());
    Ok(Loaded {
        decoder,
        tokenizer,
        name,
        dir: Some(dir),
    })
}

/// The decoder as `--quantization` asks, with what it reads per token logged (so that the
/// format `--dtype auto` chose is visible too).
fn quantized(decoder: Decoder, q: model::Quantization) -> Result<Decoder> {
    let decoder = decoder.quantized(q)?;
    let (bytes, formats) = decoder.weight_summary();
    tracing::info!(
        quantization = q.name(),
        weight_mib = bytes / (1 << 20),
        formats = formats.join(","),
        "weights ready"
    );
    Ok(decoder)
}
