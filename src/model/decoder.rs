//! One decoder for the Llama and Qwen2 families: RMSNorm, GQA attention with rotary
//! embeddings over the paged cache, SwiGLU MLP. Qwen2 is Llama with q/k/v biases (and often
//! tied embeddings), so the families differ in flags read from the config, not in code.
//!
//! The forward takes a flattened [`ForwardBatch`] — sequences at different points, some
//! prefilling a chunk, some decoding one token — and runs every layer once for all of them.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::ops::rms_norm;
use candle_nn::rotary_emb::rope_thd;

use super::batch::ForwardBatch;
use super::config::ModelConfig;
use super::kv_cache::KvCache;
use super::paged_attention::{AttentionMeta, AttentionShape};
use super::quant::{Matrix, Quantization};
use super::swiglu::swiglu;
use super::weights::Weights;
use super::{ModelError, RopeTables};

/// `x @ w.T (+ b)` for a 2-D activation.
#[derive(Clone)]
struct Linear {
    weight: Matrix,
    bias: Option<Tensor>,
}

impl Linear {
    fn load(
        w: &mut Weights,
        name: &str,
        out: usize,
        inp: usize,
        bias: bool,
    ) -> Result<Self, ModelError> {
        Ok(Self {
            weight: w.take_matrix(&format!("{name}.weight"), &[out, inp])?,
            bias: if bias {
                Some(w.take(&format!("{name}.bias"), &[out])?)
            } else {
                None
            },
        })
    }

    /// Several projections of the same input as one: their weights (and biases) stacked by
    /// output row, so one matmul replaces several small ones.
    fn stacked(parts: Vec<Linear>) -> Result<Self, ModelError> {
        let bias = if parts.iter().all(|p| p.bias.is_some()) {
            let biases: Vec<&Tensor> = parts.iter().filter_map(|p| p.bias.as_ref()).collect();
            Some(Tensor::cat(&biases, 0)?)
        } else if parts.iter().any(|p| p.bias.is_some()) {
            return Err(ModelError::Resolve(
                "projections to stack must all have a bias or none".into(),
            ));
        } else {
            None
        };
        Ok(Self {
            weight: Matrix::stack(parts.into_iter().map(|p| p.weight).collect())?,
            bias,
        })
    }

