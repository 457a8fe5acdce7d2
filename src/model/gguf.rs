//! Reads a llama.cpp GGUF file (the Llama and Qwen2 families) into the decoder: the config from
//! its metadata, the weights as they are stored (GGML blocks stay blocks, BF16/F16 matrices
//! stay half precision, other float tensors become f32), renamed to the Hugging Face names the decoder asks for.
//!
//! Knows GGUF's keys, tensor names and the one layout llama.cpp changes on conversion (Llama's
//! q/k rows, interleaved for its rotary embedding); knows nothing of what the decoder does with
//! the tensors. The tokenizer does not come from here: it is the `tokenizer.json` beside the file.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};

use super::config::ModelConfig;
use super::quant::Matrix;
use super::weights::Weights;
use super::{Decoder, ModelError};

/// The architectures whose tensors this reads, as GGUF's `general.architecture` names them.
const ARCHITECTURES: [&str; 2] = ["llama", "qwen2"];

/// Whether `path` names a GGUF file (by its extension: the loader then reads the header).
pub fn is_gguf(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        && path.is_file()
}

/// The decoder of a GGUF file; it computes in f32 between the stored matrices.
pub fn load_decoder(path: &Path, device: &Device) -> Result<Decoder, ModelError> {
    if !device.is_cpu() {
        return Err(ModelError::Resolve(format!(
            "{}: GGUF models run on the CPU only for now (--device cpu)",
            path.display()
        )));
    }
    let mut reader = BufReader::new(File::open(path).map_err(|e| ModelError::io(path, e))?);
    let (content, arch, config) = read_header(path, &mut reader)?;
    let bad = |message: String| ModelError::Config {
        path: path.to_path_buf(),
        message,
    };
    let mut tensors = HashMap::new();
    let mut matrices = HashMap::new();
    for (name, info) in &content.tensor_infos {
        // Every tensor must be one the decoder reads: one it would leave unread (a bias it
        // has no place for, a layer past block_count) would be silently wrong output.
        let Some(hf) = hf_name(name).filter(|hf| used(hf, &config)) else {
            return Err(bad(format!(
                "tensor {name:?} is not one this loader knows for {arch} with {} layers",
                config.num_hidden_layers
            )));
        };
        let dims = info.shape.dims().to_vec();
        let raw = read_raw(&mut reader, &content, name, info.ggml_dtype)
            .map_err(|e| bad(format!("tensor {name}: {e}")))?;
        // llama.cpp interleaves each head's rows of a Llama q or k projection, biases too.
        let permuted = [
            "q_proj.weight",
            "k_proj.weight",
            "q_proj.bias",
            "k_proj.bias",
        ];
        let raw = if arch == "llama" && permuted.iter().any(|p| hf.ends_with(p)) {
            let heads = if hf.contains("q_proj") {
                config.num_attention_heads
            } else {
                config.num_key_value_heads
            };
            let rows = dims.first().copied().unwrap_or(0);
            unpermute_rows(&raw, rows, heads, config.head_dim)
                .map_err(|e| bad(format!("tensor {name}: {e}")))?
        } else {
            raw
        };
        let matrix = |raw: &[u8]| match dims[..] {
            [rows, width] => Matrix::from_blocks(info.ggml_dtype, raw, rows, width),
            _ => Err(ModelError::Resolve(format!("{dims:?} is not a matrix"))),
        };
        let err = |e: ModelError| bad(format!("tensor {name}: {e}"));
        if hf == "model.embed_tokens.weight" {
            // Looked up by row: kept as f32. Without output.weight the same blocks (or half
            // values) are the output head, multiplied as they are stored.
            if !content.tensor_infos.contains_key("output.weight") {
                if let blocks @ (Matrix::Quantized { .. } | Matrix::Parts(_) | Matrix::Half(_)) =
                    matrix(&raw).map_err(err)?
                {
                    matrices.insert("lm_head.weight".to_string(), blocks);
                }
            }
            tensors.insert(hf, dequantize(&raw, info.ggml_dtype, &dims).map_err(err)?);
        } else if dims.len() == 2 {
            match matrix(&raw).map_err(err)? {
                Matrix::Dense(t) => {
                    tensors.insert(hf, t);
                }
                blocks => {
                    matrices.insert(hf, blocks);
                }
            }
        } else {
            let t = dequantize(&raw, info.ggml_dtype, &dims).map_err(err)?;
            tensors.insert(hf, t);
        }
    }
    let weights = Weights::from_file_parts(tensors, matrices, path.to_path_buf());
    tracing::info!(
        model = %path.display(),
        architecture = %arch,
        layers = config.num_hidden_layers,
        hidden = config.hidden_size,
        "GGUF model loaded"
    );
    Decoder::new(config, weights, device)
}

