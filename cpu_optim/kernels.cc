// Per-ISA kernels. Highway's foreach_target.h re-includes this file once per target in
// HWY_TARGETS (AVX3, AVX2, and the portable fallback: EMU128, or SCALAR with GCC < 12.3; SSSE3/SSE4 are disabled, they would only add build time),
// each time with that target's instruction set enabled for these functions only; the library
// is never built with -march. HWY_EXPORT/HWY_DYNAMIC_DISPATCH pick the table at run time.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#ifndef HWY_DISABLED_TARGETS
#define HWY_DISABLED_TARGETS (HWY_SSSE3 | HWY_SSE4)
#endif
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu_optim/kernels.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/cache_control.h"
#include "hwy/highway.h"

#include "cpu_optim/half.h"
#include "cpu_optim/kernels.h"
#include "cpu_optim/moment_codes.h"

HWY_BEFORE_NAMESPACE();
namespace ferry::cpu_optim::detail::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

using df_t = hn::ScalableTag<float>;
constexpr size_t k_max_lanes = 16;  // AVX-512 floats; sizes the tail's stack copies

// The fallback's (EMU128/SCALAR) Highway 1.0.3 fp16 demotion truncates and maps inf/NaN to finite values, and its
// bf16 demotion truncates; there the half conversions go lane by lane through half.h.
#if HWY_TARGET == HWY_EMU128 || HWY_TARGET == HWY_SCALAR
constexpr bool k_lanewise_half = true;
#else
constexpr bool k_lanewise_half = false;
#endif

struct no_half {};  // "no half copy" marker for the H template parameter

template <class T>
HWY_INLINE float scalar_to_f32(const T& x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    uint16_t bits;
    std::memcpy(&bits, &x, 2);
    if constexpr (std::is_same_v<T, hwy::float16_t>) return half::f16_to_f32(bits);
    else return half::bf16_to_f32(bits);
  }
}

template <class T>
HWY_INLINE void scalar_from_f32(float f, T* out) {
  if constexpr (std::is_same_v<T, float>) {
    *out = f;
  } else {
    const uint16_t bits =
        std::is_same_v<T, hwy::float16_t> ? half::f32_to_f16(f) : half::f32_to_bf16(f);
    std::memcpy(out, &bits, 2);
  }
}

// Lanes(df) elements at p, widened to fp32 (exact for every source type).
template <class G>
HWY_INLINE hn::Vec<df_t> load_f32(const G* HWY_RESTRICT p) {
  const df_t df;
  if constexpr (std::is_same_v<G, float>) {
    return hn::LoadU(df, p);
  } else if constexpr (k_lanewise_half) {
    HWY_ALIGN_MAX float tmp[k_max_lanes];
    for (size_t k = 0; k < hn::Lanes(df); ++k) tmp[k] = scalar_to_f32(p[k]);
    return hn::Load(df, tmp);
  } else {
    const hn::Rebind<G, df_t> dh;
    return hn::PromoteTo(df, hn::LoadU(dh, p));
  }
}

// fp32 -> bf16 round-to-nearest-even with integer ops (Highway 1.0.3's DemoteTo truncates, and
// AVX512-BF16's vcvtneps2bf16 flushes subnormals, which PyTorch does not).
HWY_INLINE hn::Vec<hn::Rebind<uint16_t, df_t>> bf16_rne(hn::Vec<df_t> v) {
  const hn::RebindToUnsigned<df_t> du;
  const hn::RebindToSigned<df_t> di;
  const hn::Rebind<uint16_t, df_t> du16;
  const auto bits = hn::BitCast(du, v);
  const auto lsb = hn::And(hn::ShiftRight<16>(bits), hn::Set(du, 1u));
  const auto rounded = hn::ShiftRight<16>(hn::Add(bits, hn::Add(hn::Set(du, 0x7FFFu), lsb)));
  const auto abs_bits = hn::And(hn::BitCast(di, v), hn::Set(di, 0x7FFFFFFF));
  const auto is_nan = hn::RebindMask(du, hn::Gt(abs_bits, hn::Set(di, 0x7F800000)));
  const auto quiet_nan = hn::Or(hn::ShiftRight<16>(bits), hn::Set(du, 0x0040u));
  const auto out = hn::IfThenElse(is_nan, quiet_nan, rounded);  // each lane <= 0xFFFF
  return hn::DemoteTo(du16, hn::BitCast(di, out));
}

// Narrows (or copies) one vector to p; `stream` needs p aligned to the stored vector's size.
template <class H>
HWY_INLINE void store_from_f32(hn::Vec<df_t> v, H* HWY_RESTRICT p, bool stream) {
  const df_t df;
  if constexpr (std::is_same_v<H, float>) {
    if (stream) hn::Stream(v, df, p);
    else hn::StoreU(v, df, p);
  } else if constexpr (k_lanewise_half) {
    HWY_ALIGN_MAX float tmp[k_max_lanes];
    hn::Store(v, df, tmp);
    for (size_t k = 0; k < hn::Lanes(df); ++k) scalar_from_f32(tmp[k], p + k);
  } else {
    const hn::Rebind<uint16_t, df_t> du16;
    hn::Vec<decltype(du16)> bits;
    if constexpr (std::is_same_v<H, hwy::float16_t>) {
      bits = hn::BitCast(du16, hn::DemoteTo(hn::Rebind<hwy::float16_t, df_t>(), v));  // F16C: RNE
    } else {
      bits = bf16_rne(v);
    }
    auto* out = reinterpret_cast<uint16_t*>(p);
    if (stream) hn::Stream(bits, du16, out);
    else hn::StoreU(bits, du16, out);
  }
}

