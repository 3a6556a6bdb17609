// Compact AdamW moments (bf16, int8) against a double-precision scalar model of the same
// quantizer and update, for every compiled ISA target: step, undo, redo, thread counts, the
// special blocks (zeros, subnormals, an outlier, all-equal values), stochastic rounding's bias, and
// the whole-chunk conversions checkpoints use.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "cpu_optim/moment_codes.h"
#include "tests/cpu_optim/test_util.h"

namespace ferry::cpu_optim::test {
namespace {

constexpr double k_flt_min = 1.17549435e-38;
const double k_slack = std::ldexp(1.0, -22);  // fp32 evaluation error, relative to the terms

// One chunk's fp32 master weights and compact moments.
struct compact {
  moments_kind kind;
  size_t n;
  std::vector<float> p;
  std::vector<uint16_t> m16, v16;
  std::vector<int8_t> mq;
  std::vector<uint8_t> vq;
  std::vector<float> ms, vs;
  std::vector<uint16_t> half_out;

  compact(moments_kind k, size_t n_) : kind(k), n(n_), p(n_), half_out(n_, 0xABCD) {
    if (k == moments_kind::bf16) {
      m16.assign(n, 0);
      v16.assign(n, 0);
    } else {
      mq.assign(n, 0);
      vq.assign(n, 0);
      ms.assign(quant_blocks(n), 0.0f);
      vs.assign(quant_blocks(n), 0.0f);
    }
  }
  moments_ref ref() {
    moments_ref r;
    r.kind = kind;
    r.n = n;
    if (kind == moments_kind::bf16) {
      r.m = m16.data();
      r.v = v16.data();
    } else {
      r.m = mq.data();
      r.v = vq.data();
      r.m_scale = ms.data();
      r.v_scale = vs.data();
    }
    return r;
  }
  chunk_ref chunk(const std::vector<uint8_t>& grad, dtype gt, dtype ht, bool with_half, uint64_t seed = 11) {
    const moments_ref r = ref();
    chunk_ref c{p.data(), r.m, r.v, grad.data(), gt, with_half ? half_out.data() : nullptr, ht, n};
    c.moments = kind;
    c.m_scale = r.m_scale;
    c.v_scale = r.v_scale;
    c.seed = seed;
    return c;
  }
  void decoded(std::vector<float>& m, std::vector<float>& v) {
    m.resize(n);
    v.resize(n);
    decode_moments(ref(), m.data(), v.data());
  }
  bool same_bits(const compact& o) const {
    return bits_equal(p, o.p) && m16 == o.m16 && v16 == o.v16 && mq == o.mq && vq == o.vq && bits_equal(ms, o.ms) &&
           bits_equal(vs, o.vs) && half_out == o.half_out;
  }
};

// A state after some training: master ~ N(0, 0.5), m ~ N(0, s_m), v = m'^2-like, stored in the kind.
compact random_compact(std::mt19937& rng, moments_kind k, size_t n) {
  compact c(k, n);
  c.p = normal(rng, n, 0.5f);
  std::vector<float> m = normal(rng, n, 0.01f), v = normal(rng, n, 0.01f);
  for (float& x : v) x = x * x + 1e-6f;
  encode_moments(m.data(), v.data(), c.ref());
  return c;
}

double ulp_bf16(double x) {
  const double a = std::fabs(x);
  if (a < k_flt_min) return std::ldexp(1.0, -133);
  return std::ldexp(1.0, std::ilogb(a) - 7);
}

struct scalars {
  double b1, c1, b2, c2, decay, step_size, inv_sqrt_bc2, eps;
  scalars(const adamw_hparams& h, int64_t step) {
    b1 = h.beta1;
    b2 = h.beta2;
    c1 = float(1.0 - b1);
    c2 = float(1.0 - b2);
    decay = float(1.0 - double(h.lr) * h.weight_decay);
    step_size = float(h.lr / (1.0 - std::pow(b1, double(step))));
    inv_sqrt_bc2 = float(1.0 / std::sqrt(1.0 - std::pow(b2, double(step))));
    eps = h.eps;
  }
  double term(double m, double v) const { return step_size * m / (std::sqrt(v) * inv_sqrt_bc2 + eps); }
};

// The stored moments of `after` against the double-precision values the op should have stored
// (mr, vr: before rounding to the kind's form; sm, sv: the kernel's fp32 evaluation error of
// them, 2^-22 of the terms' magnitudes, which dominates where the terms cancel). int8: each
// block's scale is its largest |value| and each code the nearest level of (|x|/A)^(1/4)
// (subnormal blocks: all zero); bf16: within one bf16 ulp (stochastic rounding picks one of the
// two neighbours; round to nearest is closer).
void expect_moments(compact& after, const std::vector<double>& mr, const std::vector<double>& vr,
                    const std::vector<double>& sm, const std::vector<double>& sv, const char* what) {
  SCOPED_TRACE(what);
  std::vector<float> md, vd;
  after.decoded(md, vd);
  int bad = 0;
  if (after.kind == moments_kind::bf16) {
    for (size_t i = 0; i < after.n && bad < 5; ++i) {
      if (std::fabs(md[i] - mr[i]) > ulp_bf16(mr[i]) * 1.0001 + sm[i] ||
          std::fabs(vd[i] - vr[i]) > ulp_bf16(vr[i]) * 1.0001 + sv[i]) {
        ADD_FAILURE() << "element " << i << ": m " << md[i] << " vs " << mr[i] << ", v " << vd[i] << " vs " << vr[i];
        ++bad;
      }
    }
    return;
  }
  for (size_t b = 0; b < quant_blocks(after.n) && bad < 5; ++b) {
    const size_t lo = b * k_quant_block, hi = std::min(after.n, lo + k_quant_block);
    double am = 0, av = 0, sam = 0, sav = 0;
    for (size_t i = lo; i < hi; ++i) {
      am = std::max(am, std::fabs(mr[i]));
      av = std::max(av, vr[i]);
      sam = std::max(sam, sm[i]);
      sav = std::max(sav, sv[i]);
    }
    EXPECT_NEAR(after.ms[b], am, 1e-6 * am + sam) << "m scale of block " << b;
    EXPECT_NEAR(after.vs[b], av, 1e-6 * av + sav) << "v scale of block " << b;
    for (size_t i = lo; i < hi && bad < 5; ++i) {
      // The levels of the value's interval [x - slack, x + slack]; the code must be the nearest
      // level of some point in it.
      auto level = [](double x, double a, double levels) { return a < k_flt_min ? 0 : levels * std::pow(std::max(0.0, x) / a, 0.25); };
      const double am_k = after.ms[b], av_k = after.vs[b];
      const double m_lo = level(std::fabs(mr[i]) - sm[i], am_k, 127), m_hi = level(std::fabs(mr[i]) + sm[i], am_k, 127);
      const double v_lo = level(vr[i] - sv[i], av_k, 255), v_hi = level(vr[i] + sv[i], av_k, 255);
      const int qm = after.mq[i], qv = after.vq[i];
      const bool sign_ok = qm == 0 || std::fabs(mr[i]) <= sm[i] || (qm < 0) == (mr[i] < 0);
      const double t = 0.5 + 5e-4;  // fast_roots: within ~1e-6 relative
      // A positive v codes to at least 1 (moment_codes.h encode_v).
      const double v_top = vr[i] + sv[i] > 0 && av_k >= k_flt_min ? std::max(v_hi, 1.0) : v_hi;
      if (std::abs(qm) < m_lo - t || std::abs(qm) > std::min(127.0, m_hi + t) || qv < v_lo - t || qv > v_top + t ||
          !sign_ok) {
        ADD_FAILURE() << "element " << i << ": m code " << qm << " for level " << m_lo << ".." << m_hi << " (m " << mr[i]
                      << "), v code " << qv << " for level " << v_lo << ".." << v_hi;
        ++bad;
      }
    }
  }
}

// p against p_ref, with the documented f32 bound (README.md): 1e-6 |p| + 1e-5 lr; the half copy
// is p rounded.
void expect_params(const compact& after, const std::vector<double>& pr, float lr, dtype ht, bool with_half) {
  int bad = 0;
  for (size_t i = 0; i < after.n && bad < 5; ++i) {
    if (std::fabs(after.p[i] - pr[i]) > 1e-6 * std::fabs(pr[i]) + 1e-5 * lr) {
      ADD_FAILURE() << "p[" << i << "] " << after.p[i] << " vs " << pr[i];
      ++bad;
    }
    if (with_half && after.half_out[i] != to_half(after.p[i], ht)) {
      ADD_FAILURE() << "half copy of p[" << i << "]";
      ++bad;
    }
  }
}

class moments_target : public target_test {};

const moments_kind k_kinds[] = {moments_kind::bf16, moments_kind::int8};
const size_t k_sizes[] = {1, 7, 17, 2048, 2049, 5000, 16384 + 33, 40000};

// Three steps with weight decay, every gradient dtype and half copy, lengths over the vector tail,
// the quantization block and the work block; each step checked against the model computed from
// the state the kernel left before it (the moments' rounding makes trajectories diverge, so the
// model is stepwise). The update must use the stored moments: p is checked against them.
TEST_P(moments_target, step_matches_the_double_model) {
  const uint32_t seed = draw_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  adamw opt(3);
  adamw_tuning fast_tuning;
  fast_tuning.fast_roots = true;
  adamw fast(3, fast_tuning);
  const adamw_hparams h{1e-3f, 0.9f, 0.999f, 1e-8f, 0.1f};
  for (moments_kind k : k_kinds) {
    for (size_t n : k_sizes) {
      for (dtype gt : {dtype::dtype_f32, dtype::dtype_f16, dtype::dtype_bf16}) {
        const dtype ht = gt == dtype::dtype_bf16 ? dtype::dtype_bf16 : dtype::dtype_f16;
        const bool with_half = gt != dtype::dtype_f32;
        SCOPED_TRACE(std::string(moments_kind_name(k)) + " n " + std::to_string(n) + " grad " + dtype_name(gt));
        compact s = random_compact(rng, k, n);
        for (int64_t step = 1; step <= 3; ++step) {
          std::vector<float> g, m0, v0;
          const auto grad = encode(normal(rng, n, 0.02f), gt, &g);
          const float mult = 0.75f;
          s.decoded(m0, v0);
          const std::vector<float> p0 = s.p;
          // Step 2 of int8 takes the fourth roots from the fast estimate (adamw_tuning::fast_roots).
          adamw& o = k == moments_kind::int8 && step == 2 ? fast : opt;
          o.step(s.chunk(grad, gt, ht, with_half), h, step, mult);
          const scalars c(h, step);
          std::vector<double> mr(n), vr(n), pr(n), sm(n), sv(n);
          for (size_t i = 0; i < n; ++i) {
            const double gi = double(g[i]) * mult;
            mr[i] = c.b1 * m0[i] + c.c1 * gi;
            vr[i] = c.b2 * v0[i] + c.c2 * gi * gi;
            sm[i] = k_slack * (std::fabs(c.b1 * m0[i]) + std::fabs(c.c1 * gi));
            sv[i] = k_slack * vr[i];
          }
          expect_moments(s, mr, vr, sm, sv, "step");
          std::vector<float> m1, v1;
          s.decoded(m1, v1);
          for (size_t i = 0; i < n; ++i) pr[i] = p0[i] * c.decay - c.term(m1[i], v1[i]);
          expect_params(s, pr, h.lr, ht, with_half);
          if (HasFailure()) return;
        }
      }
    }
  }
}

// undo(a) against the inverse computed from what the step stored; the restored state within one
// rounding of the kind of the state before; redo(a -> b) bit-identical to undo then step(b).
TEST_P(moments_target, undo_and_redo) {
  const uint32_t seed = draw_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  adamw opt(2);
  const adamw_hparams h{1e-3f, 0.9f, 0.999f, 1e-8f, 0.1f};
  const int64_t step = 4;
  const scalars c(h, step);
  for (moments_kind k : k_kinds) {
    for (size_t n : {size_t(17), size_t(40000)}) {
      SCOPED_TRACE(std::string(moments_kind_name(k)) + " n " + std::to_string(n));
      const compact s0 = random_compact(rng, k, n);
      std::vector<float> g;
      const auto grad = encode(normal(rng, n, 0.02f), dtype::dtype_f16, &g);
      const float a = 1.0f, b = 0.37f;
      compact s1 = s0;
      opt.step(s1.chunk(grad, dtype::dtype_f16, dtype::dtype_f16, true), h, step, a);
      compact undone = s1;
      opt.undo(undone.chunk(grad, dtype::dtype_f16, dtype::dtype_f16, true), h, step, a);
      std::vector<float> m1, v1, m0, v0, m2, v2;
      s1.decoded(m1, v1);
      compact s0c = s0;
      s0c.decoded(m0, v0);
      undone.decoded(m2, v2);
      std::vector<double> mr(n), vr(n), pr(n), sm(n), sv(n);
      for (size_t i = 0; i < n; ++i) {
        const double gi = double(g[i]) * a;
        pr[i] = (double(s1.p[i]) + c.term(m1[i], v1[i])) / c.decay;
        mr[i] = (m1[i] - c.c1 * gi) / c.b1;
        vr[i] = std::max(0.0, (v1[i] - c.c2 * gi * gi) / c.b2);
        sm[i] = k_slack * (std::fabs(m1[i]) + std::fabs(c.c1 * gi)) / c.b1;
        sv[i] = k_slack * (v1[i] + c.c2 * gi * gi) / c.b2;
      }
      expect_moments(undone, mr, vr, sm, sv, "undo");
      expect_params(undone, pr, h.lr, dtype::dtype_f16, true);
      // Against the state before the step: p as the f32 bound (the update term is recomputed
      // exactly), the moments within the two roundings (step and undo) of their form.
      const double u = std::ldexp(1.0, -23);
      for (size_t i = 0; i < n; ++i) {
        ASSERT_LE(std::fabs(undone.p[i] - s0.p[i]), 4 * u * (std::fabs(s0.p[i]) + std::fabs(s1.p[i])) + 1e-12) << i;
        const double rel = k == moments_kind::bf16 ? std::ldexp(1.0, -7) : 0.035;  // int8: 4/127 top step
        const double ref_m = k == moments_kind::bf16 ? std::fabs(m0[i]) + std::fabs(m1[i]) / c.b1
                                                     : s0c.ms[i / k_quant_block] + s1.ms[i / k_quant_block] / c.b1;
        const double ref_v = k == moments_kind::bf16 ? v0[i] + v1[i] / c.b2
                                                     : s0c.vs[i / k_quant_block] + s1.vs[i / k_quant_block] / c.b2;
        ASSERT_LE(std::fabs(m2[i] - m0[i]), rel * ref_m + 1e-30) << "m " << i;
        ASSERT_LE(std::fabs(v2[i] - v0[i]), rel * ref_v + 1e-30) << "v " << i;
      }
      compact redone = s1, again = undone;
      opt.redo(redone.chunk(grad, dtype::dtype_f16, dtype::dtype_f16, true), h, step, a, b);
      opt.step(again.chunk(grad, dtype::dtype_f16, dtype::dtype_f16, true), h, step, b);
      EXPECT_TRUE(redone.same_bits(again)) << "redo differs from undo + step";
    }
  }
}

// Every step rolled back (speculative step(a) with its log, then redo to the clip coefficient b)
// against the direct steps with b, over 30 steps from a state with fresh (zero) and nearly idle
// moments and a gradient with outliers. A rollback re-rounds the moments once more (undo cannot be
// exact in a compact form), so the rolled-back trajectory differs from the direct one by about the
// form's own rounding noise, which is measured beside it: the direct compact trajectory against
// fp32's. The RMS difference (in lr) must stay within a small multiple of that noise and no
// element may run away (a v lost to zero beside a surviving m gives m/eps updates of ~1e5 lr).
TEST_P(moments_target, rollback_every_step_tracks_the_direct_trajectory) {
  const uint32_t seed = draw_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  adamw opt(2);
  const adamw_hparams h{1e-3f, 0.9f, 0.999f, 1e-8f, 0.1f};
  const size_t n = 20000;
  for (moments_kind k : k_kinds) {
    SCOPED_TRACE(moments_kind_name(k));
    compact direct = random_compact(rng, k, n);
    std::vector<float> m, v;
    direct.decoded(m, v);
    for (size_t i = 0; i < n; i += 5) m[i] = v[i] = 0.0f;   // fresh elements
    for (size_t i = 1; i < n; i += 7) {                      // nearly idle ones
      m[i] *= 1e-3f;
      v[i] *= 1e-6f;
    }
    encode_moments(m.data(), v.data(), direct.ref());
    direct.decoded(m, v);
    std::vector<float> p32 = direct.p;                       // fp32 from the same start
    compact spec = direct;
    undo_log log;
    size_t logged = 0;
    for (int64_t step = 1; step <= 30; ++step) {
      std::vector<float> gv = normal(rng, n, 0.01f), g;
      for (size_t i = 0; i < n; i += 97) gv[i] *= 100;
      const auto grad = encode(gv, dtype::dtype_f16, &g);
      const float a = 1.0f, b = 0.3f;
      opt.step(chunk_ref{p32.data(), m.data(), v.data(), grad.data(), dtype::dtype_f16, nullptr, dtype::dtype_f16, n}, h,
               step, b);
      opt.step(direct.chunk(grad, dtype::dtype_f16, dtype::dtype_f16, true), h, step, b);
      opt.step(spec.chunk(grad, dtype::dtype_f16, dtype::dtype_f16, true), h, step, a, &log);
      logged += log.entries();
      opt.redo(spec.chunk(grad, dtype::dtype_f16, dtype::dtype_f16, true), h, step, a, b, &log);
    }
    double noise = 0, drift = 0, worst = 0;
    for (size_t i = 0; i < n; ++i) {
      const double a = (double(direct.p[i]) - p32[i]) / h.lr, d = (double(spec.p[i]) - direct.p[i]) / h.lr;
      noise += a * a;
      drift += d * d;
      worst = std::max(worst, std::fabs(d));
    }
    noise = std::sqrt(noise / double(n));
    drift = std::sqrt(drift / double(n));
    std::printf("[ rollback ] %s %s: %zu log entries over 30 steps; RMS |p - fp32's| %.3f lr, RMS |p_redo - p| %.3f lr "
                "(worst %.2f lr)\n", active_target().c_str(), moments_kind_name(k), logged, noise, drift, worst);
    EXPECT_GT(logged, 0u);
    EXPECT_LT(drift, 3 * noise) << "rolling back drifts more than the form's own rounding";
    EXPECT_LT(worst, 30.0) << "an element ran away";
  }
}

// Bit-identical for any thread count; a different seed draws different bf16 roundings.
TEST_P(moments_target, thread_count_and_seed) {
  const uint32_t seed = draw_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  const adamw_hparams h{1e-3f, 0.9f, 0.999f, 1e-8f, 0.1f};
  for (moments_kind k : k_kinds) {
    const size_t n = 100003;
    const compact s0 = random_compact(rng, k, n);
    std::vector<float> g;
    const auto grad = encode(normal(rng, n, 0.02f), dtype::dtype_bf16, &g);
    compact a = s0, b = s0, other = s0;
    adamw one(1), three(3);
    for (int64_t step = 1; step <= 3; ++step) {
      one.step(a.chunk(grad, dtype::dtype_bf16, dtype::dtype_bf16, true), h, step, 1.0f);
      three.step(b.chunk(grad, dtype::dtype_bf16, dtype::dtype_bf16, true), h, step, 1.0f);
      three.step(other.chunk(grad, dtype::dtype_bf16, dtype::dtype_bf16, true, 12), h, step, 1.0f);
    }
    EXPECT_TRUE(a.same_bits(b)) << moments_kind_name(k);
    if (k == moments_kind::bf16) {
      EXPECT_NE(a.m16, other.m16) << "the seed changes no rounding";
    }
    if (k == moments_kind::int8) {
      EXPECT_TRUE(a.same_bits(other)) << "int8 rounds to nearest, whatever the seed";
    }
  }
}

// Stochastic rounding is unbiased: 65536 elements with the same state and gradient; their mean
// stored m must be the exact m within 8 standard errors (round to nearest or truncation would be
// off by at least a tenth of an ulp here).
TEST_P(moments_target, bf16_rounding_is_unbiased) {
  const size_t n = 65536;
  compact s(moments_kind::bf16, n);
  const float gval = 1.0f + 0.3f * std::ldexp(1.0f, -7);
  std::vector<float> g(n, gval), dec;
  const auto grad = encode(g, dtype::dtype_f32, &dec);
  adamw opt(2);
  const adamw_hparams h{1e-3f, 0.9f, 0.999f, 1e-8f, 0.0f};
  for (int64_t step = 1; step <= 2; ++step) {
    std::vector<float> m0, v0;
    s.decoded(m0, v0);
    opt.step(s.chunk(grad, dtype::dtype_f32, dtype::dtype_f16, false), h, step, 1.0f);
    const double exact = double(0.9f * m0[0]) + double(float(1.0 - 0.9) * gval);  // the kernel's fp32 value
    const double ulp = ulp_bf16(exact);
    const double frac = (exact - std::ldexp(std::floor(std::ldexp(exact, -std::ilogb(exact) + 7)), std::ilogb(exact) - 7)) / ulp;
    ASSERT_GT(frac, 0.1);
    ASSERT_LT(frac, 0.9);
    std::vector<float> m1, v1;
    s.decoded(m1, v1);
    double mean = 0;
    for (float x : m1) mean += x;
    mean /= double(n);
    EXPECT_NEAR(mean, exact, 8 * ulp * 0.5 / std::sqrt(double(n))) << "step " << step << " fraction " << frac;
    std::fill(s.m16.begin(), s.m16.end(), s.m16[0]);  // the same state again for the next step
    std::fill(s.v16.begin(), s.v16.end(), s.v16[0]);
  }
}

// Special blocks: all zeros (codes and scales stay 0, p only decays), subnormal moments (flushed
// to zero, p unchanged by them), one huge outlier (the others keep non-zero v codes down to
// 1e-10 of the block's largest v), all-equal values (stored exactly).
TEST_P(moments_target, int8_special_blocks) {
  const size_t n = 3 * k_quant_block;
  adamw opt(2);
  const adamw_hparams h{1e-3f, 0.9f, 0.999f, 1e-8f, 0.1f};
  const scalars c(h, 1);
  compact s(moments_kind::int8, n);
  std::mt19937 rng(5);
  s.p = normal(rng, n, 1.0f);
  std::vector<float> g(n, 0.0f);
  for (size_t i = k_quant_block; i < 2 * k_quant_block; ++i) g[i] = 1e-40f;      // block 1: subnormal
  for (size_t i = 2 * k_quant_block; i < n; ++i) g[i] = -0.25f;                  // block 2: all equal
  std::vector<float> dec;
  const auto grad = encode(g, dtype::dtype_f32, &dec);
  const std::vector<float> p0 = s.p;
  opt.step(s.chunk(grad, dtype::dtype_f32, dtype::dtype_f16, false), h, 1, 1.0f);
  for (size_t i = 0; i < 2 * k_quant_block; ++i) {
    ASSERT_EQ(s.mq[i], 0) << i;
    ASSERT_EQ(s.vq[i], 0) << i;
    ASSERT_EQ(s.p[i], p0[i] * float(c.decay)) << i;
  }
  EXPECT_EQ(s.ms[0], 0.0f);
  EXPECT_EQ(s.vs[0], 0.0f);
  std::vector<float> m1, v1;
  s.decoded(m1, v1);
  for (size_t i = 2 * k_quant_block; i < n; ++i) {
    ASSERT_EQ(s.mq[i], -127) << i;
    ASSERT_EQ(s.vq[i], 255) << i;
    ASSERT_EQ(m1[i], -s.ms[2]) << i;
    ASSERT_EQ(v1[i], s.vs[2]) << i;
  }
  // Outlier: v spans 10 decades inside one block.
  compact o(moments_kind::int8, k_quant_block);
  std::vector<float> go(k_quant_block);
  for (size_t i = 0; i < k_quant_block; ++i) go[i] = std::ldexp(1.0f, -int(i % 17));  // 1 .. 2^-16
  go[100] = 1e3f;
  const auto grad_o = encode(go, dtype::dtype_f32, &dec);
  opt.step(o.chunk(grad_o, dtype::dtype_f32, dtype::dtype_f16, false), h, 1, 1.0f);
  std::vector<double> mr(k_quant_block), vr(k_quant_block);
  for (size_t i = 0; i < k_quant_block; ++i) {
    mr[i] = c.c1 * go[i];
    vr[i] = c.c2 * double(go[i]) * go[i];
  }
  std::vector<double> so(k_quant_block);
  for (size_t i = 0; i < k_quant_block; ++i) so[i] = k_slack * std::fabs(mr[i]);
  std::vector<double> sov(k_quant_block);
  for (size_t i = 0; i < k_quant_block; ++i) sov[i] = k_slack * vr[i];
  expect_moments(o, mr, vr, so, sov, "outlier block");
  for (size_t i = 0; i < k_quant_block; ++i)
    if (vr[i] >= 1e-10 * o.vs[0]) {
      ASSERT_GT(o.vq[i], 0) << "v of element " << i << " lost beside the outlier";
    }
}

// step(finite_known) skips only the pre-scan: bit-identical to a plain step on a finite gradient,
// for every kind.
TEST_P(moments_target, finite_known_step_is_the_same_step) {
  std::mt19937 rng(draw_seed());
  adamw opt(2);
  const adamw_hparams h{1e-3f, 0.9f, 0.999f, 1e-8f, 0.1f};
  const size_t n = 40000;
  for (moments_kind k : {moments_kind::f32, moments_kind::bf16, moments_kind::int8}) {
    compact a(k == moments_kind::f32 ? moments_kind::bf16 : k, n);
    std::vector<float> p = normal(rng, n, 0.5f), m(n, 0.0f), v(n, 0.0f);
    std::vector<float> g;
    const auto grad = encode(normal(rng, n, 0.02f), dtype::dtype_f16, &g);
    if (k == moments_kind::f32) {
      std::vector<float> p2 = p, m2 = m, v2 = v;
      std::vector<uint16_t> h1(n), h2(n);
      for (int64_t step = 1; step <= 2; ++step) {
        opt.step(chunk_ref{p.data(), m.data(), v.data(), grad.data(), dtype::dtype_f16, h1.data(), dtype::dtype_f16, n}, h,
                 step, 0.5f);
        opt.step(chunk_ref{p2.data(), m2.data(), v2.data(), grad.data(), dtype::dtype_f16, h2.data(), dtype::dtype_f16, n},
                 h, step, 0.5f, nullptr, true);
      }
      EXPECT_TRUE(bits_equal(p, p2) && bits_equal(m, m2) && bits_equal(v, v2) && h1 == h2) << "f32";
      continue;
    }
    a.p = p;
    compact b = a;
    for (int64_t step = 1; step <= 2; ++step) {
      opt.step(a.chunk(grad, dtype::dtype_f16, dtype::dtype_f16, true), h, step, 0.5f);
      opt.step(b.chunk(grad, dtype::dtype_f16, dtype::dtype_f16, true), h, step, 0.5f, nullptr, true);
    }
    EXPECT_TRUE(a.same_bits(b)) << moments_kind_name(k);
  }
}

// The last micro-batch fused into the update (chunk_ref::grad_acc) with compact moments:
// bit-identical to accumulating first and stepping on the fp32 sum (step, undo, redo).
TEST_P(moments_target, fused_accumulator_equals_accumulate_then_update) {
  std::mt19937 rng(draw_seed());
  adamw opt(2);
  const adamw_hparams h{1e-3f, 0.9f, 0.999f, 1e-8f, 0.1f};
  for (moments_kind k : k_kinds) {
    for (size_t n : {size_t(19), size_t(40000)}) {
      SCOPED_TRACE(std::string(moments_kind_name(k)) + " n " + std::to_string(n));
      const compact s0 = random_compact(rng, k, n);
      std::vector<float> g, acc = normal(rng, n, 0.02f);
      const auto grad = encode(normal(rng, n, 0.02f), dtype::dtype_bf16, &g);
      std::vector<float> sum = acc;
      accumulate(grad.data(), dtype::dtype_bf16, sum.data(), n, false);
      compact fused = s0, plain = s0;
      chunk_ref cf = fused.chunk(grad, dtype::dtype_bf16, dtype::dtype_bf16, true);
      cf.grad_acc = acc.data();
      chunk_ref cp = plain.chunk(std::vector<uint8_t>(), dtype::dtype_f32, dtype::dtype_bf16, true);
      cp.grad = sum.data();
      const grad_stats a = opt.step(cf, h, 3, 0.5f), b = opt.step(cp, h, 3, 0.5f);
      EXPECT_EQ(a.sum_sq, b.sum_sq);
      EXPECT_TRUE(fused.same_bits(plain)) << "step";
      opt.redo(cf, h, 3, 0.5f, 0.25f);
      opt.redo(cp, h, 3, 0.5f, 0.25f);
      EXPECT_TRUE(fused.same_bits(plain)) << "redo";
      opt.undo(cf, h, 3, 0.25f);
      opt.undo(cp, h, 3, 0.25f);
      EXPECT_TRUE(fused.same_bits(plain)) << "undo";
    }
  }
}

// A chunk of `c` with a half gradient beside an fp32 accumulator and a streamed half copy; f32
// moments (kind f32) from the plain vectors m and v, beside the struct's bf16 layout of the master
// and half copy.
chunk_ref accumulated_chunk(compact& c, moments_kind k, const std::vector<uint8_t>& grad, std::vector<float>& acc,
                            std::vector<float>& m, std::vector<float>& v) {
  chunk_ref r = c.chunk(grad, dtype::dtype_f16, dtype::dtype_f16, true);
  r.grad_acc = acc.data();
  if (k == moments_kind::f32) {
    r.moments = moments_kind::f32;
    r.m = m.data();
    r.v = v.data();
    r.m_scale = r.v_scale = nullptr;
  }
  return r;
}

// step_ranges over a partition of the chunk (the rows needed first, then the rest, as the
// embedding's split update runs them) ends bit-identical to one step() of the whole chunk, in every
// moments kind, with the fused accumulator and a streamed half copy; after the first part alone
// every element outside it still holds its old bits, and every element inside it already holds
// step()'s. The ranges are rows of 2048 elements (int8's quantization block), scattered, with
// runs of several rows and a last partial row.
TEST_P(moments_target, step_ranges_over_a_partition_is_one_step) {
  std::mt19937 rng(draw_seed());
  adamw opt(2);
  const adamw_hparams h{1e-3f, 0.9f, 0.999f, 1e-8f, 0.1f};
  const size_t row = k_quant_block, rows = 37, n = rows * row - 100;
  // Rows of the first part: random, with a run of consecutive rows and the last (partial) row.
  std::vector<bool> first(rows);
  for (size_t r = 0; r < rows; ++r) first[r] = rng() % 3 == 0;
  for (size_t r = 10; r < 15; ++r) first[r] = true;
  first[rows - 1] = true;
  auto ranges_of = [&](bool want) {
    std::vector<std::pair<size_t, size_t>> out;
    for (size_t r = 0; r < rows; ++r) {
      if (first[r] != want) continue;
      const size_t b = r * row, e = std::min(n, b + row);
      if (!out.empty() && out.back().second == b) out.back().second = e;
      else out.emplace_back(b, e);
    }
    return out;
  };
  const auto hot = ranges_of(true), cold = ranges_of(false);
  auto in_hot = [&](size_t i) { return first[i / row]; };
  for (moments_kind k : {moments_kind::f32, moments_kind::bf16, moments_kind::int8}) {
    SCOPED_TRACE(moments_kind_name(k));
    // f32 moments live in compact's p-sized float vectors: reuse the struct's bf16 layout for the
    // master and half copy, and plain vectors for m and v.
    compact whole = random_compact(rng, k == moments_kind::f32 ? moments_kind::bf16 : k, n);
    std::vector<float> m32 = normal(rng, n, 0.01f), v32 = normal(rng, n, 0.01f);
    for (float& x : v32) x = x * x + 1e-6f;
    std::vector<float> g, acc = normal(rng, n, 0.02f);
    const auto grad = encode(normal(rng, n, 0.02f), dtype::dtype_f16, &g);
    compact parts = whole;
    std::vector<float> pm32 = m32, pv32 = v32;
    auto chunk_of = [&](compact& c, std::vector<float>& m, std::vector<float>& v) {
      return accumulated_chunk(c, k, grad, acc, m, v);
    };
    const compact before = parts;
    const std::vector<float> m_before = pm32, v_before = pv32;
    opt.step(chunk_of(whole, m32, v32), h, 4, 0.5f, nullptr, true);
    opt.step_ranges(chunk_of(parts, pm32, pv32), h, 4, 0.5f, hot);
    // After the first part: its elements are the whole step's, the others untouched.
    size_t wrong_hot = 0, touched_cold = 0;
    for (size_t i = 0; i < n; ++i) {
      auto same = [&](const compact& a, const std::vector<float>& am, const std::vector<float>& av, size_t j) {
        bool eq = std::memcmp(&a.p[j], &parts.p[j], 4) == 0 && a.half_out[j] == parts.half_out[j];
        if (k == moments_kind::f32) eq = eq && std::memcmp(&am[j], &pm32[j], 4) == 0 && std::memcmp(&av[j], &pv32[j], 4) == 0;
        else if (k == moments_kind::bf16) eq = eq && a.m16[j] == parts.m16[j] && a.v16[j] == parts.v16[j];
        else eq = eq && a.mq[j] == parts.mq[j] && a.vq[j] == parts.vq[j];
        return eq;
      };
      if (in_hot(i)) wrong_hot += !same(whole, m32, v32, i);
      else touched_cold += !same(before, m_before, v_before, i);
    }
    EXPECT_EQ(wrong_hot, 0u) << "elements of the first part that differ from the whole step";
    EXPECT_EQ(touched_cold, 0u) << "elements outside the first part that it changed";
    opt.step_ranges(chunk_of(parts, pm32, pv32), h, 4, 0.5f, cold);
    EXPECT_TRUE(whole.same_bits(parts)) << "both parts against one step";
    if (k == moments_kind::f32) {
      EXPECT_TRUE(bits_equal(m32, pm32) && bits_equal(v32, pv32)) << "f32 moments";
    }
  }
}

// adamw::step_part (the engine's deferred updates, run in parts the update thread can put other
// work between): parts 0..P-1 leave the chunk and the undo log exactly as one step() with
// finite_known does, for P from 1 to more parts than the chunk has blocks, in every moments kind,
// with the fused accumulator and a streamed half copy. After part 0 alone, its elements hold the
// step's bits and the others their old ones. The logs are compared by what they restore: undo() with
// each gives the same bits (a log missing or misplacing a block restores other moments there).
TEST_P(moments_target, step_in_parts_is_one_step_with_its_log) {
  std::mt19937 rng(draw_seed());
  adamw_tuning tuning;
  tuning.block_size = 2 * k_quant_block;
  adamw opt(2, tuning);
  const adamw_hparams h{1e-3f, 0.9f, 0.999f, 1e-8f, 0.1f};
  const size_t n = 19 * tuning.block_size - 300;   // 19 blocks, the last one partial
  for (moments_kind k : {moments_kind::f32, moments_kind::bf16, moments_kind::int8}) {
    // f32 moments in plain vectors beside the struct's bf16 layout (its master and half copy).
    compact start = random_compact(rng, k == moments_kind::f32 ? moments_kind::bf16 : k, n);
    std::vector<float> m_start = normal(rng, n, 0.01f), v_start = normal(rng, n, 0.01f);
    for (size_t i = 0; i < n; ++i) {
      v_start[i] = v_start[i] * v_start[i] + 1e-6f;
      if (i % 97 == 0) v_start[i] = 1e-12f;   // grows past the log's ratio: logged
      if (i % 389 == 0) m_start[i] = v_start[i] = 0;   // zero state: restored as zeros
    }
    if (k != moments_kind::f32) encode_moments(m_start.data(), v_start.data(), start.ref());
    std::vector<float> g, acc = normal(rng, n, 0.02f);
    const auto grad = encode(normal(rng, n, 0.02f), dtype::dtype_f16, &g);
    auto chunk_of = [&](compact& c, std::vector<float>& m, std::vector<float>& v) {
      return accumulated_chunk(c, k, grad, acc, m, v);
    };
    auto same = [&](const compact& a, const std::vector<float>& am, const std::vector<float>& av, const compact& b,
                    const std::vector<float>& bm, const std::vector<float>& bv, size_t j) {
      bool eq = std::memcmp(&a.p[j], &b.p[j], 4) == 0 && a.half_out[j] == b.half_out[j];
      if (k == moments_kind::f32) eq = eq && std::memcmp(&am[j], &bm[j], 4) == 0 && std::memcmp(&av[j], &bv[j], 4) == 0;
      else if (k == moments_kind::bf16) eq = eq && a.m16[j] == b.m16[j] && a.v16[j] == b.v16[j];
      else eq = eq && a.mq[j] == b.mq[j] && a.vq[j] == b.vq[j];
      return eq;
    };
    compact whole = start;
    std::vector<float> wm = m_start, wv = v_start;
    undo_log whole_log;
    opt.step(chunk_of(whole, wm, wv), h, 4, 0.5f, &whole_log, true);
    ASSERT_GT(whole_log.entries(), 0u) << moments_kind_name(k) << ": the reference step logged nothing";
    for (size_t parts : {size_t(1), size_t(2), size_t(3), size_t(7), size_t(25)}) {
      SCOPED_TRACE(std::string(moments_kind_name(k)) + ", " + std::to_string(parts) + " parts");
      compact c = start;
      std::vector<float> cm = m_start, cv = v_start;
      undo_log log;
      size_t covered = 0;
      for (size_t p = 0; p < parts; ++p) {
        const auto [b, e] = opt.part_range(n, p, parts);
        EXPECT_EQ(b, covered) << "part " << p << " does not start where the last one ended";
        covered = std::max(covered, e);
        opt.step_part(chunk_of(c, cm, cv), h, 4, 0.5f, &log, p, parts);
        if (p != 0) continue;
        size_t wrong = 0, touched = 0;
        for (size_t i = 0; i < n; ++i) {
          if (i >= b && i < e) wrong += !same(whole, wm, wv, c, cm, cv, i);
          else touched += !same(start, m_start, v_start, c, cm, cv, i);
        }
        EXPECT_EQ(wrong, 0u) << "elements of part 0 that differ from the whole step";
        EXPECT_EQ(touched, 0u) << "elements outside part 0 that it changed";
      }
      EXPECT_EQ(covered, n);
      EXPECT_TRUE(whole.same_bits(c)) << "the parts against one step";
      if (k == moments_kind::f32) {
        EXPECT_TRUE(bits_equal(wm, cm) && bits_equal(wv, cv)) << "f32 moments";
      }
      EXPECT_EQ(log.entries(), whole_log.entries());
      EXPECT_EQ(log.bytes(), whole_log.bytes());
      compact undone_whole = whole;
      std::vector<float> uwm = wm, uwv = wv;
      opt.undo(chunk_of(undone_whole, uwm, uwv), h, 4, 0.5f, &whole_log);
      opt.undo(chunk_of(c, cm, cv), h, 4, 0.5f, &log);
      EXPECT_TRUE(undone_whole.same_bits(c)) << "undone with the parts' log against with the step's";
      if (k == moments_kind::f32) {
        EXPECT_TRUE(bits_equal(uwm, cm) && bits_equal(uwv, cv)) << "f32 moments, undone";
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(targets, moments_target, ::testing::ValuesIn(targets()));

// The scalar definitions: the largest value codes to the top level and decodes exactly; codes
// round-trip (decode then encode gives the same codes and scales, which resuming relies on);
// encode of bf16 rounds to nearest even.
TEST(moment_codes, conversions_round_trip) {
  std::mt19937 rng(3);
  const size_t n = 5 * k_quant_block + 77;
  std::vector<float> m = normal(rng, n, 0.01f), v = normal(rng, n, 0.01f);
  for (float& x : v) x *= x;
  compact a(moments_kind::int8, n), b(moments_kind::int8, n), h(moments_kind::bf16, n);
  encode_moments(m.data(), v.data(), a.ref());
  std::vector<float> md, vd;
  a.decoded(md, vd);
  encode_moments(md.data(), vd.data(), b.ref());
  EXPECT_EQ(a.mq, b.mq);
  EXPECT_EQ(a.vq, b.vq);
  EXPECT_TRUE(bits_equal(a.ms, b.ms) && bits_equal(a.vs, b.vs));
  for (size_t blk = 0; blk < quant_blocks(n); ++blk) {
    const size_t lo = blk * k_quant_block, hi = std::min(n, lo + k_quant_block);
    EXPECT_EQ(*std::max_element(md.begin() + long(lo), md.begin() + long(hi),
                                [](float x, float y) { return std::fabs(x) < std::fabs(y); }) == a.ms[blk] ||
                  -*std::min_element(md.begin() + long(lo), md.begin() + long(hi)) == a.ms[blk],
              true);
  }
  encode_moments(m.data(), v.data(), h.ref());
  for (size_t i = 0; i < n; ++i) {
    ASSERT_EQ(h.m16[i], half::f32_to_bf16(m[i]));
    ASSERT_EQ(h.v16[i], half::f32_to_bf16(v[i]));
  }
  EXPECT_EQ(moments_bytes(moments_kind::f32, n), 8 * n);
  EXPECT_EQ(moments_bytes(moments_kind::bf16, n), 4 * n);
  EXPECT_EQ(moments_bytes(moments_kind::int8, n), 2 * n + 8 * 6);
}

}  // namespace
}  // namespace ferry::cpu_optim::test
