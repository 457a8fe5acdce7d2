//! Why a model could not be loaded or run. Every variant names the file, tensor or id at fault,
//! because the person reading it has to fix a folder, not a stack trace.

use std::path::{Path, PathBuf};

#[derive(thiserror::Error, Debug)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{path}: tensor {tensor}: {message}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        message: String,
    },
    #[error("missing tensor {tensor} (looked in {files})")]
    MissingTensor { tensor: String, files: String },
    #[error("{0}")]
    Resolve(String),
    #[error("model computation failed: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("invalid batch: {0}")]
    Batch(String),
}

impl ModelError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
