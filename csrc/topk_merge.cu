// Union of neighbouring query tokens' top-k key lists, with owner bits: the preprocessing of
// the merged token top-k attention kernel (kernels/topk.py).
//
// One CTA per tile of T <= 32 consecutive query tokens of one (batch, head), one pass over its
// T x K listed keys: each (token t, key) ORs bit t into the key's owner word in an
// open-addressing (key, owner) table in shared memory. The table's keys then set their bits in
// a presence bitmap over the key range (shared memory too), and a block scan of the bitmap
// words' popcounts ranks every present key (rank = word prefix + popcount of the lower bits):
// the union is written in ascending order straight from the bitmap, and each table entry's
// owner word goes to its key's rank.
//
// Why CUDA: Triton has no shared-memory atomics, so its merge makes every (token, key) pair a
// global atomic into a per-program owner array (35 ms at 128k, K=2048, T=32 on an H100); here
// the atomics stay on chip (6.9 ms; ncu: bound by the in-SM probes and atomics, 29% of DRAM).
//
// Limits, handled without failing: key ranges longer than kWindowKeys are folded one window at
// a time (the lists are re-read per window); when a window's union overflows the table (large,
// disjoint lists), a second pass over the lists ORs the owner bits by rank, on chip when they
// fit and in global memory otherwise (slower, same result).
#include <cub/block/block_scan.cuh>

#include "sparse_attn.h"