// Sum of fp32 squares in double lanes. stats() and the fused update use this same
// accumulation, so step() returns bit for bit what stats() would.
struct sq_acc {
#if HWY_TARGET == HWY_SCALAR  // one lane: no halves to widen
  double a = 0;
  HWY_INLINE void add(hn::Vec<df_t> g) { a += static_cast<double>(hn::GetLane(hn::Mul(g, g))); }
  double sum() const { return a; }
#else
  hn::Half<df_t> dfh;
  hn::Rebind<double, hn::Half<df_t>> dd;
  hn::Vec<hn::Rebind<double, hn::Half<df_t>>> lo, hi;
  // User-provided so it carries this target's attributes (an implicit one would not).
  HWY_INLINE sq_acc() : lo(hn::Zero(dd)), hi(hn::Zero(dd)) {}
  HWY_INLINE void add(hn::Vec<df_t> g) {
    const auto sq = hn::Mul(g, g);
    lo = hn::Add(lo, hn::PromoteTo(dd, hn::LowerHalf(dfh, sq)));
    hi = hn::Add(hi, hn::PromoteTo(dd, hn::UpperHalf(dfh, sq)));
  }
  double sum() const { return hn::GetLane(hn::SumOfLanes(dd, hn::Add(lo, hi))); }
#endif
};

// Appends the old m, v of the lanes in `ill` (offsets `offset` + lane) to the step's undo log.
HWY_NOINLINE void log_lanes(hn::Mask<df_t> ill, hn::Vec<df_t> m_old, hn::Vec<df_t> v_old,
                            size_t offset, std::vector<undo_entry>* log) {
  const df_t df;
  HWY_ALIGN_MAX float mo[k_max_lanes], vo[k_max_lanes];
  HWY_ALIGN_MAX uint8_t bits[(k_max_lanes + 7) / 8 + 8] = {};
  hn::Store(m_old, df, mo);
  hn::Store(v_old, df, vo);
  hn::StoreMaskBits(df, ill, bits);
  for (size_t k = 0; k < hn::Lanes(df); ++k) {
    if (bits[k / 8] >> (k % 8) & 1) log->push_back(undo_entry{uint32_t(offset + k), mo[k], vo[k]});
  }
}

// The Adam update term from (stored) moments: lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps).
HWY_INLINE hn::Vec<df_t> update_term(hn::Vec<df_t> M, hn::Vec<df_t> V, const step_scalars& s) {
  const df_t df;
  const auto denom = hn::MulAdd(hn::Sqrt(V), hn::Set(df, s.inv_sqrt_bc2), hn::Set(df, s.eps));
  return hn::Mul(hn::Div(M, denom), hn::Set(df, s.step_size));
}

// The moments' step on g, m = b1 m + (1-b1) g and v = b2 v + (1-b2) g^2, and its inverse (v kept
// >= 0), in every moment form (the forms round only the stored results).
HWY_INLINE void advance_moments(hn::Vec<df_t>& M, hn::Vec<df_t>& V, hn::Vec<df_t> g, const step_scalars& s) {
  const df_t df;
  M = hn::MulAdd(hn::Set(df, s.beta1), M, hn::Mul(hn::Set(df, s.one_minus_beta1), g));
  V = hn::MulAdd(hn::Set(df, s.beta2), V, hn::Mul(hn::Set(df, s.one_minus_beta2), hn::Mul(g, g)));
}

HWY_INLINE void invert_moments(hn::Vec<df_t>& M, hn::Vec<df_t>& V, hn::Vec<df_t> g, const step_scalars& s) {
  const df_t df;
  M = hn::Div(hn::Sub(M, hn::Mul(hn::Set(df, s.one_minus_beta1), g)), hn::Set(df, s.beta1));
  V = hn::Max(hn::Div(hn::Sub(V, hn::Mul(hn::Set(df, s.one_minus_beta2), hn::Mul(g, g))), hn::Set(df, s.beta2)),
              hn::Zero(df));
}

// With the step's log (s.zero_ratio > 0): lanes restored to v < zero_ratio v' had m = v = 0
// before (any other state that far below v' was logged and is patched by the front).
HWY_INLINE void restore_zero_state(hn::Vec<df_t>& M, hn::Vec<df_t>& V, hn::Vec<df_t> v_new, const step_scalars& s) {
  if (s.zero_ratio > 0) {
    const auto was_zero = hn::Lt(V, hn::Mul(v_new, hn::Set(df_t(), s.zero_ratio)));
    M = hn::IfThenZeroElse(was_zero, M);
    V = hn::IfThenZeroElse(was_zero, V);
  }
}

// The lanes a step must log (adamw.h undo_log): v grew past `ratio` times a non-zero old v, or v
// was zero while m was not.
HWY_INLINE hn::Mask<df_t> ill_lanes(hn::Vec<df_t> m_old, hn::Vec<df_t> v_old, hn::Vec<df_t> v_new, float ratio) {
  const df_t df;
  const auto zero = hn::Zero(df);
  const auto v_was_zero = hn::Eq(v_old, zero);
  return hn::Or(hn::And(v_was_zero, hn::Ne(m_old, zero)),
                hn::AndNot(v_was_zero, hn::Gt(v_new, hn::Mul(v_old, hn::Set(df, ratio)))));
}

