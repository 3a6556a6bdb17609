// Gradient statistics kernels, then the launcher: a fixed grid of partial sums, then one block
// that adds them in a fixed order.
#include "gpu/grad_stats.cuh"

#include "gpu/cuda_check.h"
#include "gpu/device_utils.cuh"

namespace ferry::gpu {
namespace {

using detail::to_f32;

constexpr int k_threads = 256;
constexpr int k_blocks = 528;  // 4 per SM on an H100; fixed for determinism across GPUs

template <typename T, int VEC>
__global__ void grad_stats_partial_kernel(float* __restrict__ partial, const T* __restrict__ x, int64_t n) {
  float ss = 0.f, bad = 0.f;
  const int64_t n_vec = n / VEC;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n_vec;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const auto v = detail::load_vec<T, VEC>(x + i * VEC);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float f = to_f32(v.v[k]);
      ss += f * f;
      bad += isfinite(f) ? 0.f : 1.f;
    }
  }
  if (blockIdx.x == 0) {  // scalar tail (n % VEC elements)
    for (int64_t i = n_vec * VEC + threadIdx.x; i < n; i += blockDim.x) {
      const float f = to_f32(x[i]);
      ss += f * f;
      bad += isfinite(f) ? 0.f : 1.f;
    }
  }
  ss = detail::block_sum(ss);
  bad = detail::block_sum(bad);
  if (threadIdx.x == 0) {
    partial[2 * blockIdx.x] = ss;
    partial[2 * blockIdx.x + 1] = bad;
  }
}

__global__ void grad_stats_final_kernel(float* __restrict__ acc, const float* __restrict__ partial, int blocks) {
  float ss = 0.f, bad = 0.f;
  for (int b = threadIdx.x; b < blocks; b += blockDim.x) {
    ss += partial[2 * b];
    bad += partial[2 * b + 1];
  }
  ss = detail::block_sum(ss);
  bad = detail::block_sum(bad);
  if (threadIdx.x == 0) {
    acc[0] += ss;
    acc[1] += bad;
  }
}

}  // namespace

int64_t grad_stats_scratch_floats() { return 2 * k_blocks; }

template <typename T>
void grad_stats_accumulate_launch(float* acc, float* scratch, const T* x, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  // Alignment only: the kernel's tail loop covers n % VEC.
  if (detail::can_vectorize<T>(0, {x})) {
    grad_stats_partial_kernel<T, detail::vec_width<T>><<<k_blocks, k_threads, 0, stream>>>(scratch, x, n);
  } else {
    grad_stats_partial_kernel<T, 1><<<k_blocks, k_threads, 0, stream>>>(scratch, x, n);
  }
  FERRY_CUDA_LAUNCH_CHECK();
  grad_stats_final_kernel<<<1, 512, 0, stream>>>(acc, scratch, k_blocks);
  FERRY_CUDA_LAUNCH_CHECK();
}

template void grad_stats_accumulate_launch<float>(float*, float*, const float*, int64_t, cudaStream_t);
template void grad_stats_accumulate_launch<__half>(float*, float*, const __half*, int64_t, cudaStream_t);
template void grad_stats_accumulate_launch<__nv_bfloat16>(float*, float*, const __nv_bfloat16*, int64_t,
                                                          cudaStream_t);

}  // namespace ferry::gpu
