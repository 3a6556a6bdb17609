#pragma once
// RMSNorm as HF LlamaRMSNorm: y = w * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype).
// CUDA tensors go to ferry::gpu's fused kernels when built with them; the *_aten functions are the
// ATen composition (CPU path, and the reference in tests).
#include <ATen/core/Tensor.h>

namespace ferry::model {

// x (..., H) contiguous, w (H), same dtype. Returns y shaped like x. When rstd is non-null it is
// set to the per-row 1/rms, shape (rows), fp32 (fp64 for fp64 x).
at::Tensor rmsnorm_forward(const at::Tensor& x, const at::Tensor& w, double eps, at::Tensor* rstd);
// dy, x (..., H); rstd from rmsnorm_forward. dx (shaped like x, contiguous) is overwritten;
// dw (H) is overwritten or, with accumulate, added to.
void rmsnorm_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w, const at::Tensor& rstd,
                      at::Tensor& dx, at::Tensor& dw, bool accumulate);

at::Tensor rmsnorm_forward_aten(const at::Tensor& x, const at::Tensor& w, double eps, at::Tensor* rstd);
void rmsnorm_backward_aten(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w, const at::Tensor& rstd,
                           at::Tensor& dx, at::Tensor& dw, bool accumulate);

}  // namespace ferry::model
