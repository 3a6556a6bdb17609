#pragma once
// Shared helpers for the cpu_optim suites: random data from a seed the tests print on failure,
// gradient encoding, and the double-precision scalar AdamW reference.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "cpu_optim/adamw.h"
#include "cpu_optim/half.h"
#include "tests/test_seed.h"

namespace ferry::cpu_optim::test {

// A seed for the running test's random data, the same in every run (tests/test_seed.h): the
// test's n-th call draws with salt n. FERRY_TEST_SEED draws other data.
inline uint32_t draw_seed() {
  static const uint64_t base = ::ferry::test::base_seed();
  static std::string test;
  static uint64_t calls = 0;
  const ::testing::TestInfo* t = ::testing::UnitTest::GetInstance()->current_test_info();
  if (!t) return static_cast<uint32_t>(base);
  const std::string name = std::string(t->test_suite_name()) + "." + t->name();
  if (name != test) test = name, calls = 0;
  const uint64_t h = ::ferry::test::test_seed(*t, base, ++calls);
  return static_cast<uint32_t>(h ^ (h >> 32));
}

inline std::vector<float> normal(std::mt19937& rng, size_t n, float stddev) {
  std::normal_distribution<float> d(0.0f, stddev);
  std::vector<float> out(n);
  for (float& x : out) x = d(rng);
  return out;
}

// Gradient buffer in `t`, bytes; `decoded` receives the exact fp32 value of every element.
inline std::vector<uint8_t> encode(const std::vector<float>& x, dtype t, std::vector<float>* decoded) {
  std::vector<uint8_t> buf(x.size() * dtype_size(t));
  decoded->resize(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    if (t == dtype::dtype_f32) {
      std::memcpy(buf.data() + 4 * i, &x[i], 4);
      (*decoded)[i] = x[i];
      continue;
    }
    const uint16_t h = t == dtype::dtype_f16 ? half::f32_to_f16(x[i]) : half::f32_to_bf16(x[i]);
    std::memcpy(buf.data() + 2 * i, &h, 2);
    (*decoded)[i] = t == dtype::dtype_f16 ? half::f16_to_f32(h) : half::bf16_to_f32(h);
  }
  return buf;
}

// Ties, subnormals, overflow thresholds, infinities, NaNs, signed zeros.
inline std::vector<float> edge_values() {
  std::vector<float> v = {0.0f, -0.0f, 1.0f, -1.0f, std::numeric_limits<float>::infinity(),
                          -std::numeric_limits<float>::infinity(), std::nanf(""), -std::nanf(""),
                          65504.0f, 65519.0f, 65520.0f, -65520.0f, 3.4028235e38f, 1e-45f,
                          std::numeric_limits<float>::min(), std::ldexp(1.0f, -14), std::ldexp(1.0f, -24),
                          std::ldexp(1.0f, -25), std::ldexp(3.0f, -25), std::ldexp(1.0f, -26),
                          std::ldexp(1.5f, -25), std::ldexp(1023.5f, -24)};
  for (int e = -30; e <= 16; ++e) {
    // fp16 ties (half an fp16 ulp above 1 and 1+ulp) and bf16 ties, scaled over the range.
    for (float base : {1.0f + std::ldexp(1.0f, -11), 1.0f + 3 * std::ldexp(1.0f, -11),
                       1.0f + std::ldexp(1.0f, -8), 1.0f + 3 * std::ldexp(1.0f, -8)}) {
      v.push_back(std::ldexp(base, e));
      v.push_back(-std::ldexp(base, e));
    }
  }
  return v;
}

inline uint16_t to_half(float f, dtype t) {
  return t == dtype::dtype_f16 ? half::f32_to_f16(f) : half::f32_to_bf16(f);
}

struct state {
  std::vector<float> p, m, v;
  std::vector<uint16_t> half_out;
};

struct ref_state {
  std::vector<double> p, m, v;
};

// PyTorch AdamW in double; g is the decoded gradient times mult.
inline void ref_step(ref_state& s, const std::vector<float>& grad, float mult, const adamw_hparams& h,
                     int64_t step) {
  const double b1 = h.beta1, b2 = h.beta2, lr = h.lr;
  const double bc1 = 1 - std::pow(b1, double(step)), bc2 = 1 - std::pow(b2, double(step));
  for (size_t i = 0; i < s.p.size(); ++i) {
    const double g = double(grad[i]) * mult;
    s.p[i] *= 1 - lr * double(h.weight_decay);
    s.m[i] = b1 * s.m[i] + (1 - b1) * g;
    s.v[i] = b2 * s.v[i] + (1 - b2) * g * g;
    s.p[i] -= lr / bc1 * s.m[i] / (std::sqrt(s.v[i]) / std::sqrt(bc2) + double(h.eps));
  }
}

inline chunk_ref make_chunk(state& s, const std::vector<uint8_t>& grad, dtype gt, dtype ht,
                            bool with_half) {
  return chunk_ref{s.p.data(), s.m.data(), s.v.data(), grad.data(), gt,
                   with_half ? s.half_out.data() : nullptr, ht, s.p.size()};
}

inline bool bits_equal(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * 4) == 0;
}

// Names of the compiled targets, for INSTANTIATE_TEST_SUITE_P; the tests skip the ones this
// CPU cannot run.
inline std::vector<std::string> targets() { return compiled_targets(); }

class target_test : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (!force_target(GetParam())) GTEST_SKIP() << GetParam() << " is not supported on this CPU";
    ASSERT_EQ(active_target(), GetParam());
  }
  void TearDown() override { force_target("auto"); }
};

}  // namespace ferry::cpu_optim::test
