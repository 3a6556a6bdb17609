// The offload engine on the tiny model: the three modes against each other, the training
// trajectory against PyTorch (AdamW + clip_grad_norm_ + GradScaler), injected overflow / NaN /
// clipping with speculative rollback, gradient accumulation, the race test, the memory plan and
// evaluate(). Built for the host backend (label cpu) and for CUDA (label gpu, FERRY_TEST_CUDA=1).
#include <cmath>
#include <limits>
#include <string>

#include "src/common/error.h"
#include "src/model/block.h"
#include "tests/engine/engine_test_util.h"

namespace ferry::engine::test {
namespace {

constexpr offload_mode k_none = offload_mode::offload_none;
constexpr offload_mode k_blocked = offload_mode::offload_blocked;
constexpr offload_mode k_overlapped = offload_mode::offload_overlapped;
constexpr int64_t k_steps = 5;
const double k_inf = std::numeric_limits<double>::infinity();

std::string mode_label(const engine_options& o) {
  std::string s = offload_mode_name(o.mode);
  if (o.mode == k_overlapped)
    s += o.speculate == speculate_mode::speculate_on ? "/spec-on" : o.speculate == speculate_mode::speculate_off ? "/spec-off" : "/spec-auto";
  return s + " " + c10::toString(o.dtype) + " clip=" + std::to_string(o.clip_grad);
}

engine_options with(engine_options o, speculate_mode s) {
  o.speculate = s;
  return o;
}

// Every unit's master, m and v bit-identical.
void expect_bit_identical(const run_result& a, const run_result& b, const std::string& what) {
  ASSERT_EQ(a.steps.size(), b.steps.size());
  for (size_t k = 0; k < a.steps.size(); ++k) {
    EXPECT_EQ(a.steps[k].loss, b.steps[k].loss) << what << " step " << k;
    EXPECT_EQ(a.steps[k].skipped, b.steps[k].skipped) << what << " step " << k;
  }
  for (size_t u = 0; u < a.master.size(); ++u) {
    EXPECT_TRUE(a.master[u].equal(b.master[u])) << what << " master, unit " << u << " max diff "
                                                 << max_abs_diff(a.master[u], b.master[u]);
    EXPECT_TRUE(a.m[u].equal(b.m[u])) << what << " exp_avg, unit " << u;
    EXPECT_TRUE(a.v[u].equal(b.v[u])) << what << " exp_avg_sq, unit " << u;
  }
}

// Master weights within |Δ| <= atol + rtol |p|, losses within loss_tol (absolute).
void expect_close(const run_result& a, const run_result& b, double atol, double rtol, double loss_tol,
                  const std::string& what) {
  ASSERT_EQ(a.steps.size(), b.steps.size());
  for (size_t k = 0; k < a.steps.size(); ++k) {
    EXPECT_NEAR(a.steps[k].loss, b.steps[k].loss, loss_tol) << what << " step " << k;
    EXPECT_EQ(a.steps[k].skipped, b.steps[k].skipped) << what << " step " << k;
  }
  for (size_t u = 0; u < a.master.size(); ++u) {
    double r = bound_ratio(a.master[u], b.master[u], atol, rtol);
    EXPECT_LE(r, 1.0) << what << " master, unit " << u << ": max diff " << max_abs_diff(a.master[u], b.master[u]);
  }
}

// ---- 1. the three modes ----

// Tolerances between modes. blocked and overlapped run the same host arithmetic (bit-identical
// without clipping; with clipping the speculative path redoes each unit, within the cpu_optim
// README bound of ~4 ulp of |p| per step). none differs only in how gradient statistics are summed
// and, on CUDA, in the device AdamW and the device embedding backward.
struct mode_case {
  at::ScalarType dtype;
  double clip;
};

class engine_modes : public ::testing::TestWithParam<mode_case> {};

TEST_P(engine_modes, same_losses_and_weights) {
  FERRY_REQUIRE_ENGINE_DEVICE();
  const auto c = GetParam();
  auto data = make_data(k_steps);
  engine_options base = base_options(k_blocked, c.dtype);
  base.clip_grad = c.clip;
  run_result blocked = run_engine(base, data);

  // blocked vs overlapped without speculation: the same updates in the same order.
  engine_options ov = base;
  ov.mode = k_overlapped;
  run_result ov_off = run_engine(with(ov, speculate_mode::speculate_off), data);
  expect_bit_identical(ov_off, blocked, mode_label(with(ov, speculate_mode::speculate_off)) + " vs blocked");

  // Speculation: bit-identical unless clipping fired (then redo: a few ulp per step).
  run_result ov_on = run_engine(with(ov, speculate_mode::speculate_on), data);
  run_result ov_auto = run_engine(with(ov, speculate_mode::speculate_auto), data);
  bool clipped = false;
  for (const auto& s : blocked.steps) clipped = clipped || s.clip_coef < 1.0;
  const double spec_rtol = c.dtype == at::kFloat ? 1e-5 : 2e-2;  // half: the shadow may round the other way
  for (const auto* r : {&ov_on, &ov_auto}) {
    const std::string what = mode_label(with(ov, r == &ov_on ? speculate_mode::speculate_on : speculate_mode::speculate_auto));
    if (!clipped) expect_bit_identical(*r, blocked, what + " vs blocked");
    else expect_close(*r, blocked, 1e-6 * lr_at(0), spec_rtol, 1e-5, what + " vs blocked");
  }
  // auto stops speculating once most recent steps needed a rollback: with clipping on every
  // step it speculates for the first 4 of 8 recent steps, and not after.
  for (size_t k = 0; k < ov_auto.steps.size(); ++k) {
    bool all_clipped = true;
    for (size_t j = 0; j < k; ++j) all_clipped = all_clipped && blocked.steps[j].clip_coef < 1.0;
    if (all_clipped && k >= 4) EXPECT_FALSE(ov_auto.steps[k].speculated) << "step " << k;
    if (k < 4) EXPECT_TRUE(ov_auto.steps[k].speculated) << "step " << k;
  }

  // none: everything resident; the same cpu_optim AdamW on the host backend.
  engine_options no = base;
  no.mode = k_none;
  run_result none = run_engine(no, data);
  const double none_rtol = c.dtype == at::kFloat ? (k_cuda_suite ? 1e-4 : 1e-5) : 2e-2;
  expect_close(none, blocked, 1e-5 * lr_at(0), none_rtol, c.dtype == at::kFloat ? 1e-5 : 1e-2,
               mode_label(no) + " vs blocked");
  for (size_t k = 0; k < none.steps.size(); ++k) {
    EXPECT_NEAR(none.steps[k].grad_norm, blocked.steps[k].grad_norm, 1e-5 * blocked.steps[k].grad_norm) << k;
    EXPECT_EQ(none.steps[k].clip_coef < 1.0, blocked.steps[k].clip_coef < 1.0) << k;
  }
}

std::vector<mode_case> mode_cases() {
  std::vector<mode_case> v;
  for (auto t : {at::kFloat, at::kBFloat16})
    for (double clip : {0.0, 1.0, 0.05}) v.push_back({t, clip});
  if (k_cuda_suite)
    for (double clip : {0.0, 0.05}) v.push_back({at::kHalf, clip});
  return v;
}

INSTANTIATE_TEST_SUITE_P(all, engine_modes, ::testing::ValuesIn(mode_cases()), [](const auto& info) {
  std::string s = std::string(c10::toString(info.param.dtype)) + "_clip" + std::to_string(int(info.param.clip * 100));
  return s;
});

// ---- 2. the reference trajectory ----

// Engine vs an fp64 autograd reference trained by torch::optim::AdamW + clip_grad_norm_ (+ a
// GradScaler emulation for fp16). Tolerances:
// - fp32: the engine's gradients carry fp32 rounding (~1e-6 relative). AdamW normalises each
//   element's step, so a relative gradient error e moves p by about lr*e per step, except where
//   the gradient is itself at the rounding level (then the step direction is noise: up to 2 lr).
//   Over 5 steps with sum(lr) = 4.6e-3 we allow |Δp| <= 1e-4 * lr0 + 1e-5 |p| and check
//   the max measured (printed) stays far below the few-lr regime.
// - bf16/fp16: the forward itself is rounded to 2^-8 / 2^-11 at every stored activation; we
//   bound |Δp| by a few steps' worth of lr (an element whose gradient changes sign moves by up to
//   2 lr per step) and the loss to 2e-2 / 5e-3.
struct trajectory_tol {
  double atol, rtol, loss, norm_rel;
};
trajectory_tol tolerance_for(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return {1e-4 * lr_at(0), 1e-5, 2e-5, 1e-4};
    case at::kHalf: return {4 * lr_at(0), 2e-2, 5e-3, 2e-2};
    default: return {6 * lr_at(0), 5e-2, 2e-2, 5e-2};
  }
}

struct ref_run {
  std::vector<reference_step> steps;
  std::vector<at::Tensor> params;
};

ref_run run_reference(const engine_options& o, const std::vector<step_data>& data, const poison& p = {}) {
  auto e = make_engine(base_options(k_blocked, at::kFloat));   // only for the initial weights
  reference_trainer t(e->params(), reference_options_for(o));
  ref_run r;
  for (size_t k = 0; k < data.size(); ++k) r.steps.push_back(t.step(data[k], lr_at(int64_t(k)), p));
  for (auto& x : t.model().params) r.params.push_back(x.detach().clone());
  return r;
}

void expect_matches_reference(const run_result& got, const ref_run& want, const engine_options& o, const std::string& what) {
  auto tol = tolerance_for(o.dtype);
  auto e = make_engine(base_options(k_blocked, at::kFloat));
  ASSERT_EQ(got.steps.size(), want.steps.size());
  for (size_t k = 0; k < got.steps.size(); ++k) {
    const auto &g = got.steps[k], &w = want.steps[k];
    SCOPED_TRACE(what + " step " + std::to_string(k));
    EXPECT_EQ(g.skipped, w.skipped);
    EXPECT_EQ(g.loss_scale, w.loss_scale);
    if (std::isfinite(w.loss)) EXPECT_NEAR(g.loss, w.loss, tol.loss);
    if (!w.skipped) {
      EXPECT_NEAR(g.grad_norm, w.grad_norm, tol.norm_rel * w.grad_norm);
      EXPECT_NEAR(g.clip_coef, w.clip_coef, tol.norm_rel);
    }
  }
  auto params = engine_params_from(e->params(), got);
  auto names = e->params().named_params();
  double worst = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    double r = bound_ratio(params[i], want.params[i], tol.atol, tol.rtol);
    worst = std::max(worst, r);
    EXPECT_LE(r, 1.0) << what << " " << names[i].name << ": max diff " << max_abs_diff(params[i], want.params[i]);
  }
  RecordProperty(what, std::to_string(worst));
}

