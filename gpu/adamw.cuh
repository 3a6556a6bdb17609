#pragma once
// Fused AdamW for the "none" offload mode (all optimizer state resident on the GPU), with
// PyTorch's torch.optim.AdamW (foreach=False) arithmetic order, in fp32:
//   p *= 1 - lr*wd; m = lerp(m, g, 1-b1); v = b2*v + (1-b2)*g*g;
//   p -= (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps), g = grad * grad_mult.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace ferry::gpu {

struct adamw_scalars {
  float lr, beta1, beta2, eps;
  float decay;           // 1 - lr * weight_decay
  float step_size;       // lr / (1 - beta1^step)
  float bc2_sqrt;        // sqrt(1 - beta2^step)
  float grad_mult;       // unscale / clip coefficient applied to the gradient
};

// p, m, v fp32 (n) updated in place; half_out (n) gets p rounded to nearest even, or nullptr.
template <typename G, typename H>
void adamw_step_launch(float* p, float* m, float* v, const G* grad, H* half_out, int64_t n, const adamw_scalars& s,
                       cudaStream_t stream);

}  // namespace ferry::gpu
