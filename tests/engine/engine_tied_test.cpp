// Tied input and output embeddings (tie_word_embeddings, as Llama 3.2 1B/3B ship) in the engine:
// one parameter read by the embedding lookup and the loss head, its gradient the sum of both uses,
// one set of fp32 master weights and moments. Against the fp64 autograd reference (whose tied model
// has one leaf, tests/engine/engine_test_util.h) in every mode, with clipping, accumulation, skipped
// and rolled-back steps and fp16 loss scaling; the compact state kinds; the memory plan. Built for
// the host backend (label cpu) and for CUDA (label gpu, FERRY_TEST_CUDA=1), like engine_test.
#include <cmath>
#include <cstdio>
#include <limits>
#include <string>

#include "src/model/device_bytes.h"
#include "tests/engine/engine_test_util.h"

namespace ferry::engine::test {
namespace {

constexpr offload_mode k_none = offload_mode::offload_none;
constexpr offload_mode k_blocked = offload_mode::offload_blocked;
constexpr offload_mode k_overlapped = offload_mode::offload_overlapped;
constexpr int64_t k_steps = 5;
const double k_inf = std::numeric_limits<double>::infinity();
const char* const k_embed = "model.embed_tokens.weight";

run_result run_tied(const engine_options& o, const std::vector<step_data>& data) {
  return run_engine(o, data, {}, tied_config());
}

// Relative error max|a - e| / max|e|.
double rel_err(const at::Tensor& a, const at::Tensor& e) {
  return (a.to(at::kDouble) - e.to(at::kDouble)).abs().max().item<double>() / e.to(at::kDouble).abs().max().item<double>();
}

// ---- the store: one parameter ----

// The tied matrix is unit 0's alone: no lm_head among the names, the head unit is the final norm,
// the state tier (every kind) holds each parameter once, and the head's pinned gradient has room
// for the lm_head gradient the device sends back beside the norm's.
TEST(engine_tied, one_parameter_one_state) {
  const auto cfg = tied_config();
  const int64_t V = cfg.vocab_size, h = cfg.hidden_size;
  auto host = make_host_backend();
  for (auto kind : {state_kind::state_fp32, state_kind::state_bf16, state_kind::state_int8}) {
    SCOPED_TRACE(state_kind_name(kind));
    param_store store(cfg, at::kBFloat16, *host, true, kind);
    EXPECT_EQ(store.find("lm_head.weight"), nullptr);
    ASSERT_NE(store.find(k_embed), nullptr);
    EXPECT_EQ(store.find(k_embed)->unit, store.embed_unit());
    EXPECT_EQ(store.unit(store.head_unit()).numel, h);
    EXPECT_EQ(store.grad_numel(store.head_unit()), h + V * h);
    EXPECT_EQ(store.total_params(), cfg.total_params());
    int64_t named = 0;
    for (const auto& p : store.named_params()) named += p.numel;
    EXPECT_EQ(named, cfg.total_params());
    EXPECT_EQ(store.state().host_bytes(), state_host_bytes(cfg, kind, true));
    model::llama_config untied = cfg;
    untied.tie_word_embeddings = false;
    EXPECT_EQ(state_host_bytes(untied, kind, true) - state_host_bytes(cfg, kind, true),
              state_bytes(kind, true, h + V * h) - state_bytes(kind, true, h));
  }
}

// ---- 1. the gradient of the tied matrix ----

// After one step (offloaded modes keep the step's summed fp32 gradient of the embedding on the
// host) the tied matrix's gradient is the autograd gradient of the one shared leaf, which is the
// embedding lookup's gradient plus the head's: computed apart on an untied copy of the reference,
// their sum must match, and neither part alone does.
TEST(engine_tied, gradient_is_the_sum_of_both_uses) {
  FERRY_REQUIRE_DEVICE();
  const auto cfg = tied_config();
  const step_data batch = make_data(1)[0];
  for (auto mode : {k_blocked, k_overlapped}) {
    for (auto spec : {speculate_mode::speculate_on, speculate_mode::speculate_off}) {
      if (mode == k_blocked && spec == speculate_mode::speculate_on) continue;
      engine_options o = with(base_options(mode, at::kFloat), spec);
      SCOPED_TRACE(mode_label(o));
      auto e = make_engine(o, cfg);
      const int64_t targets = batch[0].narrow(1, 1, k_seq).ne(-100).sum().item<int64_t>();

      reference_model tied(e->params());
      (tied.loss_sum(batch[0]) / double(targets)).backward();
      reference_model parts(e->params());
      parts.cfg.tie_word_embeddings = false;
      at::Tensor lm = parts.by_name.at(k_embed).detach().clone().requires_grad_(true);
      parts.by_name["lm_head.weight"] = lm;
      (parts.loss_sum(batch[0]) / double(targets)).backward();
      const at::Tensor g_lookup = parts.by_name.at(k_embed).grad(), g_head = lm.grad();
      const at::Tensor want = tied.by_name.at(k_embed).grad();
      ASSERT_LT(rel_err(g_lookup + g_head, want), 1e-12) << "autograd: the tied leaf's gradient is the sum";

      const step_result r = e->train_step(batch, lr_at(0));
      e->wait_updates();
      const at::Tensor got = e->params().grad_tensor(e->params().embed_unit()).view({cfg.vocab_size, cfg.hidden_size});
      EXPECT_LT(rel_err(got, want), 1e-5) << "the tied gradient";
      EXPECT_GT(rel_err(got, g_lookup), 1e-2) << "the lookup's part alone would pass: the test cannot tell";
      EXPECT_GT(rel_err(got, g_head), 1e-2) << "the head's part alone would pass: the test cannot tell";
      // The global norm counts the tied matrix once, with its summed gradient.
      double norm = 0;
      for (const auto& p : tied.params) norm += p.grad().square().sum().item<double>();
      EXPECT_NEAR(r.grad_norm, std::sqrt(norm), 1e-5 * std::sqrt(norm));
    }
  }
}

// ---- 2. the training trajectory in every mode ----

struct tied_case {
  offload_mode mode;
  at::ScalarType dtype;
  double clip;
  speculate_mode spec;
};

class engine_tied_reference : public ::testing::TestWithParam<tied_case> {};

// The reference's AdamW over the tied leaf (one set of moments), clip_grad_norm_ over the
// parameters with the tied one counted once, GradScaler for fp16; the tolerances of the untied
// suite (engine_test_util.h).
TEST_P(engine_tied_reference, trajectory_matches_pytorch) {
  FERRY_REQUIRE_DEVICE();
  const auto c = GetParam();
  const auto data = make_data(k_steps);
  engine_options o = base_options(c.mode, c.dtype);
  o.clip_grad = c.clip;
  o.speculate = c.spec;
  const ref_run want = run_reference(o, data, {}, tied_config());
  const run_result got = run_tied(o, data);
  expect_matches_reference(got, want, o, "tied " + mode_label(o), tied_config());
  if (c.clip > 0 && c.clip < 0.5) {
    for (const auto& s : want.steps) EXPECT_LT(s.clip_coef, 1.0) << "the small clip must fire every step";
  }
}

std::vector<tied_case> tied_cases() {
  std::vector<tied_case> v;
  const auto on = speculate_mode::speculate_on, off = speculate_mode::speculate_off;
  for (double clip : {0.0, 0.05}) {
    v.push_back({k_none, at::kFloat, clip, off});
    v.push_back({k_blocked, at::kFloat, clip, off});
    v.push_back({k_overlapped, at::kFloat, clip, on});   // clipped: every update redone
    v.push_back({k_overlapped, at::kFloat, clip, off});
  }
  v.push_back({k_overlapped, at::kBFloat16, 0.05, on});
  v.push_back({k_none, at::kBFloat16, 0.05, off});
  if (k_cuda_suite) {
    v.push_back({k_overlapped, at::kHalf, 1.0, on});
    v.push_back({k_none, at::kHalf, 1.0, off});
  }
  return v;
}

INSTANTIATE_TEST_SUITE_P(all, engine_tied_reference, ::testing::ValuesIn(tied_cases()), [](const auto& info) {
  const auto& c = info.param;
  const char* spec = c.spec == speculate_mode::speculate_on ? "_spec_on" : "";
  return std::string(offload_mode_name(c.mode)) + "_" + c10::toString(c.dtype) + "_clip" +
         std::to_string(int(c.clip * 100)) + (c.mode == k_overlapped ? spec : "");
});

// blocked and overlapped run the same host arithmetic: bit for bit without clipping (speculative
// or not), also with one and two layers, where the head slot (norm and the embedding's copy) is
// reloaded right after the step that updated the embedding.
TEST(engine_tied, overlapped_equals_blocked_bit_for_bit) {
  FERRY_REQUIRE_DEVICE();
  const auto data = make_data(4);
  for (int64_t layers : {1, 2, 3}) {
    model::llama_config cfg = tied_config();
    cfg.num_hidden_layers = layers;
    engine_options bl = base_options(k_blocked, at::kFloat);
    const run_result blocked = run_engine(bl, data, {}, cfg);
    for (auto spec : {speculate_mode::speculate_on, speculate_mode::speculate_off}) {
      engine_options ov = with(base_options(k_overlapped, at::kFloat), spec);
      expect_bit_identical(run_engine(ov, data, {}, cfg), blocked,
                           std::to_string(layers) + " layers, tied: " + mode_label(ov) + " vs blocked");
    }
  }
}

// ---- 3. gradient accumulation ----

// 1, 2 and 3 micro-batches of the same 3 rows give one batch's trajectory in every mode, clipped
// and not (the head's task writes the tied gradient on the first micro-batch and adds after; the
// resident head overwrites the embedding's device gradient first), and the reference's; offloaded
// also as one group (the head's slot holds the group's tied gradient, summed on the device).
TEST(engine_tied, accumulation_equals_one_batch) {
  FERRY_REQUIRE_DEVICE();
  const int64_t rows = 3;
  const auto big = make_data(3, rows, k_seq, 13);
  for (auto mode : {k_none, k_blocked, k_overlapped}) {
    for (double clip : {0.0, 0.05}) {
      engine_options o = base_options(mode, at::kFloat);
      o.clip_grad = clip;
      o.max_batch = rows;
      const run_result one = run_tied(o, big);
      for (int64_t micro : {2, 3}) {
        std::vector<step_data> split;
        for (const auto& s : big) {
          step_data d;
          if (micro == 2) d = {s[0].narrow(0, 0, 2).contiguous(), s[0].narrow(0, 2, 1).contiguous()};
          else
            for (int64_t r = 0; r < rows; ++r) d.push_back(s[0].narrow(0, r, 1).contiguous());
          split.push_back(d);
        }
        // grad_accum 1 plans one micro-batch at a time; grad_accum = micro (offloaded) one group
        for (int64_t planned : {int64_t(1), micro}) {
          if (planned > 1 && mode == k_none) continue;
          engine_options og = o;
          og.grad_accum = planned;
          const std::string what = "tied " + mode_label(o) + " " + std::to_string(micro) + " micro-batches" +
                                   (planned > 1 ? " in one group" : "");
          ASSERT_EQ(make_engine(og, tied_config())->plan().micro_group, planned) << what;
          const run_result got = run_tied(og, split);
          for (size_t k = 0; k < one.steps.size(); ++k)
            EXPECT_NEAR(got.steps[k].grad_norm, one.steps[k].grad_norm, 1e-5 * one.steps[k].grad_norm) << what;
          expect_runs_close(got, one, tolerance_for(at::kFloat), what + " vs one batch");
          expect_matches_reference(got, run_reference(o, big, {}, tied_config()), o, what + " vs reference", tied_config());
        }
      }
    }
  }
}

// ---- 4. skipped steps, rollback, loss scaling ----

// An inf in the tied matrix's gradient (unit 0) or in the head's (the final norm, unit L+1) skips
// the step: the non-speculative modes and the speculative rollback (every other unit's update
// undone) follow the reference, unclipped and clipped.
TEST(engine_tied, skipped_step_matches_reference) {
  FERRY_REQUIRE_DEVICE();
  const auto cfg = tied_config();
  const auto data = make_data(k_steps);
  auto probe = make_engine(base_options(k_blocked, at::kFloat), cfg);
  for (int64_t unit : {probe->params().embed_unit(), probe->params().head_unit()}) {
    for (double clip : {0.0, 0.05}) {
      engine_options o = base_options(k_overlapped, at::kFloat);
      o.clip_grad = clip;
      o.debug_poison_step = 2;   // the second step
      o.debug_poison_unit = unit;
      o.debug_poison_index = probe->params().unit(unit).numel / 3;
      o.debug_poison_value = k_inf;
      const poison p{1, locate(probe->params(), unit, o.debug_poison_index), k_inf};
      const ref_run want = run_reference(o, data, p, cfg);
      ASSERT_TRUE(want.steps[1].skipped);
      for (auto mode : {k_none, k_blocked, k_overlapped}) {
        for (auto spec : {speculate_mode::speculate_on, speculate_mode::speculate_off}) {
          if (mode != k_overlapped && spec == speculate_mode::speculate_on) continue;
          engine_options m = with(o, spec);
          m.mode = mode;
          const std::string what = "tied, inf in unit " + std::to_string(unit) + ", " + mode_label(m);
          const run_result got = run_tied(m, data);
          EXPECT_TRUE(got.steps[1].skipped) << what;
          if (mode == k_overlapped && spec == speculate_mode::speculate_on) {
            EXPECT_EQ(got.steps[1].rollbacks, probe->params().num_units()) << what;
          }
          expect_matches_reference(got, want, m, what, cfg);
        }
      }
    }
  }
}

// fp16 (the host backend too): the loss scale halves on the overflowing step (an inf in the tied
// gradient) and doubles after scale_window good steps, as the GradScaler emulation; the
// non-speculative trajectory matches the reference and the speculative run takes the same path.
TEST(engine_tied, fp16_loss_scale_follows_gradscaler) {
  FERRY_REQUIRE_DEVICE();
  const auto cfg = tied_config();
  const auto data = make_data(k_steps);
  auto probe = make_engine(base_options(k_blocked, at::kFloat), cfg);
  engine_options o = base_options(k_overlapped, at::kHalf);
  o.clip_grad = 1.0;
  o.scale_window = 2;
  o.debug_poison_step = 3;
  o.debug_poison_unit = probe->params().embed_unit();
  o.debug_poison_index = probe->params().unit(0).numel / 3;
  o.debug_poison_value = k_inf;
  const poison p{2, locate(probe->params(), 0, o.debug_poison_index), k_inf};
  const ref_run want = run_reference(o, data, p, cfg);
  std::vector<double> want_scales;
  for (const auto& s : want.steps) want_scales.push_back(s.loss_scale);
  EXPECT_EQ(want_scales, (std::vector<double>{65536, 65536, 131072, 65536, 65536}));
  for (auto spec : {speculate_mode::speculate_off, speculate_mode::speculate_on}) {
    const run_result got = run_tied(with(o, spec), data);
    std::vector<double> scales;
    for (const auto& s : got.steps) scales.push_back(s.loss_scale);
    EXPECT_EQ(scales, want_scales) << mode_label(with(o, spec));
    EXPECT_TRUE(got.steps[2].skipped);
    if (spec == speculate_mode::speculate_off) expect_matches_reference(got, want, o, "tied fp16 " + mode_label(o), cfg);
  }
}

// ---- 5. races ----

// Random delays in every copy, compute phase and host task change no bit of an overlapped run with
// accumulation and clipping: the head's task that writes the embedding's gradient and the
// embedding's scatter and update stay ordered on the update thread, and the head slot's copy of the
// embedding is reloaded only after the embedding's update.
TEST(engine_tied, delays_change_nothing) {
  FERRY_REQUIRE_DEVICE();
  const auto big = make_data(3);
  std::vector<step_data> split;
  for (const auto& s : big) split.push_back({s[0].narrow(0, 0, 1).contiguous(), s[0].narrow(0, 1, 1).contiguous()});
  for (auto spec : {speculate_mode::speculate_on, speculate_mode::speculate_off}) {
    engine_options o = with(base_options(k_overlapped, at::kFloat), spec);
    o.clip_grad = 0.05;
    const run_result calm = run_tied(o, split);
    for (int rep = 0; rep < 3; ++rep) {
      engine_options d = o;
      d.debug_delay_us = 500;
      d.seed = 2000 + uint64_t(rep);
      expect_bit_identical(run_tied(d, split), calm, "tied " + mode_label(o) + " delays rep " + std::to_string(rep));
    }
  }
}

// ---- 6. compact optimizer state ----

// bf16 and int8 moments of the tied matrix: overlapped (speculating, no fix-ups) gives the blocked
// run's bits, and 12 steps over cycled data keep the losses within 1% of the fp32 state's.
TEST(engine_tied, compact_state_trains_like_fp32) {
  FERRY_REQUIRE_DEVICE();
  const auto four = make_data(4);
  std::vector<step_data> data;
  for (int64_t k = 0; k < 12; ++k) data.push_back(four[size_t(k % 4)]);
  engine_options bl = base_options(k_blocked, at::kFloat);
  const run_result fp32 = run_tied(bl, data);
  for (auto kind : {state_kind::state_bf16, state_kind::state_int8}) {
    const std::string label = std::string("tied ") + state_kind_name(kind) + " state";
    engine_options o = bl;
    o.state = kind;
    const run_result blocked = run_tied(o, data);
    engine_options ov = with(o, speculate_mode::speculate_on);
    ov.mode = k_overlapped;
    expect_bit_identical(run_tied(ov, data), blocked, label + " overlapped/spec-on vs blocked");
    for (size_t k = 0; k < data.size(); ++k)
      EXPECT_NEAR(blocked.steps[k].loss, fp32.steps[k].loss, 0.01 * fp32.steps[k].loss) << label << " step " << k;
  }
}

// ---- 7. the memory plan ----

// A tied model plans the matrix once: the host saves its master and moments (12 B/param in fp32
// state), its compute-dtype shadow and, with accumulation on the host, its fp32 accumulator; the head slot on
// the device still holds a copy of it, so the offloaded device plan is the untied one's. The
// plan's pinned bytes are the store's, and its tier bytes the tier's.
TEST(engine_tied, plan_counts_the_matrix_once) {
  const auto cfg = tied_config();
  model::llama_config untied = cfg;
  untied.tie_word_embeddings = false;
  const int64_t E = cfg.embed_params();
  auto host = make_host_backend();
  for (auto dt : {at::kFloat, at::kBFloat16}) {
    const int64_t e = int64_t(c10::elementSize(dt));
    param_store store(cfg, dt, *host);
    for (auto mode : {k_none, k_blocked, k_overlapped}) {
      SCOPED_TRACE(std::string(offload_mode_name(mode)) + " " + c10::toString(dt));
      for (int64_t accum : {1, 4})
      for (int64_t group : {1, 0}) {
        engine_options o = base_options(mode, dt);
        o.micro_group = group;
        // Both sum the embedding's gradient on the host (the untied one could on CUDA: embed_grad).
        o.embed_grad = embed_grad_place::embed_grad_host;
        const memory_plan t = plan_memory(cfg, o, k_batch, k_seq, accum), u = plan_memory(untied, o, k_batch, k_seq, accum);
        EXPECT_EQ(t.host_pinned, store.pinned_bytes());
        EXPECT_EQ(t.host_master + t.host_moments, store.state().host_bytes());
        // (the accumulators are planned in none mode and when micro-batches run one by one;
        // offloaded, auto runs all four in one group, summed on the device)
        const bool host_sums = accum > 1 && (mode == k_none || group == 1);
        EXPECT_EQ(u.host_total - t.host_total, E * (12 + e + (host_sums ? 4 : 0)));
        if (mode == k_none) {
          EXPECT_EQ(u.device_total - t.device_total, E * (2 * e + 12));   // weights, gradients, fp32 state
        } else {
          EXPECT_EQ(t.weight_slots, u.weight_slots);
          EXPECT_EQ(t.grad_slots, u.grad_slots);
          EXPECT_EQ(t.device_total, u.device_total);
        }
      }
    }
  }
  // An inference engine: the master and shadow once; the streamed head slot holds the matrix.
  for (auto mode : {k_none, k_overlapped}) {
    engine_options o = base_options(mode, at::kBFloat16);
    o.forward_only = true;
    const memory_plan t = plan_memory(cfg, o, k_batch, k_seq, 1), u = plan_memory(untied, o, k_batch, k_seq, 1);
    EXPECT_EQ(u.host_total - t.host_total, E * (4 + 2)) << offload_mode_name(mode);
    // Resident, the tied head holds only the final norm: the matrix leaves that tensor (in the
    // allocator's blocks on CUDA); streamed, the head slot holds the matrix in both.
    const int64_t h = cfg.hidden_size;
    const int64_t matrix = model::device_charge((E + h) * 2, o.cuda) - model::device_charge(h * 2, o.cuda);
    EXPECT_EQ(u.weight_slots - t.weight_slots, mode == k_none ? matrix : 0) << offload_mode_name(mode);
  }
}

}  // namespace
}  // namespace ferry::engine::test