struct ref_case {
  at::ScalarType dtype;
  double clip;
  speculate_mode spec;
};

class engine_reference : public ::testing::TestWithParam<ref_case> {};

TEST_P(engine_reference, trajectory_matches_pytorch) {
  FERRY_REQUIRE_ENGINE_DEVICE();
  const auto c = GetParam();
  auto data = make_data(k_steps);
  engine_options o = base_options(k_overlapped, c.dtype);
  o.clip_grad = c.clip;
  o.speculate = c.spec;
  ref_run want = run_reference(o, data);
  run_result got = run_engine(o, data);
  expect_matches_reference(got, want, o, mode_label(o));
  if (c.clip > 0 && c.clip < 0.5)
    for (const auto& s : want.steps) EXPECT_LT(s.clip_coef, 1.0) << "the small clip must fire every step";
}

std::vector<ref_case> ref_cases() {
  std::vector<ref_case> v;
  for (auto spec : {speculate_mode::speculate_on, speculate_mode::speculate_off, speculate_mode::speculate_auto})
    for (double clip : {0.0, 1.0, 0.05}) v.push_back({at::kFloat, clip, spec});
  v.push_back({at::kBFloat16, 0.05, speculate_mode::speculate_on});
  if (k_cuda_suite) {
    v.push_back({at::kHalf, 1.0, speculate_mode::speculate_on});
    v.push_back({at::kHalf, 0.05, speculate_mode::speculate_auto});
  }
  return v;
}

