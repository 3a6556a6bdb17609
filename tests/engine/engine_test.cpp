// The offload engine on the tiny model: the three modes against each other, the training
// trajectory against PyTorch (AdamW + clip_grad_norm_ + GradScaler), injected overflow / NaN /
// clipping with speculative rollback, gradient accumulation, the race test, the memory plan and
// evaluate(). Built for the host backend (label cpu) and for CUDA (label gpu, FERRY_TEST_CUDA=1).
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#if defined(FERRY_TEST_CUDA) && FERRY_TEST_CUDA
#include <dlfcn.h>
#include <unistd.h>
#endif
#include <limits>
#include <string>
#include <tuple>
#include <utility>

#include "src/common/error.h"
#include "src/model/block.h"
#include "tests/alloc_meter.h"
#include "tests/engine/engine_test_util.h"

namespace ferry::engine::test {
namespace {

constexpr offload_mode k_none = offload_mode::offload_none;
constexpr offload_mode k_blocked = offload_mode::offload_blocked;
constexpr offload_mode k_overlapped = offload_mode::offload_overlapped;
constexpr int64_t k_steps = 5;
const double k_inf = std::numeric_limits<double>::infinity();

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
  FERRY_REQUIRE_DEVICE();
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
  // With clipping the redo differs from the direct step by a few ulp per step (the one-step
  // bound is engine_rollback.redo_*); later steps see those ulps through the forward, and in
  // bf16 through the shadow's rounding, so the comparison is a trajectory one.
  for (const auto* r : {&ov_on, &ov_auto}) {
    const std::string what = mode_label(with(ov, r == &ov_on ? speculate_mode::speculate_on : speculate_mode::speculate_auto));
    if (!clipped) expect_bit_identical(*r, blocked, what + " vs blocked");
    else expect_runs_close(*r, blocked, tolerance_for(c.dtype), what + " vs blocked");
  }
  // auto speculates only after 8 steps in a row validated without a fix-up, so within these
  // first steps it never does, and its results are the blocked schedule's, bit for bit.
  for (size_t k = 0; k < ov_auto.steps.size(); ++k) EXPECT_FALSE(ov_auto.steps[k].speculated) << "step " << k;
  expect_bit_identical(ov_auto, blocked, "spec-auto vs blocked");

  // none: everything resident; the same cpu_optim AdamW on the host backend.
  engine_options no = base;
  no.mode = k_none;
  run_result none = run_engine(no, data);
  // fp32 on the host: the same arithmetic except the embedding's gradient (index_put_ vs the
  // offload path's host index_add_) and the norm's summation (fp32 vs double); measured within
  // 1e-8 + 1e-5|p| after 5 steps. bf16: none keeps bf16 gradients on the device and accumulates
  // repeated tokens' embedding rows in bf16, the offload path in fp32 on the host, so the
  // gradients differ at bf16 precision from the first step.
  expect_runs_close(none, blocked, tolerance_for(c.dtype), mode_label(no) + " vs blocked");
  for (size_t k = 0; k < none.steps.size(); ++k)
    EXPECT_NEAR(none.steps[k].grad_norm, blocked.steps[k].grad_norm, tolerance_for(c.dtype).norm_rel * blocked.steps[k].grad_norm) << k;
}

std::vector<mode_case> mode_cases() {
  std::vector<mode_case> v;
  for (auto t : {at::kFloat, at::kBFloat16})
    for (double clip : {0.0, 1.0, 0.05}) v.push_back({t, clip});
  if (k_cuda_suite)
    for (double clip : {0.0, 0.05}) v.push_back({at::kHalf, clip});
  return v;
}

// speculate=auto starts speculating once 8 steps in a row needed no fix-up; without clipping a
// speculative update is the direct update, so the run stays bit-identical to blocked.
TEST(engine_speculation, auto_starts_after_eight_clean_steps) {
  FERRY_REQUIRE_DEVICE();
  auto data = make_data(11);
  engine_options ov = base_options(k_overlapped, at::kFloat);
  ov.clip_grad = 0;
  ov.speculate = speculate_mode::speculate_auto;
  engine_options bl = ov;
  bl.mode = k_blocked;
  run_result a = run_engine(ov, data), b = run_engine(bl, data);
  for (size_t k = 0; k < a.steps.size(); ++k) EXPECT_EQ(a.steps[k].speculated, k >= 8) << "step " << k;
  expect_bit_identical(a, b, "spec-auto vs blocked, no clipping");
}

// Deferred speculation (engine_options::defer_speculative): a speculating step ends once the
// gradients' statistics are in, with its updates still queued (each sleeps 100 ms here, so the
// embedding's, queued last, cannot have run), and the run is bit-identical to one whose steps wait
// for their updates. With clipping every step needs a fix-up, which waits for them all.
TEST(engine_speculation, a_deferred_step_ends_before_its_updates) {
  FERRY_REQUIRE_DEVICE();
  auto data = make_data(3);
  for (double clip : {0.0, 0.05}) {
    engine_options o = base_options(k_overlapped, at::kFloat);   // speculate=on
    o.clip_grad = clip;
    o.debug_update_sleep_us = 100000;
    engine_options wait = o;
    wait.defer_speculative = false;
    run_result a = run_engine(o, data), b = run_engine(wait, data);
    for (size_t k = 0; k < a.steps.size(); ++k) {
      EXPECT_TRUE(a.steps[k].speculated) << "step " << k;
      EXPECT_EQ(b.steps[k].updates_pending, 0) << "step " << k;
      if (clip > 0) {
        EXPECT_GT(a.steps[k].rollbacks, 0) << "step " << k;
        EXPECT_EQ(a.steps[k].updates_pending, 0) << "step " << k;
      } else {
        EXPECT_GE(a.steps[k].updates_pending, 1) << "step " << k;
      }
    }
    expect_bit_identical(a, b, "deferred vs waiting speculation, clip " + std::to_string(clip));
  }
}

// Models of one and two layers: the head's gradient buffer is rewritten in the next step before
// compute has waited for any later copy, so only the wait on the head gradient's own copy
// (head_grad_.copied) orders them; the strict backend's d2h_reuse rule fails without it. (With three
// or more layers the wait for a block's slot, later on the same in-order queue, covers it.)
TEST(engine_modes, one_and_two_layer_models_equal_blocked) {
  FERRY_REQUIRE_DEVICE();
  auto data = make_data(3);
  for (int64_t layers : {1, 2}) {
    model::llama_config cfg = tiny_config();
    cfg.num_hidden_layers = layers;
    engine_options ov = with(base_options(k_overlapped, at::kFloat), speculate_mode::speculate_on);
    ov.clip_grad = 0;
    engine_options bl = ov;
    bl.mode = k_blocked;
    expect_bit_identical(run_engine(ov, data, {}, cfg), run_engine(bl, data, {}, cfg),
                         std::to_string(layers) + " layers: overlapped vs blocked");
  }
}

INSTANTIATE_TEST_SUITE_P(all, engine_modes, ::testing::ValuesIn(mode_cases()), [](const auto& info) {
  std::string s = std::string(c10::toString(info.param.dtype)) + "_clip" + std::to_string(int(info.param.clip * 100));
  return s;
});

// ---- 2. the reference trajectory ----

// The reference, run_reference and its tolerances: engine_test_util.h.

struct ref_case {
  at::ScalarType dtype;
  double clip;
  speculate_mode spec;
};

class engine_reference : public ::testing::TestWithParam<ref_case> {};

TEST_P(engine_reference, trajectory_matches_pytorch) {
  FERRY_REQUIRE_DEVICE();
  const auto c = GetParam();
  auto data = make_data(k_steps);
  engine_options o = base_options(k_overlapped, c.dtype);
  o.clip_grad = c.clip;
  o.speculate = c.spec;
  ref_run want = run_reference(o, data);
  run_result got = run_engine(o, data);
  expect_matches_reference(got, want, o, mode_label(o));
  if (c.clip > 0 && c.clip < 0.5) {
    for (const auto& s : want.steps) EXPECT_LT(s.clip_coef, 1.0) << "the small clip must fire every step";
  }
}

std::vector<ref_case> ref_cases() {
  std::vector<ref_case> v;
  // speculate=auto does not speculate before 8 clean steps, so over these 5 steps it would repeat
  // spec-off; it has its own longer test (engine_speculation.auto_fixup_then_recovery_matches_reference).
  for (double clip : {0.0, 1.0, 0.05}) v.push_back({at::kFloat, clip, speculate_mode::speculate_on});
  for (double clip : {0.0, 0.05}) v.push_back({at::kFloat, clip, speculate_mode::speculate_off});
  v.push_back({at::kBFloat16, 0.05, speculate_mode::speculate_on});
  if (k_cuda_suite) {
    v.push_back({at::kHalf, 1.0, speculate_mode::speculate_on});
    v.push_back({at::kHalf, 0.05, speculate_mode::speculate_off});
  }
  return v;
}

INSTANTIATE_TEST_SUITE_P(all, engine_reference, ::testing::ValuesIn(ref_cases()), [](const auto& info) {
  const char* spec = info.param.spec == speculate_mode::speculate_on ? "on" : info.param.spec == speculate_mode::speculate_off ? "off" : "auto";
  return std::string(c10::toString(info.param.dtype)) + "_clip" + std::to_string(int(info.param.clip * 100)) + "_spec_" + spec;
});

// The update bounds against the bugs they exist for, emulated on a correct engine: AdamW without
// weight decay (weight_decay 0 against the reference's 0.1), without bias correction (the step
// count starts at 10^6, where 1 - beta^t = 1), and with 1% of the elements never updated (every
// 100th restored after each step). Each must exceed a bound that the correct run stays within.
TEST(engine_reference, update_bounds_catch_real_bugs) {
  FERRY_REQUIRE_DEVICE();
  auto data = make_data(k_steps);
  std::vector<at::ScalarType> dtypes = {at::kFloat, at::kBFloat16, at::kHalf};
  for (auto dt : dtypes) {
    engine_options o = base_options(k_overlapped, dt);
    o.clip_grad = 0.05;
    // Weight decay 1 (reference too) makes it as large as the Adam step on the RMSNorm weights (~1),
    // so dropping it shows in bf16, whose rounding of those weights (2^-8 ~ 2 lr0) is larger than
    // 5 steps of weight decay 0.1.
    o.weight_decay = 1.0;
    const trajectory_tol tol = tolerance_for(dt);
    const ref_run want = run_reference(o, data);
    for (const char* bug : {"none", "no weight decay", "no bias correction", "1% not updated"}) {
      const std::string b = bug;
      engine_options oe = o;
      if (b == "no weight decay") oe.weight_decay = 0;
      auto e = make_engine(oe);
      if (b == "no bias correction") e->state().optimizer_steps = 1000000;
      run_result r;
      for (size_t k = 0; k < data.size(); ++k) {
        std::vector<at::Tensor> before;
        if (b == "1% not updated") {
          e->wait_updates();
          for (int64_t u = 0; u < e->params().num_units(); ++u) before.push_back(e->params().master_tensor(u).clone());
        }
        r.steps.push_back(e->train_step(data[k], lr_at(int64_t(k))));
        if (b == "1% not updated") {
          e->wait_updates();
          for (int64_t u = 0; u < e->params().num_units(); ++u) {
            at::Tensor m = e->params().master_tensor(u);
            at::Tensor idx = at::arange(0, m.numel(), 100, at::kLong);
            m.index_put_({idx}, before[size_t(u)].index({idx}));
          }
          e->params_changed();
        }
      }
      snapshot(*e, r);
      const update_error ue = update_error_of(engine_params_from(e->params(), r), want.params);
      const bool within = ue.model <= tol.update_model && ue.norms <= tol.update_norms;
      std::printf("  [%s, %s] update error %.3g, norms %.3g\n", c10::toString(dt), bug, ue.model, ue.norms);
      EXPECT_EQ(within, b == "none") << c10::toString(dt) << " " << bug << ": update error " << ue.model << " (bound "
                                     << tol.update_model << "), norms " << ue.norms << " (bound " << tol.update_norms << ")";
    }
  }
}

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

engine_options poisoned(engine_options o, const inject_case& c, poison& p) {
  auto probe = make_engine(base_options(k_blocked, at::kFloat));
  const int64_t unit = resolve_unit(probe->params(), c.unit);
  const int64_t index = probe->params().unit(unit).numel / 3;   // inside lm_head / a matrix / the embedding
  o.debug_poison_step = c.step + 1;
  o.debug_poison_unit = unit;
  o.debug_poison_index = index;
  o.debug_poison_value = c.value;
  p = poison{c.step, locate(probe->params(), unit, index), c.value};
  return o;
}

// The rolled-back state against the state before the step, for every unit the speculative step
// applied (README "Rollback precision": |undo(x) - x| <= 2*2^-23 (|x_old| + |x_spec|) for p and
// 4*2^-23 (|x_old| + |x_spec|) for m, v, where x_spec is the speculative step's value:
// m_spec <= b1|m| + (1-b1)|g|, v_spec = b2 v + (1-b2) g^2, |p_spec| <= |p|(1 + lr wd) + 10 lr).
// The poisoned unit was never applied and must be bit-identical.
void expect_undo_within_bound(const engine_options& o, const std::vector<step_data>& data, int64_t step,
                              const std::string& what) {
  auto e = make_engine(with(o, speculate_mode::speculate_on));
  for (int64_t k = 0; k < step; ++k) e->train_step(data[size_t(k)], lr_at(k));
  run_result before, after;
  snapshot(*e, before);
  step_result r = e->train_step(data[size_t(step)], lr_at(step));
  snapshot(*e, after);
  ASSERT_TRUE(r.skipped) << what;
  EXPECT_TRUE(r.speculated) << what;
  EXPECT_EQ(r.rollbacks, e->params().num_units()) << what;
  const double ulp = std::ldexp(1.0, -23), lr = lr_at(step);
  for (int64_t u = 0; u < e->params().num_units(); ++u) {
    const size_t i = size_t(u);
    if (u == o.debug_poison_unit) {
      EXPECT_TRUE(after.master[i].equal(before.master[i]) && after.m[i].equal(before.m[i]) && after.v[i].equal(before.v[i]))
          << what << " unit " << u;
      continue;
    }
    at::Tensor g = e->params().grad_tensor(u).to(at::kDouble).abs() / r.loss_scale;
    at::Tensor p0 = before.master[i].to(at::kDouble).abs(), m0 = before.m[i].to(at::kDouble).abs(),
               v0 = before.v[i].to(at::kDouble);
    at::Tensor p_spec = p0 * (1 + lr * o.weight_decay) + 10 * lr;
    at::Tensor m_spec = o.beta1 * m0 + (1 - o.beta1) * g, v_spec = o.beta2 * v0 + (1 - o.beta2) * g * g;
    at::Tensor dp = (after.master[i].to(at::kDouble) - before.master[i].to(at::kDouble)).abs();
    at::Tensor dm = (after.m[i].to(at::kDouble) - before.m[i].to(at::kDouble)).abs();
    at::Tensor dv = (after.v[i].to(at::kDouble) - before.v[i].to(at::kDouble)).abs();
    EXPECT_TRUE(dp.le(2 * ulp * (p0 + p_spec)).all().item<bool>()) << what << " unit " << u << " p";
    EXPECT_TRUE(dm.le(4 * ulp * (m0 + m_spec)).all().item<bool>()) << what << " unit " << u << " m";
    EXPECT_TRUE(dv.le(4 * ulp * (v0 + v_spec)).all().item<bool>()) << what << " unit " << u << " v";
  }
}

// fp32: the poisoned step is skipped (GradScaler semantics). The non-speculative path (blocked,
// overlapped/spec-off, none) matches the reference over the whole run, blocked ==
// overlapped/spec-off bit for bit, and the speculative path's rollback of the skipped step is
// within the README's undo bound. (The speculative path's later trajectory: see
// speculative_skip_trajectory below.)
TEST_P(engine_injection, skip_matches_reference) {
  FERRY_REQUIRE_DEVICE();
  const auto c = GetParam();
  auto data = make_data(k_steps);
  for (double clip : {0.0, 0.05}) {
    engine_options o = base_options(k_overlapped, at::kFloat);
    o.clip_grad = clip;
    poison p;
    o = poisoned(o, c, p);
    ref_run want = run_reference(o, data, p);
    ASSERT_TRUE(want.steps[size_t(c.step)].skipped);
    const std::string label = std::string(c.name) + " ";

    run_result off = run_engine(with(o, speculate_mode::speculate_off), data);
    expect_matches_reference(off, want, o, label + mode_label(with(o, speculate_mode::speculate_off)));
    EXPECT_TRUE(off.steps[size_t(c.step)].skipped);
    EXPECT_TRUE(std::isnan(off.steps[size_t(c.step)].grad_norm));
    EXPECT_EQ(off.steps[size_t(c.step)].rollbacks, 0);
    engine_options bo = o;
    bo.mode = k_blocked;
    expect_bit_identical(run_engine(bo, data), off, label + "blocked vs overlapped/spec-off");
    engine_options no = o;
    no.mode = k_none;
    expect_matches_reference(run_engine(no, data), want, o, label + mode_label(no));

    expect_undo_within_bound(o, data, c.step, label + mode_label(o));
  }
}

// The speculative path over the whole run: the poisoned step's updates are undone with their undo
// logs (m, v exact where the new moments cannot give them back), so the later steps follow the
// reference like the non-speculative path. (Before the logs: up to 838 lr0 off on this model.)
TEST_P(engine_injection, speculative_skip_trajectory) {
  FERRY_REQUIRE_DEVICE();
  const auto c = GetParam();
  auto data = make_data(k_steps);
  for (double clip : {0.0, 0.05}) {
    engine_options o = base_options(k_overlapped, at::kFloat);
    o.clip_grad = clip;
    poison p;
    o = poisoned(o, c, p);
    ref_run want = run_reference(o, data, p);
    run_result spec = run_engine(with(o, speculate_mode::speculate_on), data);
    expect_matches_reference(spec, want, o, std::string(c.name) + " " + mode_label(with(o, speculate_mode::speculate_on)));
  }
}

INSTANTIATE_TEST_SUITE_P(all, engine_injection,
                         ::testing::Values(inject_case{"inf_first_unit", -1, k_inf, 1},
                                           inject_case{"inf_middle_unit", -2, k_inf, 1},
                                           inject_case{"inf_last_unit", 0, k_inf, 1},
                                           inject_case{"nan_one_element", -2, std::nan(""), 2},
                                           inject_case{"neg_inf_first_step", -1, -k_inf, 0}),
                         [](const auto& info) { return std::string(info.param.name); });

// speculate=auto (the default) through a whole cycle, against the PyTorch reference: 8 clean
// steps, speculation from step 8, a fix-up at step 10, none for the 8 steps after it (each of
// which must be clean again), speculation from step 19 on. The fix-up is an overflow (an inf in a
// middle block's gradient: the step is skipped and its speculative updates undone) or a clip (one
// element of 1e3 makes the norm exceed clip_grad = 50, which no other step reaches: the updates
// are redone with the clip coefficient). Mutations this catches: auto never stopping after a
// fix-up (steps 11-18 speculate), never resuming (19-20 do not), or a wrong undo or redo (the
// trajectory leaves the reference).
TEST(engine_speculation, auto_fixup_then_recovery_matches_reference) {
  FERRY_REQUIRE_DEVICE();
  auto data = make_data(21);
  for (const auto& [c, clip] : {std::pair<inject_case, double>{inject_case{"auto_overflow", -2, k_inf, 10}, 0.0},
                                std::pair<inject_case, double>{inject_case{"auto_clip", -2, 1e3, 10}, 50.0}}) {
    engine_options o = base_options(k_overlapped, at::kFloat);
    o.speculate = speculate_mode::speculate_auto;
    o.clip_grad = clip;
    poison p;
    o = poisoned(o, c, p);
    const std::string label = std::string(c.name) + " " + mode_label(o);
    ref_run want = run_reference(o, data, p);
    for (size_t k = 0; k < want.steps.size(); ++k) {
      // the fix-up step is the only one that skips or clips
      EXPECT_EQ(want.steps[k].skipped, clip == 0 && k == 10) << label << " reference step " << k;
      EXPECT_EQ(want.steps[k].clip_coef < 1.0, clip > 0 && k == 10) << label << " reference step " << k;
    }
    run_result got = run_engine(o, data);
    for (size_t k = 0; k < got.steps.size(); ++k) {
      EXPECT_EQ(got.steps[k].speculated, (k >= 8 && k <= 10) || k >= 19) << label << " step " << k;
      EXPECT_EQ(got.steps[k].rollbacks > 0, k == 10) << label << " step " << k;
    }
    expect_matches_reference(got, want, o, label);
  }
}

// fp16 (runs on the host backend too, slowly): the loss scale starts at 2^16, halves on the
// poisoned step and doubles after every scale_window = 2 good steps, as the GradScaler emulation;
// the non-speculative trajectory matches it, and the speculative run takes the same scale path.
TEST(engine_scaler, fp16_matches_gradscaler_emulation) {
  FERRY_REQUIRE_DEVICE();
  auto data = make_data(k_steps);
  for (const auto& c : {inject_case{"inf_last_unit", 0, k_inf, 2}, inject_case{"nan_first_unit", -1, std::nan(""), 1}}) {
    engine_options o = base_options(k_overlapped, at::kHalf);
    o.clip_grad = 0.05;
    o.scale_window = 2;
    poison p;
    o = poisoned(o, c, p);
    ref_run want = run_reference(o, data, p);
    for (auto spec : {speculate_mode::speculate_off, speculate_mode::speculate_on}) {
      run_result got = run_engine(with(o, spec), data);
      std::vector<double> scales, want_scales;
      for (const auto& s : got.steps) scales.push_back(s.loss_scale);
      for (const auto& s : want.steps) want_scales.push_back(s.loss_scale);
      EXPECT_EQ(scales, want_scales) << c.name;
      if (c.step == 2) EXPECT_EQ(scales, (std::vector<double>{65536, 65536, 131072, 65536, 65536}));
      else EXPECT_EQ(scales, (std::vector<double>{65536, 65536, 32768, 32768, 65536}));
      for (size_t k = 0; k < got.steps.size(); ++k) EXPECT_EQ(got.steps[k].skipped, int64_t(k) == c.step) << c.name << " " << k;
      if (spec == speculate_mode::speculate_off) expect_matches_reference(got, want, o, std::string(c.name) + " " + mode_label(with(o, spec)));
    }
    expect_undo_within_bound(o, data, c.step, std::string(c.name) + " fp16");
  }
}

// A rollback at step 1 (m = v = 0 before): p within the README's undo bound
// 2*2^-23 (|p_old| + |p_new|) with |p_new| <= |p_old| (1 + lr wd) + lr (one AdamW step at step 1
// moves by at most lr: |m_hat / sqrt(v_hat)| <= 1), and m, v back to exact zeros (the undo log's
// zero-state rule; without it residues of ~1 ulp of m_new, v_new remained).
TEST(engine_rollback, undo_at_first_step_restores_zero_moments) {
  FERRY_REQUIRE_DEVICE();
  auto data = make_data(1);
  engine_options o = base_options(k_overlapped, at::kFloat);
  o.debug_poison_step = 1;
  o.debug_poison_unit = 0;   // the embedding: the last unit in backward, every other unit was updated
  o.debug_poison_index = 5;
  auto e = make_engine(o);
  run_result init;
  snapshot(*e, init);
  step_result r = e->train_step(data[0], lr_at(0));
  ASSERT_TRUE(r.skipped);
  EXPECT_EQ(r.rollbacks, e->params().num_units());
  run_result after;
  snapshot(*e, after);
  const double ulp = std::ldexp(1.0, -23), lr = lr_at(0);
  for (int64_t u = 0; u < e->params().num_units(); ++u) {
    at::Tensor p0 = init.master[size_t(u)].to(at::kDouble).abs();
    at::Tensor p_new = p0 * (1 + lr * o.weight_decay) + lr;
    at::Tensor d = (after.master[size_t(u)].to(at::kDouble) - init.master[size_t(u)].to(at::kDouble)).abs();
    EXPECT_TRUE(d.le(2 * ulp * (p0 + p_new)).all().item<bool>()) << "unit " << u << " max diff " << d.max().item<double>();
    at::Tensor g = e->params().grad_tensor(u).to(at::kDouble).abs();
    if (u == 0) {   // the poisoned unit was never applied: bit-identical
      EXPECT_TRUE(after.master[0].equal(init.master[0]));
      EXPECT_TRUE(after.m[0].equal(init.m[0]));
      EXPECT_TRUE(after.v[0].equal(init.v[0]));
      continue;
    }
    EXPECT_TRUE(after.m[size_t(u)].equal(init.m[size_t(u)])) << "unit " << u << " max |m| " << after.m[size_t(u)].abs().max().item<double>();
    EXPECT_TRUE(after.v[size_t(u)].equal(init.v[size_t(u)])) << "unit " << u << " max |v| " << after.v[size_t(u)].abs().max().item<double>();
  }
  EXPECT_EQ(r.undo_log_bytes, 0) << "m = v = 0 before the step: nothing needs logging";
}

// Redo after clipping against the direct clipped step, one step from the same state: the undo
// restores m = v = 0 exactly, so the redone moments are bit-identical to the direct step's, and p
// is within the README's redo bound.
TEST(engine_rollback, redo_at_first_step_gives_the_direct_moments) {
  FERRY_REQUIRE_DEVICE();
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
  const double ulp = std::ldexp(1.0, -23), lr = lr_at(0), coef = off.steps[0].clip_coef;
  for (size_t u = 0; u < spec.master.size(); ++u) {
    at::Tensor p_old = init->params().master_tensor(int64_t(u)).to(at::kDouble).abs();
    at::Tensor p_new = p_old * (1 + lr * o.weight_decay) + lr;   // the speculative step's |p|
    at::Tensor dp = (spec.master[u].to(at::kDouble) - off.master[u].to(at::kDouble)).abs();
    EXPECT_TRUE(dp.le(4 * ulp * (p_old + p_new) + 4 * ulp * lr).all().item<bool>())
        << "unit " << u << ": max excess " << ((dp - 4 * ulp * (p_old + p_new)) / (ulp * lr)).max().item<double>()
        << " ulp*lr (coef " << coef << ")";
    EXPECT_TRUE(spec.m[u].equal(off.m[u])) << "unit " << u;
    EXPECT_TRUE(spec.v[u].equal(off.v[u])) << "unit " << u;
  }
}

// ---- 4. gradient accumulation ----

TEST(engine_accumulation, two_micro_batches_equal_one_batch) {
  FERRY_REQUIRE_DEVICE();
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
      expect_runs_close(two, one, tolerance_for(at::kFloat), std::string("grad_accum=2 vs batch 2 ") + mode_label(o));
      // ... and against the reference with the two rows as one batch.
      if (mode == k_overlapped)
        expect_matches_reference(two, run_reference(o, big), o, std::string("grad_accum=2 vs reference ") + mode_label(o));
    }
  }
}

