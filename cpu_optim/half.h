#pragma once
// Scalar fp16 / bf16 <-> fp32 conversions with integer ops, round-to-nearest-even when
// narrowing. They are the definition the SIMD kernels must match bit for bit: the kernels use
// them directly on targets without hardware conversions (EMU128), and the tests use them as the
// reference next to PyTorch's `.to()`.
//
// NaN stays NaN (quiet bit set, sign and top payload bits kept, as F16C's vcvtps2ph does);
// +-inf stays +-inf; subnormals are produced and consumed exactly (no flush to zero).
#include <cstdint>
#include <cstring>

namespace ferry::cpu_optim::half {

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float f32_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {
  const uint32_t x = f32_bits(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((x >> 16) | 0x0040u);
  return static_cast<uint16_t>((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}

inline float bf16_to_f32(uint16_t h) { return f32_from_bits(static_cast<uint32_t>(h) << 16); }

inline uint16_t f32_to_f16(float f) {
  uint32_t x = f32_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  x &= 0x7FFFFFFFu;
  if (x > 0x7F800000u) return static_cast<uint16_t>(sign | 0x7E00u | ((x >> 13) & 0x3FFu));
  if (x >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // >= 65520 rounds to inf
  if (x < 0x38800000u) {                                                // below 2^-14: subnormal
    const uint32_t e = x >> 23;
    if (e < 102) return static_cast<uint16_t>(sign);  // below 2^-25: rounds to zero
    // value = m * 2^(e-150); in units of 2^-24 that is m >> (126 - e), shift in [14, 24].
    const uint32_t m = (x & 0x7FFFFFu) | 0x800000u;
    const uint32_t shift = 126 - e;
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1);
    const uint32_t halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (r & 1u))) ++r;
    return static_cast<uint16_t>(sign | r);
  }
  // Normal: rebias the exponent (127 -> 15); a mantissa carry rolls into the exponent.
  const uint32_t t = ((x + 0x0FFFu + ((x >> 13) & 1u)) >> 13) - (112u << 10);
  return static_cast<uint16_t>(sign | t);
}

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t e = (h >> 10) & 0x1Fu;
  uint32_t m = h & 0x3FFu;
  if (e == 0x1F) return f32_from_bits(sign | 0x7F800000u | (m << 13));
  if (e == 0) {
    if (m == 0) return f32_from_bits(sign);
    e = 113;  // normalise the subnormal: value = m * 2^-24
    while ((m & 0x400u) == 0) {
      m <<= 1;
      --e;
    }
    return f32_from_bits(sign | (e << 23) | ((m & 0x3FFu) << 13));
  }
  return f32_from_bits(sign | ((e + 112) << 23) | (m << 13));
}

}  // namespace ferry::cpu_optim::half