INSTANTIATE_TEST_SUITE_P(all, engine_reference, ::testing::ValuesIn(ref_cases()), [](const auto& info) {
  const char* spec = info.param.spec == speculate_mode::speculate_on ? "on" : info.param.spec == speculate_mode::speculate_off ? "off" : "auto";
  return std::string(c10::toString(info.param.dtype)) + "_clip" + std::to_string(int(info.param.clip * 100)) + "_spec_" + spec;
});

// ---- 3. injection: overflow / NaN in one unit, clipping, rollback ----

struct inject_case {
  const char* name;
  int64_t unit;      // -1 first in backward (head), -2 middle block, 0 last (embedding)
  double value;
  int64_t step;      // 0-based step whose gradient is poisoned
};

int64_t resolve_unit(const param_store& s, int64_t u) {
  if (u == -1) return s.head_unit();
  if (u == -2) return s.block_unit(tiny_config().num_hidden_layers / 2);
  return u;
}

class engine_injection : public ::testing::TestWithParam<inject_case> {};

// The poisoned step is skipped (GradScaler semantics; fp16 halves the scale), the others match
// the reference; every mode and speculation setting agrees.
TEST_P(engine_injection, skip_matches_reference) {
  FERRY_REQUIRE_ENGINE_DEVICE();
  const auto c = GetParam();
  auto data = make_data(k_steps);
  // fp16 runs on the host backend too: the GradScaler logic (scale halved on the skip, grown
  // after scale_window good steps) is checked there against the emulation.
  for (auto dt : {at::kFloat, at::kHalf}) {
    for (double clip : {0.0, 0.05}) {
      engine_options o = base_options(k_overlapped, dt);
      o.clip_grad = clip;
      o.scale_window = 2;     // growth shows within the run
      auto probe = make_engine(base_options(k_blocked, at::kFloat));
      const int64_t unit = resolve_unit(probe->params(), c.unit);
      const int64_t index = probe->params().unit(unit).numel / 3;   // inside lm_head / a matrix / the embedding
      o.debug_poison_step = c.step + 1;
      o.debug_poison_unit = unit;
      o.debug_poison_index = index;
      o.debug_poison_value = c.value;
      poison p{c.step, locate(probe->params(), unit, index), c.value};
      ref_run want = run_reference(o, data, p);
      ASSERT_TRUE(want.steps[size_t(c.step)].skipped);

      run_result spec = run_engine(with(o, speculate_mode::speculate_on), data);
      expect_matches_reference(spec, want, o, std::string(c.name) + " " + mode_label(with(o, speculate_mode::speculate_on)));
      EXPECT_TRUE(spec.steps[size_t(c.step)].skipped);
      EXPECT_TRUE(std::isnan(spec.steps[size_t(c.step)].grad_norm));
      EXPECT_GT(spec.steps[size_t(c.step)].rollbacks, 0);
      if (dt == at::kHalf) EXPECT_EQ(spec.steps[size_t(c.step) + 1].loss_scale, spec.steps[size_t(c.step)].loss_scale / 2);

      // Rollback (undo) against never applying: the cpu_optim README bound, checked directly.
      run_result off = run_engine(with(o, speculate_mode::speculate_off), data);
      expect_close(spec, off, 4 * 1e-6 * lr_at(0), 1e-5, dt == at::kFloat ? 1e-6 : 1e-2, std::string(c.name) + " spec vs off");
      engine_options bo = o;
      bo.mode = k_blocked;
      expect_bit_identical(run_engine(bo, data), off, std::string(c.name) + " blocked vs overlapped/spec-off");
      engine_options no = o;
      no.mode = k_none;
      expect_matches_reference(run_engine(no, data), want, o, std::string(c.name) + " " + mode_label(no));
    }
  }
}

