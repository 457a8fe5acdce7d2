//! The CUDA side of the model's custom operators (built only with the `cuda` feature).
//!
//! `kernels.cu` holds the kernels: the paged KV write, paged attention (decode tokens and
//! prefill chunks alike, through the block tables) and a batched greedy argmax. `build.rs`
//! compiles it to PTX with nvcc; the PTX is embedded here and loaded once per device through
//! candle's `CudaDevice::get_or_load_custom_func`. Every launch goes on candle's stream, so
//! the kernels are ordered with candle's own ops and nothing waits on the host.
//!
//! The batch metadata the kernels read (slot mapping, each token's sequence and position,
//! block tables) is uploaded once per forward ([`DeviceMeta`]) and shared by every layer.
//! Layout and semantics are those of the CPU operators in `paged_attention/mod.rs`, which the
//! tests in `tests.rs` compare against.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{bail, CudaDevice, CudaStorage, Layout, Result, Shape, Storage, Tensor};

/// The kernels, as PTX for `compute_$CUDA_COMPUTE_CAP` (see build.rs).
pub const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/distillery_kernels.ptx"));
const MODULE: &str = "distillery_kernels";
/// Threads per paged-attention block; must match `PA_THREADS` in kernels.cu.
const PA_THREADS: u32 = 128;
/// The largest head_dim the attention kernel's shared memory holds (`PA_MAX_HEAD_DIM`).
pub const MAX_HEAD_DIM: usize = 256;
const ARGMAX_THREADS: u32 = 1024;

/// One forward's batch metadata on the device.
pub struct DeviceMeta {
    slots: CudaSlice<u32>,
    /// `[T * 2]`: each token's sequence and position.
    token_seq: CudaSlice<u32>,
    block_tables: CudaSlice<u32>,
}

impl DeviceMeta {
    pub fn upload(
        dev: &CudaDevice,
        slots: &[u32],
        token_seq: &[(u32, u32)],
        block_tables: &[u32],
    ) -> Result<Self> {
        // Never a zero-length allocation: a validated batch has tokens and tables, but the
        // upload must not depend on that.
        let up = |v: &[u32]| {
            if v.is_empty() {
                dev.clone_htod(&[0u32][..])
            } else {
                dev.clone_htod(v)
            }
        };
        let flat: Vec<u32> = token_seq.iter().flat_map(|&(s, p)| [s, p]).collect();
        Ok(Self {
            slots: up(slots)?,
            token_seq: up(&flat)?,
            block_tables: up(block_tables)?,
        })
    }
}

/// The shape facts the kernels take as arguments.
#[derive(Clone, Copy, Debug)]
pub struct KernelShape {
    pub num_tokens: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    pub max_blocks: usize,
    pub scale: f32,
}

impl KernelShape {
    fn check(&self) -> Result<()> {
        if self.head_dim == 0 || self.head_dim > MAX_HEAD_DIM {
            bail!(
                "paged attention on CUDA supports head_dim up to {MAX_HEAD_DIM}, got {}",
                self.head_dim
            );
        }
        if self.num_kv_heads == 0 || !self.num_heads.is_multiple_of(self.num_kv_heads) {
            bail!(
                "num_heads {} is not a multiple of num_kv_heads {}",
                self.num_heads,
                self.num_kv_heads
            );
        }
        let as_i32 = |v: usize| i32::try_from(v).is_ok();
        if ![
            self.num_tokens,
            self.num_heads,
            self.num_kv_heads,
            self.block_size,
            self.max_blocks,
        ]
        .into_iter()
        .all(as_i32)
        {
            bail!("paged attention dimensions overflow i32: {self:?}");
        }
        Ok(())
    }
}

fn contiguous_range(l: &Layout, what: &str) -> Result<std::ops::Range<usize>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(a..b),
        None => bail!("{what} must be contiguous"),
    }
}

fn kernel_name(base: &str, dtype: candle_core::DType) -> Result<String> {
    let suffix = match dtype {
        candle_core::DType::F32 => "f32",
        candle_core::DType::F16 => "f16",
        candle_core::DType::BF16 => "bf16",
        other => bail!("{base}: unsupported dtype {other:?} on CUDA"),
    };
    Ok(format!("distillery_{base}_{suffix}"))
}

