// RoPE kernel, then its launcher. One thread per rotated pair (j, j + d/2).
#include "gpu/rope.cuh"

#include <algorithm>

#include "gpu/cuda_check.h"
#include "gpu/device_utils.cuh"

namespace ferry::gpu {
namespace {

using detail::from_f32;
using detail::to_f32;

constexpr int k_threads = 256;

template <typename T>
__global__ void rope_kernel(T* x, const float* __restrict__ cos, const float* __restrict__ sin, int64_t t, int64_t h,
                            int64_t d, int64_t stride_b, int64_t stride_t, int64_t stride_h, int64_t total,
                            bool inverse) {
  const int64_t half = d / 2;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t p = idx % half;
    int64_t rest = idx / half;
    const int64_t hh = rest % h;
    rest /= h;
    const int64_t tt = rest % t;
    const int64_t bb = rest / t;
    T* base = x + bb * stride_b + tt * stride_t + hh * stride_h;
    const float x1 = to_f32(base[p]), x2 = to_f32(base[p + half]);
    const float c1 = cos[tt * d + p], c2 = cos[tt * d + p + half];
    const float s1 = sin[tt * d + p], s2 = sin[tt * d + p + half];
    float y1, y2;
    if (!inverse) {
      y1 = x1 * c1 - x2 * s1;
      y2 = x2 * c2 + x1 * s2;
    } else {
      y1 = x1 * c1 + x2 * s2;
      y2 = x2 * c2 - x1 * s1;
    }
    base[p] = from_f32<T>(y1);
    base[p + half] = from_f32<T>(y2);
  }
}

}  // namespace

template <typename T>
void rope_launch(T* x, const float* cos, const float* sin, int64_t b, int64_t t, int64_t h, int64_t d,
                 int64_t stride_b, int64_t stride_t, int64_t stride_h, bool inverse, cudaStream_t stream) {
  const int64_t total = b * t * h * (d / 2);
  if (total == 0) return;
  const int grid = static_cast<int>(std::min<int64_t>((total + k_threads - 1) / k_threads, 132 * 16));
  rope_kernel<T><<<grid, k_threads, 0, stream>>>(x, cos, sin, t, h, d, stride_b, stride_t, stride_h, total, inverse);
  FERRY_CUDA_LAUNCH_CHECK();
}

#define FERRY_INSTANTIATE(T)                                                                                \
  template void rope_launch<T>(T*, const float*, const float*, int64_t, int64_t, int64_t, int64_t, int64_t, \
                               int64_t, int64_t, bool, cudaStream_t);
FERRY_INSTANTIATE(float)
FERRY_INSTANTIATE(__half)
FERRY_INSTANTIATE(__nv_bfloat16)
#undef FERRY_INSTANTIATE

}  // namespace ferry::gpu