INSTANTIATE_TEST_SUITE_P(all, engine_injection,
                         ::testing::Values(inject_case{"inf_first_unit", -1, k_inf, 1},
                                           inject_case{"inf_middle_unit", -2, k_inf, 1},
                                           inject_case{"inf_last_unit", 0, k_inf, 1},
                                           inject_case{"nan_one_element", -2, std::nan(""), 2},
                                           inject_case{"neg_inf_first_step", -1, -k_inf, 0}),
                         [](const auto& info) { return std::string(info.param.name); });

// A rollback at step 1 (m = v = 0 before) restores m and v exactly and p within
// 2*2^-23 (|p_old| + |p_new|), |p_new| <= |p_old| + 2 lr (README "Rollback precision").
TEST(engine_rollback, undo_at_first_step_within_readme_bound) {
  FERRY_REQUIRE_ENGINE_DEVICE();
  auto data = make_data(1);
  engine_options o = base_options(k_overlapped, at::kFloat);
  auto probe = make_engine(o);
  o.debug_poison_step = 1;
  o.debug_poison_unit = probe->params().embed_unit();   // the last unit: every other unit was updated
  o.debug_poison_index = 5;
  run_result init;
  snapshot(*probe, init);
  run_result spec = run_engine(o, data);
  ASSERT_TRUE(spec.steps[0].skipped);
  EXPECT_EQ(spec.steps[0].rollbacks, probe->params().num_units());
  const double ulp = std::ldexp(1.0, -23);
  for (size_t u = 0; u < init.master.size(); ++u) {
    at::Tensor p0 = init.master[u].to(at::kDouble);
    at::Tensor bound = 2 * ulp * (2 * p0.abs() + 2 * lr_at(0));
    at::Tensor d = (spec.master[u].to(at::kDouble) - p0).abs();
    EXPECT_TRUE(d.le(bound).all().item<bool>()) << "unit " << u << " max diff " << d.max().item<double>();
    EXPECT_TRUE(spec.m[u].equal(init.m[u])) << "unit " << u;
    EXPECT_TRUE(spec.v[u].equal(init.v[u])) << "unit " << u;
  }
}