/// The config a GGUF file's metadata describes, without reading its tensors.
pub fn read_config(path: &Path) -> Result<ModelConfig, ModelError> {
    let mut reader = BufReader::new(File::open(path).map_err(|e| ModelError::io(path, e))?);
    Ok(read_header(path, &mut reader)?.2)
}

/// The header, its architecture (checked) and the config it describes.
fn read_header<R: Read + Seek>(
    path: &Path,
    reader: &mut R,
) -> Result<(Content, String, ModelConfig), ModelError> {
    let bad = |message: String| ModelError::Config {
        path: path.to_path_buf(),
        message,
    };
    // candle's reader panics on a zero alignment; a file must not take the daemon down.
    let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Content::read(reader)))
        .map_err(|_| bad("not a GGUF file this can read: its header is malformed".into()))?;
    let content = read.map_err(|e| bad(readable(&e.to_string())))?;
    if let Some(n) = content.metadata.get("split.count").and_then(number) {
        if n > 1.0 {
            return Err(bad(format!(
                "one of {n} split GGUF files: merge them first (llama.cpp's `llama-gguf-split \
                 --merge FIRST.gguf OUT.gguf`), then serve the merged file"
            )));
        }
    }
    let arch = content
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .ok_or_else(|| bad("no general.architecture in the metadata".into()))?;
    if !ARCHITECTURES.contains(&arch.as_str()) {
        return Err(bad(format!(
            "architecture {arch:?} is not supported (supported: {})",
            ARCHITECTURES.join(", ")
        )));
    }
    if content.tensor_infos.contains_key("rope_freqs.weight") {
        return Err(bad(
            "per-dimension rope frequencies (rope_freqs.weight, Llama 3 rope scaling) are not \
             supported in GGUF files yet; serve the safetensors folder instead"
                .into(),
        ));
    }
    let gguf = Gguf {
        content: &content,
        arch: arch.clone(),
    };
    let config_json = gguf.config_json().map_err(bad)?;
    // Stop ids: the metadata names one (often not the chat turn's end); the original model's
    // generation_config.json beside the file, when there, lists them all, as for a folder.
    let generation_path = path.with_file_name("generation_config.json");
    let generation = match std::fs::read_to_string(&generation_path) {
        Ok(text) => Some(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(ModelError::io(&generation_path, e)),
    };
    let config =
        ModelConfig::from_json(&config_json.to_string(), generation.as_deref()).map_err(bad)?;
    if config.head_dim == 0 || config.hidden_size == 0 || config.num_hidden_layers == 0 {
        return Err(bad("the metadata describes an empty model".into()));
    }
    Ok((content, arch, config))
}

struct Gguf<'a> {
    content: &'a Content,
    arch: String,
}

