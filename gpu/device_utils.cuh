#pragma once
// Device helpers shared by ferry's kernels (included by .cu files only): dtype conversion with
// fp32 math, vector loads, and block-wide reductions. Framework-free (STYLE.md rule 2).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <initializer_list>

namespace ferry::gpu::detail {

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

// Round-to-nearest-even from fp32, as PyTorch's casts do.
template <typename T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// N consecutive elements moved with one (up to 16-byte) load or store.
template <typename T, int N>
struct alignas(sizeof(T) * N) vec_t {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ vec_t<T, N> load_vec(const T* p) {
  return *reinterpret_cast<const vec_t<T, N>*>(p);
}
template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const vec_t<T, N>& v) {
  *reinterpret_cast<vec_t<T, N>*>(p) = v;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide sum / max, returned to every thread. blockDim.x must be a multiple of 32 (<= 1024).
// Deterministic: the combination order depends only on blockDim. Safe to call repeatedly.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float shared[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  return warp_sum(lane < n_warps ? shared[lane] : 0.f);
}
__device__ __forceinline__ float block_max(float v) {
  __shared__ float shared[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  return warp_max(lane < n_warps ? shared[lane] : -INFINITY);
}

// Elements of T in one 16-byte vector.
template <typename T>
constexpr int vec_width = 16 / static_cast<int>(sizeof(T));

// True when 16-byte vectors tile n elements and every pointer is 16-byte aligned; launchers then
// pick the vec_width<T> kernel, else the scalar one (views at odd offsets, odd sizes).
template <typename T>
inline bool can_vectorize(int64_t n, std::initializer_list<const void*> ptrs) {
  bool ok = n % vec_width<T> == 0;
  for (const void* p : ptrs) ok = ok && reinterpret_cast<uintptr_t>(p) % 16 == 0;
  return ok;
}

}  // namespace ferry::gpu::detail