// One vector of the update. Undo inverts the step's operations in reverse order, recomputing
// the step's update term from the (unchanged) new m and v, so only the final roundings of
// p, m and v are lost (README.md "Precision and rollback tolerance"). With the step's log, lanes
// restored to v < zero_ratio v' had m = v = 0 before (any other state that far below v' was
// logged, and the front patches logged lanes after this).
template <op O, bool A, class G, class H>
HWY_INLINE void update_vec(const G* HWY_RESTRICT grad, const float* HWY_RESTRICT gacc, float* HWY_RESTRICT p,
                           float* HWY_RESTRICT m, float* HWY_RESTRICT v, H* HWY_RESTRICT half_out,
                           const step_scalars& s, bool stream, sq_acc& acc, size_t offset,
                           std::vector<undo_entry>* log) {
  const df_t df;
  const auto decay = hn::Set(df, s.decay);
  auto gr = load_f32(grad);
  if constexpr (A) gr = hn::Add(hn::LoadU(df, gacc), gr);   // accumulate()'s order and rounding
  auto P = hn::LoadU(df, p), M = hn::LoadU(df, m), V = hn::LoadU(df, v);
  if constexpr (O != op::op_step) {
    P = hn::Div(hn::Add(P, update_term(M, V, s)), decay);
    const auto v_new = V;
    invert_moments(M, V, hn::Mul(gr, hn::Set(df, s.mult)), s);
    restore_zero_state(M, V, v_new, s);
  }
  if constexpr (O != op::op_undo) {
    const auto g = hn::Mul(gr, hn::Set(df, O == op::op_redo ? s.new_mult : s.mult));
    acc.add(g);
    const auto m_old = M, v_old = V;
    advance_moments(M, V, g, s);
    if (O == op::op_step && s.log_ratio > 0) {
      const auto ill = ill_lanes(m_old, v_old, V, s.log_ratio);
      if (!hn::AllFalse(df, ill)) log_lanes(ill, m_old, v_old, offset, log);
    }
    P = hn::MulSub(P, decay, update_term(M, V, s));
  }
  hn::StoreU(P, df, p);
  hn::StoreU(M, df, m);
  hn::StoreU(V, df, v);
  if constexpr (!std::is_same_v<H, no_half>) store_from_f32(P, half_out, stream);
}

// ---- Compact moments (moment_codes.h defines each operation; the lanes repeat it exactly) ----

using du_t = hn::RebindToUnsigned<df_t>;
using di_t = hn::RebindToSigned<df_t>;

// bf16 bits -> fp32 (exact).
HWY_INLINE hn::Vec<df_t> load_bf16_bits(const uint16_t* HWY_RESTRICT p) {
  const df_t df;
  const du_t du;
  const hn::Rebind<uint16_t, df_t> d16;
  return hn::BitCast(df, hn::ShiftLeft<16>(hn::PromoteTo(du, hn::LoadU(d16, p))));
}

HWY_INLINE hn::Vec<du_t> mix32_vec(hn::Vec<du_t> x) {
  const du_t du;
  x = hn::Xor(x, hn::ShiftRight<16>(x));
  x = hn::Mul(x, hn::Set(du, 0x7feb352dU));
  x = hn::Xor(x, hn::ShiftRight<15>(x));
  x = hn::Mul(x, hn::Set(du, 0x846ca68bU));
  return hn::Xor(x, hn::ShiftRight<16>(x));
}

// codes::bf16_sr of each lane with the low 16 bits of r.
HWY_INLINE hn::Vec<hn::Rebind<uint16_t, df_t>> bf16_sr_vec(hn::Vec<df_t> x, hn::Vec<du_t> r) {
  const du_t du;
  const di_t di;
  const auto bits = hn::ShiftRight<16>(hn::Add(hn::BitCast(du, x), hn::And(r, hn::Set(du, 0xFFFFu))));
  return hn::DemoteTo(hn::Rebind<uint16_t, df_t>(), hn::BitCast(di, bits));
}

HWY_INLINE hn::Vec<df_t> bf16_bits_to_f32(hn::Vec<hn::Rebind<uint16_t, df_t>> b) {
  return hn::BitCast(df_t(), hn::ShiftLeft<16>(hn::PromoteTo(du_t(), b)));
}

// One vector with bf16 moments: the f32 update on the decoded moments, the new moments rounded
// stochastically and the weight update computed from the rounded values (so undo recomputes it
// exactly); undo rounds the inverted moments to nearest even. `index`: the first lane's element
// index in the chunk (the stochastic-rounding stream).
template <op O, bool A, class G, class H>
HWY_INLINE void update_vec_bf16(const G* HWY_RESTRICT grad, const float* HWY_RESTRICT gacc, float* HWY_RESTRICT p,
                                uint16_t* HWY_RESTRICT m, uint16_t* HWY_RESTRICT v, H* HWY_RESTRICT half_out,
                                const step_scalars& s, bool stream, sq_acc& acc, size_t index,
                                hn::Vec<du_t> lanes, size_t offset, std::vector<undo_entry>* log) {
  const df_t df;
  const du_t du;
  const hn::Rebind<uint16_t, df_t> d16;
  const auto decay = hn::Set(df, s.decay);
  auto gr = load_f32(grad);
  if constexpr (A) gr = hn::Add(hn::LoadU(df, gacc), gr);
  auto P = hn::LoadU(df, p), M = load_bf16_bits(m), V = load_bf16_bits(v);
  if constexpr (O != op::op_step) {
    P = hn::Div(hn::Add(P, update_term(M, V, s)), decay);
    const auto v_new = V;
    invert_moments(M, V, hn::Mul(gr, hn::Set(df, s.mult)), s);
    restore_zero_state(M, V, v_new, s);
    const auto mq = bf16_rne(M), vq = bf16_rne(V);
    if constexpr (O == op::op_undo) {
      hn::StoreU(mq, d16, m);
      hn::StoreU(vq, d16, v);
    }
    M = bf16_bits_to_f32(mq);
    V = bf16_bits_to_f32(vq);
  }
  if constexpr (O != op::op_undo) {
    const auto g = hn::Mul(gr, hn::Set(df, O == op::op_redo ? s.new_mult : s.mult));
    acc.add(g);
    const auto m_old = M, v_old = V;
    advance_moments(M, V, g, s);
    if (O == op::op_step && s.log_ratio > 0) {
      const auto ill = ill_lanes(m_old, v_old, V, s.log_ratio);
      if (!hn::AllFalse(df, ill)) log_lanes(ill, m_old, v_old, offset, log);
    }
    const auto r = mix32_vec(hn::Add(lanes, hn::Set(du, uint32_t(index) + s.sr_key)));
    const auto mq = bf16_sr_vec(M, r), vq = bf16_sr_vec(V, hn::ShiftRight<16>(r));
    hn::StoreU(mq, d16, m);
    hn::StoreU(vq, d16, v);
    P = hn::MulSub(P, decay, update_term(bf16_bits_to_f32(mq), bf16_bits_to_f32(vq), s));
  }
  hn::StoreU(P, df, p);
  if constexpr (!std::is_same_v<H, no_half>) store_from_f32(P, half_out, stream);
}

