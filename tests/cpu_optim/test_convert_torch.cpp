// fp16/bf16 rounding identical to PyTorch's `.to()` (and to c10::Half / c10::BFloat16), on every
// compiled target: ties, subnormals, overflow, infinities, NaN (any NaN counts as equal).
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>

#include "tests/cpu_optim/test_util.h"

namespace ferry::cpu_optim::test {
namespace {

std::vector<float> values(size_t n) {
  std::vector<float> v = edge_values();
  std::mt19937 rng(fresh_seed());
  std::uniform_int_distribution<uint32_t> bits;
  // Random bit patterns cover every class; dense values near the fp16 subnormal range too.
  while (v.size() < n / 2) v.push_back(half::f32_from_bits(bits(rng)));
  std::uniform_real_distribution<float> small(-1e-4f, 1e-4f);
  while (v.size() < n) v.push_back(small(rng));
  return v;
}

bool same(uint16_t a, uint16_t b, dtype t) {
  auto wide = [t](uint16_t x) { return t == dtype::dtype_f16 ? half::f16_to_f32(x) : half::bf16_to_f32(x); };
  return a == b || (std::isnan(wide(a)) && std::isnan(wide(b)));
}

using torch_convert_target = target_test;

TEST_P(torch_convert_target, narrowing_matches_torch_to) {
  const std::vector<float> v = values(200003);
  const int64_t n = static_cast<int64_t>(v.size());
  const at::Tensor src = at::from_blob(const_cast<float*>(v.data()), {n}, at::kFloat);
  for (dtype t : {dtype::dtype_f16, dtype::dtype_bf16}) {
    const at::Tensor want = src.to(t == dtype::dtype_f16 ? at::kHalf : at::kBFloat16).contiguous();
    const auto* w = static_cast<const uint16_t*>(want.data_ptr());
    std::vector<uint16_t> got(v.size());
    convert(v.data(), dtype::dtype_f32, got.data(), t, v.size());
    for (size_t i = 0; i < v.size(); ++i) {
      ASSERT_TRUE(same(got[i], w[i], t)) << dtype_name(t) << " of " << v[i] << " (bits " << std::hex
                                         << half::f32_bits(v[i]) << "): ours " << got[i] << " torch " << w[i];
    }
  }
}

TEST_P(torch_convert_target, widening_matches_torch_to) {
  std::vector<uint16_t> all(65536);
  for (size_t i = 0; i < all.size(); ++i) all[i] = static_cast<uint16_t>(i);
  for (dtype t : {dtype::dtype_f16, dtype::dtype_bf16}) {
    const at::Tensor src = at::from_blob(all.data(), {65536}, t == dtype::dtype_f16 ? at::kHalf : at::kBFloat16);
    const at::Tensor want = src.to(at::kFloat).contiguous();
    std::vector<float> got(all.size());
    convert(all.data(), t, got.data(), dtype::dtype_f32, all.size());
    const float* w = want.data_ptr<float>();
    for (size_t i = 0; i < all.size(); ++i) {
      ASSERT_TRUE(std::memcmp(&got[i], &w[i], 4) == 0 || (std::isnan(got[i]) && std::isnan(w[i])))
          << dtype_name(t) << " " << std::hex << all[i];
    }
  }
}

INSTANTIATE_TEST_SUITE_P(targets, torch_convert_target, ::testing::ValuesIn(targets()));

TEST(half_scalar, matches_c10_constructors) {
  for (float f : values(100000)) {
    const c10::Half h(f);
    const c10::BFloat16 b(f);
    ASSERT_TRUE(same(half::f32_to_f16(f), h.x, dtype::dtype_f16)) << f;
    ASSERT_TRUE(same(half::f32_to_bf16(f), b.x, dtype::dtype_bf16)) << f;
  }
}

}  // namespace
}  // namespace ferry::cpu_optim::test
