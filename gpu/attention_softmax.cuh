#pragma once
// The elementwise steps of ferry's large-head attention path (head_dim > 256, where libtorch's
// fused SDPA kernels do not apply). The GEMMs run in cuBLAS (gpu/attention.cpp); these kernels
// fuse the causal mask, the scale, the softmax and its backward so that each (t, t) score matrix
// is read and written once per pass.
//
// Rows: the scores of all heads stacked, (rows, t) with rows = batch*heads*t; a row's query
// position is row % t, and causal masking keeps columns j <= row % t.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace ferry::gpu {

// p (rows, t) = softmax(scale * s) with the causal mask (zeros above the diagonal), stored as T;
// lse (rows) fp32 = logsumexp of the scaled, masked row. p may alias s.
template <typename T>
void attention_softmax_forward_launch(T* p, float* lse, const T* s, int64_t rows, int64_t t, float scale,
                                      cudaStream_t stream);

// Backward from the forward's lse, recomputing P from the raw scores s:
//   p = exp(scale*s - lse) (masked), delta = rowsum(dout * out) over d,
//   ds = scale * p * (dp - delta)    (the gradient of the raw, unscaled scores)
// p_out (may alias s) and ds_out (may alias dp) are (rows, t); out, dout (rows, d).
template <typename T>
void attention_softmax_backward_launch(T* p_out, T* ds_out, const T* s, const T* dp, const T* out, const T* dout,
                                       const float* lse, int64_t rows, int64_t t, int64_t d, float scale,
                                       cudaStream_t stream);

}  // namespace ferry::gpu
