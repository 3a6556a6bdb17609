#pragma once
// Gradient statistics of a flat buffer in one read: sum of squares (fp32) and the count of
// non-finite elements. Feeds global-norm clipping and fp16 overflow detection.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace ferry::gpu {

// Floats of scratch grad_stats_accumulate_launch needs.
int64_t grad_stats_scratch_floats();

// acc[0] += sum(x^2), acc[1] += count(!isfinite(x)). Non-finite elements also make acc[0] inf/NaN.
// Deterministic: a fixed grid and a fixed reduction order, independent of the device.
template <typename T>
void grad_stats_accumulate_launch(float* acc, float* scratch, const T* x, int64_t n, cudaStream_t stream);

}  // namespace ferry::gpu
