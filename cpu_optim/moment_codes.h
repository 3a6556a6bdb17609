#pragma once
// Scalar definitions of the compact AdamW moment forms (README.md "Compact moments"). Like
// half.h, they are what the SIMD kernels must match bit for bit (same operations in the same
// order, no fused multiply-add) and what the tests take as the quantizer's definition.
//
//   bf16  the fp32 value's top 16 bits after adding 16 random bits below them (stochastic
//         rounding: rounds away from zero with probability equal to the dropped fraction, so the
//         stored value is unbiased); the bits come from lowbias32 (a 32-bit integer hash by
//         Chris Wellons) of the element's index plus a per-chunk, per-step key.
//   int8  a fourth-root code per block of k_quant_block elements with the block's largest |x| as
//         scale A: m as int8  q = round(127 (|x|/A)^(1/4)) with x's sign, value sign·A (q/127)^4;
//         v as uint8 q = round(255 (v/A)^(1/4)), value A (q/255)^4. The fourth root spreads the
//         255 levels over about 10 decades of v (the smallest non-zero v is A·2^-36) and the
//         relative step is 4/q (1.6% at the top of m's range), so small second moments keep their
//         magnitude and m/sqrt(v) stays bounded; a positive v codes to at least 1. A block whose
//         largest value is subnormal is stored as zeros.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu_optim/half.h"

namespace ferry::cpu_optim::codes {

inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

// The stream of one chunk at one optimizer step (computed once per call by the front).
inline uint32_t sr_key(uint64_t seed, int64_t step) {
  return mix32(uint32_t(seed) ^ mix32(uint32_t(seed >> 32) + uint32_t(step) * 0x9E3779B9U));
}
// 32 random bits of element i: the low 16 round m, the high 16 round v.
inline uint32_t sr_bits(uint32_t key, uint64_t i) { return mix32(uint32_t(i) + key); }

// Stochastic rounding of a finite fp32 value to bf16 with 16 random bits r.
inline uint16_t bf16_sr(float x, uint32_t r16) {
  return static_cast<uint16_t>((half::f32_bits(x) + (r16 & 0xFFFFu)) >> 16);
}

constexpr float k_m_levels = 127.0f, k_v_levels = 255.0f;
constexpr float k_inv_m_levels = 1.0f / 127.0f, k_inv_v_levels = 1.0f / 255.0f;

// 1/A, or 0 (every code 0) for a block whose largest value is 0 or subnormal, where 1/A would
// overflow: moments that small are flushed to zero.
inline float inv_scale(float a) { return a >= 1.17549435e-38f ? 1.0f / a : 0.0f; }

inline float code_level(float r, float levels) {  // round(levels * r^(1/4)), r in [0, ~1]
  const float q = std::nearbyint(levels * std::sqrt(std::sqrt(r)));
  return q < levels ? q : levels;
}

inline int8_t encode_m(float x, float inv_a) {
  const float q = code_level(std::fabs(x) * inv_a, k_m_levels);
  return static_cast<int8_t>(x < 0 ? -q : q);
}
inline float decode_m(int8_t q, float a) {
  const float t = std::fabs(static_cast<float>(q)) * k_inv_m_levels;
  const float t2 = t * t;
  const float x = t2 * t2 * a;
  return q < 0 ? -x : x;
}

// A positive v never codes to 0 (unless its block is flushed): the smallest level is A 2^-32,
// which keeps m/sqrt(v) bounded where m survives beside a large block maximum and v = (1-b2) g^2
// would fall below the range (v underflowing while m does not would make the update m/eps).
inline uint8_t encode_v(float x, float inv_a) {
  const float r = x * inv_a;
  const float q = code_level(r, k_v_levels);
  return static_cast<uint8_t>(q == 0 && r > 0 ? 1.0f : q);
}
inline float decode_v(uint8_t q, float a) {
  const float t = static_cast<float>(q) * k_inv_v_levels;
  const float t2 = t * t;
  return t2 * t2 * a;
}

}  // namespace ferry::cpu_optim::codes