impl Gguf<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(&format!("{}.{key}", self.arch))
    }

    fn number(&self, key: &str) -> Result<Option<f64>, String> {
        self.get(key)
            .map(|v| number(v).ok_or_else(|| format!("{}.{key} is not a number", self.arch)))
            .transpose()
    }

    fn required(&self, key: &str) -> Result<f64, String> {
        self.number(key)?
            .ok_or_else(|| format!("no {}.{key} in the metadata", self.arch))
    }

    /// The metadata as the `config.json` transformers would have written.
    fn config_json(&self) -> Result<serde_json::Value, String> {
        let tensors = &self.content.tensor_infos;
        let vocab = match self.number("vocab_size")? {
            Some(v) => v as usize,
            None => tensors
                .get("token_embd.weight")
                .and_then(|t| t.shape.dims().first().copied())
                .ok_or("no token_embd.weight")?,
        };
        let heads = self.required("attention.head_count")? as usize;
        let hidden = self.required("embedding_length")? as usize;
        let mut config = serde_json::json!({
            "architectures": [if self.arch == "qwen2" { "Qwen2ForCausalLM" } else { "LlamaForCausalLM" }],
            "model_type": self.arch,
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": self.required("feed_forward_length")? as usize,
            "num_hidden_layers": self.required("block_count")? as usize,
            "num_attention_heads": heads,
            "num_key_value_heads": self.number("attention.head_count_kv")?.map_or(heads, |v| v as usize),
            "rms_norm_eps": self.required("attention.layer_norm_rms_epsilon")?,
            "tie_word_embeddings": !tensors.contains_key("output.weight"),
            "attention_bias": tensors.contains_key("blk.0.attn_q.bias"),
        });
        let c = config
            .as_object_mut()
            .ok_or("the config is not an object")?;
        let key_length = self.number("attention.key_length")?;
        if let Some(d) = key_length {
            c.insert("head_dim".into(), (d as usize).into());
        }
        // A rotary width below the head's would rotate only part of each head, which the
        // decoder's rope does not do: refuse rather than compute something else.
        let head_dim = key_length.map_or(hidden / heads.max(1), |d| d as usize);
        if let Some(rot) = self.number("rope.dimension_count")? {
            if rot as usize != head_dim {
                return Err(format!(
                    "{}.rope.dimension_count is {rot} but a head is {head_dim} wide: rotary \
                     embeddings over part of each head are not supported",
                    self.arch
                ));
            }
        }
        if let Some(theta) = self.number("rope.freq_base")? {
            c.insert("rope_theta".into(), theta.into());
        }
        if let Some(n) = self.number("context_length")? {
            c.insert("max_position_embeddings".into(), (n as usize).into());
        }
        if let Some(factor) = self.number("rope.scale_linear")? {
            // The older spelling of linear rope scaling, which llama.cpp still reads.
            if factor != 1.0 {
                c.insert(
                    "rope_scaling".into(),
                    serde_json::json!({"rope_type": "linear", "factor": factor}),
                );
            }
        }
        if let Some(kind) = self
            .get("rope.scaling.type")
            .and_then(|v| v.to_string().ok())
        {
            if kind != "none" && kind != "linear" {
                // Llama 3's scaling comes as rope_freqs (refused above), so from a GGUF only
                // linear scaling is read.
                return Err(format!(
                    "{}.rope.scaling.type {kind:?} is not supported (from a GGUF file: linear)",
                    self.arch
                ));
            }
            if kind != "none" {
                let factor = self.required("rope.scaling.factor")?;
                c.insert(
                    "rope_scaling".into(),
                    serde_json::json!({"rope_type": kind, "factor": factor}),
                );
            }
        }
        let token = |key: &str| {
            self.content
                .metadata
                .get(&format!("tokenizer.ggml.{key}"))
                .and_then(number)
                .map(|v| v as u32)
        };
        if let Some(bos) = token("bos_token_id") {
            c.insert("bos_token_id".into(), bos.into());
        }
        // The end of a chat turn (Llama 3's <|eot_id|>) stops generation as EOS does.
        let eos: Vec<u32> = ["eos_token_id", "eot_token_id", "eom_token_id"]
            .iter()
            .filter_map(|k| token(k))
            .collect();
        if !eos.is_empty() {
            c.insert("eos_token_id".into(), eos.into());
        }
        Ok(config)
    }
}

fn number(v: &Value) -> Option<f64> {
    Some(match v {
        Value::U8(x) => *x as f64,
        Value::I8(x) => *x as f64,
        Value::U16(x) => *x as f64,
        Value::I16(x) => *x as f64,
        Value::U32(x) => *x as f64,
        Value::I32(x) => *x as f64,
        Value::U64(x) => *x as f64,
        Value::I64(x) => *x as f64,
        Value::F32(x) => *x as f64,
        Value::F64(x) => *x,
        _ => return None,
    })
}

/// llama.cpp's tensor names, as the Hugging Face ones the decoder loads.
fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, kind) = rest.rsplit_once('.')?;
    let hf = match part {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    matches!(kind, "weight" | "bias").then(|| format!("model.layers.{layer}.{hf}.{kind}"))
}

/// Whether the decoder reads the tensor `hf` of a model with `config`: biases only on q, k
/// and v, and only when the config has them; layers only up to its count.
fn used(hf: &str, config: &ModelConfig) -> bool {
    if let Some(layer) = hf
        .strip_prefix("model.layers.")
        .and_then(|r| r.split('.').next())
        .and_then(|n| n.parse::<usize>().ok())
    {
        if layer >= config.num_hidden_layers {
            return false;
        }
    }
    if hf.ends_with(".bias") {
        return config.attention_bias
            && ["q_proj", "k_proj", "v_proj"]
                .iter()
                .any(|p| hf.contains(p));
    }
    true
}

/// A tensor's stored bytes.
fn read_raw<R: Read + Seek>(
    reader: &mut R,
    content: &Content,
    name: &str,
    format: GgmlDType,
) -> Result<Vec<u8>, String> {
    let info = content
        .tensor_infos
        .get(name)
        .ok_or_else(|| format!("no tensor {name}"))?;
    let width = info.shape.dims().last().copied().unwrap_or(1);
    if !width.is_multiple_of(format.block_size()) {
        return Err(format!(
            "rows of {width} values are not whole {format:?} blocks of {}",
            format.block_size()
        ));
    }
    let size = (info.shape.elem_count() / format.block_size())
        .checked_mul(format.type_size())
        .ok_or("its size overflows")?;
    let start = content
        .tensor_data_offset
        .checked_add(info.offset)
        .ok_or("its offset overflows")?;
    let file_size = reader.seek(SeekFrom::End(0)).map_err(|e| e.to_string())?;
    if start.saturating_add(size as u64) > file_size {
        return Err(format!(
            "{size} bytes at {start} run past the end of the file ({file_size} bytes)"
        ));
    }
    let mut raw = vec![0u8; size];
    reader
        .seek(SeekFrom::Start(start))
        .and_then(|_| reader.read_exact(&mut raw))
        .map_err(|e| format!("reading {size} bytes at {start}: {e}"))?;
    Ok(raw)
}

