#include "src/io/half_convert.h"

#include <tbb/parallel_for.h>

#include <string>

#include "src/common/error.h"

namespace ferry::io {

uint16_t f32_to_f16(float f) {
  uint32_t u = f32_bits(f);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u | ((abs >> 13) & 0x3ffu));  // NaN
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (abs < 0x38800000u) {
    // Result is subnormal or zero: value = mantissa * 2^-24, round the shifted mantissa to even.
    if (abs < 0x33000000u) return static_cast<uint16_t>(sign);  // below half the smallest subnormal
    uint32_t exp = abs >> 23;
    uint32_t mant = (abs & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126u - exp;  // 14..24
    uint32_t q = mant >> shift;
    uint32_t rem = mant & ((1u << shift) - 1u);
    uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (q & 1u))) ++q;
    return static_cast<uint16_t>(sign | q);
  }
  // Normal: rebias the exponent (127 -> 15) and round 13 dropped mantissa bits to even.
  uint32_t v = abs - 0x38000000u;
  v += 0xfffu + ((v >> 13) & 1u);
  return static_cast<uint16_t>(sign | (v >> 13));
}

float f16_to_f32(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0x1f) return f32_from_bits(sign | 0x7f800000u | (mant << 13));
  if (exp == 0) {
    if (mant == 0) return f32_from_bits(sign);
    float v = static_cast<float>(mant) * (1.0f / 16777216.0f);  // mant * 2^-24, exact
    return sign ? -v : v;
  }
  return f32_from_bits(sign | ((exp + 112u) << 23) | (mant << 13));
}

namespace {
constexpr size_t k_grain = size_t(1) << 16;

template <typename F>
void parallel_chunks(size_t n, F&& body) {
  if (n <= k_grain) {
    body(size_t(0), n);
    return;
  }
  tbb::parallel_for(tbb::blocked_range<size_t>(0, n, k_grain),
                    [&](const tbb::blocked_range<size_t>& r) { body(r.begin(), r.end()); });
}
}  // namespace

void convert_to_f32(const void* src, const char* st_dtype, size_t n, float* dst) {
  const auto* s = static_cast<const uint8_t*>(src);
  std::string dt = st_dtype;
  if (dt == "F32") {
    std::memcpy(dst, s, n * 4);
  } else if (dt == "F16" || dt == "BF16") {
    bool bf = dt == "BF16";
    parallel_chunks(n, [&](size_t b, size_t e) {
      for (size_t i = b; i < e; ++i) {
        uint16_t h;
        std::memcpy(&h, s + 2 * i, 2);
        dst[i] = bf ? bf16_to_f32(h) : f16_to_f32(h);
      }
    });
  } else {
    FERRY_ASSERT(false, "convert_to_f32 called with dtype ", dt);
  }
}

void convert_from_f32(const float* src, size_t n, const char* st_dtype, void* dst) {
  auto* d = static_cast<uint8_t*>(dst);
  std::string dt = st_dtype;
  if (dt == "F32") {
    std::memcpy(d, src, n * 4);
  } else if (dt == "F16" || dt == "BF16") {
    bool bf = dt == "BF16";
    parallel_chunks(n, [&](size_t b, size_t e) {
      for (size_t i = b; i < e; ++i) {
        uint16_t h = bf ? f32_to_bf16(src[i]) : f32_to_f16(src[i]);
        std::memcpy(d + 2 * i, &h, 2);
      }
    });
  } else {
    FERRY_ASSERT(false, "convert_from_f32 called with dtype ", dt);
  }
}

}  // namespace ferry::io