// One vector in the moments' form (MT: float for f32, uint16_t for bf16 bits). `index`: the first
// lane's element index in the chunk (bf16's rounding stream); `offset`: the same relative to the
// work block (the undo log's).
template <op O, bool A, class G, class H>
HWY_INLINE void update_vec_any(const G* grad, const float* gacc, float* p, float* m, float* v, H* half_out,
                               const step_scalars& s, bool stream, sq_acc& acc, size_t /*index*/, size_t offset,
                               hn::Vec<du_t> /*lanes*/, std::vector<undo_entry>* log) {
  update_vec<O, A>(grad, gacc, p, m, v, half_out, s, stream, acc, offset, log);
}

template <op O, bool A, class G, class H>
HWY_INLINE void update_vec_any(const G* grad, const float* gacc, float* p, uint16_t* m, uint16_t* v, H* half_out,
                               const step_scalars& s, bool stream, sq_acc& acc, size_t index, size_t offset,
                               hn::Vec<du_t> lanes, std::vector<undo_entry>* log) {
  update_vec_bf16<O, A>(grad, gacc, p, m, v, half_out, s, stream, acc, index, lanes, offset, log);
}

// [begin, end) of a chunk with f32 (MT float) or bf16 (MT uint16_t) moments, vector by vector.
template <op O, bool A, class G, class H, class MT>
grad_stats update_range(const chunk_ref& c, const step_scalars& s, size_t begin, size_t end,
                        std::vector<undo_entry>* log) {
  sq_acc acc;
  const size_t N = hn::Lanes(df_t());
  const G* grad = static_cast<const G*>(c.grad);
  const float* gacc = c.grad_acc;
  auto* cm = static_cast<MT*>(c.m);
  auto* cv = static_cast<MT*>(c.v);
  H* half_out = nullptr;
  if constexpr (!std::is_same_v<H, no_half>) half_out = static_cast<H*>(c.half_out);
  const auto lanes = hn::Iota(du_t(), 0);  // bf16's lane indices (Highway's Iota goes through memory)
  size_t i = begin;
  for (; i + N <= end; i += N) {
    update_vec_any<O, A>(grad + i, A ? gacc + i : nullptr, c.param + i, cm + i, cv + i,
                         half_out ? half_out + i : nullptr, s, s.stream_half, acc, i, i - begin, lanes, log);
  }
  if (s.stream_half && half_out) hwy::FlushStream();  // order the weakly-ordered stores
  if (i == end) return grad_stats{acc.sum(), 0};
  // Tail: the same vector body on zero-padded stack copies (zeros stay finite through it, and
  // a zero m, v is never logged).
  const size_t r = end - i;
  HWY_ALIGN_MAX float tp[k_max_lanes] = {}, ta[k_max_lanes] = {};
  HWY_ALIGN_MAX MT tm[k_max_lanes] = {}, tv[k_max_lanes] = {};
  HWY_ALIGN_MAX G tg[k_max_lanes] = {};
  HWY_ALIGN_MAX std::conditional_t<std::is_same_v<H, no_half>, uint16_t, H> th[k_max_lanes] = {};
  std::memcpy(tp, c.param + i, r * 4);
  std::memcpy(tm, cm + i, r * sizeof(MT));
  std::memcpy(tv, cv + i, r * sizeof(MT));
  std::memcpy(tg, grad + i, r * sizeof(G));
  if constexpr (A) std::memcpy(ta, gacc + i, r * 4);
  update_vec_any<O, A>(tg, ta, tp, tm, tv, std::is_same_v<H, no_half> ? nullptr : reinterpret_cast<H*>(th), s, false,
                       acc, i, i - begin, lanes, log);
  std::memcpy(c.param + i, tp, r * 4);
  std::memcpy(cm + i, tm, r * sizeof(MT));
  std::memcpy(cv + i, tv, r * sizeof(MT));
  if constexpr (!std::is_same_v<H, no_half>) std::memcpy(half_out + i, th, r * sizeof(H));
  return grad_stats{acc.sum(), 0};
}

// The update term from sqrt(v) (int8: sqrt(A (q/255)^4) = sqrt(A) (q/255)^2, no square root per
// element; step and undo use the same expression, so undo still recomputes the step's term).
HWY_INLINE hn::Vec<df_t> update_term_sqrt(hn::Vec<df_t> M, hn::Vec<df_t> sqrt_v, const step_scalars& s) {
  const df_t df;
  const auto denom = hn::MulAdd(sqrt_v, hn::Set(df, s.inv_sqrt_bc2), hn::Set(df, s.eps));
  return hn::Mul(hn::Div(M, denom), hn::Set(df, s.step_size));
}

// sqrt of a v code's value: sqrt(A) (q/255)^2.
HWY_INLINE hn::Vec<df_t> sqrt_v_code(hn::Vec<df_t> q, float sqrt_a) {
  const df_t df;
  const auto t = hn::Mul(q, hn::Set(df, codes::k_inv_v_levels));
  return hn::Mul(hn::Mul(t, t), hn::Set(df, sqrt_a));
}