// Redo after clipping against the direct clipped step, one step from the same state.
TEST(engine_rollback, redo_at_first_step_within_readme_bound) {
  FERRY_REQUIRE_ENGINE_DEVICE();
  auto data = make_data(1);
  engine_options o = base_options(k_overlapped, at::kFloat);
  o.clip_grad = 0.05;
  run_result spec = run_engine(with(o, speculate_mode::speculate_on), data);
  run_result off = run_engine(with(o, speculate_mode::speculate_off), data);
  ASSERT_LT(off.steps[0].clip_coef, 1.0);
  EXPECT_EQ(spec.steps[0].rollbacks, int64_t(spec.master.size()));
  EXPECT_EQ(off.steps[0].rollbacks, 0);
  EXPECT_EQ(spec.steps[0].clip_coef, off.steps[0].clip_coef);
  auto init = make_engine(o);
  const double ulp = std::ldexp(1.0, -23), lr = lr_at(0);
  for (size_t u = 0; u < spec.master.size(); ++u) {
    at::Tensor p_old = init->params().master_tensor(int64_t(u)).to(at::kDouble).abs();
    at::Tensor p_new = off.master[u].to(at::kDouble).abs();
    at::Tensor dp = (spec.master[u].to(at::kDouble) - off.master[u].to(at::kDouble)).abs();
    EXPECT_TRUE(dp.le(4 * ulp * (p_old + p_new) + 4 * ulp * lr).all().item<bool>()) << "unit " << u;
    // m and v were 0: the README bound is 4 ulp of |x_new| (x_old = 0).
    for (auto [a, b] : {std::pair{&spec.m[u], &off.m[u]}, std::pair{&spec.v[u], &off.v[u]}}) {
      at::Tensor d = (a->to(at::kDouble) - b->to(at::kDouble)).abs();
      EXPECT_TRUE(d.le(4 * ulp * b->to(at::kDouble).abs()).all().item<bool>()) << "unit " << u;
    }
  }
}

// ---- 4. gradient accumulation ----

TEST(engine_accumulation, two_micro_batches_equal_one_batch) {
  FERRY_REQUIRE_ENGINE_DEVICE();
  auto big = make_data(k_steps);
  std::vector<step_data> split;
  for (const auto& s : big) split.push_back({s[0].narrow(0, 0, 1).contiguous(), s[0].narrow(0, 1, 1).contiguous()});
  for (auto mode : {k_overlapped, k_blocked, k_none}) {
    for (double clip : {0.0, 0.05}) {
      engine_options o = base_options(mode, at::kFloat);
      o.clip_grad = clip;
      run_result one = run_engine(o, big);
      run_result two = run_engine(o, split);
      for (size_t k = 0; k < one.steps.size(); ++k) {
        EXPECT_EQ(one.steps[k].n_targets, two.steps[k].n_targets);
        EXPECT_EQ(one.steps[k].n_targets, 2 * k_seq - 1);
        EXPECT_NEAR(one.steps[k].grad_norm, two.steps[k].grad_norm, 1e-5 * one.steps[k].grad_norm);
      }
      // Same gradients up to fp32 summation order; same trajectory tolerance as the reference.
      auto tol = tolerance_for(at::kFloat);
      expect_close(two, one, tol.atol, tol.rtol, 1e-5, std::string("grad_accum=2 ") + mode_label(o));
      // ... and both against the reference with the two rows as one batch.
      expect_matches_reference(two, run_reference(o, big), o, std::string("grad_accum=2 vs reference ") + mode_label(o));
    }
  }
}

// ---- 5. races ----

