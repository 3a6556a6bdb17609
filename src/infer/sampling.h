#pragma once
// Choosing the next token from the last position's logits: greedy (temperature 0) or sampling
// with temperature, top-k and top-p (nucleus), as HF transformers' generate applies them
// (temperature, then top-k, then top-p over the survivors, keeping at least one token).
//
// The random numbers come from a host std::mt19937_64 seeded by the run's seed, one uniform per
// row and step, and the draw is an inverse-CDF lookup on the device: the same seed gives the same
// tokens on every backend and batch layout, and only B numbers cross PCIe per step.
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <random>

namespace ferry::infer {

struct sampling_options {
  double temperature = 0.0;  // 0: greedy (argmax)
  int64_t top_k = 0;         // 0: off
  double top_p = 1.0;        // 1: off
  uint64_t seed = 1234;
};

class sampler {
 public:
  explicit sampler(const sampling_options& opt);
  bool greedy() const { return opt_.temperature <= 0; }
  // logits (B, V) fp32 on any device. Returns (B) int64 token ids on the same device.
  at::Tensor next(const at::Tensor& logits);

 private:
  sampling_options opt_;
  std::mt19937_64 rng_;
};

}  // namespace ferry::infer
