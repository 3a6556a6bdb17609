// cpu_optim::adamw against the double-precision reference, for every compiled ISA target, every
// gradient / half-copy dtype and lengths that exercise the vector tail and the block split.
#include <gtest/gtest.h>
#include <sched.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "tests/cpu_optim/test_util.h"

namespace ferry::cpu_optim::test {
namespace {

const size_t k_lengths[] = {1, 7, 15, 16, 17, 64 * 37, 1000003};  // 64*37: every vector width
const dtype k_grad_dtypes[] = {dtype::dtype_f32, dtype::dtype_f16, dtype::dtype_bf16};

struct half_case {
  bool with_half;
  dtype t;
};
const half_case k_half_cases[] = {{false, dtype::dtype_f16}, {true, dtype::dtype_f16}, {true, dtype::dtype_bf16}};

state random_state(std::mt19937& rng, size_t n) {
  state s;
  s.p = normal(rng, n, 0.5f);
  s.m.assign(n, 0.0f);
  s.v.assign(n, 0.0f);
  s.half_out.assign(n, 0xABCD);
  return s;
}

// random_state after `steps` AdamW steps on N(0, 1) gradients of dtype gt (moments nonzero).
state stepped_state(std::mt19937& rng, size_t n, dtype gt, adamw& opt, const adamw_hparams& h, int64_t steps) {
  state s = random_state(rng, n);
  std::vector<float> decoded;
  for (int64_t step = 1; step <= steps; ++step) {
    const auto grad = encode(normal(rng, n, 1.0f), gt, &decoded);
    opt.step(make_chunk(s, grad, gt, dtype::dtype_f16, true), h, step, 1.0f);
  }
  return s;
}

using adamw_target = target_test;

TEST_P(adamw_target, matches_double_reference) {
  const uint32_t seed = draw_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  adamw opt(2);
  const adamw_hparams h{1e-2f, 0.9f, 0.999f, 1e-8f, 0.1f};
  for (size_t n : k_lengths) {
    for (dtype gt : k_grad_dtypes) {
      for (const half_case& hc : k_half_cases) {
        SCOPED_TRACE("n " + std::to_string(n) + " grad " + dtype_name(gt) + " half " +
                     (hc.with_half ? dtype_name(hc.t) : "none"));
        state s = random_state(rng, n);
        ref_state r{{s.p.begin(), s.p.end()}, std::vector<double>(n), std::vector<double>(n)};
        for (int64_t step = 1; step <= 3; ++step) {
          const float scale = 1024.0f, mult = 0.5f / scale;  // loss scale and a clip coefficient
          std::vector<float> decoded;
          const auto grad = encode(normal(rng, n, scale), gt, &decoded);
          const grad_stats st = opt.step(make_chunk(s, grad, gt, hc.t, hc.with_half), h, step, mult);
          ref_step(r, decoded, mult, h, step);
          ASSERT_EQ(st.nonfinite, 0);
          const double want_sq = opt.stats(grad.data(), gt, n, mult).sum_sq;  // same bits
          ASSERT_EQ(std::memcmp(&st.sum_sq, &want_sq, sizeof(double)), 0) << st.sum_sq << " vs " << want_sq;
          size_t bad = 0;
          for (size_t i = 0; i < n; ++i) {
            const double gscale = 0.5;
            const bool ok = std::fabs(s.p[i] - r.p[i]) <= 1e-6 * std::fabs(r.p[i]) + 1e-5 * h.lr &&
                            std::fabs(s.m[i] - r.m[i]) <= 1e-5 * std::fabs(r.m[i]) + 1e-6 * gscale &&
                            std::fabs(s.v[i] - r.v[i]) <= 1e-5 * r.v[i] + 1e-7 * gscale * gscale &&
                            (!hc.with_half || s.half_out[i] == to_half(s.p[i], hc.t));
            if (!ok && bad++ < 3) {
              ADD_FAILURE() << "step " << step << " i " << i << " p " << s.p[i] << " vs " << r.p[i]
                            << " m " << s.m[i] << " vs " << r.m[i] << " v " << s.v[i] << " vs "
                            << r.v[i] << " half " << s.half_out[i];
            }
          }
          ASSERT_EQ(bad, 0u);
        }
      }
    }
  }
}

TEST_P(adamw_target, stats_match_reference) {
  const uint32_t seed = draw_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  adamw opt(2);
  for (size_t n : k_lengths) {
    for (dtype gt : k_grad_dtypes) {
      std::vector<float> decoded;
      const auto grad = encode(normal(rng, n, 3.0f), gt, &decoded);
      const float mult = 0.37f;
      double want = 0;
      for (float g : decoded) want += double((g * mult) * (g * mult));
      const grad_stats st = opt.stats(grad.data(), gt, n, mult);
      EXPECT_EQ(st.nonfinite, 0);
      EXPECT_NEAR(st.sum_sq, want, 1e-12 * want) << "n " << n << " " << dtype_name(gt);
    }
  }
}

TEST_P(adamw_target, nonfinite_gradient_leaves_state_untouched) {
  const uint32_t seed = draw_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  adamw opt(2);
  const adamw_hparams h{1e-3f, 0.9f, 0.999f, 1e-8f, 0.01f};
  const float inf = std::numeric_limits<float>::infinity();
  for (size_t n : {size_t(17), size_t(1000003)}) {
    for (dtype gt : k_grad_dtypes) {
      SCOPED_TRACE("n " + std::to_string(n) + " grad " + dtype_name(gt));
      state s = random_state(rng, n);
      s.m = normal(rng, n, 0.1f);
      s.v = normal(rng, n, 0.1f);
      for (float& x : s.v) x = x * x;
      std::vector<float> g = normal(rng, n, 1.0f), decoded;
      g[0] = inf;
      g[n - 1] = std::nanf("");
      g[n / 2] = -inf;
      const state before = s;
      auto grad = encode(g, gt, &decoded);
      grad_stats st = opt.step(make_chunk(s, grad, gt, dtype::dtype_bf16, true), h, 5, 1.0f);
      EXPECT_EQ(st.nonfinite, 3);
      opt.undo(make_chunk(s, grad, gt, dtype::dtype_bf16, true), h, 5, 1.0f);
      EXPECT_TRUE(bits_equal(s.p, before.p) && bits_equal(s.m, before.m) && bits_equal(s.v, before.v));
      EXPECT_EQ(s.half_out, before.half_out);
      // Finite gradient that overflows only once multiplied (fp16 max times a huge loss unscale).
      std::fill(g.begin(), g.end(), 0.5f);
      g[n - 1] = 60000.0f;
      grad = encode(g, gt, &decoded);
      st = opt.step(make_chunk(s, grad, gt, dtype::dtype_f16, true), h, 5, 1e35f);
      EXPECT_EQ(st.nonfinite, 1);
      EXPECT_TRUE(bits_equal(s.p, before.p) && bits_equal(s.m, before.m) && bits_equal(s.v, before.v));
      EXPECT_EQ(s.half_out, before.half_out);
    }
  }
}

// Rollback: step(a) then undo(a) against the never-updated state, and redo(a -> b) against a
// direct step(b). Bounds in units of 2^-23 of the magnitudes involved (README.md).
TEST_P(adamw_target, undo_and_redo_within_documented_tolerance) {
  const uint32_t seed = draw_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  adamw opt(2);
  const adamw_hparams h{1e-3f, 0.9f, 0.999f, 1e-8f, 0.1f};
  const double u = std::ldexp(1.0, -23);
  for (dtype gt : k_grad_dtypes) {
    for (size_t n : {size_t(17), size_t(100003)}) {
      SCOPED_TRACE(std::string("grad ") + dtype_name(gt) + " n " + std::to_string(n));
      const int64_t k = 4;
      state s = stepped_state(rng, n, gt, opt, h, k - 1);
      std::vector<float> decoded;
      const state s0 = s;
      const auto grad = encode(normal(rng, n, 1.0f), gt, &decoded);
      const float a = 1.0f, b = 0.37f;  // speculative multiplier, then the clip coefficient
      state s1 = s0;
      opt.step(make_chunk(s1, grad, gt, dtype::dtype_f16, true), h, k, a);
      state undone = s1;
      opt.undo(make_chunk(undone, grad, gt, dtype::dtype_f16, true), h, k, a);
      double worst_p = 0, worst_m = 0, worst_v = 0;
      for (size_t i = 0; i < n; ++i) {
        worst_p = std::max(worst_p, std::fabs(undone.p[i] - s0.p[i]) /
                                        (u * (std::fabs(s0.p[i]) + std::fabs(s1.p[i]))));
        worst_m = std::max(worst_m, std::fabs(undone.m[i] - s0.m[i]) /
                                        (u * (std::fabs(s0.m[i]) + std::fabs(s1.m[i])) + 1e-30));
        worst_v = std::max(worst_v, std::fabs(undone.v[i] - s0.v[i]) / (u * (s0.v[i] + s1.v[i]) + 1e-30));
        ASSERT_EQ(undone.half_out[i], half::f32_to_f16(undone.p[i]));
      }
      EXPECT_LE(worst_p, 2.0);
      EXPECT_LE(worst_m, 4.0);
      EXPECT_LE(worst_v, 4.0);
      std::printf("[ rollback ] %s grad %s n %zu: undo error p %.2f m %.2f v %.2f (units 2^-23 |old|+|new|)\n",
                  GetParam().c_str(), dtype_name(gt), n, worst_p, worst_m, worst_v);

      state direct = s0, redone = s1, stepwise = s1;
      opt.step(make_chunk(direct, grad, gt, dtype::dtype_f16, true), h, k, b);
      const grad_stats st = opt.redo(make_chunk(redone, grad, gt, dtype::dtype_f16, true), h, k, a, b);
      EXPECT_EQ(st.nonfinite, 0);
      opt.undo(make_chunk(stepwise, grad, gt, dtype::dtype_f16, true), h, k, a);
      opt.step(make_chunk(stepwise, grad, gt, dtype::dtype_f16, true), h, k, b);
      EXPECT_TRUE(bits_equal(redone.p, stepwise.p) && bits_equal(redone.m, stepwise.m) &&
                  bits_equal(redone.v, stepwise.v));
      EXPECT_EQ(redone.half_out, stepwise.half_out);
      double redo_p = 0, redo_m = 0, redo_v = 0;
      for (size_t i = 0; i < n; ++i) {
        redo_p = std::max(redo_p, std::fabs(redone.p[i] - direct.p[i]) /
                                      (u * (std::fabs(s0.p[i]) + std::fabs(s1.p[i])) + u * h.lr));
        redo_m = std::max(redo_m, std::fabs(redone.m[i] - direct.m[i]) /
                                      (u * (std::fabs(s0.m[i]) + std::fabs(s1.m[i])) + 1e-30));
        redo_v = std::max(redo_v, std::fabs(redone.v[i] - direct.v[i]) / (u * (s0.v[i] + s1.v[i]) + 1e-30));
      }
      EXPECT_LE(redo_p, 4.0);
      EXPECT_LE(redo_m, 4.0);
      EXPECT_LE(redo_v, 4.0);
      std::printf("[ rollback ] %s grad %s n %zu: redo vs direct p %.2f m %.2f v %.2f\n",
                  GetParam().c_str(), dtype_name(gt), n, redo_p, redo_m, redo_v);
    }
  }
}

// The undo log: elements whose old moments the new ones cannot give back (m = v = 0 before: a
// token's first gradient; v far below this step's (1-b2) g^2) are restored bit for bit, every
// other v within (k_undo_log_ratio / b2 + 3)·2^-24 |v_old|, p within the plain bound; redo with the
// log equals undo(log) then step; without the log the same elements come back measurably wrong.
TEST_P(adamw_target, undo_log_restores_moments_exactly) {
  const uint32_t seed = draw_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  adamw opt(2);
  const adamw_hparams h{1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f};
  const double u = std::ldexp(1.0, -23);
  const size_t n = 100003;  // several 16384-element blocks and a tail
  for (dtype gt : {dtype::dtype_f32, dtype::dtype_bf16}) {
    SCOPED_TRACE(std::string("grad ") + dtype_name(gt));
    state s = stepped_state(rng, n, gt, opt, h, 3);
    std::vector<float> decoded;
    // A fifth each: typical, m = v = 0, v far below (1-b2) g^2, v = 0 with m != 0, no gradient.
    std::vector<float> g = normal(rng, n, 1.0f);
    for (size_t i = 0; i < n; ++i) {
      switch (rng() % 5) {
        case 1: s.m[i] = s.v[i] = 0.0f; break;
        case 2:
          s.v[i] = std::ldexp(1.0f, -40) * (1.0f + float(rng() % 100) / 100.0f);
          s.m[i] = std::ldexp(rng() % 2 ? 1.0f : -1.0f, -22);
          break;
        case 3: s.v[i] = 0.0f; break;
        case 4: g[i] = 0.0f; break;
      }
    }
    const auto grad = encode(g, gt, &decoded);
    const state s0 = s;
    const float a = 1.0f, b = 0.37f;
    state s1 = s0;
    undo_log log;
    opt.step(make_chunk(s1, grad, gt, dtype::dtype_f16, true), h, 4, a, &log);
    // The documented criterion, on the values before and after the step.
    std::vector<char> logged(n), exact(n);
    size_t want_logged = 0, n_exact = 0;
    for (size_t i = 0; i < n; ++i) {
      logged[i] = s0.v[i] == 0 ? s0.m[i] != 0 : s1.v[i] > k_undo_log_ratio * s0.v[i];
      exact[i] = logged[i] || (s0.v[i] == 0 && s0.m[i] == 0);
      want_logged += logged[i];
      n_exact += exact[i];
    }
    EXPECT_EQ(log.entries(), want_logged);
    EXPECT_EQ(log.bytes(), want_logged * sizeof(undo_entry));

    state undone = s1, plain = s1;
    opt.undo(make_chunk(undone, grad, gt, dtype::dtype_f16, true), h, 4, a, &log);
    opt.undo(make_chunk(plain, grad, gt, dtype::dtype_f16, true), h, 4, a);
    double worst_p = 0, worst_v = 0;
    size_t not_exact = 0, plain_far = 0;
    for (size_t i = 0; i < n; ++i) {
      worst_p = std::max(worst_p, std::fabs(undone.p[i] - s0.p[i]) / (u * (std::fabs(s0.p[i]) + std::fabs(s1.p[i]))));
      ASSERT_EQ(undone.half_out[i], half::f32_to_f16(undone.p[i]));
      if (!exact[i]) {
        worst_v = std::max(worst_v, std::fabs(undone.v[i] - s0.v[i]) / (0.5 * u * s0.v[i]));
        continue;
      }
      not_exact += !(bits_equal({undone.m[i]}, {s0.m[i]}) && bits_equal({undone.v[i]}, {s0.v[i]}));
      plain_far += std::fabs(plain.v[i] - s0.v[i]) > 1e-3 * s0.v[i] || std::fabs(plain.m[i] - s0.m[i]) > 1e-3 * std::fabs(s0.m[i]);
    }
    EXPECT_EQ(not_exact, 0u) << "zero-state and logged elements must come back bit for bit";
    EXPECT_LE(worst_v, k_undo_log_ratio / h.beta2 + 3) << "(units 2^-24 |v_old|)";
    EXPECT_LE(worst_p, 2.0);
    EXPECT_GT(plain_far, n_exact / 4) << "without the log these elements are not recoverable (the test's premise)";
    std::printf("[ undo log ] %s grad %s: %zu of %zu logged, %zu exact; undo error p %.2f (2^-23 |old|+|new|), "
                "v %.2f (2^-24 |old|); without the log %zu moments off by > 1e-3\n",
                GetParam().c_str(), dtype_name(gt), log.entries(), n, n_exact, worst_p, worst_v, plain_far);

    state redone = s1, stepwise = undone;
    opt.redo(make_chunk(redone, grad, gt, dtype::dtype_f16, true), h, 4, a, b, &log);
    opt.step(make_chunk(stepwise, grad, gt, dtype::dtype_f16, true), h, 4, b);
    EXPECT_TRUE(bits_equal(redone.p, stepwise.p) && bits_equal(redone.m, stepwise.m) &&
                bits_equal(redone.v, stepwise.v));
    EXPECT_EQ(redone.half_out, stepwise.half_out);

    undo_log other;
    state small = random_state(rng, 17);
    const auto small_grad = encode(normal(rng, 17, 1.0f), gt, &decoded);
    opt.step(make_chunk(small, small_grad, gt, dtype::dtype_f16, true), h, 1, a, &other);
    EXPECT_THROW(opt.undo(make_chunk(undone, grad, gt, dtype::dtype_f16, true), h, 4, a, &other), std::exception);
    log.clear();
    EXPECT_EQ(log.entries(), 0u);
  }
}

TEST_P(adamw_target, thread_counts_give_identical_bits) {
  const uint32_t seed = draw_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  const size_t n = 1000003;
  const adamw_hparams h{1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f};
  const state init = random_state(rng, n);
  std::vector<float> decoded;
  const auto grad = encode(normal(rng, n, 100.0f), dtype::dtype_bf16, &decoded);
  state want;
  grad_stats want_st;
  for (int threads : {1, 2, 3, 0}) {
    adamw opt(threads);
    SCOPED_TRACE("threads " + std::to_string(opt.num_threads()));
    state s = init;
    grad_stats st = opt.step(make_chunk(s, grad, dtype::dtype_bf16, dtype::dtype_f16, true), h, 1, 0.01f);
    st.sum_sq += opt.redo(make_chunk(s, grad, dtype::dtype_bf16, dtype::dtype_f16, true), h, 1, 0.01f, 0.004f).sum_sq;
    if (threads == 1) {
      want = s;
      want_st = st;
      continue;
    }
    EXPECT_TRUE(bits_equal(s.p, want.p) && bits_equal(s.m, want.m) && bits_equal(s.v, want.v));
    EXPECT_EQ(s.half_out, want.half_out);
    EXPECT_EQ(std::memcmp(&st.sum_sq, &want_st.sum_sq, sizeof(double)), 0);
  }
}

// The last micro-batch fused into the update (chunk_ref::grad_acc): step, undo, redo, stats and
// the non-finite pre-scan on grad_acc + grad are bit-identical to accumulating the last
// micro-batch into the fp32 sum first and running the same call on that sum, which the tests above
// hold to the double reference. Sums include inf/NaN (one element of acc + grad overflowing in
// fp32 or an inf already in the sum, another NaN) so the refusal path is exercised too.
TEST_P(adamw_target, fused_accumulator_equals_accumulate_then_update) {
  const uint32_t seed = draw_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  adamw opt(2);
  const adamw_hparams h{1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f};
  for (size_t n : k_lengths) {
    for (dtype gt : k_grad_dtypes) {
      for (bool poison : {false, true}) {
        SCOPED_TRACE("n " + std::to_string(n) + " grad " + dtype_name(gt) + (poison ? " non-finite" : ""));
        std::vector<float> decoded;
        std::vector<float> acc = normal(rng, n, 300.0f);  // earlier micro-batches' fp32 sum
        const auto grad = encode(normal(rng, n, 300.0f), gt, &decoded);
        if (poison) {
          // f32 grads: 3e38 + 3e38 overflows in the sum itself; half grads cannot reach that
          acc[n / 2] = gt == dtype::dtype_f32 ? 3.0e38f : std::numeric_limits<float>::infinity();
          if (n > 2) acc[n - 1] = std::nanf("");
        }
        if (poison && gt == dtype::dtype_f32) {
          float big = 3.0e38f;
          std::memcpy(const_cast<uint8_t*>(grad.data()) + 4 * (n / 2), &big, 4);
        }
        std::vector<float> sum = acc;   // the unfused route: accumulate, then the fp32 sum
        accumulate(grad.data(), gt, sum.data(), n, false);
        std::vector<uint8_t> sum_bytes(n * 4);
        std::memcpy(sum_bytes.data(), sum.data(), n * 4);
        const state init = stepped_state(rng, n, dtype::dtype_f32, opt, h, 2);

        const grad_stats sa = opt.stats(sum.data(), dtype::dtype_f32, n, 0.01f);
        const grad_stats sb = opt.stats(grad.data(), gt, n, 0.01f, acc.data());
        EXPECT_EQ(std::memcmp(&sa.sum_sq, &sb.sum_sq, sizeof(double)), 0) << sa.sum_sq << " vs " << sb.sum_sq;
        EXPECT_EQ(sa.nonfinite, sb.nonfinite);
        if (poison) {
          EXPECT_GT(sb.nonfinite, 0);
        }

        state a = init, b = init;
        undo_log la, lb;
        auto fused = [&](state& s) {
          chunk_ref c = make_chunk(s, grad, gt, dtype::dtype_bf16, true);
          c.grad_acc = acc.data();
          return c;
        };
        const grad_stats ta = opt.step(make_chunk(a, sum_bytes, dtype::dtype_f32, dtype::dtype_bf16, true), h, 3, 0.01f, &la);
        const grad_stats tb = opt.step(fused(b), h, 3, 0.01f, &lb);
        EXPECT_EQ(std::memcmp(&ta.sum_sq, &tb.sum_sq, sizeof(double)), 0);
        EXPECT_EQ(ta.nonfinite, tb.nonfinite);
        EXPECT_EQ(la.entries(), lb.entries());
        EXPECT_TRUE(bits_equal(a.p, b.p) && bits_equal(a.m, b.m) && bits_equal(a.v, b.v)) << "step";
        EXPECT_EQ(a.half_out, b.half_out);
        if (!poison) {
          EXPECT_FALSE(bits_equal(a.p, init.p)) << "the step changed nothing";
        }

        opt.redo(make_chunk(a, sum_bytes, dtype::dtype_f32, dtype::dtype_bf16, true), h, 3, 0.01f, 0.004f, &la);
        opt.redo(fused(b), h, 3, 0.01f, 0.004f, &lb);
        EXPECT_TRUE(bits_equal(a.p, b.p) && bits_equal(a.m, b.m) && bits_equal(a.v, b.v)) << "redo";
        opt.undo(make_chunk(a, sum_bytes, dtype::dtype_f32, dtype::dtype_bf16, true), h, 3, 0.004f, &la);
        opt.undo(fused(b), h, 3, 0.004f, &lb);
        EXPECT_TRUE(bits_equal(a.p, b.p) && bits_equal(a.m, b.m) && bits_equal(a.v, b.v)) << "undo";
        EXPECT_EQ(a.half_out, b.half_out);
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(targets, adamw_target, ::testing::ValuesIn(targets()));

// adamw.h: "all cores but one (at least 1)". The cores are those this process may run on (its
// affinity mask, which taskset and container CPU sets narrow), as oneTBB counts them.
TEST(adamw, default_thread_count_leaves_one_core) {
  cpu_set_t cpus;
  ASSERT_EQ(sched_getaffinity(0, sizeof cpus, &cpus), 0);
  EXPECT_EQ(adamw().num_threads(), std::max(1, CPU_COUNT(&cpus) - 1)) << CPU_COUNT(&cpus) << " cores";
  EXPECT_EQ(adamw(3).num_threads(), 3);
}

TEST(adamw, compiled_targets_include_fallback) {
  const auto t = compiled_targets();
  EXPECT_TRUE(std::find(t.begin(), t.end(), "EMU128") != t.end() ||
              std::find(t.begin(), t.end(), "SCALAR") != t.end());
  EXPECT_FALSE(force_target("NO_SUCH_TARGET"));
  EXPECT_TRUE(force_target("auto"));
  EXPECT_NE(std::find(t.begin(), t.end(), active_target()), t.end());
}

}  // namespace
}  // namespace ferry::cpu_optim::test
