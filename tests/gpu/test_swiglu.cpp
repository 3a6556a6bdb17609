// Fused SwiGLU forward/backward against silu(gate) * up in ATen and its float64 autograd.
#include <tuple>

#include "tests/gpu/gpu_test_util.h"

namespace {

using namespace ferry::gpu::testing;

class swiglu_test : public ::testing::TestWithParam<std::tuple<at::ScalarType, int64_t, int64_t>> {};

at::Tensor compose(const at::Tensor& gu) {
  const int64_t i = gu.size(-1) / 2;
  return at::silu(gu.narrow(-1, 0, i)) * gu.narrow(-1, i, i);
}

TEST_P(swiglu_test, forward_backward_match_reference) {
  FERRY_REQUIRE_DEVICE();
  const auto [dt, n, i] = GetParam();
  at::manual_seed(n * 7 + i);
  const at::Tensor gu = 2 * at::randn({n, 2 * i}, cuda(dt)), dy = at::randn({n, i}, cuda(dt));
  at::Tensor gu64 = gu.to(at::kDouble).requires_grad_(true), gua = gu.detach().requires_grad_(true);
  const at::Tensor y64 = compose(gu64), ya = compose(gua);
  y64.backward(dy.to(at::kDouble));
  ya.backward(dy);

  expect_close(ferry::gpu::swiglu_forward(gu), ya.detach(), y64.detach(), dt, "y");
  at::Tensor dgu;
  ferry::gpu::swiglu_backward(dy, gu, dgu);
  expect_close(dgu, gua.grad(), gu64.grad(), dt, "d_gate_up");

  // In place: d_gate_up may alias gate_up.
  at::Tensor inplace = gu.clone();
  ferry::gpu::swiglu_backward(dy, inplace, inplace);
  EXPECT_TRUE(at::equal(inplace, dgu));
}

INSTANTIATE_TEST_SUITE_P(gpu, swiglu_test,
                         ::testing::Combine(::testing::ValuesIn(k_dtypes), ::testing::Values<int64_t>(1, 5, 130),
                                            ::testing::Values<int64_t>(1, 7, 100, 4096)));

}  // namespace
