#pragma once
// Rotary embedding, HF rotate_half convention, in place: with x1 = x[..., :d/2], x2 = x[..., d/2:],
//   forward: y1 = x1*cos1 - x2*sin1, y2 = x2*cos2 + x1*sin2
//   inverse (the transpose, i.e. the backward): y1 = x1*cos1 + x2*sin2, y2 = x2*cos2 - x1*sin1
// computed in fp32 with fp32 cos/sin.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace ferry::gpu {

// x (b, t, h, d) with element strides (stride_b, stride_t, stride_h, 1); cos, sin (t, d) fp32
// row-major; d even.
template <typename T>
void rope_launch(T* x, const float* cos, const float* sin, int64_t b, int64_t t, int64_t h, int64_t d,
                 int64_t stride_b, int64_t stride_t, int64_t stride_h, bool inverse, cudaStream_t stream);

}  // namespace ferry::gpu
