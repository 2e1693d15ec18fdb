// SALE's hot spot: int8 Q.K^T of sampled query rows against every reachable key on the tensor
// cores (mma.sync m16n8k32 s8, sm_80+), fused with the dequantization scales and the reduction
// to one number per (query block, key block), so the scores never reach device memory.
//
// Same contract as kernels/estimate.py `block_scores` with int8 inputs (and its torch
// reference sparse_attn/reference/estimate.py `block_scores_ref`):
//   s[r, j]  = (q_int[r] . k_int[j]) * q_scale[qb(r)] * k_scale[kb(j)] * scale
//   pass 1   : per row, max m_r and normaliser l_r of exp(s) over the keys of the window (sink
//              key blocks + `local` key blocks ending at the row's own block; all reachable keys
//              without a window);
//   pass 2   : out[qb, kb] = mean over the `rows` sampled rows of qb of
//              sum_{j in kb, reachable} exp(min(s[r, j] - m_r, 100 log2 units)) / l_r.
// One CTA = 8 warps x 16 sampled rows: up to 8 query heads of one GQA group (the largest power
// of two dividing the group size) x 128 / heads sampled rows; K tiles of BLOCK_N keys (= the
// key block) stream through shared memory with cp.async (double buffered) and serve every head
// of the CTA. Each warp keeps its Q fragments in registers for the whole key loop.
#include <cstdint>

#include "sparse_attn.h"

