#pragma once
// Rotary position embedding, HF convention (LlamaRotaryEmbedding, rope_type "default", and
// rotate_half): inv_freq[i] = 1 / theta^(2i/D) and angles pos * inv_freq in fp32;
// cos/sin rows are cat(freqs, freqs).cos()/.sin(). Scaled RoPE variants are rejected when
// config.json is parsed (src/io/hf_config.cpp), so llama_config carries none.
#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include "src/model/llama_config.h"

namespace ferry::model {

struct rope_cache {
  at::Tensor cos, sin;   // (max_pos, head_dim) fp32
};

rope_cache make_rope(const llama_config& cfg, int64_t max_pos, at::Device device);

// In place on x (B, T, H, D) (any strides, last dim contiguous): x = x*cos + rotate_half(x)*sin,
// computed in fp32 and rounded once. cos, sin (T, D) fp32 for x's positions. inverse applies the
// transposed rotation (sin negated), which is the backward of the forward rotation.
void rope_apply_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool inverse);
void rope_apply_aten_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool inverse);

}  // namespace ferry::model
