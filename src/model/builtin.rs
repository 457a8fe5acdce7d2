//! Models built into the binary (`--model builtin:NAME`), so the daemon starts and serves
//! anywhere with no download and no model folder: the files a Hugging Face folder would hold
//! (`config.json`, `tokenizer.json`, `tokenizer_config.json`) are generated here, and the
//! weights are random from a fixed seed.
//!
//! Owns those generated files and the list of built-in names. Must not know how weights are
//! generated (that is `dummy`'s) nor anything of serving: it hands back the same
//! `(Decoder, Tokenizer)` pair a real folder gives.

use candle_core::Device;
use serde_json::{json, Map, Value};
use std::path::PathBuf;

use super::config::ModelConfig;
use super::decoder::Decoder;
use super::{dummy, DTypeChoice, ModelError};
use crate::tokenizer::Tokenizer;

/// How `--model` names a built-in model: `builtin:tiny`.
pub const BUILTIN_PREFIX: &str = "builtin:";

/// The built-in models, without the prefix.
pub const NAMES: &[&str] = &["tiny"];

/// Fixed so that every start of `builtin:tiny` serves the same (meaningless) model, and tests
/// and bug reports can rely on its outputs.
const TINY_SEED: u64 = 0x7157_0001;

/// The test models' `initializer_range`; large enough that greedy output varies with the
/// prompt rather than collapsing onto one token.
const TINY_STD: f32 = 0.2;

const BOS: &str = "<s>";
const EOS: &str = "</s>";
/// The special tokens, at ids 0.. in this order (tiny-llama-v512's layout).
const SPECIAL_TOKENS: [&str; 5] = [BOS, EOS, "<|user|>", "<|assistant|>", "<|system|>"];

const CHAT_TEMPLATE: &str = "{{- bos_token }}{%- for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}";

/// Loads the built-in model `name` (with or without the `builtin:` prefix).
pub fn load(
    name: &str,
    dtype: DTypeChoice,
    device: &Device,
) -> Result<(Decoder, Tokenizer), ModelError> {
    let bare = name.strip_prefix(BUILTIN_PREFIX).unwrap_or(name);
    match bare {
        "tiny" => load_tiny(dtype, device),
        _ => Err(ModelError::Resolve(format!(
            "unknown built-in model {name:?}; known: {}",
            NAMES
                .iter()
                .map(|n| format!("{BUILTIN_PREFIX}{n}"))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

fn load_tiny(dtype: DTypeChoice, device: &Device) -> Result<(Decoder, Tokenizer), ModelError> {
    let origin = |file: &str| PathBuf::from(format!("{BUILTIN_PREFIX}tiny/{file}"));
    let to_bytes = |file: &str, value: &Value| {
        serde_json::to_vec(value).map_err(|e| ModelError::Config {
            path: origin(file),
            message: e.to_string(),
        })
    };
    let tokenizer = Tokenizer::from_parts(
        &to_bytes("tokenizer.json", &byte_level_tokenizer_json())?,
        Some(&to_bytes(
            "tokenizer_config.json",
            &tokenizer_config_json(),
        )?),
    )
    .map_err(|e| ModelError::Config {
        path: origin("tokenizer.json"),
        message: e.to_string(),
    })?;
    let config_text =
        serde_json::to_string(&tiny_config_json(&tokenizer)).map_err(|e| ModelError::Config {
            path: origin("config.json"),
            message: e.to_string(),
        })?;
    let config =
        ModelConfig::from_json(&config_text, None).map_err(|message| ModelError::Config {
            path: origin("config.json"),
            message,
        })?;
    let dtype = dtype.resolve(&config, device);
    let weights = dummy::random_weights_with_std(&config, dtype, device, TINY_SEED, TINY_STD)?;
    tracing::warn!(
        model = "builtin:tiny",
        "the built-in model has random weights and its output is meaningless; serve a real \
         student with `--model deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B` or a local folder"
    );
    let decoder = Decoder::new(config, weights, device)?;
    Ok((decoder, tokenizer))
}

fn tiny_config_json(tokenizer: &Tokenizer) -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 160,
        "vocab_size": tokenizer.vocab_size(),
        "max_position_embeddings": 2048,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": false,
        "attention_bias": false,
        "bos_token_id": tokenizer.token_to_id(BOS),
        "eos_token_id": tokenizer.eos_token_id(),
        // The model is tiny; f32 costs nothing and spares half-precision surprises on GPUs.
        "torch_dtype": "float32",
    })
}

/// GPT-2's byte-to-unicode mapping, in the order GPT-2 assigns ids: printable bytes stand for
/// themselves, the rest (whitespace, controls) are shifted to U+0100.. so that every token of a
/// byte-level vocabulary is a visible, valid JSON string.
fn bytes_to_unicode() -> Vec<char> {
    let printable = |b: &u32| (33..=126).contains(b) || (161..=172).contains(b) || *b >= 174;
    let mut chars: Vec<char> = (0..256)
        .filter(printable)
        .filter_map(char::from_u32)
        .collect();
    let shifted = (0..256).filter(|b| !printable(b)).count() as u32;
    chars.extend((256..256 + shifted).filter_map(char::from_u32));
    chars
}

/// A byte-level BPE with no merges: every byte is one token, so any UTF-8 text round-trips and
/// nothing has to be trained or shipped.
fn byte_level_tokenizer_json() -> Value {
    let mut vocab = Map::new();
    for (id, token) in SPECIAL_TOKENS.iter().enumerate() {
        vocab.insert((*token).to_string(), json!(id));
    }
    for (i, c) in bytes_to_unicode().into_iter().enumerate() {
        vocab.insert(c.to_string(), json!(SPECIAL_TOKENS.len() + i));
    }
    let added_tokens: Vec<Value> = SPECIAL_TOKENS
        .iter()
        .enumerate()
        .map(|(id, token)| {
            json!({
                "id": id,
                "content": token,
                "single_word": false,
                "lstrip": false,
                "rstrip": false,
                "normalized": false,
                "special": true,
            })
        })
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": null,
        "pre_tokenizer": {
            "type": "ByteLevel",
            "add_prefix_space": false,
            "trim_offsets": true,
            "use_regex": true,
        },
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": BOS, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
            ],
            "pair": [
                {"SpecialToken": {"id": BOS, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": BOS, "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {
                BOS: {"id": BOS, "ids": [0], "tokens": [BOS]},
            },
        },
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": true,
            "trim_offsets": true,
            "use_regex": true,
        },
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": [],
        },
    })
}

