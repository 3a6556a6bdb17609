// AdamW kernel, then its launcher. Elementwise, grid-stride; memory bound (16 B/param fp32 state).
#include "gpu/adamw.cuh"

#include <algorithm>

#include "gpu/cuda_check.h"
#include "gpu/device_utils.cuh"

namespace ferry::gpu {
namespace {

using detail::from_f32;
using detail::to_f32;

constexpr int k_threads = 256;

template <typename G, typename H>
__global__ void adamw_kernel(float* __restrict__ p, float* __restrict__ m, float* __restrict__ v,
                             const G* __restrict__ grad, H* __restrict__ half_out, int64_t n, adamw_scalars s) {
  const float w = 1.f - s.beta1;  // torch's lerp(m, g, w) with w < 0.5: m + w * (g - m)
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float g = to_f32(grad[i]) * s.grad_mult;
    float pi = p[i] * s.decay;
    float mi = m[i];
    mi = w < 0.5f ? mi + w * (g - mi) : g - (g - mi) * (1.f - w);
    const float vi = v[i] * s.beta2 + (1.f - s.beta2) * g * g;
    const float denom = sqrtf(vi) / s.bc2_sqrt + s.eps;
    pi = pi - s.step_size * (mi / denom);
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
    if (half_out != nullptr) half_out[i] = from_f32<H>(pi);
  }
}

}  // namespace

template <typename G, typename H>
void adamw_step_launch(float* p, float* m, float* v, const G* grad, H* half_out, int64_t n, const adamw_scalars& s,
                       cudaStream_t stream) {
  if (n == 0) return;
  const int grid = static_cast<int>(std::min<int64_t>((n + k_threads - 1) / k_threads, 132 * 16));
  adamw_kernel<G, H><<<grid, k_threads, 0, stream>>>(p, m, v, grad, half_out, n, s);
  FERRY_CUDA_LAUNCH_CHECK();
}

#define FERRY_INSTANTIATE(G, H) \
  template void adamw_step_launch<G, H>(float*, float*, float*, const G*, H*, int64_t, const adamw_scalars&, cudaStream_t);
FERRY_INSTANTIATE(float, __half)
FERRY_INSTANTIATE(float, __nv_bfloat16)
FERRY_INSTANTIATE(__half, __half)
FERRY_INSTANTIATE(__half, __nv_bfloat16)
FERRY_INSTANTIATE(__nv_bfloat16, __half)
FERRY_INSTANTIATE(__nv_bfloat16, __nv_bfloat16)
#undef FERRY_INSTANTIATE

}  // namespace ferry::gpu
