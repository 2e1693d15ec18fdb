// Launchers of the CUDA kernels, torch-free: raw pointers and a stream in, cudaError_t out.
// bindings.cpp (the only translation unit that includes torch) checks the tensors and calls
// these; the .cu files compile with nvcc alone (see tests/test_cuda_build.py).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace sparse_attn {

// ---- select.cu: per-row top-k / cumulative-mass block selection --------------------------
// probs [rows, nkb] fp32 (clamped at 0). valid / keep: uint8 [valid_rows, nkb] read at row
// `r % valid_rows` (nullptr: valid = probs > 0, keep = none). count: int32 [count_rows] read at
// `r % count_rows`, or nullptr for the mass budget `mass` in (0, 1].
// Outputs: mask uint8 [rows, nkb], indices int32 [rows, nkb] (chosen blocks ascending, -1
// padded), counts int32 [rows].
constexpr int kSelectMaxBlocks = 32768;  // keys of one row live in shared memory (128 KiB)

cudaError_t launch_select_blocks(const float* probs, const uint8_t* valid, int64_t valid_rows,
                                 const uint8_t* keep, int64_t keep_rows, const int32_t* count,
                                 int64_t count_rows, float mass, int64_t rows, int nkb,
                                 uint8_t* mask, int32_t* indices, int32_t* counts,
                                 cudaStream_t stream);

// ---- lowbit_qk.cu: int8 Q.K^T block scores (SALE's relative attention score) ---------------
// q [B, H, nrows, D] int8 (`rows` sampled rows per query block, positions row_pos int32
// [nrows]), k [B, Hkv, Sk, D] int8, q_scale fp32 [B, H, nrows / rows], k_scale fp32
// [B, Hkv, ceil(Sk / block_n)], all contiguous; out fp32 [B, H, nrows / rows, ceil(Sk /
// block_n)], zero-filled by the caller. head_dim in {64, 128}, block_n in {64, 128}, rows a
// power of two <= 128. See kernels/estimate.py `block_scores` for the math.
cudaError_t launch_lowbit_block_scores(const int8_t* q, const int8_t* k, const float* q_scale,
                                       const float* k_scale, const int32_t* row_pos, float* out,
                                       int batch, int num_heads, int num_kv_heads, int nrows,
                                       int rows, int seqlen_q, int seqlen_k, int head_dim,
                                       int block_n, bool causal, float scale, int sink_blocks,
                                       int local_blocks, bool window, cudaStream_t stream);

// ---- topk_merge.cu: union of T neighbouring tokens' top-k key lists, with owner bits -------
// idx int32 [B, H, Sq, K] (any strides in elements; -1 padding anywhere, keys < seqlen_k).
// For tile n of T = tokens consecutive query tokens (1 <= T <= 32): union_out
// [B, H, NT, T * K] gets the distinct listed keys (no particular order), owners_out (same shape)
// bit t set when the tile's token t lists that key, counts [B, H, NT] the union sizes; with
// `causal`, token i keeps only keys <= i + causal_offset. Entries past counts are unspecified.
cudaError_t launch_merge_token_lists(const int32_t* idx, int64_t stride_b, int64_t stride_h,
                                     int64_t stride_m, int64_t stride_j, int batch, int heads,
                                     int seqlen_q, int topk, int tokens, int seqlen_k,
                                     bool causal, int64_t causal_offset, int32_t* union_out,
                                     int32_t* owners_out, int32_t* counts,
                                     cudaStream_t stream);

}  // namespace sparse_attn