fn tokenizer_config_json() -> Value {
    json!({
        "add_bos_token": true,
        "add_eos_token": false,
        "bos_token": BOS,
        "eos_token": EOS,
        "additional_special_tokens": &SPECIAL_TOKENS[2..],
        "clean_up_tokenization_spaces": false,
        "model_max_length": 2048,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{argmax_rows, ForwardBatch, KvCache};
    use crate::tokenizer::ChatMessage;

    fn tiny() -> (Decoder, Tokenizer) {
        load("tiny", DTypeChoice::Auto, &Device::Cpu).unwrap()
    }

    #[test]
    fn tiny_loads_with_the_tokenizer_s_vocabulary() {
        let (decoder, tokenizer) = tiny();
        let c = decoder.config();
        assert_eq!(tokenizer.vocab_size(), 256 + SPECIAL_TOKENS.len());
        assert_eq!(c.vocab_size, tokenizer.vocab_size());
        assert_eq!(c.bos_token_id, Some(0));
        assert_eq!(c.eos_token_ids, vec![1]);
        assert_eq!(tokenizer.eos_token_id(), Some(1));
        assert_eq!(tokenizer.token_to_id("<|system|>"), Some(4));
        assert_eq!(
            (c.num_hidden_layers, c.hidden_size, c.head_dim),
            (2, 64, 16)
        );
        assert!(!c.tie_word_embeddings && !c.attention_bias);
        assert_eq!(decoder.dtype(), candle_core::DType::F32);
        // The prefix is accepted too.
        load("builtin:tiny", DTypeChoice::Bf16, &Device::Cpu).unwrap();
    }

    #[test]
    fn unknown_name_lists_the_known_ones() {
        let Err(err) = load("huge", DTypeChoice::Auto, &Device::Cpu) else {
            panic!("loaded a model that does not exist");
        };
        let message = err.to_string();
        assert!(
            message.contains("huge") && message.contains("builtin:tiny"),
            "{message}"
        );
    }

    #[test]
    fn tokenizer_round_trips_ascii_and_multibyte_text() {
        let (_, tokenizer) = tiny();
        for text in [
            "Hello, world! 42",
            "  leading spaces\tand\ntabs",
            "héllo wörld — 日本語 🦀",
        ] {
            let ids = tokenizer.encode(text, false).unwrap();
            assert_eq!(ids.len(), text.len(), "one token per byte for {text:?}");
            assert_eq!(tokenizer.decode(&ids, false).unwrap(), text);
            let with_bos = tokenizer.encode(text, true).unwrap();
            assert_eq!(with_bos[0], 0);
            assert_eq!(tokenizer.decode(&with_bos, true).unwrap(), text);
        }
    }

    #[test]
    fn chat_template_renders_and_specials_encode_as_one_token() {
        let (_, tokenizer) = tiny();
        let prompt = tokenizer
            .apply_chat_template(&[ChatMessage::new("user", "hi")], true)
            .unwrap();
        assert_eq!(prompt, "<s><|user|>hi</s><|assistant|>");
        let ids = tokenizer.encode(&prompt, false).unwrap();
        let hi: Vec<u32> = tokenizer.encode("hi", false).unwrap();
        assert_eq!(ids, [&[0, 2][..], &hi, &[1, 3]].concat());
        assert_eq!(tokenizer.add_bos_token(), Some(true));
    }

    /// Prefill then a few greedy decode steps; returns every step's logits.
    fn greedy(decoder: &Decoder, prompt: &[u32], steps: usize) -> Vec<Vec<f32>> {
        let bs = 16;
        let table = [0u32, 1];
        let cache = KvCache::new(
            decoder.config(),
            table.len(),
            bs,
            decoder.dtype(),
            decoder.device(),
        )
        .unwrap();
        let vocab = decoder.config().vocab_size;
        let mut tokens = prompt.to_vec();
        let mut computed = 0;
        let mut all = Vec::new();
        for _ in 0..=steps {
            let mut batch = ForwardBatch::default();
            batch.push_sequence(&tokens[computed..], computed, &table, bs);
            let logits = decoder.forward(&batch, &cache).unwrap();
            assert_eq!(logits.dims(), &[1, vocab]);
            computed = tokens.len();
            tokens.push(argmax_rows(&logits).unwrap()[0]);
            all.push(logits.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        }
        all
    }

    #[test]
    fn greedy_forward_is_finite_and_deterministic_across_loads() {
        let (decoder, tokenizer) = tiny();
        let prompt = tokenizer.encode("The quick brown fox", true).unwrap();
        let first = greedy(&decoder, &prompt, 4);
        assert!(first.iter().flatten().all(|v| v.is_finite()));
        let (again, _) = tiny();
        let second = greedy(&again, &prompt, 4);
        let bits =
            |l: &[Vec<f32>]| -> Vec<u32> { l.iter().flatten().map(|v| v.to_bits()).collect() };
        assert_eq!(bits(&first), bits(&second));
    }
}
