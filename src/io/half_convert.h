#pragma once
// Scalar fp32 <-> fp16 / bf16 conversions for checkpoint I/O (not the hot path: the optimizer's
// SIMD conversions live in cpu_optim/). fp32 -> half rounds to nearest even, as PyTorch does;
// NaN stays NaN, overflow becomes infinity (fp16) and subnormals are kept.
#include <cstddef>
#include <cstdint>
#include <cstring>

namespace ferry::io {

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
  uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float bf16_to_f32(uint16_t h) { return f32_from_bits(static_cast<uint32_t>(h) << 16); }

uint16_t f32_to_f16(float f);
float f16_to_f32(uint16_t h);

// Bulk conversions over possibly unaligned source bytes (safetensors data need not be aligned).
void convert_to_f32(const void* src, const char* st_dtype, size_t n, float* dst);  // "F32", "F16", "BF16"
void convert_from_f32(const float* src, size_t n, const char* st_dtype, void* dst);

}  // namespace ferry::io
