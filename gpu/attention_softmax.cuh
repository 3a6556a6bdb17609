#pragma once
// The elementwise steps of ferry's large-head attention path (head_dim > 256, where libtorch's
// fused SDPA kernels do not apply). The GEMMs run in cuBLAS (gpu/attention.cpp); these kernels
// fuse the causal mask, the scale, the softmax and its backward so that each (t, t) score matrix
// is read and written once per pass.
//
// Rows: the scores of all heads stacked, (rows, tk) with rows = batch*heads*tq; a row's query
// position is q_offset + row % tq, and causal masking keeps columns j <= that position. Training
// has tq = tk and q_offset 0; inference with a KV cache has the tq queries at the end of the tk
// keys (q_offset = tk - tq).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace ferry::gpu {

// p (rows, tk) = softmax(scale * s) with the causal mask (zeros right of each row's position),
// stored as T; lse (rows) fp32 = logsumexp of the scaled, masked row. p may alias s.
template <typename T>
void attention_softmax_forward_launch(T* p, float* lse, const T* s, int64_t rows, int64_t tq, int64_t tk,
                                      int64_t q_offset, float scale, cudaStream_t stream);

// Backward from the forward's lse, recomputing P from the raw scores s:
//   p = exp(scale*s - lse) (masked), delta = rowsum(dout * out) over d,
//   ds = scale * p * (dp - delta)    (the gradient of the raw, unscaled scores)
// p_out (may alias s) and ds_out (may alias dp) are (rows, t); out, dout (rows, d). Training only
// (tq = tk = t, q_offset 0).
template <typename T>
void attention_softmax_backward_launch(T* p_out, T* ds_out, const T* s, const T* dp, const T* out, const T* dout,
                                       const float* lse, int64_t rows, int64_t t, int64_t d, float scale,
                                       cudaStream_t stream);

}  // namespace ferry::gpu