/// Writes `k` and `v` (`[T, kv_heads, head_dim]`) into `cache` at the batch's slots. The
/// caller has checked the slots against the cache's size.
#[allow(clippy::too_many_arguments)]
pub fn write_kv(
    cache: &mut CudaStorage,
    cache_l: &Layout,
    k: &CudaStorage,
    k_l: &Layout,
    v: &CudaStorage,
    v_l: &Layout,
    meta: &DeviceMeta,
    shape: &KernelShape,
) -> Result<()> {
    shape.check()?;
    let dev = cache.device().clone();
    let name = kernel_name("write_kv", cache.dtype())?;
    #[allow(clippy::too_many_arguments)]
    fn launch<T: DeviceRepr>(
        dev: &CudaDevice,
        name: &str,
        cache: &mut CudaSlice<T>,
        ranges: [std::ops::Range<usize>; 3],
        k: &CudaSlice<T>,
        v: &CudaSlice<T>,
        meta: &DeviceMeta,
        s: &KernelShape,
    ) -> Result<()> {
        let [c_r, k_r, v_r] = ranges;
        let row = s.num_kv_heads * s.head_dim;
        if k_r.len() != s.num_tokens * row || v_r.len() != k_r.len() {
            bail!("k/v do not match the batch's token count");
        }
        if s.num_tokens == 0 {
            return Ok(());
        }
        let mut cache = cache.slice_mut(c_r);
        let (k, v) = (k.slice(k_r), v.slice(v_r));
        let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
        let threads = (s.head_dim.div_ceil(32) * 32).min(256) as u32;
        let cfg = LaunchConfig {
            grid_dim: (s.num_tokens as u32, s.num_kv_heads as u32, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        let (kv_heads, head_dim, block_size) = (
            s.num_kv_heads as i32,
            s.head_dim as i32,
            s.block_size as i32,
        );
        let mut b = func.builder();
        b.arg(&mut cache);
        b.arg(&k);
        b.arg(&v);
        b.arg(&meta.slots);
        b.arg(&kv_heads);
        b.arg(&head_dim);
        b.arg(&block_size);
        // SAFETY: the argument list matches distillery_write_kv_* in kernels.cu; every slot
        // was bounds-checked against the cache on the host, and k/v hold num_tokens rows.
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    }
    let ranges = [
        contiguous_range(cache_l, "kv cache")?,
        contiguous_range(k_l, "k")?,
        contiguous_range(v_l, "v")?,
    ];
    match (&mut cache.slice, &k.slice, &v.slice) {
        (CudaStorageSlice::F32(c), CudaStorageSlice::F32(k), CudaStorageSlice::F32(v)) => {
            launch(&dev, &name, c, ranges, k, v, meta, shape)
        }
        (CudaStorageSlice::F16(c), CudaStorageSlice::F16(k), CudaStorageSlice::F16(v)) => {
            launch(&dev, &name, c, ranges, k, v, meta, shape)
        }
        (CudaStorageSlice::BF16(c), CudaStorageSlice::BF16(k), CudaStorageSlice::BF16(v)) => {
            launch(&dev, &name, c, ranges, k, v, meta, shape)
        }
        _ => bail!(
            "paged-write-kv: unsupported dtypes cache {:?}, k {:?}, v {:?}",
            cache.dtype(),
            k.dtype(),
            v.dtype()
        ),
    }
}

/// Attention of `q` (`[T, heads, head_dim]`) over the cache; returns `[T, heads * head_dim]`.
/// The caller has checked the block tables against the cache's size.
pub fn paged_attention(
    q: &CudaStorage,
    q_l: &Layout,
    cache: &CudaStorage,
    cache_l: &Layout,
    meta: &DeviceMeta,
    shape: &KernelShape,
) -> Result<(CudaStorage, Shape)> {
    shape.check()?;
    let dev = q.device().clone();
    let name = kernel_name("paged_attention", q.dtype())?;
    let out_shape = Shape::from((shape.num_tokens, shape.num_heads * shape.head_dim));
    #[allow(clippy::too_many_arguments)]
    fn launch<T: DeviceRepr>(
        dev: &CudaDevice,
        name: &str,
        q: &CudaSlice<T>,
        q_r: std::ops::Range<usize>,
        cache: &CudaSlice<T>,
        c_r: std::ops::Range<usize>,
        meta: &DeviceMeta,
        s: &KernelShape,
    ) -> Result<CudaSlice<T>> {
        let n = s.num_tokens * s.num_heads * s.head_dim;
        if q_r.len() != n {
            bail!("q does not match the batch's token count");
        }
        // SAFETY: every element is written by the kernel below (one block per token and head,
        // covering all head_dim values) before anything reads it.
        let out = unsafe { dev.alloc::<T>(n.max(1)) }?;
        if n == 0 {
            return Ok(out);
        }
        let (q, cache) = (q.slice(q_r), cache.slice(c_r));
        let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
        let cfg = LaunchConfig {
            grid_dim: (s.num_tokens as u32, s.num_heads as u32, 1),
            block_dim: (PA_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (max_blocks, heads, kv_heads, head_dim, block_size) = (
            s.max_blocks as i32,
            s.num_heads as i32,
            s.num_kv_heads as i32,
            s.head_dim as i32,
            s.block_size as i32,
        );
        let mut b = func.builder();
        b.arg(&out);
        b.arg(&q);
        b.arg(&cache);
        b.arg(&meta.token_seq);
        b.arg(&meta.block_tables);
        b.arg(&max_blocks);
        b.arg(&heads);
        b.arg(&kv_heads);
        b.arg(&head_dim);
        b.arg(&block_size);
        b.arg(&s.scale);
        // SAFETY: the argument list matches distillery_paged_attention_* in kernels.cu; the
        // block tables were bounds-checked against the cache on the host, head_dim is at most
        // MAX_HEAD_DIM and num_heads is a multiple of num_kv_heads (KernelShape::check).
        unsafe { b.launch(cfg) }.w()?;
        Ok(out)
    }
    let q_r = contiguous_range(q_l, "q")?;
    let c_r = contiguous_range(cache_l, "kv cache")?;
    let slice = match (&q.slice, &cache.slice) {
        (CudaStorageSlice::F32(q), CudaStorageSlice::F32(c)) => {
            CudaStorageSlice::F32(launch(&dev, &name, q, q_r, c, c_r, meta, shape)?)
        }
        (CudaStorageSlice::F16(q), CudaStorageSlice::F16(c)) => {
            CudaStorageSlice::F16(launch(&dev, &name, q, q_r, c, c_r, meta, shape)?)
        }
        (CudaStorageSlice::BF16(q), CudaStorageSlice::BF16(c)) => {
            CudaStorageSlice::BF16(launch(&dev, &name, q, q_r, c, c_r, meta, shape)?)
        }
        _ => bail!(
            "paged-attention: unsupported dtypes q {:?}, cache {:?}",
            q.dtype(),
            cache.dtype()
        ),
    };
    Ok((CudaStorage { slice, device: dev }, out_shape))
}

/// The greedy token of each row of f32 `[rows, vocab]` logits on a CUDA device, computed
/// there: only the ids come back to the host. Ties and NaN as the host sampler's `argmax`
/// (lowest id wins, NaN never chosen, a row of -inf gives 0). `None` when `logits` is not
/// on a CUDA device.
pub fn argmax_rows(logits: &Tensor) -> Result<Option<Vec<u32>>> {
    let (rows, vocab) = logits.dims2()?;
    let (storage, layout) = logits.storage_and_layout();
    let Storage::Cuda(s) = &*storage else {
        return Ok(None);
    };
    let data = s.as_cuda_slice::<f32>()?;
    let r = contiguous_range(layout, "logits")?;
    let dev = s.device().clone();
    if rows == 0 {
        return Ok(Some(Vec::new()));
    }
    let Ok(vocab_i32) = i32::try_from(vocab) else {
        bail!("vocabulary of {vocab} overflows i32");
    };
    // SAFETY: the kernel writes one id per row, all `rows` of them.
    let out = unsafe { dev.alloc::<u32>(rows) }?;
    let data = data.slice(r);
    let func = dev.get_or_load_custom_func("distillery_argmax_rows_f32", MODULE, PTX)?;
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (ARGMAX_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = func.builder();
    b.arg(&data);
    b.arg(&out);
    b.arg(&vocab_i32);
    // SAFETY: matches distillery_argmax_rows_f32(const float*, uint32_t*, int); `data` holds
    // rows * vocab contiguous f32 values and `out` rows ids.
    unsafe { b.launch(cfg) }.w()?;
    Ok(Some(dev.clone_dtoh(&out)?))
}

#[cfg(test)]
mod tests;
