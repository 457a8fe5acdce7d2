// Distillery's CUDA kernels: the paged KV cache write, paged attention (decode and prefill
// chunks in one kernel) and a batched greedy argmax.
//
// Compiled to PTX by build.rs (nvcc --ptx) when the `cuda` feature is on, embedded in the
// binary and loaded through candle's CudaDevice::get_or_load_custom_func.
//
// The cache layout is the CPU operator's (src/model/paged_attention/mod.rs), bit for bit: one
// tensor per layer, [num_blocks, 2, kv_heads, block_size * head_dim]. Within a block, one kv
// head's keys are dimension-major ([head_dim][block_size]) and its values slot-major
// ([block_size][head_dim]). A token's slot is block * block_size + offset.
//
// All arithmetic is f32 whatever the storage type (f32, f16, bf16), as on the CPU.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#define PA_THREADS 128
#define PA_WARPS (PA_THREADS / 32)
#define PA_MAX_HEAD_DIM 256
#define PA_DIMS_PER_THREAD (PA_MAX_HEAD_DIM / PA_THREADS)
#define ARGMAX_THREADS 1024

template <typename T> __device__ __forceinline__ float to_f32(T x);
template <> __device__ __forceinline__ float to_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_f32<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// ---------------------------------------------------------------------------------------
// write_kv: k, v are [num_tokens, kv_heads, head_dim] (contiguous); token t goes to slot
// slots[t]. Grid (num_tokens, kv_heads), threads over head_dim. The host has checked every
// slot against the cache size.
template <typename T>
__device__ __forceinline__ void write_kv(T *__restrict__ cache, const T *__restrict__ k,
                                         const T *__restrict__ v,
                                         const uint32_t *__restrict__ slots, int kv_heads,
                                         int head_dim, int block_size) {
  const int t = blockIdx.x;
  const int g = blockIdx.y;
  const uint32_t slot = slots[t];
  const size_t block = slot / (uint32_t)block_size;
  const size_t offset = slot % (uint32_t)block_size;
  const size_t head_len = (size_t)block_size * head_dim;
  const size_t block_base = block * 2 * kv_heads * head_len;
  const size_t src = ((size_t)t * kv_heads + g) * head_dim;
  T *keys = cache + block_base + g * head_len + offset;
  T *values = cache + block_base + (kv_heads + g) * head_len + offset * head_dim;
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    keys[(size_t)d * block_size] = k[src + d];
    values[d] = v[src + d];
  }
}

// ---------------------------------------------------------------------------------------
// Block-wide reductions for PA_THREADS threads; every thread gets the result.
__device__ __forceinline__ float block_max(float x, float *red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) red[warp] = x;
  __syncthreads();
  float r = red[0];
#pragma unroll
  for (int w = 1; w < PA_WARPS; ++w) r = fmaxf(r, red[w]);
  __syncthreads();
  return r;
}

__device__ __forceinline__ float block_sum(float x, float *red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) red[warp] = x;
  __syncthreads();
  float r = red[0];
#pragma unroll
  for (int w = 1; w < PA_WARPS; ++w) r += red[w];
  __syncthreads();
  return r;
}

