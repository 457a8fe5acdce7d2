//! The sampling defaults a checkpoint ships in `generation_config.json` (R1-Distill: temperature
//! 0.6, top_p 0.95), read as vLLM's `--generation-config auto` reads them.
//!
//! Owns that file's sampling keys and nothing else (its EOS ids are `config`'s). Values equal
//! to transformers' own defaults are dropped, as vLLM's `to_diff_dict()` drops them: a file
//! that spells out `top_k: 50` did not ask for top-k.

use std::path::Path;

use serde::Deserialize;

use super::ModelError;

pub const FILE: &str = "generation_config.json";

/// Each `None` leaves the request's own default (OpenAI's) in force.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GenerationDefaults {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
}

#[derive(Deserialize, Default)]
struct Raw {
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    min_p: Option<f32>,
    repetition_penalty: Option<f32>,
}

impl GenerationDefaults {
    /// `dir/generation_config.json`, or no defaults when the folder has none.
    pub fn from_dir(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join(FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => Self::from_json(&text).map_err(|message| ModelError::Config {
                path: path.clone(),
                message,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(ModelError::io(&path, e)),
        }
    }

    pub fn from_json(text: &str) -> Result<Self, String> {
        let raw: Raw = serde_json::from_str(text).map_err(|e| e.to_string())?;
        // transformers' GenerationConfig defaults, which to_diff_dict() leaves out.
        let unless = |v: Option<f32>, default: f32| v.filter(|&x| x != default);
        Ok(Self {
            temperature: unless(raw.temperature, 1.0),
            top_p: unless(raw.top_p, 1.0),
            top_k: raw.top_k.filter(|&k| k != 50),
            min_p: raw.min_p,
            repetition_penalty: unless(raw.repetition_penalty, 1.0),
        })
    }

    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_keys_are_read_and_transformers_defaults_dropped() {
        let d = GenerationDefaults::from_json(
            r#"{"bos_token_id":0,"do_sample":true,"temperature":0.6,"top_p":0.95,"top_k":50,
                "repetition_penalty":1.0,"min_p":0.05}"#,
        )
        .unwrap();
        assert_eq!(d.temperature, Some(0.6));
        assert_eq!(d.top_p, Some(0.95));
        assert_eq!(d.top_k, None);
        assert_eq!(d.repetition_penalty, None);
        assert_eq!(d.min_p, Some(0.05));
        assert!(GenerationDefaults::from_json(r#"{"eos_token_id":2}"#)
            .unwrap()
            .is_empty());
        assert!(GenerationDefaults::from_json(r#"{"temperature":"hot"}"#).is_err());
    }
}
