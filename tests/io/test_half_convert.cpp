// fp32 <-> fp16/bf16 conversions for checkpoints, bit for bit against c10 (PyTorch's own). Its
// own binary: the only io test that needs libtorch.
#include <gtest/gtest.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <random>

#include "src/io/half_convert.h"

namespace ferry::io {
namespace {

// Conversions agree bit for bit with c10 (PyTorch's own) on normal, subnormal, huge and tie cases.
TEST(half_convert, matches_c10) {
  std::mt19937 rng(9);
  std::vector<float> xs = {0.f, -0.f, 1.f, -2.5f, 65504.f, 65519.f, 65520.f, 1e10f, -1e10f, 6e-8f, 3e-8f, 2.98e-8f,
                           5.96e-8f, 6.1e-5f, 1e-40f, INFINITY, -INFINITY, 1.00048828125f, 1.00146484375f};
  std::uniform_int_distribution<uint32_t> bits;
  for (int i = 0; i < 200000; ++i) xs.push_back(f32_from_bits(bits(rng)));
  for (float x : xs) {
    if (std::isnan(x)) {
      EXPECT_TRUE(std::isnan(f16_to_f32(f32_to_f16(x))));
      EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(x))));
      continue;
    }
    ASSERT_EQ(f32_to_f16(x), c10::Half(x).x) << x;
    ASSERT_EQ(f32_to_bf16(x), c10::BFloat16(x).x) << x;
    uint16_t h = static_cast<uint16_t>(bits(rng));
    c10::Half ch(h, c10::Half::from_bits());
    float a = f16_to_f32(h), b = static_cast<float>(ch);
    if (!std::isnan(b)) {
      ASSERT_EQ(f32_bits(a), f32_bits(b)) << h;
    }
  }
}

TEST(half_convert, bulk_matches_scalar_on_unaligned_input) {
  std::vector<float> x(100003);
  std::mt19937 rng(3);
  std::normal_distribution<float> nd(0.f, 100.f);
  for (auto& v : x) v = nd(rng);
  for (const char* dt : {"F16", "BF16"}) {
    std::vector<uint8_t> raw(x.size() * 2 + 1);
    convert_from_f32(x.data(), x.size(), dt, raw.data() + 1);
    std::vector<float> back(x.size());
    convert_to_f32(raw.data() + 1, dt, x.size(), back.data());
    for (size_t i = 0; i < x.size(); ++i) {
      float want = std::string(dt) == "F16" ? f16_to_f32(f32_to_f16(x[i])) : bf16_to_f32(f32_to_bf16(x[i]));
      ASSERT_EQ(back[i], want) << dt << " " << i;
    }
  }
}

}  // namespace
}  // namespace ferry::io
