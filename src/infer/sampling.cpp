#include "src/infer/sampling.h"

#include <ATen/ATen.h>

#include <limits>
#include <vector>

#include "src/common/error.h"

namespace ferry::infer {

sampler::sampler(const sampling_options& opt) : opt_(opt), rng_(opt.seed) {
  FERRY_CONFIG_CHECK(opt.temperature >= 0, "temperature must be >= 0 (0 = greedy), got ", opt.temperature);
  FERRY_CONFIG_CHECK(opt.top_k >= 0, "top_k must be >= 0 (0 = off), got ", opt.top_k);
  FERRY_CONFIG_CHECK(opt.top_p > 0 && opt.top_p <= 1, "top_p must be in (0, 1], got ", opt.top_p);
}

at::Tensor sampler::next(const at::Tensor& logits) {
  FERRY_ASSERT(logits.dim() == 2 && logits.scalar_type() == at::kFloat, "sampler: logits must be (B, V) fp32");
  if (greedy()) return logits.argmax(1);
  const int64_t B = logits.size(0), V = logits.size(1);
  auto [vals, idx] = (logits / opt_.temperature).sort(/*dim=*/1, /*descending=*/true);
  if (opt_.top_k > 0 && opt_.top_k < V) vals.narrow(1, opt_.top_k, V - opt_.top_k).fill_(-std::numeric_limits<float>::infinity());
  at::Tensor probs = at::softmax(vals, 1);
  if (opt_.top_p < 1.0) {
    // Drop a token when the tokens ranked above it already hold top_p of the mass; the first
    // always survives.
    at::Tensor before = probs.cumsum(1) - probs;
    probs.masked_fill_(before > opt_.top_p, 0.0);
  }
  at::Tensor cdf = probs.cumsum(1);
  std::uniform_real_distribution<double> uni(0.0, 1.0);
  std::vector<float> u(static_cast<size_t>(B));
  for (auto& x : u) x = static_cast<float>(uni(rng_));
  at::Tensor target = at::from_blob(u.data(), {B, 1}, at::kFloat).to(logits.device()) * cdf.narrow(1, V - 1, 1);
  at::Tensor pick = at::searchsorted(cdf, target, /*out_int32=*/false, /*right=*/true).clamp_max(V - 1);
  return idx.gather(1, pick).view({B});
}

}  // namespace ferry::infer
