// src/checkpoint: a run saved at step s, loaded into a fresh engine and continued, is the
// uninterrupted run bit for bit: every unit's master weights and AdamW moments, the losses, and the
// trainer state the engine keeps (loss scale and its good-step count, AdamW's step count, the
// recent fix-ups that drive speculate=auto). On the strict host backend, tiny model
// (tests/engine/engine_test_util.h), in the states where resuming is easy to get wrong.
#include <gtest/gtest.h>

#include <filesystem>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <string>

#include "src/checkpoint/checkpoint.h"
#include "src/common/error.h"
#include "src/io/atomic_file.h"
#include "src/io/safetensors.h"
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
  state_kind kind = state_kind::state_fp32;   // optimizer_state
  bool tied = false;    // tied_config(): lm_head is the embedding (tie_word_embeddings)
  // optimizer_state_on of the run that saves and of the one that resumes (the uninterrupted run
  // keeps its state in host memory): resuming between tiers is exact both ways.
  state_place saved_on = state_place::place_host, resumed_on = state_place::place_host;
  // resident_blocks of the saving (and uninterrupted) run, and of the resuming one (-1: the same):
  // the checkpoint holds the resident blocks' state as the tier's, so either side may keep them.
  int64_t resident = 0, resumed_resident = -1;
};

model::llama_config config_of(const resume_case& c) { return c.tied ? tied_config() : tiny_config(); }

// o with its optimizer state on `place` (a tier file in dir when on disk).
engine_options placed(engine_options o, state_place place, const std::string& dir) {
  o.state_on = place;
  o.nvme.path = dir;
  o.nvme.buffers = 2;
  if (place == state_place::place_nvme) std::filesystem::create_directories(dir);
  return o;
}

void PrintTo(const resume_case& c, std::ostream* os) { *os << c.name; }

