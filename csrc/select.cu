// Per-row block selection (top-k or cumulative softmax mass) by radix select: no sort.
//
// One CTA per row of block probabilities [rows, nkb]. The row's keys live in shared memory as
// order-preserving uint32 (the bits of a non-negative float, + 1 so that 0 means "not a
// candidate"); four MSB-first 8-bit passes find the threshold key T of the budget from
// histograms of counts (top-k) or of fixed-point probability sums (mass: integer shared-memory
// atomics, an exact integer scan; weights p * 2^e with a power-of-two scale, so dyadic
// probabilities and their sums are exact), then one ordered pass writes the
// mask and the ascending index list with a block scan. Ties at T are taken lowest index first.
//
// Matches sparse_attn.estimators.select.select_blocks (the torch reference):
//   candidates  = valid & ~keep, ranked by probability;
//   mass < 1    : forced + fewest highest candidates (prob > 0) whose running sum reaches
//                 mass * (sum over valid), the block crossing the target included;
//   mass == 1   : every candidate with prob > 0;
//   count       : max(count - #keep, 0) highest candidates (prob >= 0).
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "sparse_attn.h"

namespace sparse_attn {
namespace {

constexpr int kThreads = 256;  // one histogram bin per thread
constexpr int kRadixBits = 8;
constexpr uint32_t kKeepBit = 0x80000000u;  // keys of forced blocks (never ranked)

struct RowStats {
  float total;   // sum of valid probabilities
  float forced;  // sum of forced (keep) probabilities
  float cand;    // sum of candidate probabilities
  int nkeep;
  int ncand;
};

struct RowStatsSum {
  __device__ RowStats operator()(const RowStats& a, const RowStats& b) const {
    return {a.total + b.total, a.forced + b.forced, a.cand + b.cand, a.nkeep + b.nkeep,
            a.ncand + b.ncand};
  }
};

struct Bin {
  uint32_t weight;  // count (top-k) or fixed-point probability sum (mass) of a bin and above
  uint32_t count;
};

struct BinSum {
  __device__ Bin operator()(const Bin& a, const Bin& b) const {
    return {a.weight + b.weight, a.count + b.count};
  }
};

// mass budget in fixed point: a candidate's weight is round(p * 2^e), with e the largest
// exponent for which the sum of candidates stays below 2^30. A row's weights then sum to at
// most about 2^30 + nkb / 2, so the histograms use native integer shared atomics. Scaling by a
// power of two is exact (no per-weight division, whose rounding, and a float32 target
// short_of / cand * 2^30 with 24-bit precision, moved the cut by a block in ~1% of the rows of
// tie-heavy inputs), and so is the target need = ceil(short_of * 2^e): the cut S_j < need
// agrees exactly with the torch path's float test whenever the probabilities and their running
// sums are exact in fp32 (e.g. quantised scores), otherwise each weight is off by at most half a
// unit (2^-30 of the candidates' sum).
struct FixedScale {
  float lo, hi;  // 2^e = lo * hi, each factor a normal float for every finite cand > 0
};

__device__ __forceinline__ float pow2f(int n) {  // n in [-126, 127]
  return __int_as_float((n + 127) << 23);
}

// cand in (0, FLT_MAX]: e = 30 - x with cand = m * 2^x, m in [0.5, 1), so cand * 2^e lies in
// [2^29, 2^30); e in [-98, 178] is split into two factors within the normal exponent range
__device__ __forceinline__ FixedScale fixed_scale(float cand) {
  int x;
  frexpf(cand, &x);
  const int e = 30 - x;
  const int lo = e / 2;
  return {pow2f(lo), pow2f(e - lo)};
}

// p * 2^e, two exact multiplications (products of p <= cand stay <= 2^30: no overflow)
__device__ __forceinline__ float to_fixed(float p, FixedScale s) { return (p * s.lo) * s.hi; }

__device__ __forceinline__ float key_value(uint32_t key) { return __uint_as_float(key - 1u); }

__device__ __forceinline__ uint32_t fixed_weight(uint32_t key, FixedScale s) {
  return __float2uint_rn(to_fixed(key_value(key), s));
}

__global__ void __launch_bounds__(kThreads)
select_blocks_kernel(const float* __restrict__ probs, const uint8_t* __restrict__ valid,
                     int64_t valid_rows, const uint8_t* __restrict__ keep, int64_t keep_rows,
                     const int32_t* __restrict__ count, int64_t count_rows, float mass, int nkb,
                     uint8_t* __restrict__ mask, int32_t* __restrict__ indices,
                     int32_t* __restrict__ counts) {
  using Reduce = cub::BlockReduce<RowStats, kThreads>;
  using ScanBin = cub::BlockScan<Bin, kThreads>;
  using ScanInt = cub::BlockScan<int, kThreads>;
  __shared__ union {
    typename Reduce::TempStorage reduce;
    typename ScanBin::TempStorage scan_bin;
    typename ScanInt::TempStorage scan_int;
  } tmp;
  __shared__ uint32_t hist_count[1 << kRadixBits];
  __shared__ uint32_t hist_weight[1 << kRadixBits];
  __shared__ RowStats stats;
  __shared__ uint32_t s_prefix;
  __shared__ uint32_t s_need;       // weight still to cover below the fixed prefix
  __shared__ uint32_t s_tie_count;  // keys equal to the threshold
  __shared__ int s_carry[2];
  extern __shared__ uint32_t keys[];  // [nkb]

  const int tid = threadIdx.x;
  const int64_t row = blockIdx.x;
  const float* p_row = probs + row * nkb;
  const uint8_t* valid_row = valid ? valid + (row % valid_rows) * nkb : nullptr;
  const uint8_t* keep_row = keep ? keep + (row % keep_rows) * nkb : nullptr;
  const bool by_count = count != nullptr;

  RowStats local{0.f, 0.f, 0.f, 0, 0};
  for (int i = tid; i < nkb; i += kThreads) {
    const float p = fmaxf(p_row[i], 0.f);
    const bool v = valid_row ? valid_row[i] != 0 : p > 0.f;
    const bool k = v && keep_row && keep_row[i] != 0;
    const bool c = v && !k;
    keys[i] = k ? kKeepBit : (c ? __float_as_uint(p) + 1u : 0u);
    local.total += v ? p : 0.f;
    local.forced += k ? p : 0.f;
    local.cand += (c && p > 0.f) ? p : 0.f;
    local.nkeep += k;
    local.ncand += (c && (by_count || p > 0.f));
  }
  RowStats red = Reduce(tmp.reduce).Reduce(local, RowStatsSum());
  if (tid == 0) stats = red;
  __syncthreads();

  // the budget, as weight to cover among the ranked keys (>= min_key)
  const uint32_t min_key = by_count ? 1u : 2u;  // top-k ranks zeros too; mass does not
  uint32_t need = 0u;
  uint32_t threshold = 0xffffffffu;  // keys above it are taken, ties up to `take_ties`
  const float cand = stats.cand;
  FixedScale scale{1.f, 1.f};
  if (by_count) {
    const int extra = max(count[row % count_rows] - stats.nkeep, 0);
    need = static_cast<uint32_t>(min(extra, stats.ncand));
  } else if (mass >= 1.f) {
    threshold = 1u;  // every candidate with p > 0
  } else {
    // mass the ranked keys must add; rounded like the torch path (target = mass * total, then
    // compared with forced + running sum): __fmul_rn keeps nvcc from contracting this into one
    // fma, whose single rounding moved the cut by a block on exact ties (~0.25% of the rows)
    const float short_of = __fsub_rn(__fmul_rn(mass, stats.total), stats.forced);
    if (short_of > 0.f && stats.ncand > 0) {
      if (short_of >= cand) {
        threshold = 1u;  // all of them (a rounding-level shortfall included)
      } else {
        // block j is taken while the mass before it is short: S_j < need (integers);
        // 0 < short_of < cand <= FLT_MAX here, so the scale is finite and need <= 2^30
        scale = fixed_scale(cand);
        need = max(1u, static_cast<uint32_t>(ceilf(to_fixed(short_of, scale))));
      }
    }
  }

  uint32_t take_ties = 0u;
  if (need > 0u) {
    if (tid == 0) {
      s_prefix = 0u;
      s_need = need;
    }
    for (int shift = 32 - kRadixBits; shift >= 0; shift -= kRadixBits) {
      hist_count[tid] = 0u;
      hist_weight[tid] = 0u;
      __syncthreads();
      const uint32_t prefix = s_prefix;
      const uint32_t high = shift + kRadixBits >= 32 ? 0u : (0xffffffffu << (shift + kRadixBits));
      for (int i = tid; i < nkb; i += kThreads) {
        uint32_t key = keys[i];
        key = (key & kKeepBit) ? 0u : key;
        if (key >= min_key && (key & high) == prefix) {
          const int digit = (key >> shift) & ((1 << kRadixBits) - 1);
          atomicAdd(&hist_count[digit], 1u);
          if (!by_count) atomicAdd(&hist_weight[digit], fixed_weight(key, scale));
        }
      }
      __syncthreads();
      // thread t holds bin 255 - t: an inclusive scan sums the bins at or above it
      const int digit = (1 << kRadixBits) - 1 - tid;
      const uint32_t cnt = hist_count[digit];
      const Bin mine{by_count ? cnt : hist_weight[digit], cnt};
      Bin incl, total;
      ScanBin(tmp.scan_bin).InclusiveScan(mine, incl, BinSum(), total);
      const uint32_t rem = s_need;
      const uint32_t excl = incl.weight - mine.weight;
      // the bin where the running weight reaches `rem`; when the rounded weights fall short
      // of it, the lowest non-empty bin takes everything
      const bool crosses = excl < rem && incl.weight >= rem;
      const bool lowest = incl.count == total.count && total.weight < rem;
      __syncthreads();
      if (cnt > 0u && (crosses || lowest)) {
        s_prefix = prefix | (static_cast<uint32_t>(digit) << shift);
        s_need = rem - excl;
        s_tie_count = cnt;
      }
      __syncthreads();
      if (s_tie_count == 1u && shift > 0) {
        // one key left in the bin: it is the threshold; skip the remaining passes
        const uint32_t fixed = s_prefix;
        const uint32_t mask = 0xffffffffu << shift;
        for (int i = tid; i < nkb; i += kThreads) {
          uint32_t key = keys[i];
          key = (key & kKeepBit) ? 0u : key;
          if (key >= min_key && (key & mask) == fixed) s_prefix = key;
        }
        __syncthreads();
        break;
      }
    }
    threshold = s_prefix;
    const uint32_t rem = s_need;
    if (by_count) {
      take_ties = rem;
    } else {
      // tie j (0-based) is taken while the weight before it is short: S + j * w < need
      const uint32_t w = fixed_weight(threshold, scale);
      take_ties = w == 0u ? s_tie_count : min(s_tie_count, (rem + w - 1u) / w);
    }
  }

  // ordered pass: mask, tie ranks and output positions by block scans over chunks
  if (tid == 0) {
    s_carry[0] = 0;
    s_carry[1] = 0;
  }
  __syncthreads();
  uint8_t* mask_row = mask + row * nkb;
  int32_t* idx_row = indices + row * nkb;
  for (int base = 0; base < nkb; base += kThreads) {
    const int i = base + tid;
    const uint32_t key = i < nkb ? keys[i] : 0u;
    const bool forced = key & kKeepBit;
    const bool tie = !forced && key == threshold;
    int rank, ties_here;
    ScanInt(tmp.scan_int).ExclusiveSum(tie ? 1 : 0, rank, ties_here);
    rank += s_carry[0];
    const bool take = i < nkb && (forced || (key > threshold && !forced) ||
                                  (tie && static_cast<uint32_t>(rank) < take_ties));
    __syncthreads();
    int pos, taken_here;
    ScanInt(tmp.scan_int).ExclusiveSum(take ? 1 : 0, pos, taken_here);
    pos += s_carry[1];
    if (i < nkb) {
      mask_row[i] = take;
      if (take) idx_row[pos] = i;
    }
    __syncthreads();
    if (tid == 0) {
      s_carry[0] += ties_here;
      s_carry[1] += taken_here;
    }
    __syncthreads();
  }
  const int taken = s_carry[1];
  for (int i = taken + tid; i < nkb; i += kThreads) idx_row[i] = -1;
  if (tid == 0) counts[row] = taken;
}

}  // namespace

cudaError_t launch_select_blocks(const float* probs, const uint8_t* valid, int64_t valid_rows,
                                 const uint8_t* keep, int64_t keep_rows, const int32_t* count,
                                 int64_t count_rows, float mass, int64_t rows, int nkb,
                                 uint8_t* mask, int32_t* indices, int32_t* counts,
                                 cudaStream_t stream) {
  if (rows == 0 || nkb == 0) return cudaSuccess;
  if (nkb > kSelectMaxBlocks || rows > 0x7fffffffLL) return cudaErrorInvalidValue;
  const size_t smem = static_cast<size_t>(nkb) * sizeof(uint32_t);
  if (smem > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(
        select_blocks_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  select_blocks_kernel<<<static_cast<unsigned>(rows), kThreads, smem, stream>>>(
      probs, valid, valid_rows, keep, keep_rows, count, count_rows, mass, nkb, mask, indices,
      counts);
  return cudaGetLastError();
}

}  // namespace sparse_attn
