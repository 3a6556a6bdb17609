// src/checkpoint: a run saved at step s, loaded into a fresh engine and continued, is the
// uninterrupted run bit for bit: every unit's master weights and AdamW moments, the losses, and the
// trainer state the engine keeps (loss scale and its good-step count, AdamW's step count, the
// recent fix-ups that drive speculate=auto). On the strict host backend, tiny model
// (tests/engine/engine_test_util.h), in the states where resuming is easy to get wrong.
#include <gtest/gtest.h>

#include <limits>
#include <string>

#include "src/checkpoint/checkpoint.h"
#include "tests/engine/engine_test_util.h"
#include "tests/scratch_dir.h"

namespace ferry::checkpoint::test {
namespace {

using namespace ::ferry::engine;
using namespace ::ferry::engine::test;

// A scratch directory per test (tests/scratch_dir.h).
struct scratch_dir : ::ferry::test::scratch_dir {
  scratch_dir() : ::ferry::test::scratch_dir("ferry_ckpt_test") {}
};

struct resume_case {
  const char* name;
  at::ScalarType dtype;
  speculate_mode spec;
  double clip;
  int64_t micro;        // micro-batches per step
  int64_t save_after;   // steps before the checkpoint
  int64_t steps;        // steps in all
  int64_t poison_step;  // 0-based step whose gradient gets an inf (skipped step), -1 none
};

trainer_state state_of(engine::engine& e, int64_t step) {
  trainer_state st;
  st.step = step;
  st.data_cursor = step;
  st.seed = 1;
  st.model_name = "engine-test";
  return st;
}

// The poison hook counts train_step calls of one engine: a resumed engine counts from the resume.
engine_options with_poison(engine_options o, const resume_case& c, int64_t first_step) {
  if (c.poison_step < first_step) return o;
  auto probe = make_engine(base_options(offload_mode::offload_blocked, at::kFloat));
  o.debug_poison_step = c.poison_step - first_step + 1;
  o.debug_poison_unit = probe->params().block_unit(1);
  o.debug_poison_index = probe->params().unit(o.debug_poison_unit).numel / 3;
  o.debug_poison_value = std::numeric_limits<double>::infinity();
  return o;
}

void expect_same_state(const run_result& a, const run_result& b, const std::string& what) {
  ASSERT_EQ(a.master.size(), b.master.size());
  for (size_t u = 0; u < a.master.size(); ++u) {
    EXPECT_TRUE(a.master[u].equal(b.master[u])) << what << ": master of unit " << u;
    EXPECT_TRUE(a.m[u].equal(b.m[u])) << what << ": exp_avg of unit " << u;
    EXPECT_TRUE(a.v[u].equal(b.v[u])) << what << ": exp_avg_sq of unit " << u;
  }
}

class checkpoint_resume : public ::testing::TestWithParam<resume_case> {};

TEST_P(checkpoint_resume, continues_bit_for_bit) {
  const resume_case c = GetParam();
  scratch_dir d;
  std::vector<step_data> data;
  for (int64_t k = 0; k < c.steps; ++k) {
    step_data s;
    for (int64_t m = 0; m < c.micro; ++m) s.push_back(random_tokens(k_batch, k_seq, tiny_config().vocab_size, 9000 + 10 * k + m));
    data.push_back(s);
  }
  engine_options o = base_options(offload_mode::offload_overlapped, c.dtype);
  o.speculate = c.spec;
  o.clip_grad = c.clip;
  o.scale_window = 2;   // the loss scale moves within the run (fp16)

  // the uninterrupted run
  run_result full = run_engine(with_poison(o, c, 0), data);

  // the first part, saved
  auto first = make_engine(with_poison(o, c, 0));
  run_result part;
  for (int64_t k = 0; k < c.save_after; ++k) part.steps.push_back(first->train_step(data[size_t(k)], lr_at(k)));
  snapshot(*first, part);
  const trainer_state saved = state_of(*first, c.save_after);
  const std::string dir = save_checkpoint(*first, saved, d.path, 2);

  // a fresh engine (other random weights) loads it and goes on
  engine_options o2 = with_poison(o, c, c.save_after);
  auto e = make_engine(o2);
  e->params().init_random(777, 0.2);
  e->params_changed();
  const trainer_state loaded = load_checkpoint(*e, dir);
  EXPECT_EQ(loaded.step, saved.step);
  EXPECT_EQ(loaded.data_cursor, saved.data_cursor);
  EXPECT_EQ(e->state().scaler.scale, first->state().scaler.scale);
  EXPECT_EQ(e->state().scaler.good_steps, first->state().scaler.good_steps);
  EXPECT_EQ(e->state().optimizer_steps, first->state().optimizer_steps);
  EXPECT_EQ(e->state().recent_fixes, first->state().recent_fixes);
  EXPECT_EQ(e->speculating(), first->speculating());
  run_result reloaded;
  snapshot(*e, reloaded);
  expect_same_state(reloaded, part, std::string(c.name) + " loaded");

  run_result rest;
  for (int64_t k = c.save_after; k < c.steps; ++k) rest.steps.push_back(e->train_step(data[size_t(k)], lr_at(k)));
  snapshot(*e, rest);
  for (int64_t k = c.save_after; k < c.steps; ++k) {
    const step_result& a = full.steps[size_t(k)];
    const step_result& b = rest.steps[size_t(k - c.save_after)];
    SCOPED_TRACE(std::string(c.name) + " step " + std::to_string(k));
    EXPECT_EQ(b.loss, a.loss);
    EXPECT_EQ(b.loss_scale, a.loss_scale);
    EXPECT_EQ(b.skipped, a.skipped);
    EXPECT_EQ(b.speculated, a.speculated);
  }
  expect_same_state(rest, full, std::string(c.name) + " final");
  if (c.poison_step >= 0) {
    EXPECT_TRUE(full.steps[size_t(c.poison_step)].skipped) << "the poisoned step must be skipped";
  }
}

// fp16_skip_before: a skipped step (loss scale halved) before the checkpoint, scale regrowth after.
// auto_speculating: saved while speculate=auto speculates (8 clean steps), a fix-up after resuming.
// spec_on_clipped: every step clipped, so every speculative update is redone.
// accumulation: 3 micro-batches per step (the fp32 accumulation buffers are not checkpointed state).
INSTANTIATE_TEST_SUITE_P(
    all, checkpoint_resume,
    ::testing::Values(resume_case{"fp16_skip_before", at::kHalf, speculate_mode::speculate_on, 1.0, 1, 3, 6, 1},
                      resume_case{"auto_speculating", at::kFloat, speculate_mode::speculate_auto, 0.0, 1, 10, 13, 11},
                      resume_case{"spec_on_clipped", at::kFloat, speculate_mode::speculate_on, 0.05, 1, 3, 5, -1},
                      resume_case{"accumulation", at::kFloat, speculate_mode::speculate_on, 1.0, 3, 2, 4, -1}),
    [](const auto& info) { return std::string(info.param.name); });

}  // namespace
}  // namespace ferry::checkpoint::test
