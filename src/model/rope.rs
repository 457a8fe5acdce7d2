//! Rotary position embedding tables: `cos`/`sin` of shape `[max_positions, head_dim / 2]`,
//! computed once in f64 and gathered per token by position, so a batch whose sequences are at
//! different positions needs no per-sequence work.

use candle_core::{DType, Device, Tensor};

use super::config::{ModelConfig, RopeScaling};

#[derive(Clone)]
pub struct RopeTables {
    pub cos: Tensor,
    pub sin: Tensor,
}

/// Inverse frequencies after any `rope_scaling`, as transformers computes them.
pub fn inverse_frequencies(config: &ModelConfig) -> Vec<f64> {
    let dim = config.head_dim;
    let base: Vec<f64> = (0..dim / 2)
        .map(|i| 1.0 / config.rope_theta.powf((2 * i) as f64 / dim as f64))
        .collect();
    match &config.rope_scaling {
        RopeScaling::None => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let old_context = *original_max_position_embeddings as f64;
            let low_wavelen = old_context / low_freq_factor;
            let high_wavelen = old_context / high_freq_factor;
            base.iter()
                .map(|&freq| {
                    let wavelen = 2.0 * std::f64::consts::PI / freq;
                    if wavelen < high_wavelen {
                        freq
                    } else if wavelen > low_wavelen {
                        freq / factor
                    } else {
                        let smooth = (old_context / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * freq / factor + smooth * freq
                    }
                })
                .collect()
        }
    }
}

impl RopeTables {
    pub fn new(config: &ModelConfig, dtype: DType, device: &Device) -> candle_core::Result<Self> {
        let inv_freq = inverse_frequencies(config);
        let half = inv_freq.len();
        let positions = config.max_position_embeddings;
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for p in 0..positions {
            for f in &inv_freq {
                // transformers rounds inv_freq to f32 before multiplying by the position.
                let angle = (p as f32 * (*f as f32)) as f64;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        let cos = Tensor::from_vec(cos, (positions, half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (positions, half), device)?.to_dtype(dtype)?;
        Ok(Self { cos, sin })
    }

    /// The rows for the given positions, `[T, head_dim / 2]`.
    pub fn gather(&self, positions: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        Ok((
            self.cos.index_select(positions, 0)?,
            self.sin.index_select(positions, 0)?,
        ))
    }
}
