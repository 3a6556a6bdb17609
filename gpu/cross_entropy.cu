// Cross-entropy kernels, then the launcher. One block per row.
#include "gpu/cross_entropy.cuh"

#include "gpu/cuda_check.h"
#include "gpu/device_utils.cuh"

namespace ferry::gpu {
namespace {

using detail::from_f32;
using detail::to_f32;

constexpr int k_threads = 512;
constexpr int64_t k_ignore_index = -100;

// Running (max, sum of exp(x - max)) of one thread's elements.
__device__ __forceinline__ void online_update(float x, float& m, float& s) {
  if (x > m) {
    s = s * expf(m - x) + 1.f;
    m = x;
  } else if (x != -INFINITY) {
    s += expf(x - m);
  }
}

template <typename T, int VEC>
__global__ void cross_entropy_kernel(float* __restrict__ row_loss, T* dlogits, const T* logits,
                                     const int64_t* __restrict__ labels, int64_t v, float grad_scale) {
  const int64_t row = blockIdx.x;
  const T* xr = logits + row * v;
  const int64_t label = labels[row];
  const bool ignored = label == k_ignore_index;
  const bool valid = label >= 0 && label < v;
  // Read before any thread writes dlogits (which may alias logits); the reductions below order it.
  const float x_label = valid ? to_f32(xr[label]) : 0.f;

  float m = -INFINITY, s = 0.f;
  for (int64_t j = threadIdx.x * VEC; j < v; j += blockDim.x * VEC) {
    const auto xv = detail::load_vec<T, VEC>(xr + j);
#pragma unroll
    for (int k = 0; k < VEC; ++k) online_update(to_f32(xv.v[k]), m, s);
  }
  const float row_max = detail::block_max(m);
  const float scaled = m == -INFINITY ? 0.f : s * expf(m - row_max);
  const float lse = row_max + logf(detail::block_sum(scaled));

  if (threadIdx.x == 0) row_loss[row] = ignored ? 0.f : valid ? lse - x_label : NAN;
  if (dlogits == nullptr) return;
  T* dr = dlogits + row * v;
  for (int64_t j = threadIdx.x * VEC; j < v; j += blockDim.x * VEC) {
    const auto xv = detail::load_vec<T, VEC>(xr + j);
    detail::vec_t<T, VEC> out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      float g;
      if (ignored) {
        g = 0.f;
      } else if (!valid) {
        g = NAN;
      } else {
        g = grad_scale * (expf(to_f32(xv.v[k]) - lse) - (j + k == label ? 1.f : 0.f));
      }
      out.v[k] = from_f32<T>(g);
    }
    detail::store_vec<T, VEC>(dr + j, out);
  }
}

__global__ void loss_sum_kernel(float* __restrict__ loss_sum, const float* __restrict__ row_loss, int64_t n) {
  float s = 0.f;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += row_loss[i];
  s = detail::block_sum(s);
  if (threadIdx.x == 0) *loss_sum += s;
}

}  // namespace

template <typename T>
void cross_entropy_launch(float* loss_sum, float* row_loss, T* dlogits, const T* logits, const int64_t* labels,
                          int64_t n, int64_t v, float grad_scale, cudaStream_t stream) {
  if (n == 0) return;
  if (detail::can_vectorize<T>(v, {logits, dlogits})) {
    cross_entropy_kernel<T, detail::vec_width<T>>
        <<<n, k_threads, 0, stream>>>(row_loss, dlogits, logits, labels, v, grad_scale);
  } else {
    cross_entropy_kernel<T, 1><<<n, k_threads, 0, stream>>>(row_loss, dlogits, logits, labels, v, grad_scale);
  }
  FERRY_CUDA_LAUNCH_CHECK();
  loss_sum_kernel<<<1, 1024, 0, stream>>>(loss_sum, row_loss, n);
  FERRY_CUDA_LAUNCH_CHECK();
}

#define FERRY_INSTANTIATE(T)                                                                                     \
  template void cross_entropy_launch<T>(float*, float*, T*, const T*, const int64_t*, int64_t, int64_t, float, \
                                        cudaStream_t);
FERRY_INSTANTIATE(float)
FERRY_INSTANTIATE(__half)
FERRY_INSTANTIATE(__nv_bfloat16)
#undef FERRY_INSTANTIATE

}  // namespace ferry::gpu
