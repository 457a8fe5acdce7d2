//! Test model folders assembled from the shared models and a file kept in git: a folder in
//! the temporary directory, removed on drop.
//!
//! `hermes-qwen2` (tests/fixtures/hermes-qwen2/README.md): `tiny-random-qwen2`'s config,
//! generation config, weights and tokenizer, linked, beside the fixture's
//! `tokenizer_config.json` (Qwen2.5-Instruct's chat template, which writes Hermes
//! `<tool_call>` blocks). Nothing of the shared models is copied.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::model_dir;

/// The files linked from the shared model.
const LINKED: [&str; 4] = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
];

/// A model folder in the temporary directory; removed (with what is in it) on drop.
pub struct ModelFolder {
    path: PathBuf,
}

impl ModelFolder {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// An empty folder of a name no other test (of this or another process) uses.
    fn fresh(stem: &str) -> ModelFolder {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!(
            "distillery-{stem}-{}-{}-{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("create the model folder {}: {e}", path.display()));
        ModelFolder { path }
    }
}

impl Drop for ModelFolder {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// The fixture folder of this checkout, `tests/fixtures/<name>`.
pub fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// `tiny-random-qwen2` with Qwen2.5's chat template (tool format: Hermes), or `None` (after
/// the loud message of [`model_dir`]) where the shared models are absent.
pub fn hermes_qwen2() -> Option<ModelFolder> {
    let shared = model_dir("tiny-random-qwen2")?;
    let folder = ModelFolder::fresh("hermes-qwen2");
    for file in LINKED {
        let from = shared.join(file);
        assert!(from.is_file(), "{} missing", from.display());
        link(&from, &folder.path.join(file));
    }
    let config = fixture_dir("hermes-qwen2").join("tokenizer_config.json");
    std::fs::copy(&config, folder.path.join("tokenizer_config.json"))
        .unwrap_or_else(|e| panic!("copy {}: {e}", config.display()));
    Some(folder)
}

#[cfg(unix)]
fn link(from: &Path, to: &Path) {
    std::os::unix::fs::symlink(from, to)
        .unwrap_or_else(|e| panic!("link {} -> {}: {e}", to.display(), from.display()));
}

#[cfg(not(unix))]
fn link(from: &Path, to: &Path) {
    std::fs::copy(from, to)
        .unwrap_or_else(|e| panic!("copy {} -> {}: {e}", from.display(), to.display()));
}