namespace sparse_attn {
namespace {

constexpr int kWarps = 8;
constexpr int kRowsPerWarp = 16;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kMaxExp2 = 100.f;  // cap of a relative score's exponent (no fp32 overflow)

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ int floor_div(int a, int b) {  // Python's a // b for b > 0
  return a >= 0 ? a / b : -((-a + b - 1) / b);
}

// int32 -> float without I2F (quarter rate): the accumulators start at the bits of 1.5 * 2^23,
// so bias + dot read as a float is exactly 1.5 * 2^23 + dot for |dot| < 2^22 (true for D <= 128
// int8 dots: 127^2 * 128 < 2^21); one FADD removes the bias
constexpr int32_t kBiasBits = 0x4B400000;
__device__ __forceinline__ float int_to_float(int32_t biased) {
  return __int_as_float(biased) - 12582912.f;
}

__device__ __forceinline__ void mma_s8(int32_t (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                       uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int bytes = pred ? 16 : 0;  // zero-fill keys past the end
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem),
               "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

template <int HEAD_DIM, int BLOCK_N>
struct Tile {
  static constexpr int kStride = HEAD_DIM + 16;  // padded row: conflict-free fragment loads
  static constexpr int kBytes = BLOCK_N * kStride;
  static constexpr int kNTiles = BLOCK_N / 8;
  static constexpr int kKSteps = HEAD_DIM / 32;
};

// load K rows [start, start + BLOCK_N) of one head into a padded smem tile
template <int HEAD_DIM, int BLOCK_N>
__device__ __forceinline__ void load_k_tile(int8_t* dst, const int8_t* k_head, int start,
                                            int seqlen_k) {
  using T = Tile<HEAD_DIM, BLOCK_N>;
  constexpr int kChunksPerRow = HEAD_DIM / 16;
  constexpr int kChunks = BLOCK_N * kChunksPerRow;
  for (int c = threadIdx.x; c < kChunks; c += kWarps * 32) {
    const int row = c / kChunksPerRow;
    const int col = (c % kChunksPerRow) * 16;
    const int key = start + row;
    const bool ok = key < seqlen_k;
    cp_async16(dst + row * T::kStride + col,
               k_head + static_cast<int64_t>(ok ? key : 0) * HEAD_DIM + col, ok);
  }
}

// S[16 rows, BLOCK_N] of one warp (biased, see int_to_float): acc[n][0..1] row lane/4,
// acc[n][2..3] row lane/4 + 8, columns
// n * 8 + (lane % 4) * 2 + {0, 1}
template <int HEAD_DIM, int BLOCK_N>
__device__ __forceinline__ void warp_scores(int32_t (&acc)[BLOCK_N / 8][4],
                                            const uint32_t (&qa)[HEAD_DIM / 32][4],
                                            const int8_t* tile, int lane) {
  using T = Tile<HEAD_DIM, BLOCK_N>;
#pragma unroll
  for (int n = 0; n < T::kNTiles; ++n) {
    acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = kBiasBits;
    const int8_t* krow = tile + (n * 8 + lane / 4) * T::kStride + (lane % 4) * 4;
#pragma unroll
    for (int ks = 0; ks < T::kKSteps; ++ks) {
      const uint32_t b0 = *reinterpret_cast<const uint32_t*>(krow + ks * 32);
      const uint32_t b1 = *reinterpret_cast<const uint32_t*>(krow + ks * 32 + 16);
      mma_s8(acc[n], qa[ks], b0, b1);
    }
  }
}

struct Params {
  const int8_t* q;        // [B, Hs, nrows, D]
  const int8_t* k;        // [B, Hkv, Sk, D]
  const float* q_scale;   // [B, Hs, NQB]
  const float* k_scale;   // [B, Hkv, NKB]
  const int32_t* row_pos; // [nrows]
  float* out;             // [B, Hs, NQB, NKB], zero-filled
  int num_heads, group, nrows, rows, nqb, nkb, seqlen_k, pos_offset, sink_blocks,
      local_blocks;
  int heads_per_cta;  // query heads of one GQA group packed in a CTA (divides group and kWarps)
  float qk_scale;  // softmax scale * log2(e)
  bool causal, window;
};

template <int HEAD_DIM, int BLOCK_N>
__global__ void __launch_bounds__(kWarps * 32, 2)  // 2 CTAs (16 warps) per SM: <= 128 registers
lowbit_block_scores_kernel(const Params p) {
  using T = Tile<HEAD_DIM, BLOCK_N>;
  extern __shared__ __align__(16) int8_t smem[];  // 2 K tiles
  __shared__ int s_range[3];

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  // heaviest (latest) row tiles first: causal work grows with the position
  const int pid_m = gridDim.x - 1 - blockIdx.x;
  // GQA packing: the CTA's warps cover heads_per_cta query heads of one KV head x cta_rows
  // sampled rows, so every K tile brought into shared memory serves the whole group
  const int warps_per_head = kWarps / p.heads_per_cta;
  const int cta_rows = warps_per_head * kRowsPerWarp;
  const int head_packs = p.num_heads / p.heads_per_cta;
  const int b = blockIdx.y / head_packs;
  const int h = (blockIdx.y % head_packs) * p.heads_per_cta + warp / warps_per_head;
  const int hk = h / p.group;  // the same for every warp of the CTA
  const int64_t bh = static_cast<int64_t>(b) * p.num_heads + h;

  // first sampled row of this warp
  const int row0 = pid_m * cta_rows + (warp % warps_per_head) * kRowsPerWarp;
  const int r_lo = row0 + lane / 4, r_hi = r_lo + 8;
  const bool ok_lo = r_lo < p.nrows, ok_hi = r_hi < p.nrows;
  const int pos_lo = ok_lo ? p.row_pos[r_lo] + p.pos_offset : -1;
  const int pos_hi = ok_hi ? p.row_pos[r_hi] + p.pos_offset : -1;

  // Q fragments (rows r_lo / r_hi, 4 bytes at (lane % 4) * 4 of each 16-byte half of a k-step)
  uint32_t qa[T::kKSteps][4];
  {
    const int8_t* q_head = p.q + bh * p.nrows * HEAD_DIM;
    const int8_t* q_lo = q_head + static_cast<int64_t>(r_lo) * HEAD_DIM + (lane % 4) * 4;
    const int8_t* q_hi = q_head + static_cast<int64_t>(r_hi) * HEAD_DIM + (lane % 4) * 4;
#pragma unroll
    for (int ks = 0; ks < T::kKSteps; ++ks) {
      qa[ks][0] = ok_lo ? *reinterpret_cast<const uint32_t*>(q_lo + ks * 32) : 0u;
      qa[ks][1] = ok_hi ? *reinterpret_cast<const uint32_t*>(q_hi + ks * 32) : 0u;
      qa[ks][2] = ok_lo ? *reinterpret_cast<const uint32_t*>(q_lo + ks * 32 + 16) : 0u;
      qa[ks][3] = ok_hi ? *reinterpret_cast<const uint32_t*>(q_hi + ks * 32 + 16) : 0u;
    }
  }
  const float* qs_head = p.q_scale + bh * p.nqb;
  const float c_lo = ok_lo ? qs_head[r_lo / p.rows] * p.qk_scale : 0.f;
  const float c_hi = ok_hi ? qs_head[r_hi / p.rows] * p.qk_scale : 0.f;
  const int8_t* k_head = p.k + (static_cast<int64_t>(b) * (p.num_heads / p.group) + hk) *
                                   p.seqlen_k * HEAD_DIM;
  const float* ks_head =
      p.k_scale + (static_cast<int64_t>(b) * (p.num_heads / p.group) + hk) * p.nkb;

  // key range of the CTA: up to its last row's position (causal), window start for pass 1
  if (warp == 0) {
    const int first = pid_m * cta_rows;
    const int last = min(p.nrows, first + cta_rows);
    int max_pos = -1, min_pos = 0x7fffffff;
    for (int r = first + lane; r < last; r += 32) {  // positions need not be sorted
      const int pos = p.row_pos[r] + p.pos_offset;
      max_pos = max(max_pos, pos);
      min_pos = min(min_pos, pos);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      max_pos = max(max_pos, __shfl_xor_sync(0xffffffffu, max_pos, off));
      min_pos = min(min_pos, __shfl_xor_sync(0xffffffffu, min_pos, off));
    }
    if (lane == 0) {
      const int hi = p.causal ? min(p.seqlen_k, max_pos + 1) : p.seqlen_k;
      int lo2 = 0;
      if (p.window) {
        lo2 = max(p.sink_blocks * BLOCK_N,
                  (floor_div(min_pos, BLOCK_N) - p.local_blocks + 1) * BLOCK_N);
        lo2 = max(lo2, 0);
      }
      s_range[0] = max(hi, 0);
      s_range[1] = lo2;
      s_range[2] = p.window ? min(p.sink_blocks * BLOCK_N, max(hi, 0)) : 0;
    }
  }
  __syncthreads();
  const int hi = s_range[0];
  const int lo2 = s_range[1];
  const int sink_end = s_range[2];
  const int n_tiles = (hi + BLOCK_N - 1) / BLOCK_N;
  const int sink_tiles = (sink_end + BLOCK_N - 1) / BLOCK_N;
  const int lo2_tile = lo2 / BLOCK_N;
  const int n_tiles1 = sink_tiles + max(0, n_tiles - max(lo2_tile, sink_tiles));

  // key tile of pass-1 step t: sink tiles, then local tiles from lo2
  auto pass1_tile = [&](int t) { return t < sink_tiles ? t : max(lo2_tile, sink_tiles) +
                                                                 (t - sink_tiles); };
  // rows' window bounds (pass 1): key j counts when j < sink_end or j >= row_lo
  const int wlo_lo = p.window ? (floor_div(pos_lo, BLOCK_N) - p.local_blocks + 1) * BLOCK_N : 0;
  const int wlo_hi = p.window ? (floor_div(pos_hi, BLOCK_N) - p.local_blocks + 1) * BLOCK_N : 0;
  const int wsink = p.window ? p.sink_blocks * BLOCK_N : 0;
  const int lim_lo = p.causal ? pos_lo : p.seqlen_k - 1;  // last key a row may see
  const int lim_hi = p.causal ? pos_hi : p.seqlen_k - 1;

  int32_t acc[T::kNTiles][4];
  auto buf = [&](int i) { return smem + (i & 1) * T::kBytes; };

  // ---- pass 1: row max and normaliser over the window (all reachable keys without one)
  float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.f, l_hi = 0.f;
  if (n_tiles1 > 0) {
    load_k_tile<HEAD_DIM, BLOCK_N>(buf(0), k_head, pass1_tile(0) * BLOCK_N, p.seqlen_k);
    cp_async_commit();
  }
  for (int t = 0; t < n_tiles1; ++t) {
    const int start = pass1_tile(t) * BLOCK_N;
    if (t + 1 < n_tiles1)
      load_k_tile<HEAD_DIM, BLOCK_N>(buf(t + 1), k_head, pass1_tile(t + 1) * BLOCK_N,
                                     p.seqlen_k);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    warp_scores<HEAD_DIM, BLOCK_N>(acc, qa, buf(t), lane);
    const float ks = ks_head[start / BLOCK_N];
    const float cl = c_lo * ks, ch = c_hi * ks;
    float tmax_lo = -INFINITY, tmax_hi = -INFINITY;
#pragma unroll
    for (int n = 0; n < T::kNTiles; ++n) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int j = start + n * 8 + (lane % 4) * 2 + e;
        const bool in_lo = j <= lim_lo && (!p.window || j < wsink || j >= wlo_lo);
        const bool in_hi = j <= lim_hi && (!p.window || j < wsink || j >= wlo_hi);
        const float s_lo = in_lo ? int_to_float(acc[n][e]) * cl : -INFINITY;
        const float s_hi = in_hi ? int_to_float(acc[n][2 + e]) * ch : -INFINITY;
        acc[n][e] = __float_as_int(s_lo);
        acc[n][2 + e] = __float_as_int(s_hi);
        tmax_lo = fmaxf(tmax_lo, s_lo);
        tmax_hi = fmaxf(tmax_hi, s_hi);
      }
    }
#pragma unroll
    for (int off = 1; off <= 2; off <<= 1) {
      tmax_lo = fmaxf(tmax_lo, __shfl_xor_sync(0xffffffffu, tmax_lo, off));
      tmax_hi = fmaxf(tmax_hi, __shfl_xor_sync(0xffffffffu, tmax_hi, off));
    }
    const float new_lo = fmaxf(m_lo, tmax_lo), new_hi = fmaxf(m_hi, tmax_hi);
    const float safe_lo = new_lo == -INFINITY ? 0.f : new_lo;
    const float safe_hi = new_hi == -INFINITY ? 0.f : new_hi;
    float sum_lo = 0.f, sum_hi = 0.f;
#pragma unroll
    for (int n = 0; n < T::kNTiles; ++n) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        sum_lo += fast_exp2(__int_as_float(acc[n][e]) - safe_lo);
        sum_hi += fast_exp2(__int_as_float(acc[n][2 + e]) - safe_hi);
      }
    }
    l_lo = l_lo * fast_exp2(m_lo - safe_lo) + sum_lo;
    l_hi = l_hi * fast_exp2(m_hi - safe_hi) + sum_hi;
    m_lo = new_lo;
    m_hi = new_hi;
    __syncthreads();  // the buffer is refilled next step
  }