namespace sparse_attn {
namespace {

constexpr int kMergeThreads = 512;
constexpr int kWindowKeys = 1 << 18;  // bitmap + word prefix: 64 KiB of shared memory
// (key, owner word) slots in shared memory: 64 KiB. At 128k keys, K=2048, T=32 (H100), fewer
// slots probe longer: 4096 took 10.7-11.7 ms against 7.3-7.9 ms for 8192
constexpr int kTableSlots = 1 << 13;
constexpr int kMaxProbes = 64;

struct MergeArgs {
  const int32_t* idx;
  int64_t stride_b, stride_h, stride_m, stride_j;
  int heads, seqlen_q, topk, tokens, seqlen_k, num_tiles;
  bool causal;
  int64_t causal_offset;
  int32_t* union_out;  // [B, H, NT, T * K] contiguous
  uint32_t* owners_out;
  int32_t* counts;  // [B, H, NT]
};

// W consecutive keys of a list row starting at column j (W = 4: one 16-byte load).
template <int W>
__device__ __forceinline__ void load_keys(const int32_t* row, int64_t stride_j, int j,
                                          int (&keys)[W]) {
  if constexpr (W == 4) {
    const int4 v = __ldg(reinterpret_cast<const int4*>(row + j));
    keys[0] = v.x, keys[1] = v.y, keys[2] = v.z, keys[3] = v.w;
  } else {
#pragma unroll
    for (int u = 0; u < W; ++u) keys[u] = __ldg(row + (j + u) * stride_j);
  }
}

// Calls f(t, key - w0) for every key of the tile's lists inside [w0, w0 + wk) and visible to
// its token t (causality); tokens past the query length list nothing. The tile's (token,
// column) pairs are walked flat, W columns per load, kBatch loads in flight per thread (16-byte
// loads 4 deep took the two-pass version from 10.3 to 8.1 ms on an H100). W = 4 needs unit
// column stride, K % 4 == 0 and 16-byte aligned rows. `backward` walks the pairs last-first:
// a second pass then starts on the lines the first one read last, the likeliest still in L2.
template <int W, typename F>
__device__ __forceinline__ void for_each_listed(const MergeArgs& a, const int32_t* lists,
                                                int tile_m, int w0, int wk, bool backward,
                                                F&& f) {
  constexpr int kBatch = 4;
  const int t0 = tile_m * a.tokens;
  const int ntok = min(a.tokens, a.seqlen_q - t0);
  const int per_row = a.topk / W;
  const int n = ntok * per_row;
  const int steps = (n + kBatch * kMergeThreads - 1) / (kBatch * kMergeThreads);
  // (token, load) of pair i + kMergeThreads from those of pair i, without a division
  const int dt = kMergeThreads / per_row, dj = kMergeThreads % per_row;
  // keys a token sees: offsets < t0 + t + causal_offset + 1 - w0, clamped to 32 bits
  const int causal_lim = a.causal ? int(max(min(int64_t(t0) + a.causal_offset + 1 - w0,
                                                int64_t(kWindowKeys)), int64_t(-a.tokens)))
                                  : wk;
  for (int step = 0; step < steps; ++step) {
    const int i0 = (backward ? steps - 1 - step : step) * kBatch * kMergeThreads + threadIdx.x;
    int keys[kBatch][W];
    int tok[kBatch];
    int t = i0 / per_row, j = i0 - t * per_row;
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      tok[u] = i0 + u * kMergeThreads < n ? t : -1;
      if (tok[u] >= 0) load_keys<W>(lists + (t0 + t) * a.stride_m, a.stride_j, j * W, keys[u]);
      t += dt;
      j += dj;
      if (j >= per_row) j -= per_row, ++t;
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      if (tok[u] < 0) continue;
      // the token sees window offsets [0, lim): -1 padding, other windows and keys after the
      // token all fail one unsigned compare (causal_lim: offsets past the tile's first token)
      const int lim = min(wk, causal_lim + tok[u]);
      const unsigned ulim = unsigned(max(lim, 0));
#pragma unroll
      for (int e = 0; e < W; ++e) {
        const unsigned off = unsigned(keys[u][e] - w0);
        if (off < ulim) f(tok[u], int(off));
      }
    }
  }
}

// Inserts `key` into an open-addressing table (slots a power of two, EMPTY = -1) and ORs
// `bit` into its owner word; false when no slot turned up within kMaxProbes. A plain read
// first: most (token, key) pairs find their key already there (neighbours share keys) and
// need no compare-and-swap. The read may be stale only by showing EMPTY for a slot another
// thread just filled (a slot is written once), and the compare-and-swap then returns the key.
// (Issuing the first probes of a thread's 4 keys together before their atomics was slower on
// an H100: 7.6 vs 6.9 ms at 128k, K=2048, T=32.)
__device__ __forceinline__ bool table_insert(int* keys, uint32_t* owners, int slots, int key,
                                             uint32_t bit) {
  // the product's low bits: measured faster on an H100 than its high bits (Fibonacci hashing),
  // 7.3 vs 7.9 ms at 128k, K=2048, T=32 listed key blocks
  uint32_t slot = (uint32_t(key) * 2654435761u) & uint32_t(slots - 1);
  for (int probe = 0; probe < kMaxProbes; ++probe) {
    int cur = keys[slot];
    if (cur == -1) {
      cur = atomicCAS(&keys[slot], -1, key);
      if (cur == -1) cur = key;
    }
    if (cur == key) {
      atomicOr(&owners[slot], bit);
      return true;
    }
    slot = (slot + 1) & uint32_t(slots - 1);
  }
  return false;
}

template <int W>
__global__ void __launch_bounds__(kMergeThreads)
    merge_token_lists_kernel(const MergeArgs a, int slots) {
  using Scan = cub::BlockScan<int, kMergeThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  __shared__ int overflow;
  extern __shared__ uint32_t smem[];

  const int tile = blockIdx.x;
  const int bh = tile / a.num_tiles, tile_m = tile % a.num_tiles;
  const int32_t* lists = a.idx + (bh / a.heads) * a.stride_b + (bh % a.heads) * a.stride_h;
  const int64_t width = int64_t(a.tokens) * a.topk;
  int32_t* union_tile = a.union_out + int64_t(tile) * width;
  uint32_t* owners_tile = a.owners_out + int64_t(tile) * width;

  const int window = min(a.seqlen_k, kWindowKeys);
  const int max_words = (window + 31) / 32;
  uint32_t* bitmap = smem;
  int* prefix = reinterpret_cast<int*>(smem + max_words);
  // 2 * slots words: the (key, owner word) table, or owner words by rank (second pass)
  int* table_keys = reinterpret_cast<int*>(smem + 2 * max_words);
  uint32_t* table_owners = smem + 2 * max_words + slots;
  uint32_t* own = smem + 2 * max_words;

  int done = 0;  // union entries written by earlier windows
  for (int w0 = 0; w0 < a.seqlen_k; w0 += window) {
    const int wk = min(window, a.seqlen_k - w0);
    const int nwords = (wk + 31) / 32;
    for (int w = threadIdx.x; w < nwords; w += kMergeThreads) bitmap[w] = 0u;
    for (int i = threadIdx.x; i < slots; i += kMergeThreads) {
      table_keys[i] = -1;
      table_owners[i] = 0u;
    }
    if (threadIdx.x == 0) overflow = 0;
    __syncthreads();
    // one pass over the lists fills the (key -> owner word) table; the presence bits then come
    // from the table (one atomic per distinct key), or from a pass over the lists on overflow
    for_each_listed<W>(a, lists, tile_m, w0, wk, false, [&](int t, int key) {
      if (!table_insert(table_keys, table_owners, slots, key, 1u << t)) overflow = 1;
    });
    __syncthreads();
    if (!overflow) {
      for (int i = threadIdx.x; i < slots; i += kMergeThreads) {
        const int key = table_keys[i];
        if (key >= 0) atomicOr(&bitmap[key >> 5], 1u << (key & 31));
      }
    } else {
      for_each_listed<W>(a, lists, tile_m, w0, wk, true, [&](int, int key) {
        atomicOr(&bitmap[key >> 5], 1u << (key & 31));
      });
    }
    __syncthreads();

    // ranks: each thread owns a contiguous run of bitmap words (its keys in ascending order)
    const int per = (nwords + kMergeThreads - 1) / kMergeThreads;
    const int lo = min(int(threadIdx.x) * per, nwords), hi = min(lo + per, nwords);
    int local = 0;
    for (int w = lo; w < hi; ++w) local += __popc(bitmap[w]);
    int rank, total;
    Scan(scan_tmp).ExclusiveSum(local, rank, total);

    for (int w = lo; w < hi; ++w) {
      prefix[w] = rank;
      for (uint32_t bits = bitmap[w]; bits; bits &= bits - 1) {
        union_tile[done + rank++] = w0 + w * 32 + (__ffs(bits) - 1);
      }
    }
    __syncthreads();  // prefix complete
    auto rank_of = [&](int key) {
      const int w = key >> 5;
      return prefix[w] + __popc(bitmap[w] & ((1u << (key & 31)) - 1u));
    };
    if (!overflow) {
      for (int i = threadIdx.x; i < slots; i += kMergeThreads) {
        const int key = table_keys[i];
        if (key >= 0) owners_tile[done + rank_of(key)] = table_owners[i];
      }
    } else {
      // the table overflowed (a large union): a second pass ORs owner bits by rank, on chip
      // when they fit, else in global memory
      const bool on_chip = total <= 2 * slots;
      uint32_t* owner_words = on_chip ? own : owners_tile + done;
      for (int r = threadIdx.x; r < total; r += kMergeThreads) owner_words[r] = 0u;
      __syncthreads();  // zeroed owner words visible to the block (global ones too)
      for_each_listed<W>(a, lists, tile_m, w0, wk, false, [&](int t, int key) {
        atomicOr(&owner_words[rank_of(key)], 1u << t);
      });
      __syncthreads();
      if (on_chip) {
        for (int r = threadIdx.x; r < total; r += kMergeThreads) {
          owners_tile[done + r] = own[r];
        }
      }
    }
    done += total;
    __syncthreads();  // before the next window reuses the bitmap and the table
  }
  if (threadIdx.x == 0) a.counts[tile] = done;
}

// Slots of the (key, owner word) table: a power of two >= the tile's T * K entries, at most
// kTableSlots.
int merge_table_slots(int tokens, int topk) {
  const int64_t width = int64_t(tokens) * topk;
  int slots = 32;
  while (slots < kTableSlots && slots < width) slots *= 2;
  return slots;
}

size_t merge_token_lists_smem(int seqlen_k, int tokens, int topk) {
  const int window = seqlen_k < kWindowKeys ? seqlen_k : kWindowKeys;
  const int words = (window + 31) / 32;
  return sizeof(uint32_t) * (2 * size_t(words) + 2 * size_t(merge_table_slots(tokens, topk)));
}

}  // namespace

