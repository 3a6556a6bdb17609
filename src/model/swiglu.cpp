#include "src/model/swiglu.h"

#include <ATen/ATen.h>

#include "src/common/error.h"
#include "src/model/ops_common.h"
#if FERRY_WITH_CUDA
#include "gpu/ops.h"
#endif

namespace ferry::model {

at::Tensor swiglu_forward_aten(const at::Tensor& gate_up) {
  const int64_t I = gate_up.size(-1) / 2;
  at::Tensor gu = gate_up.to(detail::acc_dtype(gate_up));
  at::Tensor g = gu.narrow(-1, 0, I), u = gu.narrow(-1, I, I);
  return (g * at::sigmoid(g) * u).to(gate_up.scalar_type());
}

void swiglu_backward_aten(const at::Tensor& dy, const at::Tensor& gate_up, at::Tensor& d_gate_up) {
  const int64_t I = gate_up.size(-1) / 2;
  const auto acc = detail::acc_dtype(gate_up);
  at::Tensor gu = gate_up.to(acc);
  at::Tensor g = gu.narrow(-1, 0, I), u = gu.narrow(-1, I, I);
  at::Tensor dyf = dy.to(acc);
  at::Tensor s = at::sigmoid(g);
  at::Tensor silu = g * s;
  d_gate_up.narrow(-1, 0, I).copy_(dyf * u * s * (1 + g * (1 - s)));
  d_gate_up.narrow(-1, I, I).copy_(dyf * silu);
}

at::Tensor swiglu_forward(const at::Tensor& gate_up) {
  FERRY_ASSERT(gate_up.size(-1) % 2 == 0, "swiglu: gate_up's last dim must be 2I");
#if FERRY_WITH_CUDA
  if (gate_up.is_cuda()) {
    const int64_t two_i = gate_up.size(-1);
    auto out_shape = gate_up.sizes().vec();
    out_shape.back() = two_i / 2;
    return gpu::swiglu_forward(gate_up.reshape({-1, two_i}).contiguous()).view(out_shape);
  }
#endif
  return swiglu_forward_aten(gate_up);
}

void swiglu_backward(const at::Tensor& dy, const at::Tensor& gate_up, at::Tensor& d_gate_up) {
  FERRY_ASSERT(d_gate_up.is_contiguous() && d_gate_up.sizes() == gate_up.sizes(),
               "swiglu_backward: d_gate_up must be contiguous and shaped like gate_up");
#if FERRY_WITH_CUDA
  if (gate_up.is_cuda()) {
    const int64_t two_i = gate_up.size(-1);
    at::Tensor d2 = d_gate_up.view({-1, two_i});
    gpu::swiglu_backward(dy.reshape({-1, two_i / 2}).contiguous(), gate_up.reshape({-1, two_i}).contiguous(), d2);
    return;
  }
#endif
  swiglu_backward_aten(dy, gate_up, d_gate_up);
}

}  // namespace ferry::model
