// Compact moment forms: sizes, names and whole-chunk conversions to and from fp32 (checkpoints,
// resuming with another kind). The per-element definitions are in moment_codes.h.
#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "cpu_optim/adamw.h"
#include "cpu_optim/moment_codes.h"
#include "src/common/error.h"

namespace ferry::cpu_optim {

size_t quant_blocks(size_t n) { return (n + k_quant_block - 1) / k_quant_block; }

size_t moments_bytes(moments_kind k, size_t n) {
  switch (k) {
    case moments_kind::f32: return 8 * n;
    case moments_kind::bf16: return 4 * n;
    case moments_kind::int8: return 2 * n + 8 * quant_blocks(n);
  }
  return 8 * n;
}

const char* moments_kind_name(moments_kind k) {
  switch (k) {
    case moments_kind::f32: return "fp32";
    case moments_kind::bf16: return "bf16";
    case moments_kind::int8: return "int8";
  }
  return "?";
}

namespace {
void check_ref(const moments_ref& r) {
  FERRY_ASSERT(r.n == 0 || (r.m && r.v), "moments with null arrays");
  FERRY_ASSERT(r.kind != moments_kind::int8 || r.n == 0 || (r.m_scale && r.v_scale), "int8 moments without scales");
}

// f(begin, end) over the quantization blocks of [0, n) in parallel.
template <class F>
void for_quant_blocks(size_t n, F&& f) {
  tbb::parallel_for(tbb::blocked_range<size_t>(0, quant_blocks(n), 8), [&](const tbb::blocked_range<size_t>& r) {
    for (size_t b = r.begin(); b < r.end(); ++b) f(b * k_quant_block, std::min(n, (b + 1) * k_quant_block));
  });
}
}  // namespace

void decode_moments(const moments_ref& src, float* m, float* v) {
  check_ref(src);
  FERRY_ASSERT(src.n == 0 || (m && v), "decode_moments into null arrays");
  switch (src.kind) {
    case moments_kind::f32:
      std::memcpy(m, src.m, src.n * 4);
      std::memcpy(v, src.v, src.n * 4);
      return;
    case moments_kind::bf16:
      convert(src.m, dtype::dtype_bf16, m, dtype::dtype_f32, src.n);
      convert(src.v, dtype::dtype_bf16, v, dtype::dtype_f32, src.n);
      return;
    case moments_kind::int8: {
      const auto* qm = static_cast<const int8_t*>(src.m);
      const auto* qv = static_cast<const uint8_t*>(src.v);
      for_quant_blocks(src.n, [&](size_t b, size_t e) {
        const float am = src.m_scale[b / k_quant_block], av = src.v_scale[b / k_quant_block];
        for (size_t i = b; i < e; ++i) {
          m[i] = codes::decode_m(qm[i], am);
          v[i] = codes::decode_v(qv[i], av);
        }
      });
      return;
    }
  }
}

void encode_moments(const float* m, const float* v, const moments_ref& dst) {
  check_ref(dst);
  FERRY_ASSERT(dst.n == 0 || (m && v), "encode_moments from null arrays");
  switch (dst.kind) {
    case moments_kind::f32:
      std::memcpy(dst.m, m, dst.n * 4);
      std::memcpy(dst.v, v, dst.n * 4);
      return;
    case moments_kind::bf16:
      convert(m, dtype::dtype_f32, dst.m, dtype::dtype_bf16, dst.n);
      convert(v, dtype::dtype_f32, dst.v, dtype::dtype_bf16, dst.n);
      return;
    case moments_kind::int8: {
      auto* qm = static_cast<int8_t*>(dst.m);
      auto* qv = static_cast<uint8_t*>(dst.v);
      for_quant_blocks(dst.n, [&](size_t b, size_t e) {
        float am = 0, av = 0;
        for (size_t i = b; i < e; ++i) {
          am = std::max(am, std::fabs(m[i]));
          av = std::max(av, v[i]);
        }
        dst.m_scale[b / k_quant_block] = am;
        dst.v_scale[b / k_quant_block] = av;
        const float im = codes::inv_scale(am), iv = codes::inv_scale(av);
        for (size_t i = b; i < e; ++i) {
          qm[i] = codes::encode_m(m[i], im);
          qv[i] = codes::encode_v(v[i], iv);
        }
      });
      return;
    }
  }
}

}  // namespace ferry::cpu_optim