// Each step's one batch of rows as `micro` micro-batches of consecutive rows, the first rows % micro
// of them one row longer.
std::vector<step_data> split_rows(const std::vector<step_data>& steps, int64_t micro) {
  std::vector<step_data> split;
  for (const auto& s : steps) {
    const int64_t rows = s[0].size(0);
    step_data d;
    for (int64_t r = 0, k = 0; k < micro; ++k) {
      const int64_t take = rows / micro + (k < rows % micro ? 1 : 0);
      d.push_back(s[0].narrow(0, r, take).contiguous());
      r += take;
    }
    split.push_back(d);
  }
  return split;
}

// fp32 options of the accumulation tests: clip as given, one batch of rows x T planned.
engine_options rows_options(offload_mode mode, double clip, int64_t rows, int64_t T) {
  engine_options o = base_options(mode, at::kFloat);
  o.clip_grad = clip;
  o.max_batch = rows;
  o.max_seq = T;
  return o;
}

// Gradient accumulation over 1, 2, 3 and 7 micro-batches equals one batch of the same 7 rows, in
// every mode, unclipped and clipped (speculation on: every step is redone), and the overlapped
// runs match the double-precision reference of the 7 rows as one batch. The last micro-batch is
// read by the optimizer beside the fp32 sum of the others (chunk_ref::grad_acc).
TEST(engine_accumulation, micro_batch_counts_equal_one_batch) {
  FERRY_REQUIRE_DEVICE();
  const int64_t rows = 7, T = k_seq;
  const auto big = make_data(3, rows, T, 11);
  for (auto mode : {k_overlapped, k_blocked, k_none}) {
    for (double clip : {0.0, 0.05}) {
      const engine_options o = rows_options(mode, clip, rows, T);
      const run_result one = run_engine(o, big);
      for (int64_t micro : {1, 2, 3, 7}) {
        const run_result got = run_engine(o, split_rows(big, micro));
        const std::string what = mode_label(o) + " " + std::to_string(micro) + " micro-batches";
        for (size_t k = 0; k < one.steps.size(); ++k) {
          EXPECT_EQ(got.steps[k].n_targets, one.steps[k].n_targets) << what;
          EXPECT_NEAR(got.steps[k].grad_norm, one.steps[k].grad_norm, 1e-5 * one.steps[k].grad_norm) << what;
          EXPECT_EQ(got.steps[k].clip_coef < 1, one.steps[k].clip_coef < 1) << what;
        }
        expect_runs_close(got, one, tolerance_for(at::kFloat), what + " vs one batch");
        if (mode == k_overlapped)
          expect_matches_reference(got, run_reference(o, big), o, what + " vs reference");
      }
    }
  }
}

// Groups of micro-batches (engine_options::micro_group): each unit's weights cross once per group
// and its gradient is the group's fp32 sum (gradient_path::fold), so 2, 3 and 7 micro-batches in
// one group, and 7 in groups of 3, 3 and 1 (the host sums the groups), equal one batch of the same
// 7 rows, offloaded, unclipped and clipped (speculation on: every step is redone), activations
// checkpointed or not, and match the double-precision reference. A step in one group moves exactly
// the one batch's bytes each way; more groups move each unit's weights and gradient once per group.
// The host backends also run each with the embedding's gradient summed in the device's table
// (embed_grad=device, which auto is on CUDA), across the groups of a step.
TEST(engine_accumulation, micro_batch_groups_equal_one_batch) {
  FERRY_REQUIRE_DEVICE();
  const int64_t rows = 7, T = k_seq;
  const auto big = make_data(3, rows, T, 11);
  struct grouping { int64_t micro, group, planned; };
  for (auto mode : {k_overlapped, k_blocked}) {
    for (double clip : {0.0, 0.05}) {
      const engine_options o = rows_options(mode, clip, rows, T);
      const run_result one = run_engine(o, big);
      // group 0: auto, which with no device limit is every micro-batch of the step
      for (grouping gr : {grouping{2, 0, 2}, grouping{3, 3, 3}, grouping{7, 0, 7}, grouping{7, 3, 3}}) {
        for (int variant = 0; variant < 4; ++variant) {
          const auto recompute = variant & 1 ? recompute_mode::recompute_blocks : recompute_mode::recompute_none;
          const auto place = variant & 2 ? embed_grad_place::embed_grad_device : embed_grad_place::embed_grad_auto;
          if (recompute == recompute_mode::recompute_blocks && (gr.micro != 7 || clip == 0)) continue;
          if (place == embed_grad_place::embed_grad_device && (k_cuda_suite || gr.micro == 2)) continue;
          engine_options og = o;
          og.grad_accum = gr.micro;
          og.micro_group = gr.group;
          og.recompute = recompute;
          og.embed_grad = place;
          const std::string what = mode_label(og) + " " + std::to_string(gr.micro) + " micro-batches in groups of " +
                                   std::to_string(gr.planned) +
                                   (recompute == recompute_mode::recompute_blocks ? ", recomputed" : "") +
                                   (place == embed_grad_place::embed_grad_device ? ", embedding table" : "");
          ASSERT_EQ(make_engine(og)->plan().micro_group, gr.planned) << what;
          ASSERT_EQ(make_engine(og)->plan().embed_grad_device, place == embed_grad_place::embed_grad_device || k_cuda_suite)
              << what;
          const run_result got = run_engine(og, split_rows(big, gr.micro));
          const int64_t groups = (gr.micro + gr.planned - 1) / gr.planned;
          for (size_t k = 0; k < one.steps.size(); ++k) {
            EXPECT_EQ(got.steps[k].n_targets, one.steps[k].n_targets) << what;
            EXPECT_NEAR(got.steps[k].grad_norm, one.steps[k].grad_norm, 1e-5 * one.steps[k].grad_norm) << what;
            EXPECT_EQ(got.steps[k].clip_coef < 1, one.steps[k].clip_coef < 1) << what;
            if (groups == 1) {
              // The table crosses once in place of the batch's fp32 rows (on CUDA, in both runs).
              const int64_t table = place == embed_grad_place::embed_grad_device
                                        ? (tiny_config().vocab_size - rows * T) * tiny_config().hidden_size * 4
                                        : 0;
              EXPECT_EQ(got.steps[k].h2d_bytes, one.steps[k].h2d_bytes) << what;
              EXPECT_EQ(got.steps[k].d2h_bytes, one.steps[k].d2h_bytes + table) << what;
            } else {
              EXPECT_GT(got.steps[k].d2h_bytes, one.steps[k].d2h_bytes) << what;
            }
          }
          expect_runs_close(got, one, tolerance_for(at::kFloat), what + " vs one batch");
          expect_matches_reference(got, run_reference(o, big), o, what + " vs reference");
        }
      }
    }
  }
}

