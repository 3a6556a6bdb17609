// cpu_optim::adamw against torch::optim::AdamW (libtorch, CPU) over ten steps with weight decay,
// on every compiled target, fp32 and bf16 gradients (torch gets the same decoded fp32 values).
#include <gtest/gtest.h>
#include <torch/optim/adamw.h>

#include <cmath>

#include "tests/cpu_optim/test_util.h"

namespace ferry::cpu_optim::test {
namespace {

using torch_adamw_target = target_test;

TEST_P(torch_adamw_target, ten_steps_match_torch_optim_adamw) {
  const uint32_t seed = draw_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  const size_t n = 100003;
  const adamw_hparams h{3e-3f, 0.9f, 0.95f, 1e-8f, 0.1f};
  for (dtype gt : {dtype::dtype_f32, dtype::dtype_bf16}) {
    SCOPED_TRACE(std::string("grad ") + dtype_name(gt));
    state s{normal(rng, n, 0.5f), std::vector<float>(n), std::vector<float>(n), std::vector<uint16_t>(n)};
    at::Tensor p = torch::from_blob(s.p.data(), {int64_t(n)}, at::kFloat).clone().requires_grad_(true);
    torch::optim::AdamW ref({p}, torch::optim::AdamWOptions(h.lr)
                                     .betas({h.beta1, h.beta2})
                                     .eps(h.eps)
                                     .weight_decay(h.weight_decay));
    adamw opt(2);
    for (int64_t step = 1; step <= 10; ++step) {
      const float mult = 1.0f / 256;
      std::vector<float> decoded;
      const auto grad = encode(normal(rng, n, 256.0f), gt, &decoded);
      opt.step(make_chunk(s, grad, gt, dtype::dtype_bf16, true), h, step, mult);
      p.mutable_grad() = torch::from_blob(decoded.data(), {int64_t(n)}, at::kFloat).mul(mult);
      ref.step();
      auto& st = static_cast<torch::optim::AdamWParamState&>(*ref.state().at(p.unsafeGetTensorImpl()));
      const float* tp = p.data_ptr<float>();
      const float* tm = st.exp_avg().data_ptr<float>();
      const float* tv = st.exp_avg_sq().data_ptr<float>();
      size_t bad = 0;
      for (size_t i = 0; i < n; ++i) {
        const bool ok = std::fabs(s.p[i] - tp[i]) <= 1e-6f * std::fabs(tp[i]) + 1e-5f * h.lr &&
                        std::fabs(s.m[i] - tm[i]) <= 1e-5f * std::fabs(tm[i]) + 1e-6f &&
                        std::fabs(s.v[i] - tv[i]) <= 1e-5f * tv[i] + 1e-7f;
        if (!ok && bad++ < 3) {
          ADD_FAILURE() << "step " << step << " i " << i << " p " << s.p[i] << " vs " << tp[i] << " m "
                        << s.m[i] << " vs " << tm[i] << " v " << s.v[i] << " vs " << tv[i];
        }
      }
      ASSERT_EQ(bad, 0u);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(targets, torch_adamw_target, ::testing::ValuesIn(targets()));

}  // namespace
}  // namespace ferry::cpu_optim::test
