#pragma once
// Small helpers shared by the op files of src/model (not part of the engine-facing API).
#include <ATen/ATen.h>

namespace ferry::model::detail {

// Accumulation dtype of an op on `t`: fp64 for fp64 inputs (the autograd tests), fp32 otherwise
// (fp32, fp16, bf16 compute: every reduction runs in fp32).
inline at::ScalarType acc_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}
inline int64_t acc_size(at::ScalarType compute) { return compute == at::kDouble ? 8 : 4; }

// Weight-gradient GEMM into a view of a flat gradient buffer: g = a^T b, or g += a^T b when
// accumulate. a (N, out), b (N, in), g (out, in) contiguous.
inline void grad_mm(const at::Tensor& g, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  at::Tensor out = g;
  if (accumulate) {
    out.addmm_(a.t(), b);
  } else {
    at::mm_out(out, a.t(), b);
  }
}

}  // namespace ferry::model::detail