// int8 codes (moment_codes.h): value = sign * A * (|q|/levels)^4.
HWY_INLINE hn::Vec<df_t> decode_code(hn::Vec<df_t> q, float inv_levels, float a) {
  const df_t df;
  const auto t = hn::Mul(hn::Abs(q), hn::Set(df, inv_levels));
  const auto t2 = hn::Mul(t, t);
  const auto x = hn::Mul(hn::Mul(t2, t2), hn::Set(df, a));
  return hn::IfThenElse(hn::Lt(q, hn::Zero(df)), hn::Neg(x), x);
}

// A v code's value: A (q/levels)^4, q >= 0 (codes::decode_v; no sign to restore).
HWY_INLINE hn::Vec<df_t> decode_v_code(hn::Vec<df_t> q, float a) {
  const df_t df;
  const auto t = hn::Mul(q, hn::Set(df, codes::k_inv_v_levels));
  const auto t2 = hn::Mul(t, t);
  return hn::Mul(hn::Mul(t2, t2), hn::Set(df, a));
}

// sqrt(r) from the hardware's reciprocal-square-root estimate (AVX-512 14 bits, AVX2 12 bits) and
// one Newton step: within about 4 ulp, at a fraction of a square root's cost; 0 for r below 2^-100.
HWY_INLINE hn::Vec<df_t> fast_sqrt(hn::Vec<df_t> r) {
  const df_t df;
  auto y = hn::ApproximateReciprocalSqrt(r);
  y = hn::Mul(y, hn::NegMulAdd(hn::Mul(hn::Set(df, 0.5f), r), hn::Mul(y, y), hn::Set(df, 1.5f)));
  return hn::IfThenZeroElse(hn::Lt(r, hn::Set(df, 7.8886e-31f)), hn::Mul(r, y));
}

// round(levels * (|x| inv_a)^(1/4)), clamped to levels, with x's sign (v: at least 1 where
// positive, moment_codes.h encode_v). The fourth root is two
// square roots (exact, the scalar definition) or, with s.fast_roots on AVX2/AVX3, two fast_sqrt
// (within about 1e-6 relative: a code can differ from the definition only where the level is
// within 2e-4 of a tie).
template <bool V>
HWY_INLINE hn::Vec<df_t> encode_level(hn::Vec<df_t> x, float inv_a, float levels, bool fast) {
  const df_t df;
  const auto r = hn::Mul(hn::Abs(x), hn::Set(df, inv_a));
#if HWY_TARGET == HWY_EMU128 || HWY_TARGET == HWY_SCALAR
  (void)fast;
  const auto root = hn::Sqrt(hn::Sqrt(r));
#else
  const auto root = fast ? fast_sqrt(fast_sqrt(r)) : hn::Sqrt(hn::Sqrt(r));
#endif
  const auto q = hn::Min(hn::Round(hn::Mul(hn::Set(df, levels), root)), hn::Set(df, levels));
  if constexpr (V) return hn::Max(q, hn::IfThenElseZero(hn::Gt(r, hn::Zero(df)), hn::Set(df, 1.0f)));
  return hn::IfThenElse(hn::Lt(x, hn::Zero(df)), hn::Neg(q), q);
}

// Lanes(df) codes (or fewer, `count`, zero-padded) widened to fp32 levels.
template <class T>
HWY_INLINE hn::Vec<df_t> load_codes(const T* HWY_RESTRICT p, size_t count) {
  const df_t df;
  const hn::Rebind<T, df_t> d8;
  if (count == hn::Lanes(df)) return hn::ConvertTo(df, hn::PromoteTo(di_t(), hn::LoadU(d8, p)));
  HWY_ALIGN_MAX T tmp[k_max_lanes] = {};
  std::memcpy(tmp, p, count * sizeof(T));
  return hn::ConvertTo(df, hn::PromoteTo(di_t(), hn::Load(d8, tmp)));
}

// q holds integer levels in [-255, 255]. Adding 1.5 * 2^23 (exact for |q| < 2^22) leaves q's two's
// complement in the low mantissa bits, so the low byte of each lane is the code, int8 or uint8: two
// operations, where a conversion to int32 (with its overflow fix-up) and two saturating packs took
// about eight.
template <class T>
HWY_INLINE void store_codes(hn::Vec<df_t> q, T* HWY_RESTRICT p, size_t count) {
  const df_t df;
  const hn::RebindToUnsigned<df_t> du;
  const hn::Rebind<uint8_t, df_t> d8;
  const auto c = hn::TruncateTo(d8, hn::BitCast(du, hn::Add(q, hn::Set(df, 12582912.0f))));
  auto* out = reinterpret_cast<uint8_t*>(p);
  if (count == hn::Lanes(df)) return hn::StoreU(c, d8, out);
  HWY_ALIGN_MAX uint8_t tmp[k_max_lanes];
  hn::Store(c, d8, tmp);
  std::memcpy(out, tmp, count);
}

template <class T>
HWY_INLINE hn::Vec<df_t> load_lanes(const T* HWY_RESTRICT p, size_t count) {
  if (count == hn::Lanes(df_t())) return load_f32(p);
  HWY_ALIGN_MAX T tmp[k_max_lanes] = {};
  std::memcpy(tmp, p, count * sizeof(T));
  return load_f32(tmp);
}

HWY_INLINE void store_f32_lanes(hn::Vec<df_t> x, float* HWY_RESTRICT p, size_t count) {
  const df_t df;
  if (count == hn::Lanes(df)) return hn::StoreU(x, df, p);
  HWY_ALIGN_MAX float tmp[k_max_lanes];
  hn::Store(x, df, tmp);
  std::memcpy(p, tmp, count * 4);
}

