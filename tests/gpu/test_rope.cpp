// RoPE (HF rotate_half convention) against the ATen composition, its float64 autograd (for the
// inverse rotation), on contiguous tensors and on strided views of a fused qkv projection.
#include <tuple>

#include "tests/gpu/gpu_test_util.h"

namespace {

using namespace ferry::gpu::testing;

at::Tensor rotate_half(const at::Tensor& x) {
  const int64_t d = x.size(-1);
  return at::cat({-x.narrow(-1, d / 2, d / 2), x.narrow(-1, 0, d / 2)}, -1);
}

// HF LlamaRotaryEmbedding: fp32 angles, emb = cat(freqs, freqs). (t, d) each.
std::pair<at::Tensor, at::Tensor> cos_sin(int64_t t, int64_t d) {
  const at::Tensor inv_freq =
      1.0 / at::pow(10000.0, at::arange(0, d, 2, cuda(at::kFloat)) / static_cast<double>(d));
  const at::Tensor freqs = at::outer(at::arange(t, cuda(at::kFloat)), inv_freq);
  const at::Tensor emb = at::cat({freqs, freqs}, -1);
  return {emb.cos().contiguous(), emb.sin().contiguous()};
}

class rope_test : public ::testing::TestWithParam<std::tuple<at::ScalarType, int64_t, bool>> {};

TEST_P(rope_test, forward_and_inverse_match_reference) {
  FERRY_REQUIRE_DEVICE();
  const auto [dt, d, strided] = GetParam();
  const int64_t b = 2, t = 37, h = 3;
  at::manual_seed(d);
  at::Tensor storage, x;
  if (strided) {  // q as a slice of a (b, t, (h + 2) * d) fused projection
    storage = at::randn({b, t, (h + 2) * d}, cuda(dt));
    x = storage.narrow(2, d, h * d).view({b, t, h, d});
  } else {
    x = at::randn({b, t, h, d}, cuda(dt));
  }
  const auto [cos, sin] = cos_sin(t, d);
  const at::Tensor c4 = cos.view({1, t, 1, d}), s4 = sin.view({1, t, 1, d});
  const at::Tensor x0 = x.clone();
  const at::Tensor storage_before = strided ? storage.clone() : at::Tensor();

  at::Tensor x64 = x0.to(at::kDouble).requires_grad_(true);
  const at::Tensor y64 = x64 * c4.to(at::kDouble) + rotate_half(x64) * s4.to(at::kDouble);
  const at::Tensor ya = x0 * c4.to(dt) + rotate_half(x0) * s4.to(dt);  // HF casts cos/sin to the dtype
  ferry::gpu::rope_apply_(x, cos, sin, false);
  expect_close(x, ya, y64.detach(), dt, "rope forward");
  if (strided) {  // nothing outside the view was touched
    EXPECT_TRUE(at::equal(storage.narrow(2, 0, d), storage_before.narrow(2, 0, d)));
    EXPECT_TRUE(at::equal(storage.narrow(2, (h + 1) * d, d), storage_before.narrow(2, (h + 1) * d, d)));
  }

  const at::Tensor dy = at::randn({b, t, h, d}, cuda(dt));
  y64.backward(dy.to(at::kDouble));
  at::Tensor g = dy.clone();
  ferry::gpu::rope_apply_(g, cos, sin, true);
  expect_close(g, at::Tensor(), x64.grad(), dt, "rope inverse (backward)");
}

TEST(rope, inverse_undoes_forward_fp32) {
  FERRY_REQUIRE_DEVICE();
  at::Tensor x = at::randn({1, 9, 2, 64}, cuda(at::kFloat));
  const at::Tensor x0 = x.clone();
  const auto [cos, sin] = cos_sin(9, 64);
  ferry::gpu::rope_apply_(x, cos, sin, false);
  ferry::gpu::rope_apply_(x, cos, sin, true);
  EXPECT_LE(rel_err(x, x0), 1e-6);
}

INSTANTIATE_TEST_SUITE_P(gpu, rope_test,
                         ::testing::Combine(::testing::ValuesIn(k_dtypes), ::testing::Values<int64_t>(2, 6, 64, 100, 128),
                                            ::testing::Bool()));

}  // namespace