#pragma unroll
  for (int off = 1; off <= 2; off <<= 1) {
    l_lo += __shfl_xor_sync(0xffffffffu, l_lo, off);
    l_hi += __shfl_xor_sync(0xffffffffu, l_hi, off);
  }
  const float inv_rows = 1.f / static_cast<float>(p.rows);
  const float w_lo = (ok_lo && l_lo > 0.f) ? inv_rows / l_lo : 0.f;
  const float w_hi = (ok_hi && l_hi > 0.f) ? inv_rows / l_hi : 0.f;
  m_lo = m_lo == -INFINITY ? 0.f : m_lo;
  m_hi = m_hi == -INFINITY ? 0.f : m_hi;

  // ---- pass 2: per key block, the rows' relative mass, reduced over each query block's rows
  float* out_head = p.out + bh * p.nqb * p.nkb;
  const int qb_lo = r_lo / p.rows, qb_hi = r_hi / p.rows;
  if (n_tiles > 0) {
    load_k_tile<HEAD_DIM, BLOCK_N>(buf(0), k_head, 0, p.seqlen_k);
    cp_async_commit();
  }
  for (int t = 0; t < n_tiles; ++t) {
    const int start = t * BLOCK_N;
    if (t + 1 < n_tiles)
      load_k_tile<HEAD_DIM, BLOCK_N>(buf(t + 1), k_head, start + BLOCK_N, p.seqlen_k);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    warp_scores<HEAD_DIM, BLOCK_N>(acc, qa, buf(t), lane);
    const float ks = ks_head[t];
    const float cl = c_lo * ks, ch = c_hi * ks;
    float sum_lo = 0.f, sum_hi = 0.f;
    // masking only where a row's last key falls inside or before the tile
    const bool full_lo = start + BLOCK_N - 1 <= lim_lo;
    const bool full_hi = start + BLOCK_N - 1 <= lim_hi;
    if (full_lo && full_hi) {
#pragma unroll
      for (int n = 0; n < T::kNTiles; ++n) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          sum_lo += fast_exp2(fminf(fmaf(int_to_float(acc[n][e]), cl, -m_lo), kMaxExp2));
          sum_hi += fast_exp2(fminf(fmaf(int_to_float(acc[n][2 + e]), ch, -m_hi), kMaxExp2));
        }
      }
    } else {
#pragma unroll
      for (int n = 0; n < T::kNTiles; ++n) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int j = start + n * 8 + (lane % 4) * 2 + e;
          const float x_lo = fminf(fmaf(int_to_float(acc[n][e]), cl, -m_lo), kMaxExp2);
          const float x_hi = fminf(fmaf(int_to_float(acc[n][2 + e]), ch, -m_hi), kMaxExp2);
          sum_lo += j <= lim_lo ? fast_exp2(x_lo) : 0.f;
          sum_hi += j <= lim_hi ? fast_exp2(x_hi) : 0.f;
        }
      }
    }
    // rows -> query blocks: quad sum (a row's columns), then over rows of the same block
    sum_lo *= w_lo;
    sum_hi *= w_hi;