// The host's fp32 accumulation buffers exist only when a step has more than one group, as the
// plan says (memory_plan::host_other): none for 7 micro-batches in one group, 4 B per non-embedding
// parameter for 7 in groups of 3 or one by one.
TEST(engine_accumulation, host_accumulators_only_for_several_groups) {
  FERRY_REQUIRE_DEVICE();
  const int64_t rows = 7, T = k_seq;
  const model::llama_config cfg = tiny_config();
  const auto data = split_rows(make_data(1, rows, T, 11), rows);
  for (int64_t group : {7, 3, 1}) {
    engine_options o = rows_options(k_overlapped, 0.0, rows, T);
    o.grad_accum = rows;
    o.micro_group = group;
    auto e = make_engine(o);
    e->train_step(data[0], lr_at(0));
    const int64_t want = group == rows ? 0 : (cfg.total_params() - cfg.embed_params()) * 4;
    EXPECT_EQ(e->gradients().accumulation_bytes(), want) << "groups of " << group;
    // The embedding's input rows and one staging of its input gradient per micro-batch of a group,
    // and its fp32 gradient (pinned instead when it is summed on the device: CUDA's auto).
    const bool embed_dev = e->options().embed_grad == embed_grad_place::embed_grad_device;
    const int64_t staging = (1 + (embed_dev ? 0 : group)) * rows * T * cfg.hidden_size * 4;
    const int64_t planned = e->plan().host_other - (embed_dev ? 0 : cfg.embed_params() * 4) - staging;
    EXPECT_EQ(planned, want) << "groups of " << group << ": the plan's accumulation buffers";
  }
}

// Statistics at the source (engine_options::stats_at_source): taken from the slot before its copy
// for every unit but the embedding when the step is one group, and from the host's sums when it has
// several; either way the run is bit-identical to one that reads them on the update thread, with
// speculation deferred, waiting or off, with and without clipping (which needs fix-ups).
TEST(engine_stats, at_the_source_only_where_the_host_reads_the_slot) {
  FERRY_REQUIRE_DEVICE();
  const int64_t rows = 3, T = k_seq;
  const auto data = split_rows(make_data(1, rows, T, 11), rows);
  for (int64_t group : {3, 1}) {
    engine_options o = rows_options(k_overlapped, 0.0, rows, T);
    o.grad_accum = rows;
    o.micro_group = group;
    auto e = make_engine(o);
    e->train_step(data[0], lr_at(0));
    for (int64_t u = 0; u < e->params().num_units(); ++u)
      EXPECT_EQ(e->gradients().has_source_stats(u),
                u == e->params().embed_unit() ? e->options().embed_grad == embed_grad_place::embed_grad_device
                                              : group == rows)
          << "groups of " << group << ", unit " << u;
    o.stats_at_source = false;
    auto off = make_engine(o);
    off->train_step(data[0], lr_at(0));
    for (int64_t u = 0; u < off->params().num_units(); ++u)
      EXPECT_FALSE(off->gradients().has_source_stats(u)) << "off, unit " << u;
  }
}

TEST(engine_stats, at_the_source_same_bits_as_on_the_host) {
  FERRY_REQUIRE_DEVICE();
  auto data = make_data(4);
  for (double clip : {0.0, 0.05}) {
    for (speculate_mode spec : {speculate_mode::speculate_on, speculate_mode::speculate_off}) {
      for (bool defer : {true, false}) {
        if (spec == speculate_mode::speculate_off && !defer) continue;
        engine_options o = with(base_options(k_overlapped, at::kFloat), spec);
        o.clip_grad = clip;
        o.defer_speculative = defer;
        engine_options host = o;
        host.stats_at_source = false;
        const std::string what = mode_label(o) + (defer ? "" : " waiting") + ", clip " + std::to_string(clip) +
                                 ": statistics at the source vs on the host";
        const run_result a = run_engine(o, data), b = run_engine(host, data);
        if (k_cuda_suite && clip > 0) {
          // On CUDA the squares are summed in fp32 on the device (the host sums blocks in double):
          // the norm, so the clip coefficient, agrees to fp32 rounding, and so does the trajectory.
          ASSERT_EQ(a.steps.size(), b.steps.size());
          for (size_t k = 0; k < a.steps.size(); ++k)
            EXPECT_NEAR(a.steps[k].grad_norm, b.steps[k].grad_norm, 1e-5 * b.steps[k].grad_norm) << what << " step " << k;
          for (size_t u = 0; u < a.master.size(); ++u)
            EXPECT_LT(max_abs_diff(a.master[u], b.master[u]), 1e-6) << what << " master, unit " << u;
          continue;
        }
        // Without clipping the statistics only decide a skip; on the host they are the same call.
        expect_bit_identical(a, b, what);
        for (size_t k = 0; k < a.steps.size(); ++k) {
          if (!k_cuda_suite) {
            EXPECT_EQ(a.steps[k].grad_norm, b.steps[k].grad_norm) << what << " step " << k;
          }
        }
      }
    }
  }
}

// embed_grad=device (one rank): the embedding's gradient is summed on the device into an fp32
// table that crosses to the host once per step, its statistics taken there. The trajectory is the
// one of the host's row scatter: bit-identical on the host backends (index_put_ sums duplicate rows
// in token order, as scatter_add_rows does); on CUDA within fp32 rounding (the device sorts the
// rows, and sums the squares in fp32). Over one micro-batch, three in one group and three one by
// one, speculation deferred, waiting and off, unclipped and clipped.
TEST(engine_embed_grad, device_sum_trains_like_the_host_scatter) {
  FERRY_REQUIRE_DEVICE();
  const int64_t rows = 3, T = k_seq;
  const auto big = make_data(3, rows, T, 17);
  for (int64_t micro : {1, 3}) {
    for (int64_t group : {3, 1}) {
      if (micro == 1 && group != 1) continue;
      for (double clip : {0.0, 0.05}) {
        for (speculate_mode spec : {speculate_mode::speculate_on, speculate_mode::speculate_off}) {
          for (bool defer : {true, false}) {
            if (spec == speculate_mode::speculate_off && !defer) continue;
            engine_options o = with(rows_options(k_overlapped, clip, rows, T), spec);
            o.grad_accum = micro;
            o.micro_group = group;
            o.defer_speculative = defer;
            engine_options host = o, dev = o;
            host.embed_grad = embed_grad_place::embed_grad_host;
            dev.embed_grad = embed_grad_place::embed_grad_device;
            const std::string what = mode_label(o) + (defer ? "" : " waiting") + ", " + std::to_string(micro) +
                                     " micro-batches in groups of " + std::to_string(group) + ", clip " +
                                     std::to_string(clip) + ": embedding summed on the device vs the host";
            const auto data = split_rows(big, micro);
            const run_result a = run_engine(dev, data), b = run_engine(host, data);
            if (k_cuda_suite) {
              ASSERT_EQ(a.steps.size(), b.steps.size());
              for (size_t k = 0; k < a.steps.size(); ++k) {
                EXPECT_NEAR(a.steps[k].grad_norm, b.steps[k].grad_norm, 1e-5 * b.steps[k].grad_norm) << what << " step " << k;
                EXPECT_EQ(a.steps[k].skipped, b.steps[k].skipped) << what << " step " << k;
              }
              for (size_t u = 0; u < a.master.size(); ++u)
                EXPECT_LT(max_abs_diff(a.master[u], b.master[u]), 1e-6) << what << " master, unit " << u;
              continue;
            }
            expect_bit_identical(a, b, what);
            for (size_t k = 0; k < a.steps.size(); ++k) EXPECT_EQ(a.steps[k].grad_norm, b.steps[k].grad_norm) << what << " step " << k;
          }
        }
      }
    }
  }
}

// Where the table lives and what the plan charges for it: the fp32 table on the device, the host's
// fp32 gradient page-locked instead of pageable (the copy's target) and no staging of the input
// gradient's rows; its statistics are taken at the source. auto resolves to device only on CUDA for
// an untied model at one rank, and device where it cannot apply is refused naming the key.
TEST(engine_embed_grad, plans_and_places_the_table) {
  const auto cfg = tiny_config();
  engine_options o = base_options(k_overlapped, at::kFloat);
  o.cuda = false;
  o.grad_accum = 2;
  o.embed_grad = embed_grad_place::embed_grad_host;
  const memory_plan host = engine(cfg, o).plan();
  o.embed_grad = embed_grad_place::embed_grad_device;
  auto dev = make_engine(o);
  const memory_plan p = dev->plan();
  const int64_t table = cfg.embed_params() * 4, staging = o.max_batch * o.max_seq * cfg.hidden_size * 4;
  EXPECT_EQ(p.grad_slots - host.grad_slots, table);
  EXPECT_EQ(p.host_pinned - host.host_pinned, table);
  EXPECT_EQ(host.host_other - p.host_other, table + 2 * staging) << "two micro-batches in one group";
  EXPECT_EQ(p.host_total, host.host_total - 2 * staging);
  EXPECT_TRUE(dev->params().grad_sharded(dev->params().embed_unit()));
  for (int64_t u = 1; u < dev->params().num_units(); ++u) EXPECT_FALSE(dev->params().grad_sharded(u)) << "unit " << u;
  // Two micro-batches in two groups: the table still holds the step's whole sum, so its statistics
  // come from the source while the blocks' come from the host's sums.
  o.micro_group = 1;
  auto two_groups = make_engine(o);
  two_groups->train_step(split_rows(make_data(1), 2)[0], lr_at(0));
  for (int64_t u = 0; u < two_groups->params().num_units(); ++u)
    EXPECT_EQ(two_groups->gradients().has_source_stats(u), u == two_groups->params().embed_unit()) << "unit " << u;
  o.micro_group = 0;

  o.embed_grad = embed_grad_place::embed_grad_auto;
  EXPECT_EQ(resolve_embed_grad(o, false, cfg.embed_params()).embed_grad, embed_grad_place::embed_grad_host) << "CPU";
  o.cuda = true;
  EXPECT_EQ(resolve_embed_grad(o, false, cfg.embed_params()).embed_grad, embed_grad_place::embed_grad_device);
  EXPECT_EQ(resolve_embed_grad(o, true, cfg.embed_params()).embed_grad, embed_grad_place::embed_grad_host) << "tied";
  EXPECT_EQ(resolve_embed_grad(o, false, (int64_t(1) << 28) + 1).embed_grad, embed_grad_place::embed_grad_host)
      << "a table over 1 GiB";
  // The plan keeps the table on the device only where it fits the cap with the same group: a cap
  // between the two plans (one group of two either way) puts it on the host, and so does one where
  // the table would cost the group (the host's plan runs two at once, the device's only one).
  {
    engine_options h = o, d = o;
    h.embed_grad = embed_grad_place::embed_grad_host;
    d.embed_grad = embed_grad_place::embed_grad_device;
    EXPECT_TRUE(plan_memory(cfg, o, o.max_batch, o.max_seq, 2).embed_grad_device) << "no cap";
    const memory_plan ph = plan_memory(cfg, h, o.max_batch, o.max_seq, 2),
                      pd = plan_memory(cfg, d, o.max_batch, o.max_seq, 2);
    ASSERT_EQ(pd.device_total - ph.device_total, table);
    ASSERT_EQ(ph.micro_group, 2);
    auto cap_for = [](int64_t target) { return int64_t(double(target) / (1 - k_allocator_slack)) + 1; };
    EXPECT_TRUE(plan_memory(cfg, o, o.max_batch, o.max_seq, 2, {}, cap_for(pd.device_total)).embed_grad_device);
    engine_options fixed = o;   // a group of two asked for: the device's plan keeps it and does not fit
    fixed.micro_group = 2;
    const memory_plan between = plan_memory(cfg, fixed, o.max_batch, o.max_seq, 2, {}, cap_for(ph.device_total + table / 2));
    EXPECT_FALSE(between.embed_grad_device);
    EXPECT_EQ(between.device_total, ph.device_total);
    // A cap that fits the device's table only beside a group of one.
    engine_options d1 = d;
    d1.micro_group = 1;
    const memory_plan pd1 = plan_memory(cfg, d1, o.max_batch, o.max_seq, 2);
    if (pd1.device_total < ph.device_total) {
      const memory_plan grouped = plan_memory(cfg, o, o.max_batch, o.max_seq, 2, {}, cap_for(ph.device_total));
      EXPECT_FALSE(grouped.embed_grad_device);
      EXPECT_EQ(grouped.micro_group, 2);
    } else {
      ADD_FAILURE() << "the tiny model's group of two should outweigh its embedding table";
    }
    // A cap where the table costs a recomputed block (long rows, so that one block's saved set
    // outweighs the table): the host's plan recomputes none, and auto still takes the table, with
    // the block recomputed (memory_plan.cpp says why).
    engine_options r = o;
    r.recompute = recompute_mode::recompute_auto;
    engine_options rh = r, rd = r;
    rh.embed_grad = embed_grad_place::embed_grad_host;
    rd.embed_grad = embed_grad_place::embed_grad_device;
    const int64_t Bl = 8, Tl = 2048;
    const int64_t cap = cap_for(plan_memory(cfg, rh, Bl, Tl, 1).device_total);
    ASSERT_EQ(plan_memory(cfg, rh, Bl, Tl, 1, {}, cap).recompute_blocks, 0);
    const memory_plan rd_cap = plan_memory(cfg, rd, Bl, Tl, 1, {}, cap);
    ASSERT_GE(rd_cap.recompute_blocks, 1);
    ASSERT_LE(double(rd_cap.device_total), double(cap) * (1 - k_allocator_slack)) << "the table fits by recomputing";
    const memory_plan recomputed = plan_memory(cfg, r, Bl, Tl, 1, {}, cap);
    EXPECT_TRUE(recomputed.embed_grad_device);
    EXPECT_EQ(recomputed.recompute_blocks, rd_cap.recompute_blocks);
  }
  o.mode = k_none;
  EXPECT_EQ(resolve_embed_grad(o, false, cfg.embed_params()).embed_grad, embed_grad_place::embed_grad_host) << "none";
  o.embed_grad = embed_grad_place::embed_grad_device;
  auto refusal = [&](const engine_options& x, bool tied) {
    try {
      resolve_embed_grad(x, tied, cfg.embed_params());
    } catch (const config_error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  EXPECT_NE(refusal(o, false).find("embed_grad=device needs offload blocked or overlapped"), std::string::npos);
  o.mode = k_overlapped;
  EXPECT_NE(refusal(o, true).find("embed_grad=device: the model ties its embeddings"), std::string::npos);
  EXPECT_EQ(refusal(o, false), "");
}

// An overflow in the embedding's gradient, summed on the device with its statistics taken there:
// the poison is written into the table after the step's last scatter, so the step is skipped (and
// the speculative updates of the other units rolled back) exactly as when the host sums it.
TEST(engine_embed_grad, an_overflow_in_the_table_skips_the_step) {
  FERRY_REQUIRE_DEVICE();
  const int64_t rows = 3, T = k_seq;
  const auto data = split_rows(make_data(3, rows, T, 19), rows);
  for (double value : {k_inf, std::nan("")}) {
    engine_options o = rows_options(k_overlapped, 0.0, rows, T);
    o.grad_accum = rows;
    o.debug_poison_step = 2;
    o.debug_poison_unit = 0;
    o.debug_poison_index = 5;
    o.debug_poison_value = value;
    engine_options host = o, dev = o;
    host.embed_grad = embed_grad_place::embed_grad_host;
    dev.embed_grad = embed_grad_place::embed_grad_device;
    const run_result a = run_engine(dev, data), b = run_engine(host, data);
    ASSERT_EQ(a.steps.size(), 3u);
    for (size_t k = 0; k < a.steps.size(); ++k) EXPECT_EQ(a.steps[k].skipped, k == 1) << value << " step " << k;
    if (!k_cuda_suite) expect_bit_identical(a, b, "poisoned embedding, " + std::to_string(value));
  }
}

// In a half compute dtype a group's gradients are summed in fp32 and rounded once: 1 + 3 x (a
// quarter of the dtype's epsilon) rounds up to 1 + epsilon, where adding in the half dtype would
// round every quarter away and leave 1. A group of one leaves the gradient as it is.
TEST(engine_accumulation, a_group_sums_in_fp32_and_rounds_once) {
  FERRY_REQUIRE_DEVICE();
  for (auto dt : {at::kBFloat16, at::kHalf}) {
    engine_options o = base_options(k_overlapped, dt);
    o.grad_accum = 4;
    auto e = make_engine(o);
    ASSERT_EQ(e->plan().micro_group, 4);
    const double eps = dt == at::kBFloat16 ? std::ldexp(1.0, -7) : std::ldexp(1.0, -10);
    for (int64_t u : {e->params().block_unit(1), e->params().head_unit()}) {
      at::Tensor g = e->gradients().target(u);
      for (int64_t j = 0; j < 4; ++j) {
        g.fill_(j == 0 ? 1.0 : eps / 4);
        e->gradients().fold(g, j, 4);
      }
      e->device().synchronize();
      EXPECT_TRUE(g.cpu().to(at::kDouble).eq(1 + eps).all().item<bool>())
          << dt << " unit " << u << ": " << g.cpu().to(at::kDouble).max().item<double>();
      g.fill_(eps / 4);
      e->gradients().fold(g, 0, 1);
      e->device().synchronize();
      EXPECT_TRUE(g.cpu().to(at::kDouble).eq(eps / 4).all().item<bool>()) << dt << " unit " << u;
    }
  }
}

// The same through whole steps: 4 bf16 micro-batches in one group stay as close to the fp64
// reference as the same micro-batches summed on the host one by one (micro_group 1).
TEST(engine_accumulation, a_half_group_trains_like_one_by_one) {
  FERRY_REQUIRE_DEVICE();
  const int64_t rows = 4, T = k_seq;
  const auto big = make_data(3, rows, T, 13);
  std::vector<step_data> split;
  for (const auto& s : big) {
    step_data d;
    for (int64_t r = 0; r < rows; ++r) d.push_back(s[0].narrow(0, r, 1).contiguous());
    split.push_back(d);
  }
  engine_options o = base_options(k_overlapped, at::kBFloat16);
  o.max_batch = 1;
  o.max_seq = T;
  o.grad_accum = rows;
  engine_options each = o;
  each.micro_group = 1;
  ASSERT_EQ(make_engine(o)->plan().micro_group, rows);
  const run_result grouped = run_engine(o, split), one_by_one = run_engine(each, split);
  engine_options ref = o;
  ref.max_batch = rows;
  const ref_run want = run_reference(ref, big);
  expect_matches_reference(grouped, want, ref, "bf16, 4 micro-batches in one group vs reference");
  expect_matches_reference(one_by_one, want, ref, "bf16, 4 micro-batches one by one vs reference");
  expect_runs_close(grouped, one_by_one, tolerance_for(at::kBFloat16), "bf16, one group vs one by one");
}

// Packed rows (micro_batch::positions): rows holding several examples, each with positions from 0
// and attention confined to itself, train exactly like the examples one by one as micro-batches of
// their own (the same targets, loss, gradient norm, and after three steps the same weights and
// moments), in every mode, unclipped and clipped; evaluation agrees too. Malformed positions are
// refused before anything changes.
TEST(engine_packing, packed_rows_equal_examples_one_by_one) {
  FERRY_REQUIRE_DEVICE();
  const std::vector<std::vector<int64_t>> runs = {{5, 3, 6}, {7, 2, 4}};  // and padding: 2 and 3 columns
  const int64_t B = 2, T = 16, V = tiny_config().vocab_size;
  at::Generator gen = at::detail::createCPUGenerator(5);
  micro_batch packed{at::randint(0, V, {B, T}, gen, at::kLong), at::full({B, T}, -100, at::kLong),
                     at::zeros({B, T}, at::kLong)};
  std::vector<micro_batch> examples;
  for (int64_t b = 0; b < B; ++b) {
    int64_t at = 0;
    for (int64_t len : runs[size_t(b)]) {
      at::Tensor in = packed.inputs[b].narrow(0, at, len), lab = packed.labels[b].narrow(0, at, len);
      lab.narrow(0, 0, len - 1).copy_(in.narrow(0, 1, len - 1));  // the run's next tokens
      lab[0] = -100;                                                 // a prompt token: not trained
      packed.positions[b].narrow(0, at, len).copy_(at::arange(len, at::kLong));
      examples.push_back({in.unsqueeze(0).clone(), lab.unsqueeze(0).clone(), at::Tensor()});
      at += len;
    }
    packed.positions[b].narrow(0, at, T - at).copy_(at::arange(T - at, at::kLong));  // the padding's own run
  }
  for (auto mode : {k_overlapped, k_blocked, k_none}) {
    for (double clip : {0.0, 0.05}) {
      engine_options o = base_options(mode, at::kFloat);
      o.clip_grad = clip;
      o.max_batch = B;
      o.max_seq = T;
      const std::string what = mode_label(o) + " packed vs one by one";
      auto a = make_engine(o), b = make_engine(o);
      run_result ra, rb;
      for (int64_t k = 0; k < 3; ++k) {
        ra.steps.push_back(a->train_step({packed}, lr_at(k)));
        rb.steps.push_back(b->train_step(examples, lr_at(k)));
        EXPECT_EQ(ra.steps[k].n_targets, rb.steps[k].n_targets) << what;
        EXPECT_NEAR(ra.steps[k].loss, rb.steps[k].loss, 1e-5 * rb.steps[k].loss) << what;
        EXPECT_NEAR(ra.steps[k].grad_norm, rb.steps[k].grad_norm, 1e-5 * rb.steps[k].grad_norm) << what;
      }
      EXPECT_EQ(ra.steps[0].n_targets, 27 - 2 * 6) << "each run: its next tokens but the first label";
      double sum = 0;
      for (const micro_batch& ex : examples) sum += a->evaluate(ex).loss_sum;
      const model::head_result ev = a->evaluate(packed);
      EXPECT_NEAR(ev.loss_sum, sum, 1e-5 * sum) << what;
      snapshot(*a, ra);
      snapshot(*b, rb);
      // On CUDA the examples one by one run other attention kernels than the packed rows' masked
      // composition; AdamW turns that summation-order noise into up to ~0.05 lr0 on elements whose
      // gradient is near zero (H100, 2026-11-27: 0.0529 lr0), so the loose bound doubles there.
      // A row attending across examples is off by whole lr0s.
      trajectory_tol tol = tolerance_for(at::kFloat);
      if (k_cuda_suite) tol.loose *= 2;
      expect_runs_close(ra, rb, tol, what);
    }
  }
  engine_options o = base_options(k_blocked, at::kFloat);
  o.max_batch = B;
  o.max_seq = T;
  auto e = make_engine(o);
  micro_batch bad = packed;
  bad.positions = packed.positions.clone();
  bad.positions[1][6] = 3;  // 0 1 2 3 4 5 3: neither a restart nor the next position
  EXPECT_THROW(
      {
        try {
          e->train_step({bad}, 1e-3);
        } catch (const ferry::error& err) {
          EXPECT_NE(std::string(err.what()).find("row 1 has 3 at column 6 after 5"), std::string::npos) << err.what();
          throw;
        }
      },
      ferry::error);
  EXPECT_EQ(e->state().optimizer_steps, 0);
}

// ---- 5. races ----

// Random delays in every copy, compute phase and CPU update: the overlapped schedule must give
// bit-identical results every time, equal to a run without delays. Gradient accumulation and
// clipping (rollback on every step) are on, so every host buffer handoff is exercised.
TEST(engine_race, delays_change_nothing) {
  FERRY_REQUIRE_DEVICE();
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
        d.debug_delay_us = 500;
        d.seed = 1000 + uint64_t(rep);
        expect_bit_identical(run_engine(d, split), calm, mode_label(o) + " delays rep " + std::to_string(rep));
      }
    }
  }
}