fn dequantize(raw: &[u8], format: GgmlDType, dims: &[usize]) -> Result<Tensor, ModelError> {
    let qt = candle_core::quantized::ggml_file::qtensor_from_ggml(
        format,
        raw,
        dims.to_vec(),
        &Device::Cpu,
    )?;
    Ok(qt.dequantize(&Device::Cpu)?)
}

/// Undoes llama.cpp's reordering of a Llama q or k projection: conversion stores each head's
/// rows as interleaved pairs (`permute` in convert_hf_to_gguf.py, for GGML's rotary mode),
/// where the decoder's rotary embedding rotates the two halves of the head. Whole rows move,
/// so block-quantized rows are moved as they are.
fn unpermute_rows(
    raw: &[u8],
    rows: usize,
    heads: usize,
    head_dim: usize,
) -> Result<Vec<u8>, String> {
    if rows == 0
        || rows != heads * head_dim
        || !head_dim.is_multiple_of(2)
        || !raw.len().is_multiple_of(rows)
    {
        return Err(format!(
            "{rows} rows are not {heads} heads of an even head size {head_dim}"
        ));
    }
    let row = raw.len() / rows;
    let half = head_dim / 2;
    let mut out = vec![0u8; raw.len()];
    for h in 0..heads {
        for i in 0..half {
            for s in 0..2 {
                let from = h * head_dim + 2 * i + s;
                let to = h * head_dim + s * half + i;
                out[to * row..(to + 1) * row].copy_from_slice(&raw[from * row..(from + 1) * row]);
            }
        }
    }
    Ok(out)
}

/// candle's header error for a tensor type it does not know names the type by number only.
fn readable(error: &str) -> String {
    let id = error
        .split_once("unknown dtype for tensor ")
        .and_then(|(_, n)| {
            let digits: String = n.chars().take_while(char::is_ascii_digit).collect();
            digits.parse::<u32>().ok()
        });
    let Some(id) = id else {
        return format!("not a GGUF file this can read: {error}");
    };
    // ggml's type numbers (ggml.h) that candle does not read.
    let name = match id {
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => "unknown",
    };
    format!(
        "tensor type {name} (ggml type {id}) is not supported; supported: F32, F16, BF16, \
         Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (Q4_K_M and Q6_K files \
         mix these)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_the_decoders() {
        assert_eq!(
            hf_name("blk.11.attn_q.bias").as_deref(),
            Some("model.layers.11.self_attn.q_proj.bias")
        );
        assert_eq!(
            hf_name("blk.0.ffn_down.weight").as_deref(),
            Some("model.layers.0.mlp.down_proj.weight")
        );
        assert_eq!(hf_name("output.weight").as_deref(), Some("lm_head.weight"));
        assert_eq!(hf_name("blk.0.attn_sinks.weight"), None);
        assert_eq!(hf_name("blk.x.attn_q.weight"), None);
    }

    #[test]
    fn unpermuting_inverts_llama_cpps_permutation() {
        // Rows tagged by their Hugging Face index: 2 heads of size 4, one byte per row.
        let (heads, dim) = (2, 4);
        let hf: Vec<u8> = (0..8).collect();
        // convert_hf_to_gguf: reshape(heads, 2, dim / 2).swapaxes(1, 2).
        let mut permuted = vec![0u8; 8];
        for h in 0..heads {
            for s in 0..2 {
                for i in 0..dim / 2 {
                    permuted[h * dim + i * 2 + s] = hf[h * dim + s * dim / 2 + i];
                }
            }
        }
        assert_eq!(permuted, vec![0, 2, 1, 3, 4, 6, 5, 7]);
        assert_eq!(unpermute_rows(&permuted, 8, heads, dim).unwrap(), hf);
        assert!(unpermute_rows(&permuted, 8, 3, dim).is_err());
    }

    #[test]
    fn unknown_tensor_types_are_named() {
        let msg = readable("unknown dtype for tensor 23");
        assert!(msg.contains("IQ4_XS") && msg.contains("Q8_0"), "{msg}");
        assert!(readable("bad magic").contains("bad magic"));
    }
}
