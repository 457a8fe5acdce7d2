//! Hub ids resolved offline through a Hugging Face cache laid out as huggingface_hub writes it
//! (`models--org--name/refs/main` → `snapshots/<commit>/...`), and the error when absent.

mod common;

use std::path::Path;
use std::process::Command;

use common::models_dir;
use distillery::model::source::{resolve, HubOptions};

/// Lays `model` out in a fresh cache under `root` as `org/name` at commit `c0ffee`.
fn fake_cache(root: &Path, model: &Path, repo: &str) -> std::path::PathBuf {
    let folder = format!("models--{}", repo.replace('/', "--"));
    let base = root.join("hub").join(folder);
    let snapshot = base.join("snapshots").join("c0ffee");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(base.join("refs")).unwrap();
    std::fs::write(base.join("refs").join("main"), "c0ffee").unwrap();
    for entry in std::fs::read_dir(model).unwrap() {
        let entry = entry.unwrap();
        std::os::unix::fs::symlink(entry.path(), snapshot.join(entry.file_name())).unwrap();
    }
    snapshot
}

#[test]
fn a_hub_id_in_the_offline_cache_resolves_and_loads() {
    let Some(models) = models_dir() else { return };
    let tmp = std::env::temp_dir().join(format!("distillery-hub-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let snapshot = fake_cache(&tmp, &models.join("tiny-llama-v512"), "test-org/tiny-llama");
    let hub = HubOptions {
        cache_dir: tmp.join("hub"),
        offline: true,
        endpoint: None,
        token: None,
    };
    let dir = resolve("test-org/tiny-llama", &hub).expect("resolves from the cache");
    assert_eq!(dir, snapshot);

    // The real binary, configured only through the environment as a user would.
    let out = Command::new(env!("CARGO_BIN_EXE_distillery"))
        .args([
            "generate",
            "--model",
            "test-org/tiny-llama",
            "--prompt",
            "Hello",
        ])
        .args(["--max-tokens", "4", "--ignore-eos"])
        .env("HF_HOME", &tmp)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.stdout.is_empty());

    // An id that is not cached fails with a message naming it and the way out.
    let out = Command::new(env!("CARGO_BIN_EXE_distillery"))
        .args([
            "generate",
            "--model",
            "test-org/absent",
            "--prompt",
            "Hello",
        ])
        .env("HF_HOME", &tmp)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("test-org/absent") && err.contains("local folder"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn a_missing_folder_file_is_a_clear_error() {
    let Some(models) = models_dir() else { return };
    let tmp = std::env::temp_dir().join(format!("distillery-broken-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::copy(
        models.join("tiny-llama-v512/config.json"),
        tmp.join("config.json"),
    )
    .unwrap();
    let err = distillery::model::load_decoder(
        &tmp,
        distillery::model::DTypeChoice::F32,
        &candle_core::Device::Cpu,
    )
    .err()
    .expect("no weights");
    assert!(err.to_string().contains("model.safetensors"), "{err}");
    let _ = std::fs::remove_dir_all(&tmp);
}