// A named change to a test's engine options, one of the variants a test runs.
struct option_variant {
  std::string name;
  std::function<void(engine_options&)> set;
};
// The test hook's poison: `value` written at `index` of unit `unit`'s gradient at step `step`.
option_variant poison_variant(std::string name, int64_t step, int64_t unit, int64_t index, double value) {
  return {std::move(name), [=](engine_options& o) {
            o.debug_poison_step = step;
            o.debug_poison_unit = unit;
            o.debug_poison_index = index;
            o.debug_poison_value = value;
          }};
}

// engine_options::embed_rows_first: a deferred step given the next step's batches updates the
// embedding rows those gather first and the rest of the table after every other unit. The run is
// bit-identical to one updating the table as one: unclipped (the split runs: rows counted, fewer
// than the vocabulary) and clipped (every step needs a fix-up: the first part updates the whole
// table with its undo log), with the embedding's gradient summed on the host and on the device,
// over one micro-batch and three in one group, with fp32 and int8 moments (ranges widened to
// quantization blocks), with an overflow in a block and in the embedding, with random delays on
// both threads, with evaluation between steps (its rows are not all marked: it waits for the rest)
// and with a wrong `next` (the next forward's rows are not all marked).
TEST(engine_embed_rows_first, same_bits_as_one_update_of_the_table) {
  FERRY_REQUIRE_DEVICE();
  const int64_t rows = 3, T = k_seq;
  const auto big = make_data(4, rows, T, 23);
  const model::llama_config cfg = tiny_config();
  const std::vector<option_variant> variants = {
      {"plain", [](engine_options&) {}},
      {"int8 moments", [](engine_options& o) { o.state = state_kind::state_int8; }},
      poison_variant("overflow in block 1 at step 2", 2, 1, 3, k_inf),
      poison_variant("overflow in the embedding at step 3", 3, 0, 70, std::nan("")),
      {"delays", [](engine_options& o) {
         o.debug_delay_us = 300;
         o.seed = 77;
       }},
      // Every update sleeps: the next forward starts while the table's second part is queued.
      {"slow updates", [](engine_options& o) { o.debug_update_sleep_us = 3000; }},
  };
  for (const option_variant& var : variants) {
    for (auto place : {embed_grad_place::embed_grad_host, embed_grad_place::embed_grad_device}) {
      for (int64_t micro : {1, 3}) {
        for (double clip : {0.0, 0.05}) {
          engine_options o = rows_options(k_overlapped, clip, rows, T);
          o.grad_accum = micro;
          o.micro_group = micro;
          o.embed_grad = place;
          var.set(o);
          engine_options whole = o;
          whole.embed_rows_first = false;
          const std::string what = var.name + ", embed_grad " +
                                   (place == embed_grad_place::embed_grad_host ? "host" : "device") + ", " +
                                   std::to_string(micro) + " micro-batches, clip " + std::to_string(clip);
          const auto data = split_rows(big, micro);
          const run_result a = run_engine(o, data), b = run_engine(whole, data);
          expect_bit_identical(a, b, what + ": rows first vs the table as one");
          for (size_t k = 0; k < a.steps.size(); ++k) {
            EXPECT_EQ(b.steps[k].embed_rows_first, 0) << what << " step " << k;
            const bool split = clip == 0 && !a.steps[k].skipped && k + 1 < a.steps.size();
            if (split) {
              EXPECT_GT(a.steps[k].embed_rows_first, 0) << what << " step " << k;
              EXPECT_LT(a.steps[k].embed_rows_first, cfg.vocab_size) << what << " step " << k;
            } else {
              EXPECT_EQ(a.steps[k].embed_rows_first, 0) << what << " step " << k;
            }
          }
        }
      }
    }
  }
  // New weights between steps (params_changed, as loading a checkpoint does): the rows the first
  // part staged for the next step come from the old table and must not be used.
  {
    engine_options o = rows_options(k_overlapped, 0.0, rows, T);
    engine_options whole = o;
    whole.embed_rows_first = false;
    const step_hook surgery = [](int64_t k, engine& e) {
      if (k != 2) return;
      e.wait_updates();
      e.params().master_tensor(e.params().embed_unit()).add_(0.25);
      e.params_changed();
    };
    const auto data = split_rows(big, 1);
    const run_result a = run_engine(o, data, surgery), b = run_engine(whole, data, surgery);
    EXPECT_GT(a.steps[1].embed_rows_first, 0);
    expect_bit_identical(a, b, "new weights between steps");
  }
  // Evaluation between steps, and a `next` that is not the next step's batch; every update sleeps,
  // so both read the table while its second part is still queued.
  const auto data = split_rows(big, 1);
  const auto other = make_data(4, rows, T, 29);
  engine_options o = rows_options(k_overlapped, 0.0, rows, T);
  o.debug_update_sleep_us = 20000;
  engine_options whole = o;
  whole.embed_rows_first = false;
  // Each engine runs on its own, so that its updates are still queued when it reads the table.
  auto run = [&](const engine_options& opt, bool rows_first, run_result& r, std::vector<double>& losses) {
    auto e = make_engine(opt);
    for (size_t k = 0; k < data.size(); ++k) {
      r.steps.push_back(e->train_step(data[k], lr_at(int64_t(k)), rows_first ? &other[k] : nullptr));
      // Every other step evaluates; the others go straight to the next step (whose rows were not
      // all marked).
      if (k % 2 == 0) losses.push_back(e->evaluate(other[(k + 2) % other.size()][0]).loss_sum);
    }
    snapshot(*e, r);
  };
  run_result ra, rb;
  std::vector<double> la, lb;
  run(o, true, ra, la);
  run(whole, false, rb, lb);
  for (size_t k = 0; k < ra.steps.size(); ++k) EXPECT_GT(ra.steps[k].embed_rows_first, 0) << "step " << k;
  EXPECT_EQ(la, lb) << "evaluation between steps";
  expect_bit_identical(ra, rb, "a wrong next, and evaluation between steps");
}

// engine_options::update_part: a deferred step's updates run in parts, and the update thread takes
// a gradient task whose copy is done, and the update of a unit the next forward needs sooner,
// between them. The run is bit-identical to one with each unit updated in one piece: unclipped
// (the updates stand) and clipped (every step's fix-up undoes them with the logs the parts wrote),
// over one micro-batch and three in one group, with fp32, bf16 and int8 moments, bf16 compute (the
// half copy written part by part), an overflow in a block, random delays on both threads, and slow
// updates (the next forward waits for parts still queued). Parts went back to the queue in each.
TEST(engine_update_parts, same_bits_as_whole_updates) {
  FERRY_REQUIRE_DEVICE();
  const int64_t rows = 3, T = k_seq;
  const auto big = make_data(4, rows, T, 31);
  const std::vector<option_variant> variants = {
      {"plain", [](engine_options&) {}},
      {"bf16 moments", [](engine_options& o) { o.state = state_kind::state_bf16; }},
      {"int8 moments", [](engine_options& o) { o.state = state_kind::state_int8; }},
      {"bf16 compute", [](engine_options& o) { o.dtype = at::kBFloat16; }},
      poison_variant("overflow in block 2 at step 1", 1, 2, 5, k_inf),
      {"delays", [](engine_options& o) {
         o.debug_delay_us = 300;
         o.seed = 41;
       }},
      {"slow updates", [](engine_options& o) { o.debug_update_sleep_us = 4000; }},
  };
  for (const option_variant& var : variants) {
    for (int64_t micro : {1, 3}) {
      for (double clip : {0.0, 0.05}) {
        engine_options o = rows_options(k_overlapped, clip, rows, T);
        o.grad_accum = micro;
        o.micro_group = micro;
        var.set(o);
        o.update_part = 10000;
        engine_options whole = o;
        whole.update_part = 0;
        const std::string what =
            var.name + ", " + std::to_string(micro) + " micro-batches, clip " + std::to_string(clip);
        const auto data = split_rows(big, micro);
        int64_t resumed = 0;
        const step_hook count = [&](int64_t k, engine& e) {
          if (k + 1 == int64_t(data.size())) resumed = e.update_parts_resumed();
        };
        int64_t resumed_whole = 0;
        const step_hook count_whole = [&](int64_t k, engine& e) {
          if (k + 1 == int64_t(data.size())) resumed_whole = e.update_parts_resumed();
        };
        const run_result a = run_engine(o, data, count), b = run_engine(whole, data, count_whole);
        expect_bit_identical(a, b, what + ": updates in parts vs in one piece");
        EXPECT_GT(resumed, 0) << what << ": no update ran in parts";
        EXPECT_EQ(resumed_whole, 0) << what;
      }
    }
  }
}

