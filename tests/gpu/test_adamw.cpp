// Fused GPU AdamW against a float64 CPU loop of PyTorch's AdamW arithmetic, over several steps,
// for every gradient dtype and half output dtype; the half output is p rounded to nearest even.
#include <cmath>
#include <tuple>
#include <vector>

#include "tests/gpu/gpu_test_util.h"

namespace {

using namespace ferry::gpu::testing;

class adamw_test : public ::testing::TestWithParam<std::tuple<at::ScalarType, at::ScalarType>> {};

TEST_P(adamw_test, matches_double_loop) {
  FERRY_REQUIRE_DEVICE();
  const auto [grad_dt, out_dt] = GetParam();
  const int64_t n = 1003;
  const double lr = 1e-3, b1 = 0.9, b2 = 0.95, eps = 1e-8, wd = 0.1, mult = 0.5;
  at::manual_seed(3);
  at::Tensor p = at::randn({n}, cuda(at::kFloat)), m = at::zeros_like(p), v = at::zeros_like(p);
  at::Tensor half_out = at::empty({n}, cuda(out_dt));
  std::vector<double> pd(n), md(n, 0.0), vd(n, 0.0);
  const at::Tensor p0 = p.cpu();
  for (int64_t i = 0; i < n; ++i) pd[i] = p0[i].item<double>();

  for (int64_t step = 1; step <= 3; ++step) {
    const at::Tensor g = at::randn({n}, cuda(at::kFloat)).to(grad_dt);
    const at::Tensor gc = g.to(at::kDouble).cpu();
    const double* gp = gc.data_ptr<double>();
    const double bc1 = 1 - std::pow(b1, step), bc2 = 1 - std::pow(b2, step);
    for (int64_t i = 0; i < n; ++i) {
      const double gi = gp[i] * mult;
      pd[i] *= 1 - lr * wd;
      md[i] = b1 * md[i] + (1 - b1) * gi;
      vd[i] = b2 * vd[i] + (1 - b2) * gi * gi;
      pd[i] -= lr / bc1 * md[i] / (std::sqrt(vd[i]) / std::sqrt(bc2) + eps);
    }
    ferry::gpu::adamw_step(p, m, v, g, half_out, lr, b1, b2, eps, wd, step, mult);
  }
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  EXPECT_LE(rel_err(p, at::from_blob(pd.data(), {n}, opts)), 1e-6);
  EXPECT_LE(rel_err(m, at::from_blob(md.data(), {n}, opts)), 1e-6);
  EXPECT_LE(rel_err(v, at::from_blob(vd.data(), {n}, opts)), 1e-6);
  EXPECT_TRUE(at::equal(half_out, p.to(out_dt)));  // ATen's cast is round-to-nearest-even too
}

TEST(adamw, without_half_output) {
  FERRY_REQUIRE_DEVICE();
  at::Tensor p = at::ones({5}, cuda(at::kFloat)), m = at::zeros_like(p), v = at::zeros_like(p), none;
  ferry::gpu::adamw_step(p, m, v, at::ones({5}, cuda(at::kHalf)), none, 0.1, 0.9, 0.999, 1e-8, 0.0, 1, 1.0);
  // First step of Adam moves each weight by lr (m/sqrt(v) = 1 after bias correction).
  EXPECT_NEAR(p[0].item<float>(), 0.9f, 1e-6);
}

INSTANTIATE_TEST_SUITE_P(gpu, adamw_test,
                         ::testing::Combine(::testing::ValuesIn(k_dtypes), ::testing::Values(at::kHalf, at::kBFloat16)));

}  // namespace
