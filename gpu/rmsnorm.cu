// RMSNorm kernels, then their launchers. One block per row (forward); the backward runs a fixed
// grid over rows, each block summing its rows' weight gradient in shared memory, then a column
// reduction over the blocks' partial sums (deterministic: no atomics).
#include "gpu/rmsnorm.cuh"

#include <algorithm>

#include "gpu/cuda_check.h"
#include "gpu/device_utils.cuh"

namespace ferry::gpu {
namespace {

using detail::from_f32;
using detail::to_f32;

constexpr int k_threads = 256;

template <typename T, int VEC>
__global__ void rmsnorm_forward_kernel(T* __restrict__ y, float* __restrict__ rstd, const T* __restrict__ x,
                                       const T* __restrict__ w, int64_t h, float eps) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row * h;
  T* yr = y + row * h;
  float ss = 0.f;
  for (int64_t j = threadIdx.x * VEC; j < h; j += blockDim.x * VEC) {
    const auto xv = detail::load_vec<T, VEC>(xr + j);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float v = to_f32(xv.v[k]);
      ss += v * v;
    }
  }
  ss = detail::block_sum(ss);
  const float r = rsqrtf(ss / static_cast<float>(h) + eps);
  if (rstd != nullptr && threadIdx.x == 0) rstd[row] = r;
  for (int64_t j = threadIdx.x * VEC; j < h; j += blockDim.x * VEC) {
    const auto xv = detail::load_vec<T, VEC>(xr + j);
    const auto wv = detail::load_vec<T, VEC>(w + j);
    detail::vec_t<T, VEC> yv;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const T normed = from_f32<T>(to_f32(xv.v[k]) * r);  // HF casts before the weight multiply
      yv.v[k] = from_f32<T>(to_f32(wv.v[k]) * to_f32(normed));
    }
    detail::store_vec<T, VEC>(yr + j, yv);
  }
}

// g = dy * w, xhat = x * rstd: dx = rstd * (g - xhat * mean(g * xhat)); dw += dy * xhat.to(T).
template <typename T, int VEC>
__global__ void rmsnorm_backward_kernel(T* dx, float* __restrict__ scratch, const T* dy, const T* __restrict__ x,
                                        const T* __restrict__ w, const float* __restrict__ rstd, int64_t n,
                                        int64_t h) {
  extern __shared__ float dw_acc[];  // (h)
  for (int64_t j = threadIdx.x; j < h; j += blockDim.x) dw_acc[j] = 0.f;
  __syncthreads();
  for (int64_t row = blockIdx.x; row < n; row += gridDim.x) {
    const T* xr = x + row * h;
    const T* dyr = dy + row * h;
    const float r = rstd[row];
    float dot = 0.f;
    for (int64_t j = threadIdx.x * VEC; j < h; j += blockDim.x * VEC) {
      const auto xv = detail::load_vec<T, VEC>(xr + j);
      const auto dv = detail::load_vec<T, VEC>(dyr + j);
      const auto wv = detail::load_vec<T, VEC>(w + j);
#pragma unroll
      for (int k = 0; k < VEC; ++k) dot += to_f32(dv.v[k]) * to_f32(wv.v[k]) * to_f32(xv.v[k]);
    }
    // block_sum's barriers also order every read of this row before any write of dx (dx may alias dy).
    dot = detail::block_sum(dot) * r / static_cast<float>(h);
    for (int64_t j = threadIdx.x * VEC; j < h; j += blockDim.x * VEC) {
      const auto xv = detail::load_vec<T, VEC>(xr + j);
      const auto dv = detail::load_vec<T, VEC>(dyr + j);
      const auto wv = detail::load_vec<T, VEC>(w + j);
      detail::vec_t<T, VEC> out;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float xhat = to_f32(xv.v[k]) * r;
        const float d = to_f32(dv.v[k]);
        out.v[k] = from_f32<T>(r * (d * to_f32(wv.v[k])) - xhat * dot * r);
        dw_acc[j + k] += d * to_f32(from_f32<T>(xhat));
      }
      detail::store_vec<T, VEC>(dx + row * h + j, out);
    }
  }
  __syncthreads();
  for (int64_t j = threadIdx.x; j < h; j += blockDim.x) scratch[blockIdx.x * h + j] = dw_acc[j];
}

template <typename T>
__global__ void rmsnorm_dw_reduce_kernel(T* __restrict__ dw, const float* __restrict__ scratch, int64_t rows,
                                         int64_t h, bool accumulate) {
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j >= h) return;
  float s = 0.f;
  for (int64_t r = 0; r < rows; ++r) s += scratch[r * h + j];
  if (accumulate) s += to_f32(dw[j]);
  dw[j] = from_f32<T>(s);
}

}  // namespace

template <typename T>
void rmsnorm_forward_launch(T* y, float* rstd, const T* x, const T* w, int64_t n, int64_t h, float eps,
                            cudaStream_t stream) {
  if (n == 0) return;
  if (detail::can_vectorize<T>(h, {y, x, w})) {
    rmsnorm_forward_kernel<T, detail::vec_width<T>><<<n, k_threads, 0, stream>>>(y, rstd, x, w, h, eps);
  } else {
    rmsnorm_forward_kernel<T, 1><<<n, k_threads, 0, stream>>>(y, rstd, x, w, h, eps);
  }
  FERRY_CUDA_LAUNCH_CHECK();
}

int64_t rmsnorm_backward_scratch_rows(int64_t n) { return std::max<int64_t>(1, std::min<int64_t>(n, 256)); }

template <typename T>
void rmsnorm_backward_launch(T* dx, T* dw, bool accumulate, float* scratch, const T* dy, const T* x, const T* w,
                             const float* rstd, int64_t n, int64_t h, cudaStream_t stream) {
  const int64_t rows = rmsnorm_backward_scratch_rows(n);
  const size_t smem = static_cast<size_t>(h) * sizeof(float);
  const bool vec = detail::can_vectorize<T>(h, {dx, dy, x, w});
  auto kernel = vec ? rmsnorm_backward_kernel<T, detail::vec_width<T>> : rmsnorm_backward_kernel<T, 1>;
  if (smem > 48 * 1024) {
    FERRY_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  if (n > 0) {
    kernel<<<rows, k_threads, smem, stream>>>(dx, scratch, dy, x, w, rstd, n, h);
    FERRY_CUDA_LAUNCH_CHECK();
  } else {
    FERRY_CUDA_CHECK(cudaMemsetAsync(scratch, 0, smem, stream));
  }
  rmsnorm_dw_reduce_kernel<T><<<(h + k_threads - 1) / k_threads, k_threads, 0, stream>>>(dw, scratch, rows, h,
                                                                                        accumulate);
  FERRY_CUDA_LAUNCH_CHECK();
}

#define FERRY_INSTANTIATE(T)                                                                                  \
  template void rmsnorm_forward_launch<T>(T*, float*, const T*, const T*, int64_t, int64_t, float, cudaStream_t); \
  template void rmsnorm_backward_launch<T>(T*, T*, bool, float*, const T*, const T*, const T*, const float*,  \
                                           int64_t, int64_t, cudaStream_t);
FERRY_INSTANTIATE(float)
FERRY_INSTANTIATE(__half)
FERRY_INSTANTIATE(__nv_bfloat16)
#undef FERRY_INSTANTIATE

}  // namespace ferry::gpu
