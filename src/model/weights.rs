//! Reads `*.safetensors` (one file, or shards listed by `model.safetensors.index.json`) into
//! device tensors of the requested dtype, checking every tensor's shape against what the
//! decoder expects.
//!
//! Knows tensor names and files; knows nothing of what the tensors mean.

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::quant::Matrix;
use super::ModelError;

/// All tensors of a checkpoint, kept with the file they came from for error messages.
pub struct Weights {
    tensors: HashMap<String, (Tensor, usize)>,
    /// Weight matrices a file already stores in GGML blocks (GGUF), by the same names.
    matrices: HashMap<String, Matrix>,
    files: Vec<PathBuf>,
    dtype: DType,
}

/// The safetensors files of a folder, in load order.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
        let parsed: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ModelError::Config {
                path: index.clone(),
                message: e.to_string(),
            })?;
        let map = parsed
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| ModelError::Config {
                path: index.clone(),
                message: "no \"weight_map\" object".into(),
            })?;
        let mut files: Vec<PathBuf> = Vec::new();
        for shard in map.values().filter_map(|v| v.as_str()) {
            let path = dir.join(shard);
            if !files.contains(&path) {
                files.push(path);
            }
        }
        files.sort();
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(ModelError::Resolve(format!(
        "{}: no model.safetensors or model.safetensors.index.json (only safetensors checkpoints are supported)",
        dir.display()
    )))
}

impl Weights {
    /// Loads every tensor of `files`, converted to `dtype`, onto `device`. `on_file` is told
    /// each file's size before it is read, so a caller can show progress.
    pub fn load(
        files: &[PathBuf],
        dtype: DType,
        device: &Device,
        mut on_file: impl FnMut(&Path, u64),
    ) -> Result<Self, ModelError> {
        let mut tensors = HashMap::new();
        for (file_index, path) in files.iter().enumerate() {
            let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
            on_file(path, bytes.len() as u64);
            let loaded =
                candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).map_err(|e| {
                    ModelError::Config {
                        path: path.clone(),
                        message: format!("not a readable safetensors file: {e}"),
                    }
                })?;
            for (name, tensor) in loaded {
                let converted = tensor
                    .to_dtype(dtype)
                    .and_then(|t| t.to_device(device))
                    .map_err(|e| ModelError::Tensor {
                        path: path.clone(),
                        tensor: name.clone(),
                        message: e.to_string(),
                    })?;
                tensors.insert(name, (converted, file_index));
            }
        }
        Ok(Self {
            tensors,
            matrices: HashMap::new(),
            files: files.to_vec(),
            dtype,
        })
    }

    /// Builds weights from tensors already in memory (the embedded and dummy models).
    pub fn from_tensors(tensors: HashMap<String, Tensor>, origin: PathBuf, dtype: DType) -> Self {
        Self {
            tensors: tensors.into_iter().map(|(k, v)| (k, (v, 0))).collect(),
            matrices: HashMap::new(),
            files: vec![origin],
            dtype,
        }
    }

    /// Tensors and block-stored matrices read from one file (a GGUF), computed in f32.
    pub fn from_file_parts(
        tensors: HashMap<String, Tensor>,
        matrices: HashMap<String, Matrix>,
        origin: PathBuf,
    ) -> Self {
        Self {
            matrices,
            ..Self::from_tensors(tensors, origin, DType::F32)
        }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name) || self.matrices.contains_key(name)
    }

    /// The `[out, in]` weight matrix `name` as stored: in blocks when the file has it so,
    /// else the dense tensor (which must have exactly `shape`).
    pub fn take_matrix(&mut self, name: &str, shape: &[usize]) -> Result<Matrix, ModelError> {
        if let Some(m) = self.matrices.remove(name) {
            let (rows, width) = m.dims()?;
            if [rows, width] != shape {
                return Err(ModelError::Tensor {
                    path: self.files[0].clone(),
                    tensor: name.to_string(),
                    message: format!(
                        "shape [{rows}, {width}] does not match the config, which implies {shape:?}"
                    ),
                });
            }
            return Ok(m);
        }
        Ok(Matrix::Dense(self.take(name, shape)?))
    }

    /// The tensor `name`, which must have exactly `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        self.checked(name, self.tensors.get(name), shape).cloned()
    }

    /// Like [`Weights::get`], but hands the tensor over: a caller that builds something new
    /// from it (stacked projections) lets the original's memory go as soon as it is done,
    /// instead of holding both copies until every layer is built.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        let taken = self.tensors.remove(name);
        let tensor = self.checked(name, taken.as_ref(), shape)?.clone();
        Ok(tensor)
    }

    fn checked<'a>(
        &self,
        name: &str,
        entry: Option<&'a (Tensor, usize)>,
        shape: &[usize],
    ) -> Result<&'a Tensor, ModelError> {
        let Some((tensor, file)) = entry else {
            return Err(ModelError::MissingTensor {
                tensor: name.to_string(),
                files: self
                    .files
                    .iter()
                    .map(|f| f.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        if tensor.dims() != shape {
            return Err(ModelError::Tensor {
                path: self.files[*file].clone(),
                tensor: name.to_string(),
                message: format!(
                    "shape {:?} does not match the config, which implies {:?}",
                    tensor.dims(),
                    shape
                ),
            });
        }
        Ok(tensor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shape_mismatch_names_the_file_and_the_tensor() {
        let t = Tensor::zeros((4, 3), DType::F32, &Device::Cpu).unwrap();
        let w = Weights::from_tensors(
            HashMap::from([("model.norm.weight".to_string(), t)]),
            PathBuf::from("/models/x/model.safetensors"),
            DType::F32,
        );
        let err = w.get("model.norm.weight", &[3]).unwrap_err().to_string();
        assert!(
            err.contains("model.norm.weight") && err.contains("model.safetensors"),
            "{err}"
        );
        let err = w.get("lm_head.weight", &[3, 4]).unwrap_err().to_string();
        assert!(err.contains("lm_head.weight"), "{err}");
    }

    #[test]
    fn take_hands_the_tensor_over_once() {
        let t = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
        let mut w = Weights::from_tensors(
            HashMap::from([("model.norm.weight".to_string(), t)]),
            PathBuf::from("/models/x/model.safetensors"),
            DType::F32,
        );
        assert_eq!(w.take("model.norm.weight", &[3]).unwrap().dims(), &[3]);
        assert!(!w.contains("model.norm.weight"));
        let err = w.take("model.norm.weight", &[3]).unwrap_err().to_string();
        assert!(err.contains("model.norm.weight"), "{err}");
    }
}