// A part size that is not a count of parameters is refused, naming where it came from.
TEST(engine_update_parts, refuses_a_bad_part_size) {
  FERRY_REQUIRE_DEVICE();
  engine_options o = rows_options(k_overlapped, 0.0, 1, k_seq);
  o.update_part = -1;
  try {
    make_engine(o);
    ADD_FAILURE() << "update_part=-1 was accepted";
  } catch (const config_error& e) {
    EXPECT_NE(std::string(e.what()).find("update_part=-1"), std::string::npos) << e.what();
  }
  o.update_part = 0;
  for (const char* bad : {"abc", "-5", "12x", "", " 4", "+4"}) {
    ::setenv("FERRY_UPDATE_PART", bad, 1);
    try {
      make_engine(o);
      ADD_FAILURE() << "FERRY_UPDATE_PART='" << bad << "' was accepted";
    } catch (const config_error& e) {
      EXPECT_NE(std::string(e.what()).find("FERRY_UPDATE_PART='" + std::string(bad) + "'"), std::string::npos)
          << e.what();
    }
  }
  ::setenv("FERRY_UPDATE_PART", "4096", 1);
  EXPECT_NO_THROW(make_engine(o));
  ::unsetenv("FERRY_UPDATE_PART");
}

// ---- 6. memory plan ----

// The plan's activations, optimizer and pinned bytes against what a real forward saves and a
// real parameter store holds (host tensors: the sizes are the device's too).
TEST(engine_memory, plan_matches_measured_bytes) {
  const auto cfg = tiny_config();
  const int64_t B = 3, T = 11;
  auto host = make_host_backend();
  for (auto dt : {at::kFloat, at::kBFloat16, at::kHalf}) {
    SCOPED_TRACE(c10::toString(dt));
    // Every layer keeps what block_forward saves, and one (B, T, h) hidden state is alive besides.
    at::Tensor w = (at::randn({cfg.block_params()}) * 0.05).to(dt);
    at::Tensor x = at::randn({B, T, cfg.hidden_size}).to(dt);
    auto rope = model::make_rope(cfg, T, at::kCPU);
    model::block_saved saved;
    model::block_forward(x, model::block_views(w, cfg), cfg, rope, saved);
    const int64_t activations = cfg.num_hidden_layers * saved.bytes() + int64_t(x.nbytes());
    // none mode keeps the store's fp32 master, m and v on the device.
    param_store store(cfg, dt, *host);
    int64_t adam_state = 0;
    for (int64_t u = 0; u < store.num_units(); ++u)
      adam_state += int64_t(store.master_tensor(u).nbytes() + store.exp_avg_tensor(u).nbytes() +
                            store.exp_avg_sq_tensor(u).nbytes());
    for (auto mode : {k_none, k_blocked, k_overlapped}) {
      engine_options o = base_options(mode, dt);
      o.embed_grad = embed_grad_place::embed_grad_host;   // as the store: the embedding's gradient pageable
      memory_plan p = plan_memory(cfg, o, B, T, 1);
      EXPECT_EQ(p.activations, activations) << offload_mode_name(mode);
      // describe() prints the device total as the sum of these parts.
      EXPECT_EQ(p.device_total, p.weight_slots + p.grad_slots + p.optimizer + p.activations + p.workspace);
      EXPECT_EQ(p.optimizer, mode == k_none ? adam_state : 0) << offload_mode_name(mode);
      EXPECT_EQ(p.host_pinned, store.pinned_bytes()) << offload_mode_name(mode);
    }
  }
}

// A run that cannot fit fails in the constructor, before any step, saying how much it needs.
TEST(engine_memory, refuses_a_run_that_does_not_fit) {
  if (!k_cuda_suite) GTEST_SKIP() << "the device-memory check applies to CUDA only";
  FERRY_REQUIRE_DEVICE();
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
  // The constructor capped this process's caching allocator at 10 MiB; give the card back to
  // the tests that run after this one in the same process.
  auto b = make_cuda_backend();
  b->limit_memory(double(b->memory_stats().total) / double(1ull << 30));
}

// ---- 7. evaluate ----

TEST(engine_evaluate, equals_training_forward_loss) {
  FERRY_REQUIRE_DEVICE();
  auto data = make_data(2);
  for (auto mode : {k_overlapped, k_blocked, k_none}) {
    for (auto dt : {at::kFloat, at::kBFloat16}) {
      engine_options o = base_options(mode, dt);
      auto e = make_engine(o);
      model::head_result ev = e->evaluate(data[0][0]);
      step_result r = e->train_step(data[0], lr_at(0));
      EXPECT_EQ(ev.n_targets, r.n_targets) << mode_label(o);
      // Bit-equal on the host backend; on CUDA the evaluation skips the gradient half of the fused
      // cross-entropy kernel, whose fp32 loss reduction may then differ in the last bits.
      const double tol = o.cuda ? 1e-6 * std::abs(r.loss) : 0.0;
      EXPECT_NEAR(ev.loss_sum / double(ev.n_targets), r.loss, tol) << mode_label(o);
      // after the update: evaluate sees the new weights, and equals the next step's forward
      model::head_result ev2 = e->evaluate(data[1][0]);
      step_result r2 = e->train_step(data[1], lr_at(1));
      EXPECT_NEAR(ev2.loss_sum / double(ev2.n_targets), r2.loss, o.cuda ? 1e-6 * std::abs(r2.loss) : 0.0)
          << mode_label(o);
    }
  }
}

// ---- 8. the parameter store ----

// init_random draws units in parallel, each from its own generator: the thread count changes nothing.
TEST(engine_store, init_random_independent_of_threads) {
  auto host = make_host_backend();
  param_store one(tiny_config(), at::kBFloat16, *host), many(tiny_config(), at::kBFloat16, *host, false);
  const int threads = at::get_num_threads();
  at::set_num_threads(1);
  one.init_random(5, 0.02);
  at::set_num_threads(4);
  many.init_random(5, 0.02);
  at::set_num_threads(threads);
  for (int64_t u = 0; u < one.num_units(); ++u) {
    EXPECT_TRUE(one.master_tensor(u).equal(many.master_tensor(u))) << "unit " << u;
    EXPECT_TRUE(one.shadow_tensor(u).equal(many.shadow_tensor(u))) << "unit " << u;
  }
  EXPECT_GT(one.master_tensor(1).std().item<double>(), 0.015);
}

// ---- 9. forward_only: inference engines ----

engine_options forward_only(engine_options o) {
  o.forward_only = true;
  return o;
}

// No gradients or moments anywhere: the host store is the fp32 master plus the pinned shadows, the
// plan has no gradient slots or optimizer, and training is refused.
TEST(engine_forward_only, allocates_no_training_state) {
  FERRY_REQUIRE_DEVICE();
  const auto cfg = tiny_config();
  for (auto mode : {k_none, k_blocked, k_overlapped}) {
    for (auto dt : {at::kFloat, at::kBFloat16}) {
      engine_options o = forward_only(base_options(mode, dt));
      SCOPED_TRACE(mode_label(o));
      auto e = make_engine(o);
      const int64_t esz = int64_t(c10::elementSize(dt));
      param_store& ps = e->params();
      EXPECT_FALSE(ps.has_optimizer_state());
      int64_t shadows = 0;
      for (int64_t u = 0; u < ps.num_units(); ++u) shadows += (ps.unit(u).numel * esz + 63) / 64 * 64;
      EXPECT_EQ(ps.pinned_bytes(), shadows);
      EXPECT_EQ(ps.host_bytes(), shadows + cfg.total_params() * 4);
      EXPECT_FALSE(ps.state().has_moments());
      EXPECT_EQ(ps.state().host_bytes(), cfg.total_params() * 4);
      for (int64_t u = 0; u < ps.num_units(); ++u) EXPECT_EQ(ps.grad(u), nullptr) << "unit " << u;
      EXPECT_THROW(ps.exp_avg_tensor(1), ferry::error);
      EXPECT_THROW(ps.grad_tensor(0), ferry::error);

      const memory_plan& p = e->plan();
      EXPECT_EQ(p.grad_slots, 0);
      EXPECT_EQ(p.optimizer, 0);
      EXPECT_EQ(p.host_moments, 0);
      EXPECT_EQ(p.host_pinned, cfg.total_params() * esz);
      EXPECT_EQ(p.device_total, p.weight_slots + p.activations + p.workspace);
      memory_plan train = plan_memory(cfg, base_options(mode, dt), k_batch, k_seq, 1);
      // The weight buffers, each charged as the allocator charges it (up to 511 bytes of rounding
      // per buffer on CUDA: every unit resident, or the slots and the head's).
      const int64_t buffers = mode == k_none ? cfg.num_hidden_layers + 2 : (mode == k_blocked ? 1 : o.prefetch + 1) + 1;
      const int64_t weights = mode == k_none ? cfg.total_params() * esz : train.weight_slots;
      EXPECT_GE(p.weight_slots, weights);
      EXPECT_LT(p.weight_slots, weights + (k_cuda_suite ? 512 * buffers : 1));
      EXPECT_LT(p.device_total, train.device_total);
      EXPECT_LT(p.host_total, train.host_total);

      try {
        e->train_step(make_data(1)[0], lr_at(0));
        ADD_FAILURE() << "train_step ran on a forward_only engine";
      } catch (const ferry::error& err) {
        EXPECT_NE(std::string(err.what()).find("forward_only"), std::string::npos) << err.what();
      }
    }
  }
}

// The same losses as a training engine's evaluate (bit for bit on the host backend: the same
// forward), and on CUDA a peak within the plan.
TEST(engine_forward_only, evaluate_equals_training_engine) {
  FERRY_REQUIRE_DEVICE();
  auto data = make_data(2);
  for (auto mode : {k_none, k_blocked, k_overlapped}) {
    for (auto dt : {at::kFloat, at::kBFloat16}) {
      engine_options o = base_options(mode, dt);
      SCOPED_TRACE(mode_label(o));
      // On CUDA: the allocator's bytes before the engine exists (other tests' leftovers, e.g.
      // cuBLAS workspaces of earlier streams) are not the engine's.
      // On failure the meter lists what was alive at the peak, with call stacks.
      std::unique_ptr<::ferry::test::alloc_meter> meter;
      if (o.cuda) meter = std::make_unique<::ferry::test::alloc_meter>(true);
      auto infer = make_engine(forward_only(o));
      std::vector<model::head_result> got;
      for (const auto& batch : data) got.push_back(infer->evaluate(batch[0]));
      if (meter) {
        EXPECT_LE(meter->peak(), infer->plan().device_total)
            << "bytes at the peak beyond those before the engine\n" << infer->plan().describe() << "\n" << meter->report();
      }
      meter.reset();
      infer.reset();
      auto train = make_engine(o);
      for (size_t k = 0; k < data.size(); ++k) {
        model::head_result want = train->evaluate(data[k][0]);
        EXPECT_EQ(got[k].n_targets, want.n_targets);
        if (o.cuda) {
          EXPECT_NEAR(got[k].loss_sum, want.loss_sum, 1e-6 * std::abs(want.loss_sum));
        } else {
          EXPECT_EQ(got[k].loss_sum, want.loss_sum);
        }
      }
    }
  }
}


// ---- 9. the step's seams ----

// Every input check runs before the step changes anything: a refused batch (a token or target
// outside the vocabulary, more tokens than planned, a bad second micro-batch) throws and leaves
// the engine exactly as it was, so the run then goes on bit for bit like one that never saw it.
// (Checked after the step count moved, a refused batch would shift AdamW's bias correction.)
TEST(engine_inputs, refused_batch_changes_nothing) {
  FERRY_REQUIRE_DEVICE();
  const auto data = make_data(2);
  const int64_t V = tiny_config().vocab_size;
  std::vector<std::pair<std::string, step_data>> bad;
  at::Tensor t = data[0][0].clone();
  t.index_put_({0, 0}, V);
  bad.push_back({"input token = vocab", {t}});
  t = data[0][0].clone();
  t.index_put_({1, 3}, V + 4);
  bad.push_back({"target token past the vocab", {t}});
  t = data[0][0].clone();
  t.index_put_({1, 5}, -1);
  bad.push_back({"negative input token", {t}});
  bad.push_back({"more tokens than planned", {random_tokens(k_batch + 1, k_seq, V, 5)}});
  t = data[1][0].clone();
  t.index_put_({0, 2}, V);
  bad.push_back({"bad second micro-batch", {data[1][0], t}});
  for (auto mode : {k_none, k_blocked, k_overlapped}) {
    const engine_options o = base_options(mode, at::kFloat);
    SCOPED_TRACE(mode_label(o));
    const run_result want = run_engine(o, data);
    auto e = make_engine(o);
    run_result got;
    got.steps.push_back(e->train_step(data[0], lr_at(0)));
    const engine_state before = e->state();
    for (const auto& [what, batch] : bad) {
      EXPECT_THROW(e->train_step(batch, lr_at(1)), ferry::error) << what;
      EXPECT_EQ(e->state().optimizer_steps, before.optimizer_steps) << what;
      EXPECT_EQ(e->state().scaler.scale, before.scaler.scale) << what;
      EXPECT_EQ(e->state().recent_fixes, before.recent_fixes) << what;
    }
    got.steps.push_back(e->train_step(data[1], lr_at(1)));
    snapshot(*e, got);
    expect_bit_identical(got, want, mode_label(o) + " after refused batches");
  }
}

// The engine plans the run it was asked for: with grad_accum > 1 micro-batches summed on the host
// (more than one group) the host keeps an fp32 accumulator per streamed unit (the embedding sums
// into its own fp32 gradient); one group of all of them keeps none, and instead the group's
// activations and one fp32 gradient sum of the widest unit on the device.
TEST(engine_plan, counts_the_accumulation_buffers) {
  const auto cfg = tiny_config();
  for (auto mode : {k_blocked, k_overlapped}) {
    engine_options o = base_options(mode, at::kFloat);
    o.cuda = false;
    const memory_plan one = engine(cfg, o).plan();
    EXPECT_EQ(one.micro_group, 1);
    o.grad_accum = 4;
    o.micro_group = 1;
    const memory_plan each = engine(cfg, o).plan();
    EXPECT_EQ(each.host_other - one.host_other, (cfg.total_params() - cfg.embed_params()) * 4) << offload_mode_name(mode);
    EXPECT_EQ(each.device_total, one.device_total) << offload_mode_name(mode);
    // The embedding's input gradient is staged per micro-batch of a group (gradient_path::send_embed).
    const int64_t staging = o.max_batch * o.max_seq * cfg.hidden_size * 4;
    o.micro_group = 2;   // two groups: the host still sums them
    const memory_plan two = engine(cfg, o).plan();
    EXPECT_EQ(two.host_other, each.host_other + staging) << offload_mode_name(mode);
    EXPECT_EQ(two.activations, 2 * one.activations) << offload_mode_name(mode);
    o.micro_group = 0;   // auto, no device limit: one group of four
    const memory_plan four = engine(cfg, o).plan();
    EXPECT_EQ(four.micro_group, 4) << offload_mode_name(mode);
    EXPECT_EQ(four.host_other, one.host_other + 3 * staging) << offload_mode_name(mode);
    EXPECT_EQ(four.activations, 4 * one.activations) << offload_mode_name(mode);
    EXPECT_EQ(four.grad_slots - one.grad_slots, std::max(cfg.block_params(), cfg.head_slot_params()) * 4)
        << offload_mode_name(mode);
    EXPECT_NE(four.describe().find("4 micro-batches at once"), std::string::npos) << four.describe();
  }
}

// micro_group auto takes the largest group that fits the device: with the cap between the plans
// of groups of 2 and 3 (of 5 micro-batches), 2; with activation checkpointing auto, each group
// size recomputes what it needs, so 5 fit where only 2 fit without; offload none runs one by one.
TEST(engine_plan, auto_group_is_the_largest_that_fits) {
  const auto cfg = tiny_config();
  engine_options o = base_options(k_overlapped, at::kFloat);
  o.cuda = false;
  o.max_batch = k_batch;
  o.grad_accum = 5;
  auto plan_of = [&](int64_t group, int64_t device_bytes, recompute_mode rm = recompute_mode::recompute_none) {
    engine_options q = o;
    q.micro_group = group;
    q.recompute = rm;
    return plan_memory(cfg, q, k_batch, k_seq, 5, {}, device_bytes);
  };
  const int64_t two = plan_of(2, 0).device_total, three = plan_of(3, 0).device_total;
  ASSERT_LT(two, three);
  const int64_t cap = (two + three) / 2;
  EXPECT_EQ(plan_of(0, cap).micro_group, 2);
  EXPECT_LE(plan_of(0, cap).device_total, cap);
  EXPECT_EQ(plan_of(0, three).micro_group, 3);
  EXPECT_EQ(plan_of(0, 1).micro_group, 1) << "nothing fits: one by one (the engine then names the bytes)";
  const memory_plan ckpt = plan_of(0, cap, recompute_mode::recompute_auto);
  EXPECT_GT(ckpt.micro_group, 2);
  EXPECT_GT(ckpt.recompute_blocks, 0);
  EXPECT_LE(ckpt.device_total, cap);
  // activation_bytes of a group: per micro-batch without checkpointing, and with every block
  // recomputed, the inputs and output gradients of the group and one block's saved tensors
  const int64_t e = 4, L = cfg.num_hidden_layers, I = k_batch * k_seq * cfg.hidden_size * e;
  EXPECT_EQ(activation_bytes(cfg, k_batch, k_seq, e, 0, 3), 3 * activation_bytes(cfg, k_batch, k_seq, e, 0));
  EXPECT_EQ(activation_bytes(cfg, k_batch, k_seq, e, L, 3),
            activation_bytes(cfg, k_batch, k_seq, e, L) + (3 * (L + 1) - 1 - L) * I);
  o.mode = k_none;
  EXPECT_EQ(plan_of(0, 0).micro_group, 1);
}