// ---------------------------------------------------------------------------------------
// paged_attention: q is [num_tokens, num_heads, head_dim]; out the same. One thread block per
// (query token, query head), PA_THREADS threads. token_seq[2t] is token t's sequence and
// token_seq[2t+1] its position in it; the token attends to positions 0..=pos of its sequence,
// read through that sequence's block table (causal within a prefill chunk, full over the
// cached prefix: the chunk's own K/V were written to the cache first). GQA: query head h
// reads kv head h / (num_heads / kv_heads). One pass with an online softmax, a tile of
// PA_THREADS keys at a time: each thread scores one key, then each thread accumulates its
// own dimensions over the tile's values.
template <typename T>
__device__ __forceinline__ void paged_attention(
    T *__restrict__ out, const T *__restrict__ q, const T *__restrict__ cache,
    const uint32_t *__restrict__ token_seq, const uint32_t *__restrict__ block_tables,
    int max_blocks, int num_heads, int kv_heads, int head_dim, int block_size, float scale) {
  __shared__ float q_s[PA_MAX_HEAD_DIM];
  __shared__ float p_s[PA_THREADS];
  __shared__ float red[PA_WARPS];

  const int t = blockIdx.x;
  const int h = blockIdx.y;
  const int tid = threadIdx.x;
  const int g = h / (num_heads / kv_heads);
  const uint32_t seq = token_seq[2 * t];
  const int n_ctx = (int)token_seq[2 * t + 1] + 1;
  const uint32_t *table = block_tables + (size_t)seq * max_blocks;
  const size_t head_len = (size_t)block_size * head_dim;
  const size_t block_stride = 2 * (size_t)kv_heads * head_len;
  const size_t key_off = (size_t)g * head_len;
  const size_t value_off = (size_t)(kv_heads + g) * head_len;
  const size_t q_base = ((size_t)t * num_heads + h) * head_dim;

  for (int d = tid; d < head_dim; d += PA_THREADS) q_s[d] = to_f32(q[q_base + d]) * scale;
  __syncthreads();

  float running_max = -INFINITY;
  float running_sum = 0.f;
  float acc[PA_DIMS_PER_THREAD];
#pragma unroll
  for (int i = 0; i < PA_DIMS_PER_THREAD; ++i) acc[i] = 0.f;

  for (int j0 = 0; j0 < n_ctx; j0 += PA_THREADS) {
    // Scores: thread tid takes key j0 + tid. Keys are dimension-major in a block, so
    // neighbouring threads read neighbouring addresses for each d.
    const int j = j0 + tid;
    float score = -INFINITY;
    if (j < n_ctx) {
      const T *key = cache + (size_t)table[j / block_size] * block_stride + key_off +
                     (j % block_size);
      float dot = 0.f;
      for (int d = 0; d < head_dim; ++d) dot += q_s[d] * to_f32(key[(size_t)d * block_size]);
      score = dot;
    }
    // Online softmax: the tile's max (finite: key j0 is always valid), rescale, weights.
    const float new_max = fmaxf(running_max, block_max(score, red));
    const float p = j < n_ctx ? expf(score - new_max) : 0.f;
    const float rescale = expf(running_max - new_max); // exp(-inf) = 0 on the first tile
    running_sum = running_sum * rescale + block_sum(p, red);
    running_max = new_max;
    p_s[tid] = p;
    __syncthreads();
    // Values: thread tid owns dimensions tid, tid + PA_THREADS, ...; values are slot-major,
    // so neighbouring threads read neighbouring addresses for each key.
    const int count = min(PA_THREADS, n_ctx - j0);
#pragma unroll
    for (int i = 0; i < PA_DIMS_PER_THREAD; ++i) {
      const int d = tid + i * PA_THREADS;
      if (d < head_dim) {
        float a = acc[i] * rescale;
        for (int jj = 0; jj < count; ++jj) {
          const int jg = j0 + jj;
          const T *value = cache + (size_t)table[jg / block_size] * block_stride + value_off +
                           (size_t)(jg % block_size) * head_dim;
          a += p_s[jj] * to_f32(value[d]);
        }
        acc[i] = a;
      }
    }
    __syncthreads(); // p_s is rewritten by the next tile
  }

  const float inv = 1.f / running_sum;
#pragma unroll
  for (int i = 0; i < PA_DIMS_PER_THREAD; ++i) {
    const int d = tid + i * PA_THREADS;
    if (d < head_dim) out[q_base + d] = from_f32<T>(acc[i] * inv);
  }
}

#define INSTANTIATE(T, SUFFIX)                                                                \
  extern "C" __global__ void distillery_write_kv_##SUFFIX(                                   \
      T *cache, const T *k, const T *v, const uint32_t *slots, int kv_heads, int head_dim,   \
      int block_size) {                                                                       \
    write_kv<T>(cache, k, v, slots, kv_heads, head_dim, block_size);                          \
  }                                                                                           \
  extern "C" __global__ void __launch_bounds__(PA_THREADS) distillery_paged_attention_##SUFFIX( \
      T *out, const T *q, const T *cache, const uint32_t *token_seq,                          \
      const uint32_t *block_tables, int max_blocks, int num_heads, int kv_heads,              \
      int head_dim, int block_size, float scale) {                                            \
    paged_attention<T>(out, q, cache, token_seq, block_tables, max_blocks, num_heads,         \
                       kv_heads, head_dim, block_size, scale);                                \
  }

INSTANTIATE(float, f32)
INSTANTIATE(__half, f16)
INSTANTIATE(__nv_bfloat16, bf16)

// ---------------------------------------------------------------------------------------
// Greedy argmax of each row of [rows, vocab] f32 logits, as the host sampler's argmax
// (torch.argmax): the lowest id wins ties, NaN is never chosen, and a row with nothing above
// -inf gives 0. One block of ARGMAX_THREADS threads per row.
__device__ __forceinline__ void better(float &best, uint32_t &idx, float v, uint32_t i) {
  if (v > best || (v == best && i < idx)) {
    best = v;
    idx = i;
  }
}

extern "C" __global__ void __launch_bounds__(ARGMAX_THREADS)
    distillery_argmax_rows_f32(const float *__restrict__ logits, uint32_t *__restrict__ out,
                               int vocab) {
  __shared__ float best_s[ARGMAX_THREADS / 32];
  __shared__ uint32_t idx_s[ARGMAX_THREADS / 32];
  const float *x = logits + (size_t)blockIdx.x * vocab;
  float best = -INFINITY;
  uint32_t idx = 0xffffffffu;
  // Each thread's indices increase, so a strict > keeps its first occurrence of its max.
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float v = x[i];
    if (v > best) {
      best = v;
      idx = (uint32_t)i;
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ob = __shfl_xor_sync(0xffffffffu, best, o);
    const uint32_t oi = __shfl_xor_sync(0xffffffffu, idx, o);
    better(best, idx, ob, oi);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    best_s[warp] = best;
    idx_s[warp] = idx;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    const int warps = (blockDim.x + 31) / 32;
    for (int w = 1; w < warps; ++w) better(best, idx, best_s[w], idx_s[w]);
    out[blockIdx.x] = best == -INFINITY ? 0u : idx;
  }
}
