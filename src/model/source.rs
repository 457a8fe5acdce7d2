//! Where a model's files come from: a local folder, or a Hugging Face hub id resolved through
//! the hub cache (downloading into it unless offline).
//!
//! Owns the mapping from the user's `--model` argument to a folder on disk; knows nothing of
//! what is in the files.

use std::path::{Path, PathBuf};

use super::ModelError;

/// The hub settings, read from the environment once by the caller (no global state here).
#[derive(Clone, Debug)]
pub struct HubOptions {
    /// The hub cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`).
    pub cache_dir: PathBuf,
    /// `HF_HUB_OFFLINE=1`: only the cache is consulted.
    pub offline: bool,
    pub endpoint: Option<String>,
    pub token: Option<String>,
}

impl HubOptions {
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let cache_dir = var("HF_HUB_CACHE")
            .map(PathBuf::from)
            .or_else(|| var("HF_HOME").map(|h| PathBuf::from(h).join("hub")))
            .unwrap_or_else(|| hf_hub::Cache::default().path().clone());
        let offline = var("HF_HUB_OFFLINE")
            .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
            .unwrap_or(false);
        Self {
            cache_dir,
            offline,
            endpoint: var("HF_ENDPOINT"),
            token: var("HF_TOKEN"),
        }
    }
}

/// Fetches one file of the repository into the cache, returning its local path.
type Fetch = dyn Fn(&str) -> Result<PathBuf, String>;

/// Files a hub snapshot must provide; the weights are found from what is listed.
const REQUIRED: [&str; 2] = ["config.json", "tokenizer.json"];
const OPTIONAL: [&str; 3] = [
    "generation_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

/// Resolves `model` to a folder holding its files. A path that exists is used as it is;
/// anything shaped like `org/name` is a hub id.
pub fn resolve(model: &str, hub: &HubOptions) -> Result<PathBuf, ModelError> {
    let path = Path::new(model);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if !looks_like_hub_id(model) {
        return Err(ModelError::Resolve(format!(
            "model {model:?} is neither an existing folder nor a hub id of the form org/name"
        )));
    }
    let (repo, revision) = match model.split_once('@') {
        Some((r, rev)) => (r, rev.to_string()),
        None => (model, "main".to_string()),
    };
    let repo_ref = hf_hub::Repo::with_revision(repo.to_string(), hf_hub::RepoType::Model, revision);
    let fetch: Box<Fetch> = if hub.offline {
        let cached = hf_hub::Cache::new(hub.cache_dir.clone()).repo(repo_ref);
        Box::new(move |file| {
            cached
                .get(file)
                .ok_or_else(|| "not in the cache and HF_HUB_OFFLINE is set".to_string())
        })
    } else {
        let mut builder =
            hf_hub::api::sync::ApiBuilder::from_cache(hf_hub::Cache::new(hub.cache_dir.clone()))
                .with_token(hub.token.clone())
                .with_progress(std::io::IsTerminal::is_terminal(&std::io::stderr()));
        if let Some(endpoint) = &hub.endpoint {
            builder = builder.with_endpoint(endpoint.clone());
        }
        let api = builder
            .build()
            .map_err(|e| unreachable_hub(model, hub, &e.to_string()))?;
        let remote = api.repo(repo_ref);
        Box::new(move |file| remote.get(file).map_err(|e| e.to_string()))
    };
    let mut folder = None;
    for file in REQUIRED {
        let got = fetch(file).map_err(|e| unreachable_hub(model, hub, &format!("{file}: {e}")))?;
        folder = got.parent().map(Path::to_path_buf);
    }
    for file in OPTIONAL {
        let _ = fetch(file);
    }
    // Weights: a sharded checkpoint names its shards in the index.
    match fetch("model.safetensors.index.json") {
        Ok(index) => {
            let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
            let parsed: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| ModelError::Config {
                    path: index.clone(),
                    message: e.to_string(),
                })?;
            let mut shards: Vec<&str> = parsed
                .get("weight_map")
                .and_then(|m| m.as_object())
                .map(|m| m.values().filter_map(|v| v.as_str()).collect())
                .unwrap_or_default();
            shards.sort_unstable();
            shards.dedup();
            for shard in shards {
                fetch(shard).map_err(|e| unreachable_hub(model, hub, &format!("{shard}: {e}")))?;
            }
        }
        Err(_) => {
            fetch("model.safetensors")
                .map_err(|e| unreachable_hub(model, hub, &format!("model.safetensors: {e}")))?;
        }
    }
    folder.ok_or_else(|| ModelError::Resolve(format!("hub id {model:?} resolved to no folder")))
}

fn looks_like_hub_id(model: &str) -> bool {
    let name = model.split('@').next().unwrap_or(model);
    let mut parts = name.split('/');
    matches!((parts.next(), parts.next(), parts.next()), (Some(org), Some(repo), None)
        if !org.is_empty() && !repo.is_empty() && !org.starts_with('.'))
}

fn unreachable_hub(model: &str, hub: &HubOptions, detail: &str) -> ModelError {
    ModelError::Resolve(format!(
        "could not get model {model:?} from the Hugging Face hub ({detail}); cache: {}{}. \
         Download it where there is network (e.g. `huggingface-cli download {model}`) into that \
         cache, or pass a local folder: --model /path/to/folder",
        hub.cache_dir.display(),
        if hub.offline {
            ", offline mode (HF_HUB_OFFLINE)"
        } else {
            ""
        }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_hub_ids_from_paths() {
        assert!(looks_like_hub_id(
            "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
        ));
        assert!(looks_like_hub_id("org/name@v1"));
        assert!(!looks_like_hub_id("./relative"));
        assert!(!looks_like_hub_id("/abs/path/model"));
        assert!(!looks_like_hub_id("name"));
    }

    #[test]
    fn offline_miss_names_the_id_and_the_fix() {
        let hub = HubOptions {
            cache_dir: std::env::temp_dir().join("distillery-empty-hub-cache"),
            offline: true,
            endpoint: None,
            token: None,
        };
        let err = resolve("someone/absent-model", &hub)
            .unwrap_err()
            .to_string();
        assert!(err.contains("someone/absent-model"), "{err}");
        assert!(err.contains("--model /path/to/folder"), "{err}");
    }
}