// The planner's what-if rows (the finder's "with activation checkpointing / bf16 moments / NVMe"):
// recomputation keeps every block input and one block's saved tensors, measured from a real
// forward; the state options move exactly the tier's bytes.
TEST(engine_plan, what_if_rows) {
  const auto cfg = tiny_config();
  const int64_t B = 2, T = 9;
  for (auto dt : {at::kFloat, at::kBFloat16}) {
    at::Tensor w = (at::randn({cfg.block_params()}) * 0.05).to(dt);
    at::Tensor x = at::randn({B, T, cfg.hidden_size}).to(dt);
    auto rope = model::make_rope(cfg, T, at::kCPU);
    model::block_saved saved;
    model::block_forward(x, model::block_views(w, cfg), cfg, rope, saved);
    const engine_options o = base_options(k_overlapped, dt);
    const memory_plan base = plan_memory(cfg, o, B, T, 1);
    plan_what_if ckpt;
    ckpt.recompute_blocks = cfg.num_hidden_layers;
    const memory_plan r = plan_memory(cfg, o, B, T, 1, ckpt);
    EXPECT_EQ(r.activations, cfg.num_hidden_layers * int64_t(x.nbytes()) + saved.bytes());
    EXPECT_EQ(r.device_total - base.device_total, r.activations - base.activations);
    EXPECT_EQ(r.host_total, base.host_total);
    plan_what_if bf16;
    bf16.state = state_kind::state_bf16;
    const memory_plan b = plan_memory(cfg, o, B, T, 1, bf16);
    EXPECT_EQ(b.host_moments * 2, base.host_moments);
    EXPECT_EQ(base.host_total - b.host_total, cfg.total_params() * 4);
    // int8: 2 B/param of codes and 8 B per quantization block of every unit (blocks do not span units)
    plan_what_if int8;
    int8.state = state_kind::state_int8;
    const memory_plan q = plan_memory(cfg, o, B, T, 1, int8);
    auto qb = [](int64_t n) { return (n + 2047) / 2048; };
    const int64_t blocks = qb(cfg.embed_params()) + cfg.num_hidden_layers * qb(cfg.block_params()) + qb(cfg.head_params());
    EXPECT_EQ(q.host_moments, cfg.total_params() * 2 + blocks * 8);
    EXPECT_EQ(q.host_master, base.host_master);
    EXPECT_EQ(q.device_total, base.device_total);
    // On disk: master and moments leave host memory for nvme_buffers buffers of the largest unit's
    // state (4096-aligned), and the file holds every unit's.
    plan_what_if disk;
    disk.state_on_disk = true;
    const memory_plan d = plan_memory(cfg, o, B, T, 1, disk);
    auto stride = [](int64_t n) { return (n * 12 + 4095) / 4096 * 4096; };
    const int64_t largest = std::max({stride(cfg.embed_params()), stride(cfg.block_params()), stride(cfg.head_params())});
    EXPECT_EQ(d.host_state_buffers, o.nvme.buffers * largest);
    EXPECT_EQ(base.host_total - d.host_total, cfg.total_params() * 12 - d.host_state_buffers);
    EXPECT_EQ(d.disk_state, stride(cfg.embed_params()) + cfg.num_hidden_layers * stride(cfg.block_params()) +
                                stride(cfg.head_params()));
    EXPECT_EQ(base.disk_state, 0);
    EXPECT_EQ(d.device_total, base.device_total);
  }
}

// The state tier owns master and moments: the store's bytes, names and views go through it.
TEST(engine_state_tier, host_fp32_tier) {
  const auto cfg = tiny_config();
  auto host = make_host_backend();
  param_store store(cfg, at::kBFloat16, *host);
  state_tier& tier = store.state();
  EXPECT_EQ(tier.num_units(), store.num_units());
  EXPECT_TRUE(tier.has_moments());
  EXPECT_EQ(tier.host_bytes(), cfg.total_params() * state_bytes_per_param(state_kind::state_fp32, true));
  EXPECT_EQ(state_bytes_per_param(state_kind::state_fp32, true), 12);
  store.init_random(3, 0.1);
  int64_t covered = 0;
  for (const auto& p : store.named_params()) {
    state_lease s(tier, p.unit, false);
    at::Tensor v = store.master_view(p);
    EXPECT_EQ(v.sizes().vec(), p.shape) << p.name;
    EXPECT_EQ(v.data_ptr<float>(), s->master + p.offset) << p.name;
    EXPECT_EQ(at::from_blob(exp_avg_f32(*s) + p.offset, {p.numel}).abs().sum().item<float>(), 0.0f) << p.name;
    covered += p.numel;
  }
  EXPECT_EQ(covered, cfg.total_params());
  try {
    parse_state_kind("int4");
    ADD_FAILURE() << "int4 accepted";
  } catch (const config_error& err) {
    EXPECT_NE(std::string(err.what()).find("fp32"), std::string::npos) << err.what();
  }
}


// ---- 10. resident blocks (engine_options::resident_blocks) ----

// With one micro-batch a resident block's gradient, statistics and AdamW are what the streamed
// block's would be: the same gradient in the compute dtype, the same statistics function and, on
// the host backend, the same CPU kernel. So the run is bit-identical to the streamed one, except
// where a clipped speculative step redid the streamed units (the resident ones step once, with the
// final multiplier): then within the trajectory tolerance, as on CUDA (the device AdamW). The
// resident blocks never cross: fewer bytes reach the device every step. Speculation deferred, waiting
// for its updates (defer_speculative = false) and off.
TEST(engine_resident_blocks, one_micro_batch_trains_like_streaming) {
  FERRY_REQUIRE_DEVICE();
  auto data = make_data(k_steps);
  const int64_t L = tiny_config().num_hidden_layers;
  for (auto dt : {at::kFloat, at::kBFloat16}) {
    for (double clip : {0.0, 0.05}) {
      for (auto mode : {k_overlapped, k_blocked}) {
        for (int schedule = 0; schedule < 3; ++schedule) {
          const auto spec = schedule < 2 ? speculate_mode::speculate_on : speculate_mode::speculate_off;
          if (mode == k_blocked && spec == speculate_mode::speculate_on) continue;
          engine_options o = with(base_options(mode, dt), spec);
          o.defer_speculative = schedule == 0;
          o.clip_grad = clip;
          const run_result streamed = run_engine(o, data);
          for (int64_t k : {int64_t(1), L}) {
            engine_options r = o;
            r.resident_blocks = k;
            const std::string what = mode_label(r) + (schedule == 1 ? " waiting" : "") + ", " + std::to_string(k) +
                                     " resident blocks vs streamed";
            const run_result got = run_engine(r, data);
            const bool redone = clip > 0 && spec == speculate_mode::speculate_on;
            if (!k_cuda_suite && !redone) expect_bit_identical(got, streamed, what);
            else expect_runs_close(got, streamed, tolerance_for(dt), what);
            for (size_t s = 0; s < got.steps.size(); ++s) {
              EXPECT_LT(got.steps[s].h2d_bytes, streamed.steps[s].h2d_bytes) << what << " step " << s;
              EXPECT_NEAR(got.steps[s].grad_norm, streamed.steps[s].grad_norm,
                          tolerance_for(dt).norm_rel * streamed.steps[s].grad_norm)
                  << what << " step " << s;
              EXPECT_EQ(got.steps[s].clip_coef < 1, streamed.steps[s].clip_coef < 1) << what << " step " << s;
              // A redone step rolls back the streamed units only: the resident ones stepped once.
              EXPECT_EQ(got.steps[s].rollbacks, streamed.steps[s].rollbacks - (redone ? k : 0)) << what << " step " << s;
            }
          }
        }
      }
    }
  }
}

// Several micro-batches: a resident block adds each one's gradient into its device buffer (in the
// compute dtype, as offload none does), across the groups of a step too. The run matches the
// double-precision reference of the rows as one batch, and the streamed run (fp32 sums on the
// host), unclipped and clipped (speculation on: the streamed units are redone).
TEST(engine_resident_blocks, accumulation_matches_one_batch) {
  FERRY_REQUIRE_DEVICE();
  const int64_t rows = 7, T = k_seq;
  const auto big = make_data(3, rows, T, 11);
  struct grouping { int64_t micro, group; };
  for (double clip : {0.0, 0.05}) {
    const engine_options o = rows_options(k_overlapped, clip, rows, T);
    const ref_run want = run_reference(o, big);
    for (grouping gr : {grouping{3, 3}, grouping{7, 3}, grouping{2, 1}}) {
      engine_options og = o;
      og.grad_accum = gr.micro;
      og.micro_group = gr.group;
      const run_result streamed = run_engine(og, split_rows(big, gr.micro));
      og.resident_blocks = 2;
      const run_result got = run_engine(og, split_rows(big, gr.micro));
      const std::string what = mode_label(og) + " clip " + std::to_string(clip) + ", " + std::to_string(gr.micro) +
                               " micro-batches in groups of " + std::to_string(gr.group) + ", 2 resident blocks";
      for (size_t k = 0; k < got.steps.size(); ++k) {
        EXPECT_NEAR(got.steps[k].grad_norm, streamed.steps[k].grad_norm, 1e-5 * streamed.steps[k].grad_norm) << what;
        EXPECT_EQ(got.steps[k].clip_coef < 1, streamed.steps[k].clip_coef < 1) << what;
      }
      expect_runs_close(got, streamed, tolerance_for(at::kFloat), what + " vs streamed");
      expect_matches_reference(got, want, o, what + " vs reference");
    }
  }
}

// An overflow in a resident block's gradient, or in a streamed unit's beside resident blocks,
// skips the step on every unit: the resident blocks are not stepped, the streamed units'
// speculative updates are undone, and the run matches the reference (GradScaler semantics), with
// speculation on and off.
TEST(engine_resident_blocks, an_overflow_skips_the_step) {
  FERRY_REQUIRE_DEVICE();
  auto data = make_data(k_steps);
  for (const auto& c : {inject_case{"inf_resident_block", -2, k_inf, 1}, inject_case{"nan_streamed_head", -1, std::nan(""), 2}}) {
    engine_options o = base_options(k_overlapped, at::kFloat);
    o.clip_grad = 0.05;
    o.resident_blocks = 2;   // blocks 0 and 1: the middle block (-2) is resident
    poison p;
    o = poisoned(o, c, p);
    const ref_run want = run_reference(o, data, p);
    ASSERT_TRUE(want.steps[size_t(c.step)].skipped);
    for (auto spec : {speculate_mode::speculate_on, speculate_mode::speculate_off}) {
      const std::string what = std::string(c.name) + " " + mode_label(with(o, spec)) + ", 2 resident blocks";
      const run_result got = run_engine(with(o, spec), data);
      for (size_t k = 0; k < got.steps.size(); ++k)
        EXPECT_EQ(got.steps[k].skipped, int64_t(k) == c.step) << what << " step " << k;
      expect_matches_reference(got, want, o, what);
    }
  }
}

// wait_updates brings the resident blocks' master weights and moments to the host tier (what a
// checkpoint saves) and params_changed takes them back to the device: an engine started from a
// copy of the tier after two steps goes on bit for bit as the first one does.
TEST(engine_resident_blocks, state_crosses_to_the_host_tier_and_back) {
  FERRY_REQUIRE_DEVICE();
  const auto data = make_data(4);
  engine_options o = with(base_options(k_overlapped, at::kFloat), speculate_mode::speculate_off);
  o.clip_grad = 0.05;
  o.resident_blocks = 2;
  auto a = make_engine(o);
  for (int64_t k = 0; k < 2; ++k) a->train_step(data[size_t(k)], lr_at(k));
  a->wait_updates();
  auto b = make_engine(o);
  for (int64_t u = 0; u < a->params().num_units(); ++u) {
    state_lease from(a->params().state(), u, false), to(b->params().state(), u, true);
    const size_t bytes = size_t(from->n) * sizeof(float);
    std::memcpy(to->master, from->master, bytes);
    std::memcpy(exp_avg_f32(*to), exp_avg_f32(*from), bytes);
    std::memcpy(exp_avg_sq_f32(*to), exp_avg_sq_f32(*from), bytes);
  }
  b->state() = a->state();
  b->params_changed();
  run_result ra, rb;
  for (int64_t k = 2; k < 4; ++k) {
    ra.steps.push_back(a->train_step(data[size_t(k)], lr_at(k)));
    rb.steps.push_back(b->train_step(data[size_t(k)], lr_at(k)));
  }
  snapshot(*a, ra);
  snapshot(*b, rb);
  expect_bit_identical(rb, ra, "restarted from the host tier vs running on");
}

// The plan counts what resident blocks hold on the device: an engine allocates beyond the
// streamed engine's exactly the plan's difference (on the host backend its "device" tensors are
// this thread's CPU allocations; on CUDA within the allocator's 512-byte rounding of each of the
// five buffers per block), and the host's fp32 accumulation buffers, planned and allocated, leave
// the resident blocks out.
TEST(engine_resident_blocks, plan_counts_what_the_engine_allocates) {
  FERRY_REQUIRE_DEVICE();
  const model::llama_config cfg = tiny_config();
  const int64_t rows = 7, T = k_seq, K = 2;
  const auto data = split_rows(make_data(1, rows, T, 11), rows);
  for (auto dt : {at::kFloat, at::kBFloat16}) {
    auto built = [&](int64_t k) {
      engine_options o = rows_options(k_overlapped, 0.0, rows, T);
      o.dtype = dt;
      o.grad_accum = rows;
      o.micro_group = 3;
      o.resident_blocks = k;
      ::ferry::test::alloc_meter meter(o.cuda);
      auto e = std::make_unique<engine>(cfg, o);
      return std::make_pair(meter.peak(), std::move(e));
    };
    auto [peak0, e0] = built(0);
    auto [peakK, eK] = built(K);
    const int64_t planned = eK->plan().device_total - e0->plan().device_total;
    const std::string what = std::string(c10::toString(dt)) + ", " + std::to_string(K) + " resident blocks";
    EXPECT_EQ(planned, K * cfg.block_params() * (2 * int64_t(c10::elementSize(dt)) + 12)) << what;
    EXPECT_GE(peakK - peak0, planned) << what;
    EXPECT_LE(peakK - peak0, planned + (k_cuda_suite ? 512 * 5 * K : 0)) << what;
    eK->params().init_random(k_init_seed, k_init_std);
    eK->params_changed();
    eK->train_step(data[0], lr_at(0));
    const int64_t accum = (cfg.total_params() - cfg.embed_params() - K * cfg.block_params()) * 4;
    EXPECT_EQ(eK->gradients().accumulation_bytes(), accum) << what;
    const bool embed_dev = eK->options().embed_grad == embed_grad_place::embed_grad_device;
    const int64_t staging = (1 + (embed_dev ? 0 : 3)) * rows * T * cfg.hidden_size * int64_t(c10::elementSize(dt));
    EXPECT_EQ(eK->plan().host_other - (embed_dev ? 0 : cfg.embed_params() * 4) - staging, accum)
        << what << ": the plan's accumulation buffers";
  }
}