template <class H>
HWY_INLINE void store_half_lanes(hn::Vec<df_t> x, H* HWY_RESTRICT p, size_t count, bool stream) {
  if constexpr (!std::is_same_v<H, no_half>) {
    if (count == hn::Lanes(df_t())) return store_from_f32(x, p, stream);
    HWY_ALIGN_MAX H tmp[k_max_lanes];
    store_from_f32(x, tmp, false);
    std::memcpy(p, tmp, count * sizeof(H));
  }
}

// One quantization block [b, e) with int8 moments, op_step or op_undo. Pass 1 decodes the
// moments, applies the f32 step (or its inverse, restoring p there) and keeps the new moments
// in a block-sized stack buffer with their largest |m| and v; pass 2 encodes them against the new
// scales, stores the codes, and (step) updates p from the decoded stored values.
template <op O, bool A, class G, class H>
HWY_NOINLINE void update_qblock(const chunk_ref& c, const step_scalars& s, size_t b, size_t e, bool stream,
                                sq_acc& acc, size_t begin, std::vector<undo_entry>* log, const float* old_scales) {
  static_assert(O != op::op_redo, "int8 redo runs as undo then step");
  const df_t df;
  const size_t N = hn::Lanes(df);
  HWY_ALIGN_MAX float bm[k_quant_block], bv[k_quant_block];
  const G* grad = static_cast<const G*>(c.grad);
  auto* qm = static_cast<int8_t*>(c.m);
  auto* qv = static_cast<uint8_t*>(c.v);
  H* half_out = nullptr;
  if constexpr (!std::is_same_v<H, no_half>) half_out = static_cast<H*>(c.half_out);
  const size_t qi = b / k_quant_block;
  const float am_old = c.m_scale[qi], av_old = c.v_scale[qi], sqrt_av_old = std::sqrt(av_old);
  const auto decay = hn::Set(df, s.decay), mult = hn::Set(df, s.mult);
  auto max_m = hn::Zero(df), max_v = hn::Zero(df);
  // The lanes the undo log needs, per vector of pass 1 (mask bits), logged after it: no call in the
  // loop, whose vector registers a call would clobber.
  const size_t mask_bytes = (N + 7) / 8;
  HWY_ALIGN_MAX uint8_t ill_bits[k_quant_block + 8];
  bool any_ill = false;
  for (size_t i = b; i < e; i += N) {
    const size_t n = std::min(N, e - i);
    auto gr = load_lanes(grad + i, n);
    if constexpr (A) gr = hn::Add(load_lanes(c.grad_acc + i, n), gr);
    const auto g = hn::Mul(gr, mult);
    auto M = decode_code(load_codes(qm + i, n), codes::k_inv_m_levels, am_old);
    const auto qv_old = load_codes(qv + i, n);
    auto V = decode_v_code(qv_old, av_old);
    if constexpr (O == op::op_undo) {
      const auto term = update_term_sqrt(M, sqrt_v_code(qv_old, sqrt_av_old), s);
      const auto P = hn::Div(hn::Add(load_lanes(c.param + i, n), term), decay);
      store_f32_lanes(P, c.param + i, n);
      store_half_lanes(P, half_out ? half_out + i : nullptr, n, false);
      invert_moments(M, V, g, s);
    } else {
      acc.add(g);
      const auto m_old = M, v_old = V;
      advance_moments(M, V, g, s);
      if (s.log_ratio > 0) {
        const auto ill = ill_lanes(m_old, v_old, V, s.log_ratio);
        hn::StoreMaskBits(df, ill, ill_bits + (i - b) / N * mask_bytes);
        any_ill |= !hn::AllFalse(df, ill);
      }
    }
    hn::Store(M, df, bm + (i - b));
    hn::Store(V, df, bv + (i - b));
    max_m = hn::Max(max_m, hn::Abs(M));
    max_v = hn::Max(max_v, V);
  }
  if (any_ill) {
    // The old moments again from the codes, which pass 2 has not yet overwritten: the same values.
    for (size_t i = b; i < e; i += N) {
      const auto ill = hn::LoadMaskBits(df, ill_bits + (i - b) / N * mask_bytes);
      if (hn::AllFalse(df, ill)) continue;
      const size_t n = std::min(N, e - i);
      const auto m_old = decode_code(load_codes(qm + i, n), codes::k_inv_m_levels, am_old);
      const auto v_old = decode_v_code(load_codes(qv + i, n), av_old);
      log_lanes(ill, m_old, v_old, i - begin, log);
    }
  }
  // Undo with the step's log re-encodes against the scales before the step (what the logged
  // elements' old codes were coded with), not the maxima of the inverted values.
  const float am = old_scales ? old_scales[0] : hn::GetLane(hn::MaxOfLanes(df, max_m));
  const float av = old_scales ? old_scales[1] : hn::GetLane(hn::MaxOfLanes(df, max_v));
  c.m_scale[qi] = am;
  c.v_scale[qi] = av;
  const float im = codes::inv_scale(am), iv = codes::inv_scale(av), sqrt_av = std::sqrt(av);
  for (size_t i = b; i < e; i += N) {
    const size_t n = std::min(N, e - i);
    const auto cm = encode_level<false>(hn::Load(df, bm + (i - b)), im, codes::k_m_levels, s.fast_roots);
    const auto cv = encode_level<true>(hn::Load(df, bv + (i - b)), iv, codes::k_v_levels, s.fast_roots);
    store_codes(cm, qm + i, n);
    store_codes(cv, qv + i, n);
    if constexpr (O == op::op_step) {
      const auto M = decode_code(cm, codes::k_inv_m_levels, am);
      const auto P = hn::MulSub(load_lanes(c.param + i, n), decay, update_term_sqrt(M, sqrt_v_code(cv, sqrt_av), s));
      store_f32_lanes(P, c.param + i, n);
      store_half_lanes(P, half_out ? half_out + i : nullptr, n, stream && n == N);
    }
  }
}

