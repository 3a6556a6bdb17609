// Causal GQA attention forward/backward against a float64 math reference, for the fused paths
// (head_dim 64, 100 (padded to 104), 128; cuDNN's and flash attention in fp16/bf16) and ferry's
// large-head path (1024), GQA ratios 1 and 4.
// The same-dtype comparator is ATen's math SDPA backend.
#include <ATen/cuda/CUDAContext.h>

#include <cmath>
#include <string>
#include <tuple>

#include "tests/gpu/gpu_test_util.h"

namespace {

using namespace ferry::gpu::testing;

struct ref_out {
  at::Tensor out, lse;
};

// q (b, hq, t, d), k/v (b, hkv, t, d) requiring grad; float64 math with HF's repeat_kv.
ref_out reference(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  const int64_t g = q.size(1) / k.size(1), t = q.size(2);
  const at::Tensor ke = k.repeat_interleave(g, 1), ve = v.repeat_interleave(g, 1);
  const at::Tensor mask = at::ones({t, t}, q.options().dtype(at::kBool)).triu(1);
  const at::Tensor s = at::matmul(q, ke.transpose(-1, -2)).mul(scale).masked_fill(mask, -INFINITY);
  return {at::matmul(at::softmax(s, -1), ve), at::logsumexp(s, -1)};
}

class attention_test : public ::testing::TestWithParam<std::tuple<at::ScalarType, int64_t, int64_t, int64_t>> {};

TEST_P(attention_test, forward_backward_match_float64) {
  FERRY_REQUIRE_DEVICE();
  const auto [dt, d, ratio, t] = GetParam();
  const int64_t b = 2, hkv = 2, hq = hkv * ratio;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  at::manual_seed(d * 10 + ratio + t);
  const at::Tensor q = at::randn({b, hq, t, d}, cuda(dt)), k = at::randn({b, hkv, t, d}, cuda(dt)),
                   v = at::randn({b, hkv, t, d}, cuda(dt)), dout = at::randn({b, hq, t, d}, cuda(dt));

  at::Tensor q64 = q.to(at::kDouble).requires_grad_(true), k64 = k.to(at::kDouble).requires_grad_(true),
             v64 = v.to(at::kDouble).requires_grad_(true);
  const ref_out r = reference(q64, k64, v64, scale);
  r.out.backward(dout.to(at::kDouble));

  at::Tensor qa = q.detach().requires_grad_(true), ka = k.detach().requires_grad_(true),
             va = v.detach().requires_grad_(true);
  const at::Tensor outa =
      std::get<0>(at::_scaled_dot_product_attention_math(qa, ka, va, {}, 0.0, true, {}, scale, ratio > 1));
  outa.backward(dout);

  // Each fused kernel where it applies: cuDNN's (fp16/bf16, head_dim a multiple of 8 up to 128, on
  // sm 9.x) and flash attention; then cuDNN's forward with flash attention's backward, which a
  // cuDNN error mid-step would take (gpu/attention.cpp).
  const bool half = dt != at::kFloat;
  const bool cudnn_shape =
      half && d % 8 == 0 && d <= 128 && at::cuda::getDeviceProperties(q.device().index())->major == 9;
  // The setting is the process's: put back at the end, also when an assertion below returns early.
  struct restore_cudnn {
    bool was = ferry::gpu::set_attention_cudnn(true);
    ~restore_cudnn() { ferry::gpu::set_attention_cudnn(was); }
  } restore;
  EXPECT_EQ(ferry::gpu::attention_uses_cudnn(q), cudnn_shape) << dtype_name(dt) << " head_dim " << d;
  for (int kernel = 0; kernel < (cudnn_shape ? 3 : 1); ++kernel) {
    const std::string what = kernel == 0 ? "default" : kernel == 1 ? "flash" : "cudnn forward, flash backward";
    ferry::gpu::set_attention_cudnn(kernel != 1);
    auto [out, lse] = ferry::gpu::attention_forward(q, k, v, scale);
    ASSERT_EQ(out.scalar_type(), dt);
    ASSERT_EQ(lse.scalar_type(), at::kFloat);
    ASSERT_EQ(lse.sizes(), (at::IntArrayRef{b, hq, t})) << what;
    expect_close(out, outa.detach(), r.out.detach(), dt, ("out, " + what).c_str(), 3.0);
    EXPECT_LE(rel_err(lse, r.lse.detach()), dt == at::kFloat ? 1e-5 : 4e-3) << dtype_name(dt) << ", " << what;

    if (kernel == 2) ferry::gpu::set_attention_cudnn(false);
    auto [dq, dk, dv] = ferry::gpu::attention_backward(dout, q, k, v, out, lse, scale);
    expect_close(dq, qa.grad(), q64.grad(), dt, ("dq, " + what).c_str(), 3.0);
    expect_close(dk, ka.grad(), k64.grad(), dt, ("dk, " + what).c_str(), 3.0);
    expect_close(dv, va.grad(), v64.grad(), dt, ("dv, " + what).c_str(), 3.0);
  }
  ferry::gpu::set_attention_cudnn(true);
  // No cuDNN call failed (a failure switches the process to flash attention for good).
  EXPECT_EQ(ferry::gpu::attention_uses_cudnn(q), cudnn_shape) << dtype_name(dt) << " head_dim " << d;
}

// Inference: the last tq queries against all t keys equal the last tq rows of the full causal
// attention, with k and v read in place from a prefix of a longer cache (batch strides of tmax).
TEST_P(attention_test, offset_queries_match_last_rows) {
  FERRY_REQUIRE_DEVICE();
  const auto [dt, d, ratio, t] = GetParam();
  const int64_t b = 2, hkv = 2, hq = hkv * ratio, tmax = t + 5;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  at::manual_seed(d * 10 + ratio + t + 1);
  const at::Tensor q = at::randn({b, hq, t, d}, cuda(dt));
  const at::Tensor kc = at::randn({b, hkv, tmax, d}, cuda(dt)), vc = at::randn({b, hkv, tmax, d}, cuda(dt));
  const at::Tensor k = kc.narrow(2, 0, t), v = vc.narrow(2, 0, t);
  const ref_out r = reference(q.to(at::kDouble), k.to(at::kDouble), v.to(at::kDouble), scale);
  const at::Tensor outa = std::get<0>(
      at::_scaled_dot_product_attention_math(q, k.contiguous(), v.contiguous(), {}, 0.0, true, {}, scale, ratio > 1));
  for (int64_t tq : {int64_t(1), int64_t(5), t}) {
    const at::Tensor out = ferry::gpu::attention_forward_offset(q.narrow(2, t - tq, tq).contiguous(), k, v, scale);
    ASSERT_EQ(out.scalar_type(), dt);
    const std::string what = "offset out, " + std::to_string(tq) + " queries";
    expect_close(out, outa.narrow(2, t - tq, tq), r.out.narrow(2, t - tq, tq), dt, what.c_str(), 3.0);
  }
}

// Sequence lengths: odd (scalar kernels on the large-head path) and a multiple of 8 (vector kernels).
INSTANTIATE_TEST_SUITE_P(gpu, attention_test,
                         ::testing::Combine(::testing::ValuesIn(k_dtypes),
                                            ::testing::Values<int64_t>(64, 100, 128, 1024),
                                            ::testing::Values<int64_t>(1, 4), ::testing::Values<int64_t>(77, 256)));

}  // namespace