// resident_blocks = -1 (auto): the most blocks whose plan fits the limit beside the group of
// micro-batches the plan without them chose; none without a limit. The engine takes the plan's count
// (run on the host backend, whose limit is only planned: on CUDA gpu_mem_limit_gib would also cap the
// allocator at these few MiB).
TEST(engine_resident_blocks, auto_takes_the_blocks_that_fit) {
  FERRY_REQUIRE_DEVICE();
  const model::llama_config cfg = tiny_config();
  const int64_t rows = 7, T = k_seq;
  engine_options o = rows_options(k_overlapped, 0.0, rows, T);
  o.grad_accum = rows;
  o.resident_blocks = -1;
  EXPECT_EQ(plan_memory(cfg, o, rows, T, rows).resident_blocks, 0) << "no limit known";
  auto explicit_plan = [&](int64_t n) {
    engine_options x = o;
    x.resident_blocks = n;
    return plan_memory(cfg, x, rows, T, rows);
  };
  const memory_plan base = explicit_plan(0);
  ASSERT_EQ(base.micro_group, rows);
  const int64_t per_block = explicit_plan(1).device_total - base.device_total;
  ASSERT_GT(per_block, 0);
  // The limit whose usable part (CUDA leaves k_allocator_slack of it) is base + 2.5 blocks.
  auto cap_for = [&](int64_t usable) {
    return o.cuda ? int64_t(double(usable) / (1 - k_allocator_slack)) + 1 : usable;
  };
  for (int64_t fit : {int64_t(0), int64_t(2), cfg.num_hidden_layers}) {
    const int64_t cap = cap_for(base.device_total + fit * per_block + per_block / 2);
    const memory_plan p = plan_memory(cfg, o, rows, T, rows, {}, cap);
    EXPECT_EQ(p.resident_blocks, fit) << "limit of base + " << fit << ".5 blocks";
    EXPECT_EQ(p.device_total, explicit_plan(fit).device_total) << fit;
    EXPECT_EQ(p.micro_group, rows) << fit;
    if (o.cuda) continue;
    engine_options oe = o;
    oe.gpu_mem_limit_gib = double(cap) / double(int64_t(1) << 30);
    auto e = make_engine(oe);
    EXPECT_EQ(e->plan().resident_blocks, fit);
    for (int64_t i = 0; i < cfg.num_hidden_layers; ++i)
      EXPECT_EQ(e->gradients().is_resident(e->params().block_unit(i)), i < fit) << "block " << i << " of " << fit;
    const step_result r = e->train_step(split_rows(make_data(1, rows, T, 11), rows)[0], lr_at(0));
    EXPECT_TRUE(std::isfinite(r.loss));
  }
}

// What resident blocks cannot run with is refused before anything is allocated, naming the key.
TEST(engine_resident_blocks, refuses_what_it_cannot_run) {
  FERRY_REQUIRE_DEVICE();
  auto refusal = [](engine_options o) {
    try {
      engine e(tiny_config(), o);
    } catch (const config_error& err) {
      return std::string(err.what());
    }
    return std::string();
  };
  engine_options o = base_options(k_overlapped, at::kFloat);
  o.resident_blocks = 3;
  EXPECT_EQ(refusal(o), "");
  auto expect_refused = [&](engine_options x, const std::string& why) {
    const std::string got = refusal(x);
    EXPECT_NE(got.find(why), std::string::npos) << "got \"" << got << "\", want \"" << why << "\"";
  };
  engine_options x = o;
  x.resident_blocks = 4;
  expect_refused(x, "resident_blocks=4 exceeds the 3 blocks of model engine-test; use 0 to 3");
  x.resident_blocks = -2;
  expect_refused(x, "resident_blocks=-2: expected a count of blocks kept on the GPU, 0 for none, -1 for as many as fit");
  x = o;
  x.mode = k_none;
  expect_refused(x, "resident_blocks=3 needs offload blocked or overlapped");
  x.resident_blocks = -1;
  expect_refused(x, "resident_blocks=-1 needs offload blocked or overlapped");
  x = o;
  x.forward_only = true;
  expect_refused(x, "resident_blocks=3 applies to training");
  x = o;
  x.state = state_kind::state_bf16;
  expect_refused(x, "resident_blocks=3 needs optimizer_state=fp32 and optimizer_state_on=host");
  x = o;
  x.state_on = state_place::place_nvme;
  x.nvme.path = "/tmp";
  expect_refused(x, "optimizer_state_on=nvme");
}

// ---- 11. compact optimizer state (optimizer_state = bf16 | int8) ----

int64_t quant_blocks_of(const model::llama_config& cfg) {
  auto qb = [](int64_t n) { return (n + 2047) / 2048; };
  return qb(cfg.embed_params()) + cfg.num_hidden_layers * qb(cfg.block_params()) + qb(cfg.head_params());
}

// The compact tiers hold exactly their bytes (bf16: 4 + 2 + 2 B/param; int8: 4 + 1 + 1 B/param and
// one fp32 scale per 2048-element block of each unit for m and for v), which is what the planner
// charges; zero_moments zeroes codes and scales; each unit has its own fixed stochastic-rounding
// seed; the fp32 moment tensors are refused.
TEST(engine_state_tier, compact_kinds) {
  const auto cfg = tiny_config();
  auto host = make_host_backend();
  const int64_t P = cfg.total_params();
  EXPECT_EQ(state_bytes_per_param(state_kind::state_fp32, true), 12.0);
  EXPECT_EQ(state_bytes_per_param(state_kind::state_bf16, true), 8.0);
  EXPECT_EQ(state_bytes_per_param(state_kind::state_int8, true), 6.0 + 8.0 / 2048);
  for (auto kind : {state_kind::state_bf16, state_kind::state_int8}) {
    SCOPED_TRACE(state_kind_name(kind));
    EXPECT_EQ(state_bytes_per_param(kind, false), 4.0);
    EXPECT_EQ(parse_state_kind(state_kind_name(kind)), kind);
    param_store store(cfg, at::kBFloat16, *host, true, kind);
    store.init_random(3, 0.1);
    state_tier& tier = store.state();
    EXPECT_EQ(tier.kind(), kind);
    const int64_t want = kind == state_kind::state_bf16 ? P * 8 : P * 6 + quant_blocks_of(cfg) * 8;
    EXPECT_EQ(tier.host_bytes(), want);
    engine_options o = base_options(k_overlapped, at::kBFloat16);
    o.state = kind;
    const memory_plan p = plan_memory(cfg, o, k_batch, k_seq, 1);
    EXPECT_EQ(p.state, kind);
    EXPECT_EQ(p.host_master + p.host_moments, tier.host_bytes());
    EXPECT_EQ(p.host_master, P * 4);
    EXPECT_EQ(store.host_bytes() - store.pinned_bytes() - cfg.embed_params() * 4, tier.host_bytes());
    for (int64_t u = 0; u < tier.num_units(); ++u) {
      {
        state_lease s(tier, u, true);
        EXPECT_EQ(s->moments, moments_kind_of(kind));
        EXPECT_EQ(s->seed, uint64_t(u) + 1);
        EXPECT_EQ(s->m_scale != nullptr, kind == state_kind::state_int8);
        EXPECT_EQ(s->v_scale != nullptr, kind == state_kind::state_int8);
        const size_t n = size_t(s->n), elem = kind == state_kind::state_bf16 ? 2 : 1;
        std::memset(s->exp_avg, 0xff, n * elem);
        std::memset(s->exp_avg_sq, 0xff, n * elem);
        if (s->m_scale) {
          std::memset(s->m_scale, 0xff, cpu_optim::quant_blocks(n) * 4);
          std::memset(s->v_scale, 0xff, cpu_optim::quant_blocks(n) * 4);
        }
      }
    }
    tier.zero_moments();
    for (int64_t u = 0; u < tier.num_units(); ++u) {
      const unit_moments m = moments_copy(store, u);
      for (const at::Tensor* t : {&m.m, &m.v, &m.m_scale, &m.v_scale})
        EXPECT_EQ(t->ne(0).sum().item<int64_t>(), 0) << "unit " << u;
      EXPECT_EQ(m.m_scale.numel(), kind == state_kind::state_int8 ? (store.unit(u).numel + 2047) / 2048 : 0);
    }
    try {
      store.exp_avg_tensor(1);
      ADD_FAILURE() << "fp32 moment tensors of a " << state_kind_name(kind) << " tier";
    } catch (const ferry::error& err) {
      EXPECT_NE(std::string(err.what()).find("optimizer_state=fp32"), std::string::npos) << err.what();
    }
  }
  try {
    parse_state_kind("int4");
    ADD_FAILURE() << "int4 accepted";
  } catch (const config_error& err) {
    for (const char* w : {"optimizer_state", "fp32", "bf16", "int8"})
      EXPECT_NE(std::string(err.what()).find(w), std::string::npos) << err.what();
  }
}

// offload none runs the device AdamW over fp32 moments: a compact kind there is a config error at
// construction (one line naming both keys); an inference engine keeps no moments and is built.
TEST(engine_state_tier, compact_kinds_need_offload) {
  for (auto kind : {state_kind::state_bf16, state_kind::state_int8}) {
    engine_options o = base_options(k_none, at::kFloat);
    o.cuda = false;
    o.state = kind;
    try {
      engine e(tiny_config(), o);
      ADD_FAILURE() << "offload none with optimizer_state " << state_kind_name(kind);
    } catch (const config_error& err) {
      const std::string msg = err.what();
      EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
      for (const char* w : {"optimizer_state", "offload", state_kind_name(kind)})
        EXPECT_NE(msg.find(w), std::string::npos) << msg;
    }
    o.forward_only = true;
    EXPECT_NO_THROW(engine(tiny_config(), o));
    o.forward_only = false;
    o.mode = k_blocked;
    EXPECT_NO_THROW(engine(tiny_config(), o));
  }
}

// Each compact kind trains the tiny model like fp32: 20 steps cycling over 4 batches (so the loss
// falls), constant lr, fp32 and bf16 compute. Blocked and overlapped with speculation (no fix-ups)
// give the same bits: codes, scales, master weights and losses (the speculative update is the
// direct one, and the bf16 rounding stream is fixed per unit and step). The losses stay within
// k_compact_loss_rel of the fp32 state's at every step (measured on the host backend, 2026-11-27:
// at most 1.5e-4 bf16 / 1.3e-3 int8 with fp32 compute, 2.2e-3 / 3.4e-3 with bf16 compute).
constexpr double k_compact_loss_rel = 0.01;

std::vector<step_data> cycled_data(int64_t steps) {
  const auto four = make_data(4);
  std::vector<step_data> d;
  for (int64_t k = 0; k < steps; ++k) d.push_back(four[size_t(k % 4)]);
  return d;
}

run_result run_cycled(const engine_options& o, int64_t steps, double lr) {
  const auto data = cycled_data(steps);
  auto e = make_engine(o);
  run_result r;
  for (int64_t k = 0; k < steps; ++k) r.steps.push_back(e->train_step(data[size_t(k)], lr));
  snapshot(*e, r);
  return r;
}

void expect_losses_near(const run_result& got, const run_result& want, double rel, const std::string& what) {
  ASSERT_EQ(got.steps.size(), want.steps.size());
  double worst = 0;
  for (size_t k = 0; k < got.steps.size(); ++k) {
    const double d = std::abs(got.steps[k].loss - want.steps[k].loss) / want.steps[k].loss;
    worst = std::max(worst, d);
    EXPECT_LE(d, rel) << what << " step " << k << ": " << got.steps[k].loss << " vs " << want.steps[k].loss;
  }
  std::printf("  [%s] losses %.4f -> %.4f (reference %.4f -> %.4f), worst relative difference %.2e\n", what.c_str(),
              got.steps.front().loss, got.steps.back().loss, want.steps.front().loss, want.steps.back().loss, worst);
}

TEST(engine_compact_state, trains_like_fp32) {
  FERRY_REQUIRE_DEVICE();
  const int64_t steps = 20;
  const double lr = 3e-3;
  for (auto dt : {at::kFloat, at::kBFloat16}) {
    const engine_options bl = base_options(k_blocked, dt);
    const run_result fp32 = run_cycled(bl, steps, lr);
    EXPECT_LT(fp32.steps.back().loss, fp32.steps.front().loss - 0.5) << "the cycled data must be learnt";
    for (auto kind : {state_kind::state_bf16, state_kind::state_int8}) {
      const std::string label = std::string(state_kind_name(kind)) + " state, " + c10::toString(dt);
      engine_options o = bl;
      o.state = kind;
      const run_result blocked = run_cycled(o, steps, lr);
      expect_losses_near(blocked, fp32, k_compact_loss_rel, label + " blocked vs fp32 state");
      engine_options ov = with(o, speculate_mode::speculate_on);
      ov.mode = k_overlapped;
      const run_result overlapped = run_cycled(ov, steps, lr);
      for (const auto& s : overlapped.steps) EXPECT_TRUE(s.speculated && s.rollbacks == 0);
      expect_bit_identical(overlapped, blocked, label + " overlapped/spec-on vs blocked");
    }
  }
}

// After a skipped step undone under speculation (compact moments), against the blocked run's state
// (the state before the step): the poisoned unit untouched; p within the fp32 undo bound
// 2^-22 (|p_old| + |p_new|), |p_new| <= |p_old| (1 + lr wd) + 10 lr (as expect_undo_within_bound);
// m, v within one rounding of the speculative value (bf16: 2^-7 (|x_new| / beta + |x_old|), with
// |m_new| <= b1 |m_old| + (1-b1) |g| and v_new = b2 v_old + (1-b2) g^2) or 3.5% of the block's
// scale (int8, cpu_optim README). Returns the largest ratio to its bound (printed).
double expect_compact_undo_within_bound(engine& spec, engine& blocked, const engine_options& o, double lr,
                                        const std::string& what) {
  run_result s, b;
  snapshot(spec, s);
  snapshot(blocked, b);
  const double ulp22 = std::ldexp(1.0, -22), bf16_round = std::ldexp(1.0, -7);
  double worst = 0;
  for (int64_t u = 0; u < spec.params().num_units(); ++u) {
    const size_t i = size_t(u);
    SCOPED_TRACE(what + ", unit " + std::to_string(u));
    if (u == o.debug_poison_unit) {
      EXPECT_TRUE(s.master[i].equal(b.master[i]) && s.m[i].equal(b.m[i]) && s.v[i].equal(b.v[i]) &&
                  s.m_scale[i].equal(b.m_scale[i]) && s.v_scale[i].equal(b.v_scale[i]));
      continue;
    }
    auto ratio = [&](const at::Tensor& got, const at::Tensor& want, const at::Tensor& bound, const char* name) {
      const double r = ((got.to(at::kDouble) - want.to(at::kDouble)).abs() / (bound + 1e-30)).max().item<double>();
      EXPECT_LE(r, 1.0) << name;
      worst = std::max(worst, r);
    };
    const at::Tensor p0 = b.master[i].to(at::kDouble).abs();
    ratio(s.master[i], b.master[i], ulp22 * (p0 + p0 * (1 + lr * o.weight_decay) + 10 * lr), "p");
    const auto [ms, vs] = decoded_moments(spec, u);
    const auto [mb, vb] = decoded_moments(blocked, u);
    if (o.state == state_kind::state_bf16) {
      const at::Tensor g = spec.params().grad_tensor(u).to(at::kDouble).abs();
      const at::Tensor m0 = mb.to(at::kDouble).abs(), v0 = vb.to(at::kDouble);
      const at::Tensor m_new = o.beta1 * m0 + (1 - o.beta1) * g, v_new = o.beta2 * v0 + (1 - o.beta2) * g * g;
      ratio(ms, mb, bf16_round * (m_new / o.beta1 + m0), "m");
      ratio(vs, vb, bf16_round * (v_new / o.beta2 + v0), "v");
    } else {
      auto per_element = [&](const at::Tensor& scale) {
        return scale.to(at::kDouble).repeat_interleave(int64_t(cpu_optim::k_quant_block)).narrow(0, 0, ms.numel());
      };
      ratio(ms, mb, 0.035 * per_element(b.m_scale[i]), "m");
      ratio(vs, vb, 0.035 * per_element(b.v_scale[i]), "v");
    }
  }
  std::printf("  [%s] rolled-back state within %.3g of its bound\n", what.c_str(), worst);
  return worst;
}

