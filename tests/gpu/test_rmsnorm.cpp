// Fused RMSNorm forward/backward against the HF composition in ATen and its float64 autograd.
#include <tuple>

#include "tests/gpu/gpu_test_util.h"

namespace {

using namespace ferry::gpu::testing;

at::Tensor hf_rmsnorm(const at::Tensor& x, const at::Tensor& w, double eps) {
  const at::Tensor xf = x.to(at::kFloat);
  return w * (xf * at::rsqrt(xf.pow(2).mean(-1, true) + eps)).to(x.scalar_type());
}
at::Tensor ref_rmsnorm(const at::Tensor& x, const at::Tensor& w, double eps) {
  return w * (x * at::rsqrt(x.pow(2).mean(-1, true) + eps));
}

class rmsnorm_test : public ::testing::TestWithParam<std::tuple<at::ScalarType, int64_t, int64_t>> {};

TEST_P(rmsnorm_test, forward_backward_match_reference) {
  FERRY_REQUIRE_DEVICE();
  const auto [dt, n, h] = GetParam();
  const double eps = 1e-5;
  at::manual_seed(n * 131 + h);
  const at::Tensor x = at::randn({n, h}, cuda(dt)), w = (1 + 0.1 * at::randn({h}, cuda(at::kFloat))).to(dt);
  const at::Tensor dy = at::randn({n, h}, cuda(dt));

  at::Tensor rstd;
  const at::Tensor y = ferry::gpu::rmsnorm_forward(x, w, eps, &rstd);
  at::Tensor x64 = x.to(at::kDouble).requires_grad_(true), w64 = w.to(at::kDouble).requires_grad_(true);
  const at::Tensor y64 = ref_rmsnorm(x64, w64, eps);
  y64.backward(dy.to(at::kDouble));
  at::Tensor xa = x.detach().requires_grad_(true), wa = w.detach().requires_grad_(true);
  const at::Tensor ya = hf_rmsnorm(xa, wa, eps);
  ya.backward(dy);

  expect_close(y, ya.detach(), y64.detach(), dt, "y");
  const at::Tensor rstd64 = at::rsqrt(x.to(at::kDouble).pow(2).mean(-1) + eps);
  EXPECT_LE(rel_err(rstd, rstd64), 1e-6);

  at::Tensor dx, dw;
  ferry::gpu::rmsnorm_backward(dy, x, w, rstd, dx, dw, false);
  expect_close(dx, xa.grad(), x64.grad(), dt, "dx");
  expect_close(dw, wa.grad(), w64.grad(), dt, "dw");

  // accumulate adds onto dw; dx is overwritten.
  const at::Tensor dw_before = dw.clone();
  ferry::gpu::rmsnorm_backward(dy, x, w, rstd, dx, dw, true);
  expect_close(dw, at::Tensor(), (dw_before.to(at::kDouble) + w64.grad()), dt, "dw accumulated", 1.0);
}

INSTANTIATE_TEST_SUITE_P(gpu, rmsnorm_test,
                         ::testing::Combine(::testing::ValuesIn(k_dtypes),
                                            ::testing::Values<int64_t>(1, 7, 300),
                                            ::testing::Values<int64_t>(8, 33, 2048, 13001)));

}  // namespace
