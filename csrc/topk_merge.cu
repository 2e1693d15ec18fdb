// Union of neighbouring query tokens' top-k key lists, with owner bits: the preprocessing of
// the merged token top-k attention kernel (kernels/topk.py).
//
// One CTA per tile of T <= 32 consecutive query tokens of one (batch, head). The fast kernel
// makes one pass over the tile's T x K listed keys: each (token t, key) ORs bit t into the
// key's owner word in an open-addressing (key, owner) table in shared memory; a block scan then
// compacts the occupied slots, so the union comes out in slot (hash) order, not ascending (the
// attention kernel does not need an order). The table alone (64 KiB, 40 registers) lets three
// CTAs share an SM.
//
// Why CUDA: Triton has no shared-memory atomics, so its merge makes every (token, key) pair a
// global atomic into a per-program owner array (35 ms at 128k, K=2048, T=32 on an H100); here
// the atomics stay on chip (5.8 ms; ncu on the earlier 2-CTA version: bound by the in-SM
// probes and atomics, 29% of DRAM).
//
// A tile whose union overflows the table (large, disjoint lists) writes counts = -1 (giving up
// early, with a shared-flag check per step, made the whole merge 30% slower: 7.5-7.9 vs
// 5.8 ms). A second kernel redoes only those tiles in two passes over the lists: presence bits
// in a shared-memory bitmap over a window of keys (ranks from a block scan of the words'
// popcounts, the union ascending), then the owner bits ORed by rank, on chip when they fit and
// in global memory otherwise. Key ranges longer than kWindowKeys are folded one window at a
// time.
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
// the fast kernel: keys in flight per thread (x 4 with 16-byte loads) and CTAs per SM. At 128k,
// K=2048, T=32 on an H100: (2 loads, 3 CTAs, 40 registers) 5.82 ms; (4, 3: spills) 6.06;
// (4, 2) 7.04, as the bitmap + table version it replaced (6.99)
constexpr int kTableBatch = 2;
constexpr int kTableBlocks = 3;

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
template <int W, int kBatch = 4, typename F>
__device__ __forceinline__ void for_each_listed(const MergeArgs& a, const int32_t* lists,
                                                int tile_m, int w0, int wk, bool backward,
                                                F&& f) {
  const int t0 = tile_m * a.tokens;
  const int ntok = min(a.tokens, a.seqlen_q - t0);
  const int per_row = a.topk / W;
  const int n = ntok * per_row;
  const int steps = (n + kBatch * kMergeThreads - 1) / (kBatch * kMergeThreads);
  // (token, load) of pair i + kMergeThreads from those of pair i, without a division
  const int dt = kMergeThreads / per_row, dj = kMergeThreads % per_row;
  // keys a token sees: offsets < t0 + t + causal_offset + 1 - w0, clamped to 32 bits
  const int causal_lim = a.causal ? int(max(min(int64_t(t0) + a.causal_offset + 1 - w0,
                                                int64_t(wk)), int64_t(-a.tokens)))
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

// The overflow fallback: only the tiles the table kernel marked (counts = -1). Per window of
// keys, a pass over the lists sets presence bits, a block scan ranks them (the union written
// ascending), and a second pass ORs owner bits by rank: into 2 * slots words of shared memory
// when the union fits, else straight into the output in global memory.
template <int W>
__global__ void __launch_bounds__(kMergeThreads)
    merge_overflow_kernel(const MergeArgs a, int slots) {
  using Scan = cub::BlockScan<int, kMergeThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  extern __shared__ uint32_t smem[];

  const int tile = blockIdx.x;
  if (a.counts[tile] >= 0) return;  // the table kernel merged it
  const int bh = tile / a.num_tiles, tile_m = tile % a.num_tiles;
  const int32_t* lists = a.idx + (bh / a.heads) * a.stride_b + (bh % a.heads) * a.stride_h;
  const int64_t width = int64_t(a.tokens) * a.topk;
  int32_t* union_tile = a.union_out + int64_t(tile) * width;
  uint32_t* owners_tile = a.owners_out + int64_t(tile) * width;

  const int window = min(a.seqlen_k, kWindowKeys);
  const int max_words = (window + 31) / 32;
  uint32_t* bitmap = smem;
  int* prefix = reinterpret_cast<int*>(smem + max_words);
  uint32_t* own = smem + 2 * max_words;  // 2 * slots owner words by rank

  int done = 0;  // union entries written by earlier windows
  for (int w0 = 0; w0 < a.seqlen_k; w0 += window) {
    const int wk = min(window, a.seqlen_k - w0);
    const int nwords = (wk + 31) / 32;
    for (int w = threadIdx.x; w < nwords; w += kMergeThreads) bitmap[w] = 0u;
    __syncthreads();
    for_each_listed<W>(a, lists, tile_m, w0, wk, false, [&](int, int key) {
      atomicOr(&bitmap[key >> 5], 1u << (key & 31));
    });
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
    const bool on_chip = total <= 2 * slots;
    uint32_t* owner_words = on_chip ? own : owners_tile + done;
    for (int r = threadIdx.x; r < total; r += kMergeThreads) owner_words[r] = 0u;
    __syncthreads();  // prefix complete; zeroed owner words visible to the block
    // the second pass walks the lists last-first: it starts on the lines the first one read
    // last, the likeliest still in L2
    for_each_listed<W>(a, lists, tile_m, w0, wk, true, [&](int t, int key) {
      const int w = key >> 5;
      const int r = prefix[w] + __popc(bitmap[w] & ((1u << (key & 31)) - 1u));
      atomicOr(&owner_words[r], 1u << t);
    });
    __syncthreads();
    if (on_chip) {
      for (int r = threadIdx.x; r < total; r += kMergeThreads) owners_tile[done + r] = own[r];
    }
    done += total;
    __syncthreads();  // before the next window reuses the bitmap
  }
  if (threadIdx.x == 0) a.counts[tile] = done;
}

// The fast kernel: the (key, owner word) table alone in shared memory, one pass over the lists,
// then the occupied slots compacted by a block scan (union in slot order). Any key length. A
// tile whose union overflows the table writes counts = -1 for merge_overflow_kernel.
template <int W, int kBatch, int kMinBlocks>
__global__ void __launch_bounds__(kMergeThreads, kMinBlocks)
    merge_token_lists_table_kernel(const MergeArgs a, int slots) {
  using Scan = cub::BlockScan<int, kMergeThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  __shared__ int overflow;
  extern __shared__ uint32_t smem[];

  const int tile = blockIdx.x;
  const int bh = tile / a.num_tiles, tile_m = tile % a.num_tiles;
  const int32_t* lists = a.idx + (bh / a.heads) * a.stride_b + (bh % a.heads) * a.stride_h;
  const int64_t width = int64_t(a.tokens) * a.topk;
  int* table_keys = reinterpret_cast<int*>(smem);
  uint32_t* table_owners = smem + slots;
  for (int i = threadIdx.x; i < slots; i += kMergeThreads) {
    table_keys[i] = -1;
    table_owners[i] = 0u;
  }
  if (threadIdx.x == 0) overflow = 0;
  __syncthreads();
  for_each_listed<W, kBatch>(
      a, lists, tile_m, 0, a.seqlen_k, false,
      [&](int t, int key) {
        if (!table_insert(table_keys, table_owners, slots, key, 1u << t)) overflow = 1;
      });
  __syncthreads();
  if (overflow) {
    if (threadIdx.x == 0) a.counts[tile] = -1;
    return;
  }
  // each thread compacts a contiguous run of slots
  const int per = (slots + kMergeThreads - 1) / kMergeThreads;
  const int lo = min(int(threadIdx.x) * per, slots), hi = min(lo + per, slots);
  int local = 0;
  for (int i = lo; i < hi; ++i) local += table_keys[i] >= 0;
  int rank, total;
  Scan(scan_tmp).ExclusiveSum(local, rank, total);
  int32_t* union_tile = a.union_out + int64_t(tile) * width;
  uint32_t* owners_tile = a.owners_out + int64_t(tile) * width;
  for (int i = lo; i < hi; ++i) {
    const int key = table_keys[i];
    if (key >= 0) {
      union_tile[rank] = key;
      owners_tile[rank] = table_owners[i];
      ++rank;
    }
  }
  if (threadIdx.x == 0) a.counts[tile] = total;
}

// Slots of the (key, owner word) table: a power of two >= the tile's T * K entries, at most
// kTableSlots.
int merge_table_slots(int tokens, int topk) {
  const int64_t width = int64_t(tokens) * topk;
  int slots = 32;
  while (slots < kTableSlots && slots < width) slots *= 2;
  return slots;
}

// shared memory of merge_overflow_kernel: bitmap and word prefix over a window, owner words
size_t merge_overflow_smem(int seqlen_k, int tokens, int topk) {
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
  MergeArgs a{idx, stride_b, stride_h, stride_m, stride_j, heads, seqlen_q, topk, tokens,
              seqlen_k, num_tiles, causal, causal_offset, union_out,
              reinterpret_cast<uint32_t*>(owners_out), counts};
  const bool vec4 = stride_j == 1 && topk % 4 == 0 && stride_m % 4 == 0 && stride_h % 4 == 0 &&
                    stride_b % 4 == 0 && reinterpret_cast<uintptr_t>(idx) % 16 == 0;
  const int slots = merge_table_slots(tokens, topk);
  const size_t table_smem = sizeof(uint32_t) * 2 * size_t(slots);
  auto table_kernel = vec4 ? merge_token_lists_table_kernel<4, kTableBatch, kTableBlocks>
                           : merge_token_lists_table_kernel<1, kTableBatch, kTableBlocks>;
  cudaError_t err = cudaFuncSetAttribute(
      table_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(table_smem));
  if (err != cudaSuccess) return err;
  table_kernel<<<unsigned(grid), kMergeThreads, table_smem, stream>>>(a, slots);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  // the tiles whose union overflowed the table (counts = -1); the others return at once
  const size_t smem = merge_overflow_smem(seqlen_k, tokens, topk);
  auto overflow_kernel = vec4 ? merge_overflow_kernel<4> : merge_overflow_kernel<1>;
  err = cudaFuncSetAttribute(overflow_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             int(smem));
  if (err != cudaSuccess) return err;
  overflow_kernel<<<unsigned(grid), kMergeThreads, smem, stream>>>(a, slots);
  return cudaGetLastError();
}

}  // namespace sparse_attn