// One fix-up under speculation with compact moments, at step 10 of 20: a skipped step (an inf in
// a middle block's gradient: every other unit's speculative update is undone) and a clipped one
// (one element of 1e3 against clip_grad 50: every unit is redone). Before it the run is the
// blocked one bit for bit; right after the skip the state is within the undo bounds above; to the
// end the losses stay within k_compact_loss_rel of the blocked run's (measured, 2026-11-27: at
// most 8e-5 bf16, 4.2e-3 int8). Repeated rollbacks accumulate the moments' error (README "Engine
// notes"); speculate=auto stops speculating after a fix-up.
TEST(engine_compact_state, one_rollback_stays_close) {
  FERRY_REQUIRE_DEVICE();
  const int64_t steps = 20, at_step = 10;
  const double lr = 3e-3;
  const auto data = cycled_data(steps);
  auto probe = make_engine(base_options(k_blocked, at::kFloat));
  const int64_t unit = probe->params().block_unit(1);
  for (auto kind : {state_kind::state_bf16, state_kind::state_int8}) {
    for (bool skip : {true, false}) {
      const std::string label = std::string(state_kind_name(kind)) + (skip ? " skip" : " clip spike");
      engine_options o = base_options(k_blocked, at::kFloat);
      o.state = kind;
      o.debug_poison_step = at_step + 1;
      o.debug_poison_unit = unit;
      o.debug_poison_index = probe->params().unit(unit).numel / 3;
      o.debug_poison_value = skip ? k_inf : 1e3;
      o.clip_grad = skip ? 0.0 : 50.0;
      engine_options ov = with(o, speculate_mode::speculate_on);
      ov.mode = k_overlapped;
      auto eb = make_engine(o), es = make_engine(ov);
      run_result blocked, spec;
      for (int64_t k = 0; k < steps; ++k) {
        blocked.steps.push_back(eb->train_step(data[size_t(k)], lr));
        spec.steps.push_back(es->train_step(data[size_t(k)], lr));
        EXPECT_EQ(spec.steps.back().rollbacks, k == at_step ? es->params().num_units() : 0) << label << " step " << k;
        EXPECT_EQ(blocked.steps.back().skipped, skip && k == at_step) << label << " step " << k;
        EXPECT_EQ(blocked.steps.back().clip_coef < 1, !skip && k == at_step) << label << " step " << k;
        if (k == at_step - 1) {
          run_result b, s;
          snapshot(*eb, b);
          snapshot(*es, s);
          expect_bit_identical(s, b, label + " before the fix-up");
        }
        if (skip && k == at_step) expect_compact_undo_within_bound(*es, *eb, o, lr, label + ", after the skip");
      }
      run_result rb, rs;
      rb.steps.assign(blocked.steps.begin() + at_step, blocked.steps.end());
      rs.steps.assign(spec.steps.begin() + at_step, spec.steps.end());
      expect_losses_near(rs, rb, k_compact_loss_rel, label + ", speculative vs blocked from the fix-up on");
    }
  }
}

// Every step clipped (clip_grad far below the gradient norm) under speculate=on: each step's
// speculative update of every unit is redone with the clip coefficient, 20 times in a row. With
// the compact undo log (cpu_optim README "Compact moments") the losses stay near the blocked
// run's, which never speculates; the printed worst relative difference is the figure README
// quotes.
TEST(engine_compact_state, every_step_rolled_back_stays_close) {
  FERRY_REQUIRE_DEVICE();
  const int64_t steps = 20;
  const double lr = 3e-3;
  const auto data = cycled_data(steps);
  for (auto kind : {state_kind::state_bf16, state_kind::state_int8}) {
    const std::string label = std::string(state_kind_name(kind)) + " every step clipped";
    engine_options o = base_options(k_blocked, at::kFloat);
    o.state = kind;
    o.clip_grad = 0.05;
    engine_options ov = with(o, speculate_mode::speculate_on);
    ov.mode = k_overlapped;
    auto eb = make_engine(o), es = make_engine(ov);
    run_result blocked, spec;
    double worst = 0;
    for (int64_t k = 0; k < steps; ++k) {
      blocked.steps.push_back(eb->train_step(data[size_t(k)], lr));
      spec.steps.push_back(es->train_step(data[size_t(k)], lr));
      EXPECT_LT(blocked.steps.back().clip_coef, 1.0) << label << " step " << k;
      EXPECT_EQ(spec.steps.back().rollbacks, es->params().num_units()) << label << " step " << k;
      worst = std::max(worst, std::fabs(spec.steps.back().loss / blocked.steps.back().loss - 1));
    }
    std::printf("[ compact ] %s: worst |loss_spec / loss_blocked - 1| %.2e, final losses %.4f / %.4f\n", label.c_str(),
                worst, spec.steps.back().loss, blocked.steps.back().loss);
    expect_losses_near(spec, blocked, k_compact_loss_rel, label + ", speculative vs blocked");
  }
}

// Activation checkpointing recomputes a block's forward (saving) just before its backward; the
// recomputation is the training forward itself, so every mode trains bit for bit as without it,
// with all blocks recomputed or the first one only (auto under a limit), with accumulation and
// with clipping (speculative redo).
TEST(engine_recompute, same_bits_as_keeping_activations) {
  FERRY_REQUIRE_DEVICE();
  auto big = make_data(3);
  std::vector<step_data> split;
  for (const auto& s : big) split.push_back({s[0].narrow(0, 0, 1).contiguous(), s[0].narrow(0, 1, 1).contiguous()});
  for (auto mode : {k_none, k_blocked, k_overlapped}) {
    for (double clip : {0.0, 0.05}) {
      engine_options o = base_options(mode, at::kFloat);
      o.clip_grad = clip;
      const run_result keep = run_engine(o, split);
      engine_options all = o;
      all.recompute = recompute_mode::recompute_blocks;
      EXPECT_EQ(make_engine(all)->plan().recompute_blocks, tiny_config().num_hidden_layers);
      expect_bit_identical(run_engine(all, split), keep, mode_label(o) + " all blocks recomputed");
      // auto under a limit the plan of one recomputed block just fits (host backend only: on CUDA
      // the limit caps the process's caching allocator, below what the rest of this test holds)
      if (o.cuda) continue;
      plan_what_if one;
      one.recompute_blocks = 1;
      engine_options some = o;
      some.recompute = recompute_mode::recompute_auto;
      some.gpu_mem_limit_gib =
          double(plan_memory(tiny_config(), o, o.max_batch, o.max_seq, 1, one).device_total) / double(1ull << 30);
      EXPECT_EQ(make_engine(some)->plan().recompute_blocks, 1);
      expect_bit_identical(run_engine(some, split), keep, mode_label(o) + " first block recomputed");
    }
  }
}

// auto picks the fewest recomputed blocks whose plan fits; each recomputed block saves what the
// planner says a block keeps, less its input (measured from a real forward).
TEST(engine_recompute, auto_plans_the_fewest_blocks_that_fit) {
  const auto cfg = tiny_config();
  const int64_t B = 2, T = 9, L = cfg.num_hidden_layers;
  engine_options o = base_options(k_overlapped, at::kBFloat16);
  o.recompute = recompute_mode::recompute_auto;
  // The embedding's gradient pinned to the host: this test is about recomputation alone (auto's
  // choice of the table against recomputed blocks is engine_embed_grad.plans_and_places_the_table).
  o.embed_grad = embed_grad_place::embed_grad_host;
  at::Tensor w = (at::randn({cfg.block_params()}) * 0.05).to(at::kBFloat16);
  at::Tensor x = at::randn({B, T, cfg.hidden_size}).to(at::kBFloat16);
  auto rope = model::make_rope(cfg, T, at::kCPU);
  model::block_saved saved;
  model::block_forward(x, model::block_views(w, cfg), cfg, rope, saved);
  std::vector<memory_plan> fixed;
  for (int64_t c = 0; c <= L; ++c) {
    plan_what_if w;
    w.recompute_blocks = c;
    fixed.push_back(plan_memory(cfg, o, B, T, 1, w));
    EXPECT_EQ(fixed[size_t(c)].recompute_blocks, c);
    if (c > 0 && c < L) {
      EXPECT_EQ(fixed[size_t(c - 1)].activations - fixed[size_t(c)].activations, saved.bytes() - int64_t(x.nbytes()));
    }
  }
  // Recomputing the last block too saves nothing (its saved set holds the input it would keep).
  EXPECT_EQ(fixed[size_t(L)].activations, fixed[size_t(L - 1)].activations);
  for (int64_t c = 0; c <= L; ++c) {
    const memory_plan p = plan_memory(cfg, o, B, T, 1, {}, fixed[size_t(c)].device_total);
    const int64_t want = c == L ? L - 1 : c;
    EXPECT_EQ(p.recompute_blocks, want) << "limit of the plan with " << c << " recomputed";
    EXPECT_EQ(p.device_total, fixed[size_t(c)].device_total);
  }
  EXPECT_EQ(plan_memory(cfg, o, B, T, 1, {}, 1).recompute_blocks, L) << "nothing fits: all recomputed";
  EXPECT_EQ(plan_memory(cfg, o, B, T, 1).recompute_blocks, 0) << "no limit known: nothing recomputed";

  // On CUDA (planned here, nothing allocated) the plan must leave k_allocator_slack of the cap
  // free; where no plan does, the fewest blocks that fit without it. Long rows, so that the
  // activations are most of the plan and a recomputed block saves more than the slack.
  engine_options g = o;
  g.cuda = true;
  const int64_t Bg = 8, Tg = 2048;
  std::vector<int64_t> total;
  for (int64_t c = 0; c <= L; ++c) {
    plan_what_if w;
    w.recompute_blocks = c;
    total.push_back(plan_memory(cfg, g, Bg, Tg, 1, w).device_total);
  }
  int slack_mattered = 0;
  for (int64_t c = 0; c < L; ++c) {
    for (int64_t cap : {total[size_t(c)], int64_t(double(total[size_t(c)]) / (1 - k_allocator_slack)) + 1}) {
      int64_t want = -1;
      for (int64_t k = 0; k <= L && want < 0; ++k)
        if (double(total[size_t(k)]) <= double(cap) * (1 - k_allocator_slack)) want = k;
      for (int64_t k = 0; k <= L && want < 0; ++k)
        if (total[size_t(k)] <= cap) want = k;
      const memory_plan p = plan_memory(cfg, g, Bg, Tg, 1, {}, cap);
      EXPECT_EQ(p.recompute_blocks, want) << "cap " << cap << " (the plan with " << c << " recomputed)";
      EXPECT_LE(p.device_total, cap);
      slack_mattered += p.recompute_blocks > c;
    }
  }
  EXPECT_GT(slack_mattered, 0) << "no cap where the slack recomputed more blocks";
}

// The shape of the measured-peak tests: large enough that activations dominate what a step
// allocates.
model::llama_config peak_config() {
  model::llama_config cfg = tiny_config();
  cfg.hidden_size = 256;
  cfg.intermediate_size = 512;
  cfg.num_hidden_layers = 6;
  cfg.head_dim = 64;
  cfg.max_position_embeddings = 256;
  return cfg;
}

// Options of the measured-peak tests: blocked on the host backend, rows x T tokens planned.
engine_options peak_options(int64_t rows, int64_t T) {
  engine_options o = base_options(k_blocked, at::kFloat);
  o.cuda = false;
  o.strict_host_backend = false;   // its lazy copies would hold staging of their own
  o.max_batch = rows;
  o.max_seq = T;
  o.ce_chunk = 64;
  return o;
}

// The peak of what the second of two steps allocates (the first warms up), which must be within the
// engine's plan; and the plan.
std::pair<int64_t, memory_plan> measured_peak(const engine_options& o, const model::llama_config& cfg,
                                              const std::vector<step_data>& data) {
  auto e = make_engine(o, cfg);
  e->train_step(data[0], 1e-3);
  ::ferry::test::alloc_meter meter(false);
  e->train_step(data[1], 1e-3);
  const int64_t peak = meter.peak();
  EXPECT_LE(peak, e->plan().device_total) << e->plan().describe();
  return {peak, e->plan()};
}

// A training step's measured peak with every block recomputed is within its plan and below the
// peak of the same step keeping every block's activations, by what the plans say (within 10%).
// Measured on the host backend, whose "device" tensors are the compute thread's CPU allocations
// (tests/alloc_meter.h); on CUDA the same step saved less than planned (issue 20's notes), which
// is still open.
TEST(engine_recompute, measured_peak_within_the_plan) {
  const model::llama_config cfg = peak_config();
  const int64_t B = 2, T = 256;
  std::vector<step_data> data = make_data(2, B, T, 3);
  int64_t peak[2] = {0, 0};
  memory_plan plan[2];
  for (int k = 0; k < 2; ++k) {
    engine_options o = peak_options(B, T);
    o.recompute = k == 0 ? recompute_mode::recompute_none : recompute_mode::recompute_blocks;
    std::tie(peak[k], plan[k]) = measured_peak(o, cfg, data);
  }
  EXPECT_EQ(plan[1].recompute_blocks, cfg.num_hidden_layers);
  EXPECT_LT(peak[1], peak[0]);
  const double planned = double(plan[0].activations - plan[1].activations), measured = double(peak[0] - peak[1]);
  EXPECT_NEAR(measured, planned, 0.1 * planned) << "planned saving " << planned << " B, measured " << measured << " B";
}


// A group's measured peak is within its plan, with and without recomputation, and a group of 3
// keeps more than one micro-batch at a time by about what the plans' activations say (within
// 10%; activation_bytes with the group). Host backend, as above: the meter sees what the step
// allocates, not the buffers made with the engine (the group's fp32 gradient sum among them).
TEST(engine_accumulation, a_group_peak_within_its_plan) {
  const model::llama_config cfg = peak_config();
  const int64_t B = 2, T = 256, micro = 3;
  std::vector<step_data> data(2);
  for (int64_t j = 0; j < micro; ++j) {
    const auto d = make_data(2, B, T, 5 + uint64_t(j));
    for (size_t k = 0; k < 2; ++k) data[k].push_back(d[k][0]);
  }
  for (auto recompute : {recompute_mode::recompute_none, recompute_mode::recompute_blocks}) {
    int64_t peak[2] = {0, 0};
    memory_plan plan[2];
    for (int k = 0; k < 2; ++k) {
      engine_options o = peak_options(B, T);
      o.grad_accum = micro;
      o.micro_group = k == 0 ? 1 : 0;
      o.recompute = recompute;
      std::tie(peak[k], plan[k]) = measured_peak(o, cfg, data);
    }
    EXPECT_EQ(plan[1].micro_group, micro);
    const double planned = double(plan[1].activations - plan[0].activations), measured = double(peak[1] - peak[0]);
    EXPECT_GT(measured, 0);
    EXPECT_NEAR(measured, planned, 0.1 * planned)
        << (recompute == recompute_mode::recompute_none ? "" : "recomputed: ") << "planned " << planned
        << " B more for the group, measured " << measured << " B";
  }
}

#if defined(FERRY_TEST_CUDA) && FERRY_TEST_CUDA
// Whether device d's primary context is active in this process: 1 or 0, -1 where the driver cannot
// say. The driver API through libcuda loaded here, as the suites link no driver library.
int primary_context_active(int d) {
  void* lib = ::dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (!lib) return -1;
  using init_fn = int (*)(unsigned);
  using get_fn = int (*)(int*, int);
  using state_fn = int (*)(int, unsigned*, int*);
  auto init = reinterpret_cast<init_fn>(::dlsym(lib, "cuInit"));
  auto get = reinterpret_cast<get_fn>(::dlsym(lib, "cuDeviceGet"));
  auto state = reinterpret_cast<state_fn>(::dlsym(lib, "cuDevicePrimaryCtxGetState"));
  int dev = 0, active = 0;
  unsigned flags = 0;
  if (!init || !get || !state || init(0) != 0 || get(&dev, d) != 0 || state(dev, &flags, &active) != 0) return -1;
  return active;
}

// An engine on GPU 1 (a data-parallel rank's case) makes no context on GPU 0: its pinned buffers,
// copies and the update thread's event waits run in GPU 1's context. Before backend::bind_thread,
// a rank's threads ran in device 0's primary context (the runtime's default), which cost every
// rank but rank 0 a context and its memory on GPU 0.
TEST(engine_device, an_engine_on_gpu_1_makes_no_context_on_gpu_0) {
  FERRY_REQUIRE_DEVICE();
  if (cuda_device_count() < 2) GTEST_SKIP() << "needs 2 CUDA devices";
  if (primary_context_active(0) != 0 && !std::getenv("FERRY_ENGINE_DEVICE_CHILD")) {
    // An earlier test of this process made GPU 0's context (the whole binary run at once): the
    // check runs again in a fresh process of this binary, as ctest runs it.
    char exe[4096] = {};
    const ssize_t n = ::readlink("/proc/self/exe", exe, sizeof exe - 1);
    ASSERT_GT(n, 0) << "cannot find this test binary to re-run it";
    const std::string cmd = "FERRY_ENGINE_DEVICE_CHILD=1 '" + std::string(exe, size_t(n)) +
                            "' --gtest_filter=engine_device.an_engine_on_gpu_1_makes_no_context_on_gpu_0";
    EXPECT_EQ(std::system(cmd.c_str()), 0) << "the check in a fresh process failed (its output above)";
    return;
  }
  ASSERT_EQ(primary_context_active(0), 0) << "GPU 0's context exists before any engine";
  engine_options o = base_options(k_overlapped, at::kHalf);
  o.device_index = 1;
  const run_result r = run_engine(o, make_data(3));
  ASSERT_EQ(r.steps.size(), 3u);
  EXPECT_EQ(primary_context_active(1), 1);
  EXPECT_EQ(primary_context_active(0), 0) << "the engine on GPU 1 made a context on GPU 0";
}
#endif

}  // namespace
}  // namespace ferry::engine::test
