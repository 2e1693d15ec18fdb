// torch bindings of the CUDA kernels: ops registered as torch.ops.sparse_attn.<name>.
//
// The Python wrappers (sparse_attn/_cuda.py) validate arguments first and give each op a fake
// (meta) implementation for torch.compile; the TORCH_CHECKs here guard the C++ entry points
// against misuse from elsewhere. A failing CUDA call raises a RuntimeError naming the kernel.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string>

#include "sparse_attn.h"

namespace sparse_attn {
namespace {

#define SA_CHECK_CUDA(call, kernel)                                                       \
  do {                                                                                   \
    const cudaError_t sa_err_ = (call);                                                  \
    TORCH_CHECK(sa_err_ == cudaSuccess, std::string("sparse_attn CUDA kernel ") + kernel + \
                                            " failed: " + cudaGetErrorString(sa_err_));  \
  } while (0)

// Error messages are built as one std::string, numbers through std::to_string: never insert a
// number into TORCH_CHECK's message stream here. In the JIT build of this library on the H100
// image (torch 2.11+cu130) that insertion crashed the process (SIGSEGV inside the copy of
// std::basic_ostream::_M_insert<long> emitted into the library) instead of raising, so every
// check whose message held an integer or a double (row tables, mass, sizes) segfaulted.
std::string text(int64_t v) { return std::to_string(v); }
std::string text(double v) { return std::to_string(v); }
std::string text(at::IntArrayRef sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + "]";
}
std::string text(at::ScalarType t) { return c10::toString(t); }
std::string text(const at::Device& d) { return d.str(); }

// An optional uint8/bool [n, nkb] row table broadcast over `rows` (read at row % n).
const uint8_t* row_table(const c10::optional<at::Tensor>& t, const at::Tensor& probs,
                         const char* name, int64_t* n) {
  *n = 1;
  if (!t.has_value() || !t->defined()) return nullptr;
  const at::Tensor& x = *t;
  const std::string what = std::string("select_blocks: ") + name;
  TORCH_CHECK(x.layout() == at::kStrided, what + " must be a dense tensor");
  TORCH_CHECK(x.is_cuda() && x.device() == probs.device(),
              what + " must be on " + text(probs.device()) + ", got " + text(x.device()));
  TORCH_CHECK(x.scalar_type() == at::kBool || x.scalar_type() == at::kByte,
              what + " must be bool or uint8, got " + text(x.scalar_type()));
  TORCH_CHECK(x.dim() == 2 && x.size(1) == probs.size(1),
              what + " must be [n, nkb] with nkb = " + text(probs.size(1)) + ", got " +
                  text(x.sizes()));
  TORCH_CHECK(x.is_contiguous(), what + " must be contiguous");
  TORCH_CHECK(x.size(0) >= 1 && probs.size(0) % x.size(0) == 0,
              what + " rows (" + text(x.size(0)) + ") must divide the rows of probs (" +
                  text(probs.size(0)) + ")");
  *n = x.size(0);
  return reinterpret_cast<const uint8_t*>(x.data_ptr());
}

// An optional int32 [n] per-row count table broadcast over `rows` (read at row % n).
const int32_t* count_table(const c10::optional<at::Tensor>& t, const at::Tensor& probs,
                           int64_t* n) {
  *n = 1;
  if (!t.has_value() || !t->defined()) return nullptr;
  const at::Tensor& c = *t;
  TORCH_CHECK(c.layout() == at::kStrided, "select_blocks: count must be a dense tensor");
  TORCH_CHECK(c.is_cuda() && c.device() == probs.device(),
              "select_blocks: count must be on " + text(probs.device()) + ", got " +
                  text(c.device()));
  TORCH_CHECK(c.scalar_type() == at::kInt,
              "select_blocks: count must be int32, got " + text(c.scalar_type()));
  TORCH_CHECK(c.dim() == 1 && c.is_contiguous(),
              "select_blocks: count must be a contiguous 1-d tensor, got " + text(c.sizes()));
  TORCH_CHECK(c.size(0) >= 1 && probs.size(0) % c.size(0) == 0,
              "select_blocks: count rows (" + text(c.size(0)) + ") must divide the rows of " +
                  "probs (" + text(probs.size(0)) + ")");
  *n = c.size(0);
  return c.data_ptr<int32_t>();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> select_blocks_cuda(
    const at::Tensor& probs, const c10::optional<at::Tensor>& valid,
    const c10::optional<at::Tensor>& keep, const c10::optional<at::Tensor>& count, double mass) {
  // every check before any device call (the guard included): bad input raises, never launches
  TORCH_CHECK(probs.defined() && probs.layout() == at::kStrided,
              "select_blocks: probs must be a dense tensor");
  TORCH_CHECK(probs.is_cuda(), "select_blocks: probs must be a CUDA tensor, got " +
                                   text(probs.device()));
  TORCH_CHECK(probs.scalar_type() == at::kFloat,
              "select_blocks: probs must be float32, got " + text(probs.scalar_type()));
  TORCH_CHECK(probs.dim() == 2,
              "select_blocks: probs must be [rows, nkb], got " + text(probs.sizes()));
  TORCH_CHECK(probs.is_contiguous(), "select_blocks: probs must be contiguous");
  const int64_t rows = probs.size(0);
  const int64_t nkb = probs.size(1);
  TORCH_CHECK(nkb <= kSelectMaxBlocks, "select_blocks: at most " +
                                           text(int64_t{kSelectMaxBlocks}) +
                                           " key blocks per row, got " + text(nkb));
  TORCH_CHECK(rows <= int64_t{0x7fffffff},
              "select_blocks: at most 2^31 - 1 rows (one CTA each), got " + text(rows));
  int64_t valid_rows, keep_rows, count_rows;
  const uint8_t* valid_ptr = row_table(valid, probs, "valid", &valid_rows);
  const uint8_t* keep_ptr = row_table(keep, probs, "keep", &keep_rows);
  const int32_t* count_ptr = count_table(count, probs, &count_rows);
  if (count_ptr == nullptr) {
    TORCH_CHECK(mass > 0.0 && mass <= 1.0,
                "select_blocks: mass must lie in (0, 1], got " + text(mass));
  }
  c10::cuda::CUDAGuard guard(probs.device());
  auto mask = at::empty({rows, nkb}, probs.options().dtype(at::kBool));
  auto indices = at::empty({rows, nkb}, probs.options().dtype(at::kInt));
  auto counts = at::empty({rows}, probs.options().dtype(at::kInt));
  SA_CHECK_CUDA(
      launch_select_blocks(probs.data_ptr<float>(), valid_ptr, valid_rows, keep_ptr, keep_rows,
                           count_ptr, count_rows, static_cast<float>(mass), rows,
                           static_cast<int>(nkb), reinterpret_cast<uint8_t*>(mask.data_ptr()),
                           indices.data_ptr<int32_t>(), counts.data_ptr<int32_t>(),
                           c10::cuda::getCurrentCUDAStream()),
      "select_blocks");
  return {mask, indices, counts};
}

void check_cuda_tensor(const at::Tensor& t, const at::Tensor& ref, at::ScalarType dtype,
                       int64_t dim, const char* name) {
  const std::string what = std::string("lowbit_block_scores: ") + name;
  TORCH_CHECK(t.layout() == at::kStrided, what + " must be a dense tensor");
  TORCH_CHECK(t.is_cuda() && t.device() == ref.device(),
              what + " must be on " + text(ref.device()) + ", got " + text(t.device()));
  TORCH_CHECK(t.scalar_type() == dtype,
              what + " must be " + text(dtype) + ", got " + text(t.scalar_type()));
  TORCH_CHECK(t.dim() == dim && t.is_contiguous(),
              what + " must be a contiguous " + text(dim) + "-d tensor, got " + text(t.sizes()));
}

at::Tensor lowbit_block_scores_cuda(const at::Tensor& q, const at::Tensor& k,
                                    const at::Tensor& q_scale, const at::Tensor& k_scale,
                                    const at::Tensor& row_pos, int64_t rows, int64_t block_n,
                                    int64_t seqlen_q, bool causal, double scale,
                                    int64_t sink_blocks, int64_t local_blocks, bool window) {
  check_cuda_tensor(q, q, at::kChar, 4, "q");
  check_cuda_tensor(k, q, at::kChar, 4, "k");
  check_cuda_tensor(q_scale, q, at::kFloat, 3, "q_scale");
  check_cuda_tensor(k_scale, q, at::kFloat, 3, "k_scale");
  check_cuda_tensor(row_pos, q, at::kInt, 1, "row_pos");
  const int64_t batch = q.size(0), heads = q.size(1), nrows = q.size(2), dim = q.size(3);
  const int64_t kv_heads = k.size(1), seqlen_k = k.size(2);
  TORCH_CHECK(k.size(0) == batch && k.size(3) == dim && kv_heads >= 1 && heads % kv_heads == 0,
              "lowbit_block_scores: k must be [B, Hkv, Sk, D] with Hkv dividing H, got q " +
                  text(q.sizes()) + " and k " + text(k.sizes()));
  TORCH_CHECK(dim == 64 || dim == 128, "lowbit_block_scores: head dim 64 or 128, got " +
                                           text(dim));
  TORCH_CHECK(block_n == 64 || block_n == 128,
              "lowbit_block_scores: block_n 64 or 128, got " + text(block_n));
  TORCH_CHECK(rows >= 1 && rows <= 128 && (rows & (rows - 1)) == 0 && nrows % rows == 0,
              "lowbit_block_scores: rows must be a power of two <= 128 dividing " +
                  text(nrows) + ", got " + text(rows));
  const int64_t nqb = nrows / rows;
  const int64_t nkb = (seqlen_k + block_n - 1) / block_n;
  TORCH_CHECK(q_scale.size(0) == batch && q_scale.size(1) == heads && q_scale.size(2) == nqb,
              "lowbit_block_scores: q_scale must be [B, H, nrows / rows] = [" + text(batch) +
                  ", " + text(heads) + ", " + text(nqb) + "], got " + text(q_scale.sizes()));
  TORCH_CHECK(k_scale.size(0) == batch && k_scale.size(1) == kv_heads && k_scale.size(2) == nkb,
              "lowbit_block_scores: k_scale must be [B, Hkv, ceil(Sk / block_n)] = [" +
                  text(batch) + ", " + text(kv_heads) + ", " + text(nkb) + "], got " +
                  text(k_scale.sizes()));
  TORCH_CHECK(row_pos.size(0) == nrows, "lowbit_block_scores: row_pos must be [nrows] = [" +
                                            text(nrows) + "], got " + text(row_pos.sizes()));
  TORCH_CHECK(seqlen_k < (int64_t{1} << 31) && nrows < (int64_t{1} << 31) &&
                  batch * heads < 65536,
              "lowbit_block_scores: sizes beyond the kernel's 32-bit indexing");
  c10::cuda::CUDAGuard guard(q.device());
  auto out = at::zeros({batch, heads, nqb, nkb}, q.options().dtype(at::kFloat));
  SA_CHECK_CUDA(
      launch_lowbit_block_scores(
          q.data_ptr<int8_t>(), k.data_ptr<int8_t>(), q_scale.data_ptr<float>(),
          k_scale.data_ptr<float>(), row_pos.data_ptr<int32_t>(), out.data_ptr<float>(),
          static_cast<int>(batch), static_cast<int>(heads), static_cast<int>(kv_heads),
          static_cast<int>(nrows), static_cast<int>(rows), static_cast<int>(seqlen_q),
          static_cast<int>(seqlen_k), static_cast<int>(dim), static_cast<int>(block_n), causal,
          static_cast<float>(scale), static_cast<int>(sink_blocks),
          static_cast<int>(local_blocks), window, c10::cuda::getCurrentCUDAStream()),
      "lowbit_block_scores");
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> merge_token_lists_cuda(
    const at::Tensor& indices, int64_t tokens, int64_t seqlen_k,
    c10::optional<int64_t> causal_offset) {
  const std::string name = "merge_token_lists";
  TORCH_CHECK(indices.defined() && indices.layout() == at::kStrided,
              name + ": indices must be a dense tensor");
  TORCH_CHECK(indices.is_cuda(), name + ": indices must be a CUDA tensor, got " +
                                     text(indices.device()));
  TORCH_CHECK(indices.scalar_type() == at::kInt,
              name + ": indices must be int32, got " + text(indices.scalar_type()));
  TORCH_CHECK(indices.dim() == 4,
              name + ": indices must be [B, H, Sq, K], got " + text(indices.sizes()));
  TORCH_CHECK(tokens >= 1 && tokens <= 32, name + ": tokens must lie in [1, 32], got " +
                                               text(tokens));
  TORCH_CHECK(seqlen_k >= 0 && seqlen_k < (int64_t{1} << 31),
              name + ": seqlen_k must lie in [0, 2^31), got " + text(seqlen_k));
  const int64_t batch = indices.size(0), heads = indices.size(1);
  const int64_t seqlen_q = indices.size(2), topk = indices.size(3);
  const int64_t tiles = (seqlen_q + tokens - 1) / tokens;
  TORCH_CHECK(batch * heads * tiles < (int64_t{1} << 31) && seqlen_q < (int64_t{1} << 31) &&
                  topk < (int64_t{1} << 24),
              name + ": sizes beyond the kernel's indexing: " + text(indices.sizes()));
  c10::cuda::CUDAGuard guard(indices.device());
  auto opts = indices.options();
  auto union_out = at::empty({batch, heads, tiles, tokens * topk}, opts);
  auto owners = at::empty({batch, heads, tiles, tokens * topk}, opts);
  auto counts = at::empty({batch, heads, tiles}, opts);
  SA_CHECK_CUDA(
      launch_merge_token_lists(
          indices.data_ptr<int32_t>(), indices.stride(0), indices.stride(1), indices.stride(2),
          indices.stride(3), static_cast<int>(batch), static_cast<int>(heads),
          static_cast<int>(seqlen_q), static_cast<int>(topk), static_cast<int>(tokens),
          static_cast<int>(seqlen_k), causal_offset.has_value(),
          causal_offset.has_value() ? *causal_offset : 0, union_out.data_ptr<int32_t>(),
          owners.data_ptr<int32_t>(), counts.data_ptr<int32_t>(),
          c10::cuda::getCurrentCUDAStream()),
      "merge_token_lists");
  return {union_out, owners, counts};
}

}  // namespace

TORCH_LIBRARY(sparse_attn, m) {
  m.def(
      "select_blocks(Tensor probs, Tensor? valid, Tensor? keep, Tensor? count, float mass) -> "
      "(Tensor mask, Tensor indices, Tensor counts)");
  m.def(
      "lowbit_block_scores(Tensor q, Tensor k, Tensor q_scale, Tensor k_scale, Tensor row_pos, "
      "int rows, int block_n, int seqlen_q, bool causal, float scale, int sink_blocks, "
      "int local_blocks, bool window) -> Tensor");
  m.def(
      "merge_token_lists(Tensor indices, int tokens, int seqlen_k, int? causal_offset) -> "
      "(Tensor union, Tensor owners, Tensor counts)");
}

TORCH_LIBRARY_IMPL(sparse_attn, CUDA, m) {
  m.impl("select_blocks", &select_blocks_cuda);
  m.impl("lowbit_block_scores", &lowbit_block_scores_cuda);
  m.impl("merge_token_lists", &merge_token_lists_cuda);
}

}  // namespace sparse_attn
