#pragma once
// The shape rule of cuDNN's fused attention, in one place for the code that runs it
// (gpu/attention.cpp, which also needs sm 9.x, cuDNN 9 and the causal full-key case) and for the
// memory planner, which runs without a GPU (src/model/block_bytes.cpp). Header-only, no CUDA.
#include <cstdint>

namespace ferry::gpu {

// The head sizes cuDNN's fused attention takes: a multiple of 8, at most 128.
constexpr bool cudnn_attention_head_dim(int64_t d) { return d % 8 == 0 && d <= 128; }

}  // namespace ferry::gpu
