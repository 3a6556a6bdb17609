// Chunked cross-entropy (online softmax) against at::cross_entropy_loss in float64 and in fp32 on
// the same logits, including ignored (-100) labels, dlogits aliasing logits, and loss-only calls.
#include <tuple>

#include "tests/gpu/gpu_test_util.h"

namespace {

using namespace ferry::gpu::testing;

class cross_entropy_test : public ::testing::TestWithParam<std::tuple<at::ScalarType, int64_t, int64_t>> {};

TEST_P(cross_entropy_test, loss_and_grad_match_reference) {
  FERRY_REQUIRE_DEVICE();
  const auto [dt, n, v] = GetParam();
  at::manual_seed(n + v);
  const at::Tensor logits = (3 * at::randn({n, v}, cuda(at::kFloat))).to(dt);
  at::Tensor labels = at::randint(0, v, {n}, cuda(at::kLong));
  if (n > 2) labels.index_put_({at::arange(0, n, 3, cuda(at::kLong))}, -100);
  const int64_t counted = (labels != -100).sum().item<int64_t>();
  const double grad_scale = 1.0 / static_cast<double>(std::max<int64_t>(counted, 1));

  at::Tensor l64 = logits.to(at::kDouble).requires_grad_(true);
  const at::Tensor loss64 = at::cross_entropy_loss(l64, labels, {}, at::Reduction::Sum, -100);
  (loss64 * grad_scale).backward();
  at::Tensor l32 = logits.to(at::kFloat).requires_grad_(true);  // ATen's usual path: fp32 logits
  const at::Tensor loss32 = at::cross_entropy_loss(l32, labels, {}, at::Reduction::Sum, -100);
  (loss32 * grad_scale).backward();

  at::Tensor loss_sum = at::full({1}, 1.5, cuda(at::kFloat));
  at::Tensor dlogits;
  ferry::gpu::cross_entropy_forward_backward(logits, labels, grad_scale, loss_sum, &dlogits);
  const double expected = 1.5 + loss64.item<double>();
  EXPECT_NEAR(loss_sum.item<double>(), expected, 1e-5 * std::abs(expected) + 1e-5) << dtype_name(dt);
  // The fp32 reference sees the same (already rounded) logits, so fp32 tolerances apply to the loss
  // for every dtype; the gradient is rounded to the logits' dtype.
  expect_close(dlogits, l32.grad().to(dt), l64.grad(), dt, "dlogits");
  EXPECT_TRUE(at::all(dlogits.index({labels == -100}) == 0).item<bool>());

  at::Tensor in_place = logits.clone();
  at::Tensor loss2 = at::zeros({1}, cuda(at::kFloat));
  ferry::gpu::cross_entropy_forward_backward(in_place, labels, grad_scale, loss2, &in_place);
  EXPECT_TRUE(at::equal(in_place, dlogits));
  EXPECT_EQ(loss2.item<float>() + 1.5f, loss_sum.item<float>());

  at::Tensor loss3 = at::zeros({1}, cuda(at::kFloat));
  ferry::gpu::cross_entropy_forward_backward(logits, labels, grad_scale, loss3, nullptr);
  EXPECT_EQ(loss3.item<float>(), loss2.item<float>());
}

TEST(cross_entropy, out_of_range_label_gives_nan_loss) {
  FERRY_REQUIRE_DEVICE();
  const at::Tensor logits = at::randn({2, 10}, cuda(at::kFloat));
  const at::Tensor labels = at::tensor({3, 10}, at::TensorOptions().dtype(at::kLong)).to(at::kCUDA);
  at::Tensor loss = at::zeros({1}, cuda(at::kFloat));
  ferry::gpu::cross_entropy_forward_backward(logits, labels, 1.0, loss, nullptr);
  EXPECT_TRUE(std::isnan(loss.item<float>()));
}

INSTANTIATE_TEST_SUITE_P(gpu, cross_entropy_test,
                         ::testing::Combine(::testing::ValuesIn(k_dtypes), ::testing::Values<int64_t>(1, 13, 64),
                                            ::testing::Values<int64_t>(7, 1001, 32000)));

}  // namespace
