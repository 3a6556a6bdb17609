// cpu_optim::convert and accumulate on every compiled target against the scalar integer conversions of half.h,
// bit for bit, on random bit patterns (every float class) and the hand-picked edge cases.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>

#include "tests/cpu_optim/test_util.h"

namespace ferry::cpu_optim::test {
namespace {

std::vector<float> test_values(std::mt19937& rng, size_t n) {
  std::vector<float> v = edge_values();
  std::uniform_int_distribution<uint32_t> bits;
  while (v.size() < n) v.push_back(half::f32_from_bits(bits(rng)));
  v.resize(n);
  return v;
}

bool same(uint16_t a, uint16_t b, dtype t) {
  const float fa = t == dtype::dtype_f16 ? half::f16_to_f32(a) : half::bf16_to_f32(a);
  return a == b || (std::isnan(fa) && std::isnan(t == dtype::dtype_f16 ? half::f16_to_f32(b) : half::bf16_to_f32(b)));
}

using convert_target = target_test;

TEST_P(convert_target, narrowing_matches_scalar_rne) {
  std::mt19937 rng(draw_seed());
  for (size_t n : {size_t(1), size_t(7), size_t(17), size_t(4096), size_t(1000003)}) {
    const std::vector<float> src = test_values(rng, n);
    for (dtype t : {dtype::dtype_f16, dtype::dtype_bf16}) {
      std::vector<uint16_t> out(n);
      convert(src.data(), dtype::dtype_f32, out.data(), t, n);
      for (size_t i = 0; i < n; ++i) {
        ASSERT_TRUE(same(out[i], to_half(src[i], t), t))
            << dtype_name(t) << " of " << src[i] << " (bits " << std::hex << half::f32_bits(src[i])
            << ") gave " << out[i] << " want " << to_half(src[i], t);
      }
    }
  }
}

TEST_P(convert_target, widening_is_exact_for_every_half_value) {
  std::vector<uint16_t> all(65536);
  for (size_t i = 0; i < all.size(); ++i) all[i] = static_cast<uint16_t>(i);
  for (dtype t : {dtype::dtype_f16, dtype::dtype_bf16}) {
    std::vector<float> wide(all.size());
    convert(all.data(), t, wide.data(), dtype::dtype_f32, all.size());
    std::vector<uint16_t> back(all.size());
    convert(wide.data(), dtype::dtype_f32, back.data(), t, all.size());
    for (size_t i = 0; i < all.size(); ++i) {
      const float want = t == dtype::dtype_f16 ? half::f16_to_f32(all[i]) : half::bf16_to_f32(all[i]);
      ASSERT_TRUE(std::memcmp(&wide[i], &want, 4) == 0 || (std::isnan(want) && std::isnan(wide[i])))
          << dtype_name(t) << " " << std::hex << all[i];
      if (!std::isnan(want)) {
        ASSERT_EQ(back[i], all[i]) << dtype_name(t) << " round trip";
      }
    }
  }
}

TEST_P(convert_target, same_type_copy_and_cross_half) {
  std::mt19937 rng(draw_seed());
  const size_t n = 100003;
  const std::vector<float> src = test_values(rng, n);
  std::vector<float> copy(n);
  convert(src.data(), dtype::dtype_f32, copy.data(), dtype::dtype_f32, n);
  EXPECT_EQ(std::memcmp(copy.data(), src.data(), n * 4), 0);
  std::vector<uint16_t> f16(n), bf16(n);
  convert(src.data(), dtype::dtype_f32, f16.data(), dtype::dtype_f16, n);
  convert(f16.data(), dtype::dtype_f16, bf16.data(), dtype::dtype_bf16, n);
  for (size_t i = 0; i < n; ++i) {
    ASSERT_TRUE(same(bf16[i], half::f32_to_bf16(half::f16_to_f32(f16[i])), dtype::dtype_bf16));
  }
}

// accumulate on every target: each micro-batch's gradient (f32, f16, bf16: random values of every
// class, lengths around the vector widths) added into an fp32 accumulator over three micro-batches
// against a double-precision loop that rounds once per add; the first overwrites.
TEST_P(convert_target, accumulate_matches_double_loop) {
  std::mt19937 rng(draw_seed());
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (size_t n : {size_t(1), size_t(15), size_t(17), size_t(33), size_t(16384 + 5), size_t(100003)}) {
    for (dtype t : {dtype::dtype_f32, dtype::dtype_f16, dtype::dtype_bf16}) {
      std::vector<float> acc(n, 12345.0f), want(n);
      for (int micro = 0; micro < 3; ++micro) {
        // grads of ordinary size plus, in the second micro-batch, every edge value
        std::vector<float> g(n);
        for (auto& x : g) x = normal(rng) * 1e-2f;
        if (micro == 1) {
          const std::vector<float> edges = edge_values();
          for (size_t i = 0; i < std::min(n, edges.size()); ++i) g[i] = edges[i];
        }
        std::vector<uint16_t> h(n);
        const void* src = g.data();
        if (t != dtype::dtype_f32) {
          for (size_t i = 0; i < n; ++i) h[i] = to_half(g[i], t);
          src = h.data();
        }
        accumulate(src, t, acc.data(), n, /*overwrite=*/micro == 0);
        for (size_t i = 0; i < n; ++i) {
          const double gi = t == dtype::dtype_f32 ? double(g[i])
                            : t == dtype::dtype_f16 ? double(half::f16_to_f32(h[i]))
                                                    : double(half::bf16_to_f32(h[i]));
          want[i] = micro == 0 ? float(gi) : float(double(want[i]) + gi);
        }
      }
      for (size_t i = 0; i < n; ++i) {
        ASSERT_TRUE(half::f32_bits(acc[i]) == half::f32_bits(want[i]) || (std::isnan(acc[i]) && std::isnan(want[i])))
            << dtype_name(t) << " n=" << n << " element " << i << ": " << acc[i] << " want " << want[i];
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(targets, convert_target, ::testing::ValuesIn(targets()));

}  // namespace
}  // namespace ferry::cpu_optim::test
