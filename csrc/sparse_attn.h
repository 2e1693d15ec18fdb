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

}  // namespace sparse_attn