#pragma unroll
    for (int off = 1; off <= 2; off <<= 1) {
      sum_lo += __shfl_xor_sync(0xffffffffu, sum_lo, off);
      sum_hi += __shfl_xor_sync(0xffffffffu, sum_hi, off);
    }
#pragma unroll
    for (int step = 1; step < 8; step <<= 1) {  // row stride `step` = lane stride 4 * step
      if (step < p.rows) {
        sum_lo += __shfl_xor_sync(0xffffffffu, sum_lo, 4 * step);
        sum_hi += __shfl_xor_sync(0xffffffffu, sum_hi, 4 * step);
      }
    }
    if (p.rows >= 16) {
      // one query block covers both halves (and, above 16 rows, other warps: atomics)
      const float total = sum_lo + sum_hi;
      if (lane == 0 && ok_lo) {
        float* dst = out_head + static_cast<int64_t>(qb_lo) * p.nkb + t;
        if (p.rows == 16) *dst = total; else atomicAdd(dst, total);
      }
    } else if (lane % 4 == 0 && (lane / 4) % p.rows == 0) {
      if (ok_lo) out_head[static_cast<int64_t>(qb_lo) * p.nkb + t] = sum_lo;
      if (ok_hi) out_head[static_cast<int64_t>(qb_hi) * p.nkb + t] = sum_hi;
    }
    __syncthreads();
  }
}

