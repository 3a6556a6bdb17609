#include "src/model/rope.h"

#include <ATen/ATen.h>

#include <cmath>

#include "src/common/error.h"
#include "src/model/ops_common.h"
#if FERRY_WITH_CUDA
#include "gpu/ops.h"
#endif

namespace ferry::model {

rope_cache make_rope(const llama_config& cfg, int64_t max_pos, at::Device device) {
  const int64_t D = cfg.head_dim;
  FERRY_CONFIG_CHECK(D > 0 && D % 2 == 0, "model '", cfg.name, "': head_dim ", D,
                     " must be even for rotary embeddings; fix head_dim in config.json");
  FERRY_CONFIG_CHECK(cfg.rope_theta > 0, "model '", cfg.name, "': rope_theta must be > 0");
  FERRY_CONFIG_CHECK(max_pos > 0, "rotary cache needs at least one position (got ", max_pos, ")");
  auto f32 = at::TensorOptions().dtype(at::kFloat);
  // Same fp32 operations as transformers: base ** (arange(0, D, 2).float() / D), then 1 / that.
  at::Tensor expo = at::arange(0, D, 2, at::TensorOptions().dtype(at::kLong)).to(at::kFloat) / static_cast<double>(D);
  at::Tensor inv_freq = 1.0 / at::pow(at::Scalar(cfg.rope_theta), expo);
  // Frequency scaling, transformers' modeling_rope_utils formulas with the same fp32 operations.
  if (cfg.rope_type == "linear") {
    inv_freq = inv_freq / cfg.rope_factor;
  } else if (cfg.rope_type == "llama3") {
    const double old_len = double(cfg.rope_original_max_positions);
    const double low_wavelen = old_len / cfg.rope_low_freq_factor, high_wavelen = old_len / cfg.rope_high_freq_factor;
    // (Python's scalar / tensor is reciprocal(tensor) * scalar.)
    at::Tensor wavelen = at::reciprocal(inv_freq) * (2 * M_PI);
    at::Tensor scaled = at::where(wavelen > low_wavelen, inv_freq / cfg.rope_factor, inv_freq);
    at::Tensor smooth =
        (at::reciprocal(wavelen) * old_len - cfg.rope_low_freq_factor) / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor);
    at::Tensor smoothed = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled;
    at::Tensor medium = (wavelen < high_wavelen).logical_not() & (wavelen > low_wavelen).logical_not();
    inv_freq = at::where(medium, smoothed, scaled);
  } else {
    FERRY_CONFIG_CHECK(cfg.rope_type == "default", "model '", cfg.name, "': rope_type \"", cfg.rope_type,
                       "\" is not one of default, linear, llama3");
  }
  at::Tensor pos = at::arange(max_pos, f32.dtype(at::kLong)).to(at::kFloat);
  at::Tensor freqs = pos.unsqueeze(1) * inv_freq.unsqueeze(0);    // (max_pos, D/2)
  at::Tensor emb = at::cat({freqs, freqs}, 1);                    // (max_pos, D)
  return rope_cache{emb.cos().to(device), emb.sin().to(device)};
}

void rope_apply_aten_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool inverse) {
  const int64_t T = x.size(1), D = x.size(3), half = D / 2;
  const auto acc = detail::acc_dtype(x);
  at::Tensor xf = x.to(acc);
  at::Tensor rot = at::cat({-xf.narrow(3, half, half), xf.narrow(3, 0, half)}, 3);
  at::Tensor c = cos.view({1, T, 1, D}).to(acc);
  at::Tensor s = sin.view({1, T, 1, D}).to(acc);
  x.copy_(inverse ? xf * c - rot * s : xf * c + rot * s);
}

void rope_apply_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool inverse) {
  FERRY_ASSERT(x.dim() == 4 && x.stride(3) == 1 && x.size(3) % 2 == 0, "rope: x must be (B,T,H,D), D even, contiguous");
  FERRY_ASSERT(cos.size(0) == x.size(1) && cos.size(1) == x.size(3) && sin.sizes() == cos.sizes(),
               "rope: cos/sin must be (T, D) for x's T positions");
#if FERRY_WITH_CUDA
  if (x.is_cuda()) {
    gpu::rope_apply_(x, cos, sin, inverse);
    return;
  }
#endif
  rope_apply_aten_(x, cos, sin, inverse);
}

}  // namespace ferry::model
