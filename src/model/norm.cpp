#include "src/model/norm.h"

#include <ATen/ATen.h>

#include "src/common/error.h"
#include "src/model/ops_common.h"
#if FERRY_WITH_CUDA
#include "gpu/ops.h"
#endif

namespace ferry::model {

at::Tensor rmsnorm_forward_aten(const at::Tensor& x, const at::Tensor& w, double eps, at::Tensor* rstd) {
  const int64_t H = x.size(-1);
  at::Tensor xf = x.reshape({-1, H}).to(detail::acc_dtype(x));
  at::Tensor r = at::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + eps);
  at::Tensor y = (w * (xf * r).to(x.scalar_type())).view(x.sizes());
  if (rstd) *rstd = r.squeeze(-1);
  return y;
}

void rmsnorm_backward_aten(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w, const at::Tensor& rstd,
                           at::Tensor& dx, at::Tensor& dw, bool accumulate) {
  const int64_t H = x.size(-1);
  const auto acc = detail::acc_dtype(x);
  at::Tensor xf = x.reshape({-1, H}).to(acc);
  at::Tensor dyf = dy.reshape({-1, H}).to(acc);
  at::Tensor r = rstd.reshape({-1, 1}).to(acc);
  at::Tensor n = xf * r;                                   // (N, H) normalised x
  at::Tensor dn = dyf * w.to(acc);
  at::Tensor dxf = r * (dn - n * (dn * n).mean(-1, /*keepdim=*/true));
  dx.view({-1, H}).copy_(dxf);
  at::Tensor dwf = (dyf * n).sum(0);
  if (accumulate) {
    dw.add_(dwf);
  } else {
    dw.copy_(dwf);
  }
}

at::Tensor rmsnorm_forward(const at::Tensor& x, const at::Tensor& w, double eps, at::Tensor* rstd) {
  FERRY_ASSERT(x.size(-1) == w.numel() && x.scalar_type() == w.scalar_type(), "rmsnorm: x (..., H) and w (H) disagree");
#if FERRY_WITH_CUDA
  if (x.is_cuda()) {
    const int64_t H = x.size(-1);
    at::Tensor x2 = x.reshape({-1, H}).contiguous();
    if (rstd) *rstd = at::empty({x2.size(0)}, x.options().dtype(at::kFloat));
    return gpu::rmsnorm_forward(x2, w, eps, rstd).view(x.sizes());
  }
#endif
  return rmsnorm_forward_aten(x, w, eps, rstd);
}

void rmsnorm_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w, const at::Tensor& rstd,
                      at::Tensor& dx, at::Tensor& dw, bool accumulate) {
  FERRY_ASSERT(dx.is_contiguous() && dx.numel() == x.numel(), "rmsnorm_backward: dx must be contiguous like x");
#if FERRY_WITH_CUDA
  if (x.is_cuda()) {
    const int64_t H = x.size(-1);
    at::Tensor dx2 = dx.view({-1, H});
    gpu::rmsnorm_backward(dy.reshape({-1, H}).contiguous(), x.reshape({-1, H}).contiguous(), w, rstd, dx2, dw,
                          accumulate);
    return;
  }
#endif
  rmsnorm_backward_aten(dy, x, w, rstd, dx, dw, accumulate);
}

}  // namespace ferry::model