    /// The same projection with its weight in the format `q` names ([`Matrix::requantized`];
    /// the bias stays as it is).
    fn quantized(self, q: Quantization) -> Result<Self, ModelError> {
        Ok(Self {
            weight: self.weight.requantized(q)?,
            ..self
        })
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.weight.forward(x)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

#[derive(Clone)]
struct Layer {
    input_norm: Tensor,
    /// q, k and v projections stacked: `[q_heads + 2 * kv_heads] * head_dim` outputs.
    qkv: Linear,
    o: Linear,
    post_norm: Tensor,
    /// gate and up projections stacked: `2 * intermediate_size` outputs.
    gate_up: Linear,
    down: Linear,
}

impl Layer {
    /// The layer with `f` applied to each of its four projections.
    fn map_projections(
        self,
        f: impl Fn(Linear) -> Result<Linear, ModelError>,
    ) -> Result<Self, ModelError> {
        Ok(Self {
            qkv: f(self.qkv)?,
            o: f(self.o)?,
            gate_up: f(self.gate_up)?,
            down: f(self.down)?,
            ..self
        })
    }
}

/// Cheap to clone: tensors are shared, not copied.
#[derive(Clone)]
pub struct Decoder {
    config: ModelConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Matrix,
    rope: RopeTables,
    device: Device,
    dtype: DType,
}

impl Decoder {
    pub fn new(config: ModelConfig, mut w: Weights, device: &Device) -> Result<Self, ModelError> {
        let c = &config;
        let (h, kv) = (c.hidden_size, c.num_key_value_heads * c.head_dim);
        let q_out = c.num_attention_heads * c.head_dim;
        let embed = w.get("model.embed_tokens.weight", &[c.vocab_size, h])?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let bias = c.attention_bias;
            let inter = c.intermediate_size;
            let q = Linear::load(&mut w, &format!("{p}.self_attn.q_proj"), q_out, h, bias)?;
            let k = Linear::load(&mut w, &format!("{p}.self_attn.k_proj"), kv, h, bias)?;
            let v = Linear::load(&mut w, &format!("{p}.self_attn.v_proj"), kv, h, bias)?;
            let gate = Linear::load(&mut w, &format!("{p}.mlp.gate_proj"), inter, h, false)?;
            let up = Linear::load(&mut w, &format!("{p}.mlp.up_proj"), inter, h, false)?;
            layers.push(Layer {
                input_norm: w.take(&format!("{p}.input_layernorm.weight"), &[h])?,
                qkv: Linear::stacked(vec![q, k, v])?,
                o: Linear::load(&mut w, &format!("{p}.self_attn.o_proj"), h, q_out, false)?,
                post_norm: w.take(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                gate_up: Linear::stacked(vec![gate, up])?,
                down: Linear::load(&mut w, &format!("{p}.mlp.down_proj"), h, inter, false)?,
            });
        }
        let norm = w.get("model.norm.weight", &[h])?;
        // Some checkpoints with tied embeddings still ship lm_head.weight; prefer it when present.
        let lm_head = if c.tie_word_embeddings && !w.contains("lm_head.weight") {
            Matrix::Dense(embed.clone())
        } else {
            w.take_matrix("lm_head.weight", &[c.vocab_size, h])?
        };
        let rope = RopeTables::new(c, w.dtype(), device)?;
        Self {
            dtype: w.dtype(),
            config,
            embed,
            layers,
            norm,
            lm_head,
            rope,
            device: device.clone(),
        }
        .for_this_cpu()
    }

    /// Every matrix in the form this CPU multiplies fastest ([`Matrix::for_this_cpu`]); and a
    /// bf16 or f16 model on the CPU made an f32 one around half-precision weight matrices
    /// ([`Self::half_weights_on_the_cpu`]).
    fn for_this_cpu(mut self) -> Result<Self, ModelError> {
        if self.device.is_cpu() && matches!(self.dtype, DType::BF16 | DType::F16) {
            self = self.half_weights_on_the_cpu()?;
        }
        self = self.map_projections(|l| {
            Ok(Linear {
                weight: l.weight.for_this_cpu()?,
                ..l
            })
        })?;
        self.lm_head = self.lm_head.for_this_cpu()?;
        Ok(self)
    }

    /// Every layer's projections through `f`.
    fn map_projections(
        mut self,
        f: impl Fn(Linear) -> Result<Linear, ModelError>,
    ) -> Result<Self, ModelError> {
        self.layers = std::mem::take(&mut self.layers)
            .into_iter()
            .map(|l| l.map_projections(&f))
            .collect::<Result<_, ModelError>>()?;
        Ok(self)
    }

    /// `--dtype bf16` / `f16` on the CPU: the projections and the output head keep their
    /// values in a [`Matrix::Half`] (half of f32's bytes, widened in registers), and the rest computes in f32, KV cache included: candle's own bf16 and
    /// f16 ops on the CPU widen every operand, ~2.5x slower than f32. The embedding table
    /// stays in its dtype (rows are widened as they are looked up).
    fn half_weights_on_the_cpu(mut self) -> Result<Self, ModelError> {
        let format = if self.dtype == DType::F16 {
            Quantization::F16
        } else {
            Quantization::Bf16
        };
        let f32 = |t: Tensor| t.to_dtype(DType::F32);
        self = self.map_projections(|l| {
            Ok(Linear {
                bias: l.bias.clone().map(f32).transpose()?,
                ..l.quantized(format)?
            })
        })?;
        self.layers = std::mem::take(&mut self.layers)
            .into_iter()
            .map(|l| {
                Ok(Layer {
                    input_norm: f32(l.input_norm)?,
                    post_norm: f32(l.post_norm)?,
                    ..l
                })
            })
            .collect::<Result<_, ModelError>>()?;
        if let Matrix::Dense(t) = &self.lm_head {
            self.lm_head = Matrix::quantized(t.clone(), format)?;
        }
        self.norm = f32(self.norm)?;
        self.rope = RopeTables::new(&self.config, DType::F32, &self.device)?;
        self.dtype = DType::F32;
        Ok(self)
    }

    /// The decoder with every projection and the output head quantized (`--quantization`);
    /// the embedding table, the norms and the biases stay in the model's dtype. One layer at
    /// a time, so the dense copy of each goes as soon as its quantized one exists.
    pub fn quantized(self, q: Quantization) -> Result<Self, ModelError> {
        q.check(self.dtype, &self.device)?;
        if q.is_none() {
            return Ok(self);
        }
        let blocks = std::iter::once(&self.lm_head).chain(self.layers.iter().flat_map(|l| {
            [
                &l.qkv.weight,
                &l.o.weight,
                &l.gate_up.weight,
                &l.down.weight,
            ]
        }));
        if blocks.into_iter().any(Matrix::has_blocks) {
            return Err(ModelError::Resolve(format!(
                "--quantization {}: the weights are already quantized (a GGUF file); \
                 leave --quantization at none",
                q.name()
            )));
        }
        // Dense and half-precision matrices alike, from the values they hold.
        let mut q_model = self.map_projections(|l| l.quantized(q))?;
        q_model.lm_head = q_model.lm_head.requantized(q)?;
        q_model.for_this_cpu()
    }

    /// Bytes each token's forward reads from the weight matrices (projections and output
    /// head), with the block formats used: what bounds decoding speed on memory bandwidth.
    pub fn weight_summary(&self) -> (usize, Vec<String>) {
        let mut bytes = self.lm_head.bytes();
        let mut formats = std::collections::BTreeSet::new();
        let all = self
            .layers
            .iter()
            .flat_map(|l| {
                [
                    &l.qkv.weight,
                    &l.o.weight,
                    &l.gate_up.weight,
                    &l.down.weight,
                ]
            })
            .chain(std::iter::once(&self.lm_head));
        for m in all {
            formats.insert(match m.format() {
                Some(f) => format!("{f:?}"),
                None => format!("{:?}", self.dtype),
            });
        }
        for l in &self.layers {
            bytes += l.qkv.weight.bytes() + l.o.weight.bytes();
            bytes += l.gate_up.weight.bytes() + l.down.weight.bytes();
        }
        (bytes, formats.into_iter().collect())
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn attention_shape(&self, block_size: usize) -> AttentionShape {
        AttentionShape {
            num_heads: self.config.num_attention_heads,
            num_kv_heads: self.config.num_key_value_heads,
            head_dim: self.config.head_dim,
            block_size,
        }
    }

    /// Runs the batch, writing its K/V into `cache`. Returns f32 logits for each sequence's
    /// last token, every token of the sequences in `batch.every_token`, or every token of
    /// all when `batch.all_logits` (rows in batch order: [`ForwardBatch::logit_rows`]).
    pub fn forward(&self, batch: &ForwardBatch, cache: &KvCache) -> Result<Tensor, ModelError> {
        batch.validate(cache.num_slots(), cache.block_size())?;
        let max_pos = self.config.max_position_embeddings;
        if let Some(p) = batch.positions.iter().find(|&&p| p as usize >= max_pos) {
            return Err(ModelError::Batch(format!(
                "position {p} is beyond max_position_embeddings {max_pos}"
            )));
        }
        if let Some(t) = batch
            .token_ids
            .iter()
            .find(|&&t| t as usize >= self.config.vocab_size)
        {
            return Err(ModelError::Batch(format!(
                "token id {t} is outside the vocabulary of {}",
                self.config.vocab_size
            )));
        }
        let c = &self.config;
        let t = batch.num_tokens();
        let meta = AttentionMeta::new(
            batch,
            self.attention_shape(cache.block_size()),
            &self.device,
        );
        let ids = Tensor::from_slice(&batch.token_ids, t, &self.device)?;
        let positions = Tensor::from_slice(&batch.positions, t, &self.device)?;
        let (cos, sin) = self.rope.gather(&positions)?;
        let eps = c.rms_norm_eps as f32;
        let mut x = self.embed.index_select(&ids, 0)?.to_dtype(self.dtype)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let residual = &x;
            let h = rms_norm(&x, &layer.input_norm, eps)?;
            let (q_len, kv_len) = (
                c.num_attention_heads * c.head_dim,
                c.num_key_value_heads * c.head_dim,
            );
            let qkv = layer.qkv.forward(&h)?;
            let q = qkv
                .narrow(1, 0, q_len)?
                .reshape((1, t, c.num_attention_heads, c.head_dim))?;
            let k =
                qkv.narrow(1, q_len, kv_len)?
                    .reshape((1, t, c.num_key_value_heads, c.head_dim))?;
            let v = qkv.narrow(1, q_len + kv_len, kv_len)?.reshape((
                t,
                c.num_key_value_heads,
                c.head_dim,
            ))?;
            let q = rope_thd(&q, &cos, &sin)?.squeeze(0)?;
            let k = rope_thd(&k, &cos, &sin)?.squeeze(0)?;
            meta.write_kv(cache.layer(i), &k, &v)?;
            let attn = meta.attend(&q, cache.layer(i))?;
            x = (residual + layer.o.forward(&attn)?)?;
            let h = rms_norm(&x, &layer.post_norm, eps)?;
            let gated = swiglu(&layer.gate_up.forward(&h)?)?;
            x = (&x + layer.down.forward(&gated)?)?;
        }
        let x = match batch.logit_rows() {
            None => x,
            Some(rows) => {
                let n = rows.len();
                x.index_select(&Tensor::from_vec(rows, n, &self.device)?, 0)?
            }
        };
        let x = rms_norm(&x, &self.norm, eps)?;
        let logits = self.lm_head.forward(&x)?;
        Ok(logits.to_dtype(DType::F32)?.contiguous()?)
    }
}

/// Index of the largest value in each row of `[S, vocab]` logits (ties: lowest id, as torch).
pub fn argmax_rows(logits: &Tensor) -> candle_core::Result<Vec<u32>> {
    logits.argmax(D::Minus1)?.to_vec1::<u32>()
}
