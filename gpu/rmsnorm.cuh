#pragma once
// Fused RMSNorm, HF LlamaRMSNorm semantics: y = w * (x.float() * rstd).to(T), rstd = rsqrt(mean(x^2) + eps)
// in fp32. Kernels take raw pointers; gpu/ops.cpp checks tensors and dispatches on dtype.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace ferry::gpu {

// x, y (n, h) row-major; w (h); rstd (n) fp32 or nullptr.
template <typename T>
void rmsnorm_forward_launch(T* y, float* rstd, const T* x, const T* w, int64_t n, int64_t h, float eps,
                            cudaStream_t stream);

// Rows of the fp32 scratch (rows, h) that rmsnorm_backward_launch needs for the weight gradient.
// Fixed (not per device) so the reduction order, hence dw's bits, is the same on every GPU.
int64_t rmsnorm_backward_scratch_rows(int64_t n);

// dx (n, h) overwritten (may alias dy); dw (h) overwritten, or added to when accumulate.
// scratch: rmsnorm_backward_scratch_rows(n) * h floats.
template <typename T>
void rmsnorm_backward_launch(T* dx, T* dw, bool accumulate, float* scratch, const T* dy, const T* x, const T* w,
                             const float* rstd, int64_t n, int64_t h, cudaStream_t stream);

}  // namespace ferry::gpu