// Random delays in every copy, compute phase and CPU update: the overlapped schedule must give
// bit-identical results every time, equal to a run without delays. Gradient accumulation and
// clipping (rollback on every step) are on, so every host buffer handoff is exercised.
TEST(engine_race, delays_change_nothing) {
  FERRY_REQUIRE_ENGINE_DEVICE();
  auto big = make_data(4);
  std::vector<step_data> split;
  for (const auto& s : big) split.push_back({s[0].narrow(0, 0, 1).contiguous(), s[0].narrow(0, 1, 1).contiguous()});
  for (auto spec : {speculate_mode::speculate_on, speculate_mode::speculate_off}) {
    for (double clip : {0.0, 0.05}) {
      engine_options o = base_options(k_overlapped, at::kFloat);
      o.speculate = spec;
      o.clip_grad = clip;
      run_result calm = run_engine(o, split);
      for (int rep = 0; rep < 5; ++rep) {
        engine_options d = o;
        d.debug_delay_us = 300;
        d.seed = 1000 + uint64_t(rep);
        expect_bit_identical(run_engine(d, split), calm, mode_label(o) + " delays rep " + std::to_string(rep));
      }
    }
  }
}

// ---- 6. memory plan ----

TEST(engine_memory, plan_activations_match_block_saved) {
  const auto cfg = tiny_config();
  for (auto dt : {at::kFloat, at::kBFloat16, at::kHalf}) {
    for (auto mode : {k_none, k_blocked, k_overlapped}) {
      engine_options o = base_options(mode, dt);
      const int64_t e = int64_t(c10::elementSize(dt));
      memory_plan p = plan_memory(cfg, o, 3, 11, 1);
      EXPECT_EQ(p.activations, cfg.num_hidden_layers * model::block_saved_bytes(cfg, 3, 11, e) + 3 * 11 * cfg.hidden_size * e);
      EXPECT_EQ(p.device_total, p.weight_slots + p.grad_slots + p.optimizer + p.activations + p.workspace);
      if (mode == k_none) EXPECT_EQ(p.optimizer, cfg.total_params() * 12);
      else EXPECT_EQ(p.host_pinned, cfg.total_params() * e + (cfg.total_params() - cfg.embed_params()) * e);
    }
  }
  // block_saved_bytes against what block_forward really keeps (host backend, compute dtypes).
  if (!k_cuda_suite) {
    for (auto dt : {at::kFloat, at::kBFloat16}) {
      at::Tensor w = (at::randn({cfg.block_params()}) * 0.05).to(dt);
      at::Tensor x = at::randn({2, 9, cfg.hidden_size}).to(dt);
      auto rope = model::make_rope(cfg, 16, at::kCPU);
      model::block_saved saved;
      model::block_forward(x, model::block_views(w, cfg), cfg, rope, &saved);
      EXPECT_EQ(saved.bytes(), model::block_saved_bytes(cfg, 2, 9, int64_t(c10::elementSize(dt))));
    }
  }
}

// A run that cannot fit fails in the constructor, before any step, saying how much it needs.
TEST(engine_memory, refuses_a_run_that_does_not_fit) {
  if (!k_cuda_suite) GTEST_SKIP() << "the device-memory check applies to CUDA only";
  FERRY_REQUIRE_ENGINE_DEVICE();
  engine_options o = base_options(k_none, at::kHalf);
  o.max_seq = 4096;
  o.max_batch = 8;
  o.gpu_mem_limit_gib = 0.01;
  try {
    engine e(tiny_config(), o);
    FAIL() << "the engine accepted a plan of " << e.plan().device_total << " bytes in 10 MiB";
  } catch (const ferry::error& err) {
    std::string msg = err.what();
    EXPECT_NE(msg.find("MiB of GPU memory"), std::string::npos) << msg;
    EXPECT_NE(msg.find("lower"), std::string::npos) << msg;
  }
}

// ---- 7. evaluate ----

TEST(engine_evaluate, equals_training_forward_loss) {
  FERRY_REQUIRE_ENGINE_DEVICE();
  auto data = make_data(2);
  for (auto mode : {k_overlapped, k_blocked, k_none}) {
    for (auto dt : {at::kFloat, at::kBFloat16}) {
      engine_options o = base_options(mode, dt);
      auto e = make_engine(o);
      model::head_result ev = e->evaluate(data[0][0]);
      step_result r = e->train_step(data[0], lr_at(0));
      EXPECT_EQ(ev.n_targets, r.n_targets) << mode_label(o);
      EXPECT_EQ(ev.loss_sum / double(ev.n_targets), r.loss) << mode_label(o);
      // after the update: evaluate sees the new weights, and equals the next step's forward
      model::head_result ev2 = e->evaluate(data[1][0]);
      step_result r2 = e->train_step(data[1], lr_at(1));
      EXPECT_EQ(ev2.loss_sum / double(ev2.n_targets), r2.loss) << mode_label(o);
      EXPECT_NE(ev2.loss_sum, ev.loss_sum);
    }
  }
}

}  // namespace
}  // namespace ferry::engine::test
