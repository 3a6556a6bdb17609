// Causal softmax forward/backward kernels for the large-head attention path, then launchers.
// One block per score row; a row only reads its causal prefix.
#include "gpu/attention_softmax.cuh"

#include "gpu/cuda_check.h"
#include "gpu/device_utils.cuh"

namespace ferry::gpu {
namespace {

using detail::from_f32;
using detail::to_f32;

constexpr int k_threads = 256;

template <typename T, int VEC>
__global__ void softmax_forward_kernel(T* p, float* __restrict__ lse, const T* s, int64_t tq, int64_t t,
                                       int64_t q_offset, float scale) {
  const int64_t row = blockIdx.x;
  const int64_t pos = q_offset + row % tq;
  const int64_t len = pos < t ? pos + 1 : t;
  const T* sr = s + row * t;
  float m = -INFINITY, sum = 0.f;
  for (int64_t j = threadIdx.x * VEC; j < len; j += blockDim.x * VEC) {
    const auto sv = detail::load_vec<T, VEC>(sr + j);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      if (j + k >= len) break;
      const float x = scale * to_f32(sv.v[k]);
      if (x > m) {
        sum = sum * expf(m - x) + 1.f;
        m = x;
      } else {
        sum += expf(x - m);
      }
    }
  }
  const float row_max = detail::block_max(m);
  const float row_lse = row_max + logf(detail::block_sum(m == -INFINITY ? 0.f : sum * expf(m - row_max)));
  if (threadIdx.x == 0) lse[row] = row_lse;
  T* pr = p + row * t;
  for (int64_t j = threadIdx.x * VEC; j < t; j += blockDim.x * VEC) {
    detail::vec_t<T, VEC> out;
    if (j < len) {
      const auto sv = detail::load_vec<T, VEC>(sr + j);
#pragma unroll
      for (int k = 0; k < VEC; ++k)
        out.v[k] = from_f32<T>(j + k < len ? expf(scale * to_f32(sv.v[k]) - row_lse) : 0.f);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) out.v[k] = from_f32<T>(0.f);
    }
    detail::store_vec<T, VEC>(pr + j, out);
  }
}

template <typename T, int VEC>
__global__ void softmax_backward_kernel(T* p_out, T* ds_out, const T* s, const T* dp, const T* __restrict__ out,
                                        const T* __restrict__ dout, const float* __restrict__ lse, int64_t t,
                                        int64_t d, float scale) {
  const int64_t row = blockIdx.x;
  const int64_t len = row % t + 1;
  float delta = 0.f;
  for (int64_t c = threadIdx.x * VEC; c < d; c += blockDim.x * VEC) {
    const auto ov = detail::load_vec<T, VEC>(out + row * d + c);
    const auto dv = detail::load_vec<T, VEC>(dout + row * d + c);
#pragma unroll
    for (int k = 0; k < VEC; ++k) delta += to_f32(ov.v[k]) * to_f32(dv.v[k]);
  }
  delta = detail::block_sum(delta);
  const float row_lse = lse[row];
  const T* sr = s + row * t;
  const T* dpr = dp + row * t;
  for (int64_t j = threadIdx.x * VEC; j < t; j += blockDim.x * VEC) {
    detail::vec_t<T, VEC> pv, dsv;
    if (j < len) {
      const auto sv = detail::load_vec<T, VEC>(sr + j);
      const auto dv = detail::load_vec<T, VEC>(dpr + j);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float pf = j + k < len ? expf(scale * to_f32(sv.v[k]) - row_lse) : 0.f;
        pv.v[k] = from_f32<T>(pf);
        dsv.v[k] = from_f32<T>(scale * pf * (to_f32(dv.v[k]) - delta));
      }
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) pv.v[k] = dsv.v[k] = from_f32<T>(0.f);
    }
    detail::store_vec<T, VEC>(p_out + row * t + j, pv);
    detail::store_vec<T, VEC>(ds_out + row * t + j, dsv);
  }
}

}  // namespace

template <typename T>
void attention_softmax_forward_launch(T* p, float* lse, const T* s, int64_t rows, int64_t tq, int64_t tk,
                                      int64_t q_offset, float scale, cudaStream_t stream) {
  if (rows == 0) return;
  if (detail::can_vectorize<T>(tk, {p, s})) {
    softmax_forward_kernel<T, detail::vec_width<T>><<<rows, k_threads, 0, stream>>>(p, lse, s, tq, tk, q_offset, scale);
  } else {
    softmax_forward_kernel<T, 1><<<rows, k_threads, 0, stream>>>(p, lse, s, tq, tk, q_offset, scale);
  }
  FERRY_CUDA_LAUNCH_CHECK();
}

template <typename T>
void attention_softmax_backward_launch(T* p_out, T* ds_out, const T* s, const T* dp, const T* out, const T* dout,
                                       const float* lse, int64_t rows, int64_t t, int64_t d, float scale,
                                       cudaStream_t stream) {
  if (rows == 0) return;
  if (detail::can_vectorize<T>(t, {p_out, ds_out, s, dp}) && detail::can_vectorize<T>(d, {out, dout})) {
    softmax_backward_kernel<T, detail::vec_width<T>>
        <<<rows, k_threads, 0, stream>>>(p_out, ds_out, s, dp, out, dout, lse, t, d, scale);
  } else {
    softmax_backward_kernel<T, 1><<<rows, k_threads, 0, stream>>>(p_out, ds_out, s, dp, out, dout, lse, t, d, scale);
  }
  FERRY_CUDA_LAUNCH_CHECK();
}

#define FERRY_INSTANTIATE(T)                                                                                        \
  template void attention_softmax_forward_launch<T>(T*, float*, const T*, int64_t, int64_t, int64_t, int64_t, float, \
                                                    cudaStream_t);                                                 \
  template void attention_softmax_backward_launch<T>(T*, T*, const T*, const T*, const T*, const T*, const float*,   \
                                                     int64_t, int64_t, int64_t, float, cudaStream_t);
FERRY_INSTANTIATE(float)
FERRY_INSTANTIATE(__half)
FERRY_INSTANTIATE(__nv_bfloat16)
#undef FERRY_INSTANTIATE

}  // namespace ferry::gpu