trainer_state saved_state(int64_t step) {
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
  auto probe = make_engine(base_options(offload_mode::offload_blocked, at::kFloat), config_of(c));
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
    EXPECT_TRUE(a.m_scale[u].equal(b.m_scale[u])) << what << ": exp_avg scales of unit " << u;
    EXPECT_TRUE(a.v_scale[u].equal(b.v_scale[u])) << what << ": exp_avg_sq scales of unit " << u;
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
  o.state = c.kind;
  o.resident_blocks = c.resident;

  const model::llama_config cfg = config_of(c);
  // the uninterrupted run
  run_result full = run_engine(with_poison(o, c, 0), data, {}, cfg);

  // the first part, saved
  auto first = make_engine(placed(with_poison(o, c, 0), c.saved_on, d.path + "/tier-saved"), cfg);
  run_result part;
  for (int64_t k = 0; k < c.save_after; ++k) part.steps.push_back(first->train_step(data[size_t(k)], lr_at(k)));
  snapshot(*first, part);
  const trainer_state saved = saved_state(c.save_after);
  const std::string dir = save_checkpoint(*first, saved, d.path, 2);

  // a fresh engine (other random weights) loads it and goes on
  engine_options o2 = placed(with_poison(o, c, c.save_after), c.resumed_on, d.path + "/tier-resumed");
  if (c.resumed_resident >= 0) o2.resident_blocks = c.resumed_resident;
  auto e = make_engine(o2, cfg);
  e->params().init_random(777, 0.2);
  e->params_changed();
  const trainer_state loaded = load_checkpoint(*e, dir);
  EXPECT_EQ(loaded.step, saved.step);
  EXPECT_EQ(loaded.data_cursor, saved.data_cursor);
  EXPECT_EQ(loaded.optimizer_state, state_kind_name(c.kind));
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
// The compact kinds (optimizer_state bf16, int8: codes, int8 scales and the bf16 stochastic-rounding
// stream, whose seed is fixed per unit and mixed with the step count) in the same states.
// tied_*: the same states with tied embeddings (one parameter, saved once).
// nvme_*: the same with the optimizer state on disk for the saving run, the resuming one or both
// (the checkpoint streams the tier unit by unit).
// resident_*: two blocks kept on the device (resident_blocks), the poisoned one among them; their
// state reaches the checkpoint through the host tier (engine::wait_updates) and the device from it
// (params_changed). Across settings (resident to streamed and back) with one micro-batch, no
// clipping and no speculation, where the two are the same bits on the host backend.
constexpr state_kind k_fp32 = state_kind::state_fp32, k_bf16 = state_kind::state_bf16, k_int8 = state_kind::state_int8;
constexpr state_place k_host = state_place::place_host, k_nvme = state_place::place_nvme;
INSTANTIATE_TEST_SUITE_P(
    all, checkpoint_resume,
    ::testing::Values(resume_case{"fp16_skip_before", at::kHalf, speculate_mode::speculate_on, 1.0, 1, 3, 6, 1},
                      resume_case{"auto_speculating", at::kFloat, speculate_mode::speculate_auto, 0.0, 1, 10, 13, 11},
                      resume_case{"spec_on_clipped", at::kFloat, speculate_mode::speculate_on, 0.05, 1, 3, 5, -1},
                      resume_case{"accumulation", at::kFloat, speculate_mode::speculate_on, 1.0, 3, 2, 4, -1},
                      resume_case{"bf16_state_fp16_skip_before", at::kHalf, speculate_mode::speculate_on, 1.0, 1, 3, 6, 1, k_bf16},
                      resume_case{"bf16_state_auto_speculating", at::kFloat, speculate_mode::speculate_auto, 0.0, 1, 10, 13, 11, k_bf16},
                      resume_case{"int8_state_fp16_skip_before", at::kHalf, speculate_mode::speculate_on, 1.0, 1, 3, 6, 1, k_int8},
                      resume_case{"int8_state_auto_speculating", at::kFloat, speculate_mode::speculate_auto, 0.0, 1, 10, 13, 11, k_int8},
                      resume_case{"int8_state_spec_on_clipped", at::kFloat, speculate_mode::speculate_on, 0.05, 1, 3, 5, -1, k_int8},
                      resume_case{"bf16_state_accumulation", at::kFloat, speculate_mode::speculate_on, 1.0, 3, 2, 4, -1, k_bf16},
                      resume_case{"tied_fp16_skip_before", at::kHalf, speculate_mode::speculate_on, 1.0, 1, 3, 6, 1, k_fp32, true},
                      resume_case{"tied_accumulation", at::kFloat, speculate_mode::speculate_on, 1.0, 3, 2, 4, -1, k_fp32, true},
                      resume_case{"tied_bf16_state_auto_speculating", at::kFloat, speculate_mode::speculate_auto, 0.0, 1, 10, 13, 11, k_bf16, true},
                      resume_case{"tied_int8_state_spec_on_clipped", at::kFloat, speculate_mode::speculate_on, 0.05, 1, 3, 5, -1, k_int8, true},
                      resume_case{"nvme_auto_speculating", at::kFloat, speculate_mode::speculate_auto, 0.0, 1, 10, 13, 11,
                                  k_fp32, false, k_nvme, k_nvme},
                      resume_case{"host_to_nvme_int8_accumulation", at::kFloat, speculate_mode::speculate_on, 1.0, 2, 2, 5, -1,
                                  k_int8, false, k_host, k_nvme},
                      resume_case{"nvme_to_host_fp16_skip_before", at::kHalf, speculate_mode::speculate_on, 1.0, 1, 3, 6, 1,
                                  k_fp32, false, k_nvme, k_host},
                      resume_case{"nvme_to_host_bf16_clipped", at::kFloat, speculate_mode::speculate_on, 0.05, 1, 3, 5, -1,
                                  k_bf16, false, k_nvme, k_host},
                      resume_case{"tied_nvme_int8_accumulation", at::kFloat, speculate_mode::speculate_on, 1.0, 2, 2, 5, -1,
                                  k_int8, true, k_nvme, k_nvme},
                      resume_case{"resident_fp16_skip_before", at::kHalf, speculate_mode::speculate_on, 1.0, 1, 3, 6, 1,
                                  k_fp32, false, k_host, k_host, 2},
                      resume_case{"resident_accumulation", at::kFloat, speculate_mode::speculate_on, 1.0, 3, 2, 4, -1,
                                  k_fp32, false, k_host, k_host, 2},
                      resume_case{"tied_resident_spec_on_clipped", at::kFloat, speculate_mode::speculate_on, 0.05, 1, 3, 5, -1,
                                  k_fp32, true, k_host, k_host, 2},
                      resume_case{"resident_to_streamed", at::kFloat, speculate_mode::speculate_off, 0.0, 1, 3, 5, -1,
                                  k_fp32, false, k_host, k_host, 2, 0},
                      resume_case{"streamed_to_resident", at::kFloat, speculate_mode::speculate_off, 0.0, 1, 3, 5, -1,
                                  k_fp32, false, k_host, k_host, 0, 3}),
    [](const auto& info) { return std::string(info.param.name); });

// ---- optimizer_state kinds: layout, conversion on resume, errors ----

engine_options kind_options(state_kind k) {
  engine_options o = base_options(offload_mode::offload_overlapped, at::kFloat);
  o.state = k;
  return o;
}

// Every unit's moments set from random fp32 values (as they would be after some training: m of
// both signs, v >= 0, a zero block, an outlier and equal values inside blocks), stored in the
// engine's kind by cpu_optim::encode_moments; the master weights moved off their init.
void fill_random_state(engine::engine& e, uint64_t seed) {
  auto& store = e.params();
  for (int64_t u = 0; u < store.num_units(); ++u) {
    engine::state_lease s(store.state(), u, true);
    at::Generator gen = at::detail::createCPUGenerator(seed * 131 + uint64_t(u));
    at::Tensor m = at::randn({s->n}, gen) * 1e-3, v = (at::randn({s->n}, gen) * 1e-3).square();
    m.narrow(0, 0, std::min<int64_t>(s->n, 2048)).zero_();
    v.narrow(0, 0, std::min<int64_t>(s->n, 2048)).zero_();
    if (s->n > 3000) {
      m.index_put_({2500}, 0.5);
      v.index_put_({2600}, 1e3);
      m.narrow(0, 2048 * (s->n / 2048 - 1), 64).fill_(3e-4);
    }
    cpu_optim::encode_moments(m.data_ptr<float>(), v.data_ptr<float>(), moments_of(*s));
    at::from_blob(s->master, {s->n}).add_(at::randn({s->n}, gen) * 1e-2);
  }
  e.params_changed();
}

// Unit u's moments of e decoded to fp32.
std::pair<at::Tensor, at::Tensor> decoded(engine::engine& e, int64_t u) {
  engine::state_lease s(e.params().state(), u, false);
  at::Tensor m = at::empty({s->n}), v = at::empty({s->n});
  cpu_optim::decode_moments(moments_of(*s), m.data_ptr<float>(), v.data_ptr<float>());
  return {m, v};
}

// Fp32 moments m, v encoded into `kind`, as unit_moments.
unit_moments encoded(const at::Tensor& m, const at::Tensor& v, state_kind kind) {
  const int64_t n = m.numel(), blocks = int64_t(cpu_optim::quant_blocks(size_t(n)));
  const bool int8 = kind == state_kind::state_int8;
  unit_moments r;
  r.m = at::empty({n}, int8 ? at::kChar : at::kShort);
  r.v = at::empty({n}, int8 ? at::kByte : at::kShort);
  r.m_scale = at::empty({int8 ? blocks : 0});
  r.v_scale = at::empty({int8 ? blocks : 0});
  cpu_optim::moments_ref ref;
  ref.kind = moments_kind_of(kind);
  ref.m = r.m.data_ptr();
  ref.v = r.v.data_ptr();
  ref.m_scale = int8 ? r.m_scale.data_ptr<float>() : nullptr;
  ref.v_scale = int8 ? r.v_scale.data_ptr<float>() : nullptr;
  ref.n = size_t(n);
  cpu_optim::encode_moments(m.contiguous().data_ptr<float>(), v.contiguous().data_ptr<float>(), ref);
  return r;
}

void expect_same_moments(const unit_moments& got, const unit_moments& want, const std::string& what) {
  EXPECT_TRUE(got.m.equal(want.m)) << what << " exp_avg";
  EXPECT_TRUE(got.v.equal(want.v)) << what << " exp_avg_sq";
  EXPECT_TRUE(got.m_scale.equal(want.m_scale)) << what << " exp_avg scales";
  EXPECT_TRUE(got.v_scale.equal(want.v_scale)) << what << " exp_avg_sq scales";
}

// Bitwise: float tensors compared as their bits (0 and -0 differ).
bool same_bits(const at::Tensor& a, const at::Tensor& b) {
  return a.sizes() == b.sizes() && a.view(at::kInt).equal(b.view(at::kInt));
}

// Resuming with another kind converts: fp32 -> int8 gives encode(x); int8 -> fp32 gives
// decode(encode(x)) bit for bit; bf16 -> int8 gives encode(decode(bf16)); bf16 -> fp32 decode(bf16);
// the masters are copied exactly; the loaded state names the checkpoint's kind; the same kind
// loads its codes and scales bit for bit.
TEST(checkpoint_kinds, resume_with_another_kind_converts) {
  scratch_dir d;
  auto a = make_engine(kind_options(state_kind::state_fp32));
  fill_random_state(*a, 1);
  const std::string fp32_dir = save_checkpoint(*a, saved_state(3), d.path + "/fp32", 2);

  auto b = make_engine(kind_options(k_int8));
  const trainer_state from_fp32 = load_checkpoint(*b, fp32_dir);
  EXPECT_EQ(from_fp32.optimizer_state, "fp32");
  for (int64_t u = 0; u < b->params().num_units(); ++u) {
    SCOPED_TRACE("fp32 -> int8, unit " + std::to_string(u));
    EXPECT_TRUE(same_bits(b->params().master_tensor(u), a->params().master_tensor(u)));
    expect_same_moments(moments_copy(b->params(), u),
                        encoded(a->params().exp_avg_tensor(u), a->params().exp_avg_sq_tensor(u), k_int8), "");
  }
  const std::string int8_dir = save_checkpoint(*b, saved_state(4), d.path + "/int8", 2);

  auto c = make_engine(kind_options(state_kind::state_fp32));
  EXPECT_EQ(load_checkpoint(*c, int8_dir).optimizer_state, "int8");
  auto b2 = make_engine(kind_options(k_int8));
  EXPECT_EQ(load_checkpoint(*b2, int8_dir).optimizer_state, "int8");
  for (int64_t u = 0; u < c->params().num_units(); ++u) {
    SCOPED_TRACE("int8 -> fp32 and int8 -> int8, unit " + std::to_string(u));
    const auto [m, v] = decoded(*b, u);
    EXPECT_TRUE(same_bits(c->params().exp_avg_tensor(u), m));
    EXPECT_TRUE(same_bits(c->params().exp_avg_sq_tensor(u), v));
    EXPECT_TRUE(same_bits(c->params().master_tensor(u), a->params().master_tensor(u)));
    expect_same_moments(moments_copy(b2->params(), u), moments_copy(b->params(), u), "");
    EXPECT_GT(m.abs().max().item<float>(), 0.0f);
  }

  auto bf = make_engine(kind_options(k_bf16));
  fill_random_state(*bf, 2);
  const std::string bf16_dir = save_checkpoint(*bf, saved_state(5), d.path + "/bf16", 2);
  auto e8 = make_engine(kind_options(k_int8));
  auto e32 = make_engine(kind_options(state_kind::state_fp32));
  EXPECT_EQ(load_checkpoint(*e8, bf16_dir).optimizer_state, "bf16");
  load_checkpoint(*e32, bf16_dir);
  for (int64_t u = 0; u < e8->params().num_units(); ++u) {
    SCOPED_TRACE("bf16 -> int8 and bf16 -> fp32, unit " + std::to_string(u));
    const auto [m, v] = decoded(*bf, u);
    expect_same_moments(moments_copy(e8->params(), u), encoded(m, v, k_int8), "");
    EXPECT_TRUE(same_bits(e32->params().exp_avg_tensor(u), m));
    EXPECT_TRUE(same_bits(e32->params().exp_avg_sq_tensor(u), v));
    EXPECT_TRUE(same_bits(e8->params().master_tensor(u), bf->params().master_tensor(u)));
  }
}

// A tier on disk is checkpointed unit by unit (one leased at a time) into the very files the host
// tier writes: the same state gives byte-identical model.safetensors and optimizer.safetensors.
TEST(checkpoint_kinds, nvme_tier_writes_the_host_tiers_files) {
  scratch_dir d;
  for (auto kind : {state_kind::state_fp32, k_bf16, k_int8}) {
    SCOPED_TRACE(state_kind_name(kind));
    auto host = make_engine(kind_options(kind));
    auto disk = make_engine(placed(kind_options(kind), k_nvme, d.path + "/tier"));
    const auto data = make_data(2);
    for (int64_t k = 0; k < 2; ++k) {
      host->train_step(data[size_t(k)], lr_at(k));
      disk->train_step(data[size_t(k)], lr_at(k));
    }
    const std::string a = save_checkpoint(*host, saved_state(2), d.path + "/host-" + state_kind_name(kind), 2);
    const std::string b = save_checkpoint(*disk, saved_state(2), d.path + "/nvme-" + state_kind_name(kind), 2);
    for (const char* f : {"/model.safetensors", "/optimizer.safetensors"})
      EXPECT_EQ(io::read_file(a + f), io::read_file(b + f)) << f;
  }
}

// fp32 checkpoints are laid out as before the compact kinds (per parameter: master, exp_avg,
// exp_avg_sq, F32); compact ones keep the per-parameter F32 master and their moments per unit.
TEST(checkpoint_kinds, file_layout) {
  scratch_dir d;
  for (auto kind : {state_kind::state_fp32, k_bf16, k_int8}) {
    SCOPED_TRACE(state_kind_name(kind));
    auto e = make_engine(kind_options(kind));
    const std::string dir = save_checkpoint(*e, saved_state(1), d.path + "/" + state_kind_name(kind), 2);
    io::safetensors_file f(dir + "/optimizer.safetensors");
    std::map<std::string, std::string> want;
    for (const auto& p : e->params().named_params()) {
      want[p.name] = "F32";
      if (kind == state_kind::state_fp32) want[p.name + ".exp_avg"] = want[p.name + ".exp_avg_sq"] = "F32";
    }
    for (int64_t u = 0; kind != state_kind::state_fp32 && u < e->params().num_units(); ++u) {
      const std::string prefix = "optimizer.unit" + std::to_string(u);
      want[prefix + ".exp_avg"] = kind == k_bf16 ? "BF16" : "I8";
      want[prefix + ".exp_avg_sq"] = kind == k_bf16 ? "BF16" : "U8";
      if (kind == k_int8) want[prefix + ".exp_avg.scale"] = want[prefix + ".exp_avg_sq.scale"] = "F32";
    }
    std::map<std::string, std::string> got;
    for (const auto& t : f.tensors()) got[t.name] = t.dtype;
    EXPECT_EQ(got, want);
    const auto js = nlohmann::json::parse(io::read_file(dir + "/trainer_state.json"));
    EXPECT_EQ(js.at("optimizer_state").get<std::string>(), state_kind_name(kind));
  }
}

// A tied model is saved tied: HF's layout (no lm_head.weight, tie_word_embeddings true in
// config.json), no lm_head in optimizer.safetensors, and the saved weights load into a tied engine
// bit for bit; an untied engine refuses them with one line, and the other way round.
TEST(checkpoint_tied, saved_tied_and_loaded_tied) {
  scratch_dir d;
  engine_options o = kind_options(state_kind::state_fp32);
  auto e = make_engine(o, tied_config());
  e->train_step(make_data(1)[0], lr_at(0));
  const std::string dir = save_checkpoint(*e, saved_state(1), d.path, 2);
  for (const char* file : {"/model.safetensors", "/optimizer.safetensors"}) {
    io::safetensors_file f(dir + file);
    EXPECT_NE(f.find("model.embed_tokens.weight"), nullptr) << file;
    for (const auto& t : f.tensors()) EXPECT_EQ(t.name.find("lm_head"), std::string::npos) << file << ": " << t.name;
  }
  const auto js = nlohmann::json::parse(io::read_file(dir + "/config.json"));
  EXPECT_TRUE(js.at("tie_word_embeddings").get<bool>());

  auto back = make_engine(o, tied_config(), 5);
  load_hf_weights(*back, dir);
  for (const auto& p : e->params().named_params())
    EXPECT_TRUE(back->params().master_view(p).equal(e->params().master_view(p))) << p.name;

  model::llama_config untied = tied_config();
  untied.tie_word_embeddings = false;
  auto other = make_engine(o, untied);
  try {
    load_hf_weights(*other, dir);
    ADD_FAILURE() << "an untied model loaded a tied checkpoint";
  } catch (const ferry::error& err) {
    const std::string msg = err.what();
    EXPECT_NE(msg.find("tie_word_embeddings"), std::string::npos) << msg;
    EXPECT_NE(msg.find("--model-config"), std::string::npos) << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
  }
  const std::string untied_dir = save_checkpoint(*other, saved_state(2), d.path + "/untied", 2);
  EXPECT_THROW(load_hf_weights(*back, untied_dir), ferry::error);
}

// A checkpoint whose moments are missing or do not match the kind its trainer_state.json names is
// refused with one line naming the file and the tensor; an unknown kind names trainer_state.json.
TEST(checkpoint_kinds, missing_or_mismatched_moments_are_refused) {
  scratch_dir d;
  auto src = make_engine(kind_options(k_int8));
  const std::string good = save_checkpoint(*src, saved_state(1), d.path + "/good", 2);
  auto copy_of = [&](const std::string& name) {
    const std::string dir = d.path + "/" + name;
    std::filesystem::create_directories(dir);
    for (const auto& f : std::filesystem::directory_iterator(good))
      std::filesystem::copy_file(f.path(), dir + "/" + f.path().filename().string());
    return dir;
  };
  auto set_kind = [](const std::string& dir, const std::string& kind) {
    auto js = nlohmann::json::parse(io::read_file(dir + "/trainer_state.json"));
    js["optimizer_state"] = kind;
    io::write_file_atomic(dir + "/trainer_state.json", js.dump(2));
  };
  auto expect_refused = [](engine::engine& e, const std::string& dir, std::initializer_list<std::string> needles) {
    try {
      load_checkpoint(e, dir);
      ADD_FAILURE() << "loaded " << dir;
    } catch (const ferry::error& err) {
      const std::string msg = err.what();
      EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
      for (const auto& n : needles) EXPECT_NE(msg.find(n), std::string::npos) << "'" << n << "' not in: " << msg;
    }
  };
  // a tensor left out
  const std::string dropped = copy_of("dropped");
  {
    io::safetensors_file f(good + "/optimizer.safetensors");
    std::vector<io::st_write_entry> keep;
    for (const auto& t : f.tensors())
      if (t.name != "optimizer.unit2.exp_avg_sq.scale")
        keep.push_back({t.name, t.dtype, t.shape, f.data(t), t.end - t.begin});
    io::write_safetensors(dropped + "/optimizer.safetensors", keep);
  }
  auto e = make_engine(kind_options(k_int8));
  expect_refused(*e, dropped, {"optimizer.safetensors", "optimizer.unit2.exp_avg_sq.scale"});
  // int8 tensors named bf16 (another dtype), fp32 ones named int8 (missing), an unknown kind
  const std::string relabelled = copy_of("relabelled");
  set_kind(relabelled, "bf16");
  expect_refused(*e, relabelled, {"optimizer.safetensors", "optimizer.unit0.exp_avg", "BF16"});
  auto f32 = make_engine(kind_options(state_kind::state_fp32));
  const std::string fp32_dir = save_checkpoint(*f32, saved_state(1), d.path + "/fp32", 2);
  set_kind(fp32_dir, "int8");
  expect_refused(*e, fp32_dir, {"optimizer.safetensors", "optimizer.unit0.exp_avg"});
  const std::string unknown = copy_of("unknown");
  set_kind(unknown, "int4");
  expect_refused(*e, unknown, {"trainer_state.json", "int4"});
}

}  // namespace
}  // namespace ferry::checkpoint::test
