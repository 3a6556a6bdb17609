#pragma once
// dtype dispatch for the tensor wrappers (gpu/ops.cpp, gpu/attention.cpp): maps an ATen scalar
// type to the CUDA element type the kernels are instantiated for (same bit layout).
#include <ATen/core/Tensor.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "src/common/error.h"

namespace ferry::gpu::detail {

template <typename T>
struct type_tag {
  using type = T;
};

// Calls f(type_tag<T>{}) with T in {float, __half, __nv_bfloat16}; throws for other dtypes.
template <typename F>
void dispatch_float(at::ScalarType st, const char* what, F&& f) {
  switch (st) {
    case at::kFloat: f(type_tag<float>{}); break;
    case at::kHalf: f(type_tag<__half>{}); break;
    case at::kBFloat16: f(type_tag<__nv_bfloat16>{}); break;
    default:
      throw ::ferry::error(::ferry::detail::str_cat(what, ": dtype ", c10::toString(st),
                                                    " is not supported; use float32, float16 or bfloat16"));
  }
}

template <typename T>
T* ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

}  // namespace ferry::gpu::detail