template <op O, bool A, class G, class H>
grad_stats update_range_int8(const chunk_ref& c, const step_scalars& s, size_t begin, size_t end,
                             std::vector<undo_entry>* log) {
  sq_acc acc;
  if constexpr (O != op::op_redo) {
    for (size_t b = begin; b < end; b += k_quant_block) {
      const float* old = s.old_scales ? s.old_scales + 2 * ((b - begin) / k_quant_block) : nullptr;
      update_qblock<O, A, G, H>(c, s, b, std::min(end, b + k_quant_block), s.stream_half, acc, begin, log, old);
    }
    if (s.stream_half && c.half_out) hwy::FlushStream();
  }
  return grad_stats{acc.sum(), 0};
}

template <op O, bool A, class G, class H>
grad_stats update_k(const chunk_ref& c, const step_scalars& s, size_t b, size_t e, std::vector<undo_entry>* log) {
  switch (c.moments) {
    case moments_kind::f32: return update_range<O, A, G, H, float>(c, s, b, e, log);
    case moments_kind::bf16: return update_range<O, A, G, H, uint16_t>(c, s, b, e, log);
    case moments_kind::int8: return update_range_int8<O, A, G, H>(c, s, b, e, log);
  }
  return {};
}

template <op O, bool A, class G>
grad_stats update_h(const chunk_ref& c, const step_scalars& s, size_t b, size_t e,
                    std::vector<undo_entry>* log) {
  if (c.half_out == nullptr) return update_k<O, A, G, no_half>(c, s, b, e, log);
  if (c.half_dtype == dtype::dtype_f16) return update_k<O, A, G, hwy::float16_t>(c, s, b, e, log);
  return update_k<O, A, G, hwy::bfloat16_t>(c, s, b, e, log);
}

template <op O, class G>
grad_stats update_g(const chunk_ref& c, const step_scalars& s, size_t b, size_t e,
                    std::vector<undo_entry>* log) {
  return c.grad_acc ? update_h<O, true, G>(c, s, b, e, log) : update_h<O, false, G>(c, s, b, e, log);
}

template <op O>
grad_stats update_o(const chunk_ref& c, const step_scalars& s, size_t b, size_t e,
                    std::vector<undo_entry>* log) {
  switch (c.grad_dtype) {
    case dtype::dtype_f32: return update_g<O, float>(c, s, b, e, log);
    case dtype::dtype_f16: return update_g<O, hwy::float16_t>(c, s, b, e, log);
    case dtype::dtype_bf16: return update_g<O, hwy::bfloat16_t>(c, s, b, e, log);
  }
  return {};
}

grad_stats update(op o, const chunk_ref& c, const step_scalars& s, size_t b, size_t e,
                  std::vector<undo_entry>* log) {
  switch (o) {
    case op::op_step: return update_o<op::op_step>(c, s, b, e, log);
    case op::op_undo: return update_o<op::op_undo>(c, s, b, e, log);
    case op::op_redo: return update_o<op::op_redo>(c, s, b, e, log);
  }
  return {};
}

// The non-finite count is only taken (scalar) when the block's sum is not finite, which any
// inf/NaN element forces.
// g = acc + grad (acc may be null), as the update reads it.
template <class G>
HWY_INLINE auto load_g(const G* grad, const float* acc) {
  const auto g = load_f32(grad);
  return acc ? hn::Add(hn::LoadU(df_t(), acc), g) : g;
}

template <class G>
float scalar_g(const G* grad, const float* acc, size_t k) {
  return acc ? acc[k] + scalar_to_f32(grad[k]) : scalar_to_f32(grad[k]);
}

template <class G>
grad_stats stats_range(const G* grad, const float* gacc, size_t begin, size_t end, float mult) {
  const df_t df;
  const size_t N = hn::Lanes(df);
  const auto vmult = hn::Set(df, mult);
  sq_acc acc;
  size_t i = begin;
  for (; i + N <= end; i += N) acc.add(hn::Mul(load_g(grad + i, gacc ? gacc + i : nullptr), vmult));
  if (i < end) {
    HWY_ALIGN_MAX G tg[k_max_lanes] = {};
    HWY_ALIGN_MAX float ta[k_max_lanes] = {};
    std::memcpy(tg, grad + i, (end - i) * sizeof(G));
    if (gacc) std::memcpy(ta, gacc + i, (end - i) * 4);
    acc.add(hn::Mul(load_g(tg, gacc ? ta : nullptr), vmult));
  }
  grad_stats st{acc.sum(), 0};
  if (!std::isfinite(st.sum_sq)) {
    for (size_t k = begin; k < end; ++k) st.nonfinite += !std::isfinite(scalar_g(grad, gacc, k) * mult);
  }
  return st;
}

// max |grad| over [begin, end) as the bits of a non-negative float: for non-negative IEEE
// values the bit patterns order like the values, and NaN orders above inf. One AND and one
// integer MAX per vector, so the pre-scan runs at read bandwidth.
template <class G>
float max_abs_range(const G* grad, const float* gacc, size_t begin, size_t end) {
  const df_t df;
  const hn::RebindToSigned<df_t> di;
  const size_t N = hn::Lanes(df);
  const auto mask = hn::Set(di, 0x7FFFFFFF);
  auto mx = hn::Zero(di);
  size_t i = begin;
  for (; i + N <= end; i += N)
    mx = hn::Max(mx, hn::And(hn::BitCast(di, load_g(grad + i, gacc ? gacc + i : nullptr)), mask));
  if (i < end) {
    HWY_ALIGN_MAX G tg[k_max_lanes] = {};
    HWY_ALIGN_MAX float ta[k_max_lanes] = {};
    std::memcpy(tg, grad + i, (end - i) * sizeof(G));
    if (gacc) std::memcpy(ta, gacc + i, (end - i) * 4);
    mx = hn::Max(mx, hn::And(hn::BitCast(di, load_g(tg, gacc ? ta : nullptr)), mask));
  }
  const int32_t bits = hn::GetLane(hn::MaxOfLanes(di, mx));
  return half::f32_from_bits(static_cast<uint32_t>(bits));
}

