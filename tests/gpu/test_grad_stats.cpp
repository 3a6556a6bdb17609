// Gradient sum of squares and non-finite count against float64 ATen, with planted inf/NaN,
// misaligned views and lengths that are not multiples of the vector width.
#include <tuple>

#include "tests/gpu/gpu_test_util.h"

namespace {

using namespace ferry::gpu::testing;

class grad_stats_test : public ::testing::TestWithParam<std::tuple<at::ScalarType, int64_t, int64_t>> {};

TEST_P(grad_stats_test, finite_buffer_matches_reference) {
  FERRY_REQUIRE_DEVICE();
  const auto [dt, n, offset] = GetParam();
  at::manual_seed(n + offset);
  const at::Tensor storage = at::randn({n + offset}, cuda(dt));
  const at::Tensor flat = storage.narrow(0, offset, n);
  at::Tensor acc = at::tensor({0.25f, 2.0f}).to(at::kCUDA);
  ferry::gpu::grad_stats_accumulate(flat, acc);
  const double expected = 0.25 + flat.to(at::kDouble).square().sum().item<double>();
  EXPECT_NEAR(acc[0].item<double>(), expected, 1e-5 * expected) << dtype_name(dt);
  EXPECT_EQ(acc[1].item<float>(), 2.0f);
  // Deterministic: the same input gives the same bits.
  at::Tensor acc2 = at::tensor({0.25f, 2.0f}).to(at::kCUDA);
  ferry::gpu::grad_stats_accumulate(flat, acc2);
  EXPECT_TRUE(at::equal(acc, acc2));
}

TEST_P(grad_stats_test, planted_non_finite_values_are_counted) {
  FERRY_REQUIRE_DEVICE();
  const auto [dt, n, offset] = GetParam();
  at::Tensor flat = at::randn({n}, cuda(dt));
  flat[n - 1] = INFINITY;
  if (n > 1) flat[n / 2] = NAN;
  if (n > 2) flat[0] = -INFINITY;
  at::Tensor acc = at::zeros({2}, cuda(at::kFloat));
  ferry::gpu::grad_stats_accumulate(flat, acc);
  EXPECT_EQ(acc[1].item<float>(), static_cast<float>(std::min<int64_t>(n, 3)));
  EXPECT_FALSE(std::isfinite(acc[0].item<float>()));
}

INSTANTIATE_TEST_SUITE_P(gpu, grad_stats_test,
                         ::testing::Combine(::testing::ValuesIn(k_dtypes),
                                            ::testing::Values<int64_t>(1, 7, 1000, (1 << 20) + 3),
                                            ::testing::Values<int64_t>(0, 1)));

}  // namespace
