// SwiGLU kernels, then launchers. Elementwise over (n, i) with 16-byte vectors where the row
// width allows; a grid-stride loop over a fixed grid.
#include "gpu/swiglu.cuh"

#include <algorithm>

#include "gpu/cuda_check.h"
#include "gpu/device_utils.cuh"

namespace ferry::gpu {
namespace {

using detail::from_f32;
using detail::to_f32;

constexpr int k_threads = 256;

__device__ __forceinline__ float sigmoid(float g) { return 1.f / (1.f + expf(-g)); }

template <typename T, int VEC>
__global__ void swiglu_forward_kernel(T* __restrict__ y, const T* __restrict__ gate_up, int64_t n, int64_t i) {
  const int64_t per_row = i / VEC;
  const int64_t total = n * per_row;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = idx / per_row, col = (idx % per_row) * VEC;
    const auto g = detail::load_vec<T, VEC>(gate_up + row * 2 * i + col);
    const auto u = detail::load_vec<T, VEC>(gate_up + row * 2 * i + i + col);
    detail::vec_t<T, VEC> out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float gf = to_f32(g.v[k]);
      out.v[k] = from_f32<T>(gf * sigmoid(gf) * to_f32(u.v[k]));
    }
    detail::store_vec<T, VEC>(y + row * i + col, out);
  }
}

// d silu(g)/dg = sig(g) * (1 + g * (1 - sig(g))).
template <typename T, int VEC>
__global__ void swiglu_backward_kernel(T* d_gate_up, const T* __restrict__ dy, const T* gate_up, int64_t n,
                                       int64_t i) {
  const int64_t per_row = i / VEC;
  const int64_t total = n * per_row;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = idx / per_row, col = (idx % per_row) * VEC;
    const auto g = detail::load_vec<T, VEC>(gate_up + row * 2 * i + col);
    const auto u = detail::load_vec<T, VEC>(gate_up + row * 2 * i + i + col);
    const auto d = detail::load_vec<T, VEC>(dy + row * i + col);
    detail::vec_t<T, VEC> dg, du;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float gf = to_f32(g.v[k]), df = to_f32(d.v[k]);
      const float s = sigmoid(gf);
      dg.v[k] = from_f32<T>(df * to_f32(u.v[k]) * s * (1.f + gf * (1.f - s)));
      du.v[k] = from_f32<T>(df * gf * s);
    }
    detail::store_vec<T, VEC>(d_gate_up + row * 2 * i + col, dg);
    detail::store_vec<T, VEC>(d_gate_up + row * 2 * i + i + col, du);
  }
}

int grid_for(int64_t work) {
  // Enough blocks to fill any current GPU several times over; the loop strides over the rest.
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((work + k_threads - 1) / k_threads, 132 * 16)));
}

}  // namespace

template <typename T>
void swiglu_forward_launch(T* y, const T* gate_up, int64_t n, int64_t i, cudaStream_t stream) {
  if (n * i == 0) return;
  constexpr int vw = detail::vec_width<T>;
  if (detail::can_vectorize<T>(i, {y, gate_up})) {
    swiglu_forward_kernel<T, vw><<<grid_for(n * i / vw), k_threads, 0, stream>>>(y, gate_up, n, i);
  } else {
    swiglu_forward_kernel<T, 1><<<grid_for(n * i), k_threads, 0, stream>>>(y, gate_up, n, i);
  }
  FERRY_CUDA_LAUNCH_CHECK();
}

template <typename T>
void swiglu_backward_launch(T* d_gate_up, const T* dy, const T* gate_up, int64_t n, int64_t i, cudaStream_t stream) {
  if (n * i == 0) return;
  constexpr int vw = detail::vec_width<T>;
  if (detail::can_vectorize<T>(i, {d_gate_up, dy, gate_up})) {
    swiglu_backward_kernel<T, vw><<<grid_for(n * i / vw), k_threads, 0, stream>>>(d_gate_up, dy, gate_up, n, i);
  } else {
    swiglu_backward_kernel<T, 1><<<grid_for(n * i), k_threads, 0, stream>>>(d_gate_up, dy, gate_up, n, i);
  }
  FERRY_CUDA_LAUNCH_CHECK();
}

#define FERRY_INSTANTIATE(T)                                                                   \
  template void swiglu_forward_launch<T>(T*, const T*, int64_t, int64_t, cudaStream_t);        \
  template void swiglu_backward_launch<T>(T*, const T*, const T*, int64_t, int64_t, cudaStream_t);
FERRY_INSTANTIATE(float)
FERRY_INSTANTIATE(__half)
FERRY_INSTANTIATE(__nv_bfloat16)
#undef FERRY_INSTANTIATE

}  // namespace ferry::gpu