template <int HEAD_DIM, int BLOCK_N>
cudaError_t launch(const Params& p, int batch, cudaStream_t stream) {
  using T = Tile<HEAD_DIM, BLOCK_N>;
  auto kernel = lowbit_block_scores_kernel<HEAD_DIM, BLOCK_N>;
  const int smem = 2 * T::kBytes;
  if (smem > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
  }
  const int cta_rows = kWarps / p.heads_per_cta * kRowsPerWarp;
  const dim3 grid((p.nrows + cta_rows - 1) / cta_rows, batch * (p.num_heads / p.heads_per_cta));
  kernel<<<grid, kWarps * 32, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_lowbit_block_scores(const int8_t* q, const int8_t* k, const float* q_scale,
                                       const float* k_scale, const int32_t* row_pos, float* out,
                                       int batch, int num_heads, int num_kv_heads, int nrows,
                                       int rows, int seqlen_q, int seqlen_k, int head_dim,
                                       int block_n, bool causal, float scale, int sink_blocks,
                                       int local_blocks, bool window, cudaStream_t stream) {
  if (batch == 0 || num_heads == 0 || nrows == 0 || seqlen_k == 0) return cudaSuccess;
  if (rows < 1 || rows > 128 || (rows & (rows - 1)) || nrows % rows ||
      num_kv_heads < 1 || num_heads % num_kv_heads)
    return cudaErrorInvalidValue;
  Params p;
  p.q = q;
  p.k = k;
  p.q_scale = q_scale;
  p.k_scale = k_scale;
  p.row_pos = row_pos;
  p.out = out;
  p.num_heads = num_heads;
  p.group = num_heads / num_kv_heads;
  p.heads_per_cta = 1;
  while (p.heads_per_cta < kWarps && p.group % (2 * p.heads_per_cta) == 0) p.heads_per_cta *= 2;
  p.nrows = nrows;
  p.rows = rows;
  p.nqb = nrows / rows;
  p.nkb = (seqlen_k + block_n - 1) / block_n;
  p.seqlen_k = seqlen_k;
  p.pos_offset = seqlen_k - seqlen_q;
  p.sink_blocks = sink_blocks;
  p.local_blocks = local_blocks;
  p.qk_scale = scale * kLog2e;
  p.causal = causal;
  p.window = window;
  if (head_dim == 128 && block_n == 128) return launch<128, 128>(p, batch, stream);
  if (head_dim == 128 && block_n == 64) return launch<128, 64>(p, batch, stream);
  if (head_dim == 64 && block_n == 128) return launch<64, 128>(p, batch, stream);
  if (head_dim == 64 && block_n == 64) return launch<64, 64>(p, batch, stream);
  return cudaErrorInvalidValue;
}

}  // namespace sparse_attn