cudaError_t launch_merge_token_lists(const int32_t* idx, int64_t stride_b, int64_t stride_h,
                                     int64_t stride_m, int64_t stride_j, int batch, int heads,
                                     int seqlen_q, int topk, int tokens, int seqlen_k,
                                     bool causal, int64_t causal_offset, int32_t* union_out,
                                     int32_t* owners_out, int32_t* counts,
                                     cudaStream_t stream) {
  const int num_tiles = (seqlen_q + tokens - 1) / tokens;
  const int64_t grid = int64_t(batch) * heads * num_tiles;
  if (grid == 0) return cudaSuccess;
  if (seqlen_k <= 0) {  // nothing can be listed: empty unions
    return cudaMemsetAsync(counts, 0, sizeof(int32_t) * grid, stream);
  }
  const size_t smem = merge_token_lists_smem(seqlen_k, tokens, topk);
  MergeArgs a{idx, stride_b, stride_h, stride_m, stride_j, heads, seqlen_q, topk, tokens,
              seqlen_k, num_tiles, causal, causal_offset, union_out,
              reinterpret_cast<uint32_t*>(owners_out), counts};
  const bool vec4 = stride_j == 1 && topk % 4 == 0 && stride_m % 4 == 0 && stride_h % 4 == 0 &&
                    stride_b % 4 == 0 && reinterpret_cast<uintptr_t>(idx) % 16 == 0;
  auto kernel = vec4 ? merge_token_lists_kernel<4> : merge_token_lists_kernel<1>;
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (err != cudaSuccess) return err;
  kernel<<<unsigned(grid), kMergeThreads, smem, stream>>>(a, merge_table_slots(tokens, topk));
  return cudaGetLastError();
}

}  // namespace sparse_attn