float max_abs(const void* grad, dtype t, const float* acc, size_t begin, size_t end) {
  switch (t) {
    case dtype::dtype_f32: return max_abs_range(static_cast<const float*>(grad), acc, begin, end);
    case dtype::dtype_f16: return max_abs_range(static_cast<const hwy::float16_t*>(grad), acc, begin, end);
    case dtype::dtype_bf16: return max_abs_range(static_cast<const hwy::bfloat16_t*>(grad), acc, begin, end);
  }
  return 0;
}

grad_stats stats(const void* grad, dtype t, const float* acc, size_t begin, size_t end, float mult) {
  switch (t) {
    case dtype::dtype_f32: return stats_range(static_cast<const float*>(grad), acc, begin, end, mult);
    case dtype::dtype_f16:
      return stats_range(static_cast<const hwy::float16_t*>(grad), acc, begin, end, mult);
    case dtype::dtype_bf16:
      return stats_range(static_cast<const hwy::bfloat16_t*>(grad), acc, begin, end, mult);
  }
  return {};
}

template <class S, class D>
void convert_range(const S* src, D* dst, size_t begin, size_t end) {
  const size_t N = hn::Lanes(df_t());
  size_t i = begin;
  for (; i + N <= end; i += N) store_from_f32(load_f32(src + i), dst + i, false);
  for (; i < end; ++i) scalar_from_f32(scalar_to_f32(src[i]), dst + i);
}

template <class S>
void convert_s(const S* src, void* dst, dtype dt, size_t b, size_t e) {
  switch (dt) {
    case dtype::dtype_f32: return convert_range(src, static_cast<float*>(dst), b, e);
    case dtype::dtype_f16: return convert_range(src, static_cast<hwy::float16_t*>(dst), b, e);
    case dtype::dtype_bf16: return convert_range(src, static_cast<hwy::bfloat16_t*>(dst), b, e);
  }
}

void convert(const void* src, dtype st, void* dst, dtype dt, size_t b, size_t e) {
  if (st == dt) {
    const size_t w = dtype_size(st);
    std::memcpy(static_cast<char*>(dst) + b * w, static_cast<const char*>(src) + b * w, (e - b) * w);
    return;
  }
  switch (st) {
    case dtype::dtype_f32: return convert_s(static_cast<const float*>(src), dst, dt, b, e);
    case dtype::dtype_f16: return convert_s(static_cast<const hwy::float16_t*>(src), dst, dt, b, e);
    case dtype::dtype_bf16:
      return convert_s(static_cast<const hwy::bfloat16_t*>(src), dst, dt, b, e);
  }
}

template <class G>
void accumulate_range(const G* grad, float* acc, size_t begin, size_t end) {
  const df_t df;
  const size_t N = hn::Lanes(df);
  size_t i = begin;
  for (; i + N <= end; i += N) hn::StoreU(hn::Add(hn::LoadU(df, acc + i), load_f32(grad + i)), df, acc + i);
  for (; i < end; ++i) acc[i] += scalar_to_f32(grad[i]);   // the same single rounding as the lanes
}

void accumulate(const void* grad, dtype t, float* acc, size_t b, size_t e) {
  switch (t) {
    case dtype::dtype_f32: return accumulate_range(static_cast<const float*>(grad), acc, b, e);
    case dtype::dtype_f16: return accumulate_range(static_cast<const hwy::float16_t*>(grad), acc, b, e);
    case dtype::dtype_bf16: return accumulate_range(static_cast<const hwy::bfloat16_t*>(grad), acc, b, e);
  }
}

kernel_table make_table() {
  return kernel_table{hwy::TargetName(HWY_TARGET), &stats, &max_abs, &update, &convert, &accumulate};
}

}  // namespace ferry::cpu_optim::detail::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace ferry::cpu_optim {
namespace detail {
HWY_EXPORT(make_table);

kernel_table kernels() { return HWY_DYNAMIC_DISPATCH(make_table)(); }
}  // namespace detail

std::vector<std::string> compiled_targets() {
  std::vector<std::string> out;
  for (int64_t t = HWY_TARGETS; t != 0; t &= t - 1) out.emplace_back(hwy::TargetName(t & -t));
  return out;
}

std::string active_target() { return detail::kernels().target; }

bool force_target(const std::string& name) {
  hwy::SetSupportedTargetsForTest(0);  // back to what the CPU really supports
  if (name == "auto") {
    hwy::GetChosenTarget().Update(hwy::SupportedTargets());
    return true;
  }
  for (int64_t t = HWY_TARGETS; t != 0; t &= t - 1) {
    const int64_t bit = t & -t;
    if (name != hwy::TargetName(bit)) continue;
    if ((hwy::SupportedTargets() & bit) == 0) break;
    hwy::SetSupportedTargetsForTest(bit);
    hwy::GetChosenTarget().Update(hwy::SupportedTargets());
    return true;
  }
  hwy::GetChosenTarget().Update(hwy::SupportedTargets());
  return false;
}
}  // namespace ferry::cpu_optim
#endif  // HWY_ONCE
