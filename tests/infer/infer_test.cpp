// ferry-infer's runner on a tiny model. Compiled twice: CPU (host backend, label cpu) and, with
// FERRY_TEST_CUDA=1, CUDA (label gpu, skipped without a device). fp32 throughout.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "src/common/error.h"
#include "src/engine/engine.h"
#include "src/infer/evaluate.h"
#include "src/infer/generate.h"
#include "src/infer/runner.h"
#include "src/io/hf_checkpoint.h"
#include "src/io/hf_config.h"
#include "src/model/block.h"
#include "src/checkpoint/checkpoint.h"
#include "tests/cuda_suite.h"
#include "tests/engine/engine_test_util.h"
#include "tests/model/model_test_ref.h"
#include "tests/scratch_dir.h"

namespace ferry::infer {
namespace {

constexpr bool k_cuda = ::ferry::test::k_cuda_suite;
using engine::test::make_engine;

const engine::offload_mode k_modes[] = {engine::offload_mode::offload_none, engine::offload_mode::offload_blocked,
                                        engine::offload_mode::offload_overlapped};

// Tiny GQA shape; vocabulary 320 holds the byte tokenizer (259 ids). A larger init spread than
// HF's 0.02 gives decisive logits, so greedy choices are not near-ties.
constexpr double k_init_range = 0.3;
constexpr uint64_t k_weights_seed = 7;
model::llama_config tiny() {
  // vocab, hidden, intermediate, layers, heads, kv_heads, head_dim, max_positions
  model::llama_config c = ::ferry::test::tiny_llama("infer-test", {320, 32, 64, 3, 4, 2, 8, 128});
  c.torch_dtype = "float32";
  c.initializer_range = k_init_range;
  return c;
}
// The same with lm_head tied to the embedding (Llama 3.2's tie_word_embeddings).
model::llama_config tied() {
  model::llama_config c = tiny();
  c.name = "infer-tied-test";
  c.tie_word_embeddings = true;
  return c;
}

// fp32 on the suite's device, one block slot ahead, batches up to 4 x 64.
engine::engine_options infer_options(engine::offload_mode mode, bool forward_only = false) {
  engine::engine_options o;
  o.forward_only = forward_only;
  o.mode = mode;
  o.dtype = at::kFloat;
  o.cuda = k_cuda;
  o.prefetch = 1;
  o.max_batch = 4;
  o.max_seq = 64;
  o.cpu_threads = 1;
  return o;
}

// A scratch directory per test (tests/scratch_dir.h).
struct temp_dir : ::ferry::test::scratch_dir {
  temp_dir() : ::ferry::test::scratch_dir("ferry_infer_test") {}
};

std::vector<std::vector<int64_t>> prompts_of(const std::vector<int64_t>& lengths, uint64_t seed) {
  at::Generator g = at::detail::createCPUGenerator(seed);
  std::vector<std::vector<int64_t>> out;
  for (int64_t n : lengths) {
    at::Tensor t = at::randint(3, 300, {n}, g, at::kLong);
    out.emplace_back(t.data_ptr<int64_t>(), t.data_ptr<int64_t>() + n);
  }
  return out;
}

// Mean loss of tokens (B, T+1) in fp64 from plain ATen ops (tests/model/model_test_ref.h, written
// apart from src/model) on the engine's fp32 master weights: no ferry code in the reference.
double reference_loss(engine::engine& e, const at::Tensor& tokens) {
  namespace ref = ::ferry::model::test::ref;
  const auto& c = e.config();
  std::map<std::string, at::Tensor> w;
  for (const auto& p : e.params().named_params())
    w[p.name] = e.params().master_view(p).to(at::kDouble);
  const int64_t B = tokens.size(0), T = tokens.size(1) - 1;
  at::Tensor x = w.at("model.embed_tokens.weight").index_select(0, tokens.narrow(1, 0, T).reshape({-1})).view({B, T, -1});
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    x = ref::block(x, {w.at(p + "input_layernorm.weight"), w.at(p + "self_attn.q_proj.weight"),
                       w.at(p + "self_attn.k_proj.weight"), w.at(p + "self_attn.v_proj.weight"),
                       w.at(p + "self_attn.o_proj.weight"), w.at(p + "post_attention_layernorm.weight"),
                       w.at(p + "mlp.gate_proj.weight"), w.at(p + "mlp.up_proj.weight"), w.at(p + "mlp.down_proj.weight")},
                   c);
  }
  const at::Tensor& lm = w.at(c.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight");
  at::Tensor logits = at::matmul(ref::rmsnorm(x, w.at("model.norm.weight"), c.rms_norm_eps), lm.t());
  return ref::ce_sum(logits, tokens.narrow(1, 1, T)).item<double>() / double(B * T);
}

TEST(infer, evaluation_loss_equals_training_forward) {
  FERRY_REQUIRE_DEVICE();
  temp_dir dir;
  std::string text;
  for (int i = 0; i < 60; ++i) text += "The quick brown fox " + std::to_string(i * 7919) + " jumps over the lazy dog.\n";
  std::ofstream(dir.path + "/corpus.txt") << text;
  io::data_options d;
  d.paths = {dir.path + "/corpus.txt"};
  d.seq_len = 32;
  d.eval_fraction = 0.1;
  d.vocab_limit = tiny().vocab_size;
  io::token_dataset ds = io::token_dataset::open(d);
  ASSERT_GE(ds.num_eval(), 4);
  for (auto mode : k_modes) {
    auto e = make_engine(infer_options(mode), tiny(), k_weights_seed, k_init_range);
    eval_result r = evaluate(*e, ds, 2, 2);
    EXPECT_EQ(r.sequences, 4);
    EXPECT_EQ(r.tokens, 4 * 32);
    std::vector<int64_t> buf(4 * 33);
    for (int64_t i = 0; i < 4; ++i) ds.eval_sequence(i, buf.data() + i * 33);
    at::Tensor tok = at::from_blob(buf.data(), {4, 33}, at::kLong).clone();
    double ref = reference_loss(*e, tok);
    EXPECT_NEAR(r.loss, ref, 1e-5 * std::abs(ref)) << engine::offload_mode_name(mode);
    EXPECT_NEAR(r.perplexity, std::exp(ref), 1e-4 * std::exp(ref));
    auto hr = e->evaluate(tok);   // the same batch through engine::evaluate in one pass
    EXPECT_NEAR(r.loss, hr.loss_sum / double(hr.n_targets), 1e-6 * std::abs(ref));
  }
}

// Greedy decoding with the KV cache equals the argmax of full-sequence forwards, and its logits
// match at every step: unequal prompt lengths (per-row positions) and equal ones (shared position).
void check_greedy_against_full(const std::vector<int64_t>& lengths, const model::llama_config& cfg = tiny()) {
  auto e = make_engine(infer_options(engine::offload_mode::offload_overlapped), cfg, k_weights_seed, k_init_range);
  auto prompts = prompts_of(lengths, 11);
  generate_options g;
  g.max_new_tokens = 10;
  g.eos_id = -1;
  g.keep_logits = true;
  generate_result r = generate(*e, prompts, g);
  ASSERT_EQ(r.logits.size(), size_t(g.max_new_tokens));
  for (size_t b = 0; b < prompts.size(); ++b) {
    ASSERT_EQ(r.tokens[b].size(), size_t(g.max_new_tokens));
    std::vector<int64_t> seq = prompts[b];
    seq.insert(seq.end(), r.tokens[b].begin(), r.tokens[b].end());
    at::Tensor tok = at::tensor(seq, at::kLong).view({1, -1});
    at::Tensor full = full_forward_logits(*e, tok)[0];   // (T, V)
    const int64_t L = int64_t(prompts[b].size());
    for (int64_t s = 0; s < g.max_new_tokens; ++s) {
      at::Tensor ref = full[L - 1 + s];
      at::Tensor got = r.logits[size_t(s)][int64_t(b)];
      double diff = (ref - got).abs().max().item<double>();
      EXPECT_LT(diff, 1e-4) << "row " << b << " step " << s;
      EXPECT_EQ(ref.argmax().item<int64_t>(), r.tokens[b][size_t(s)]) << "row " << b << " step " << s;
    }
  }
}

TEST(infer, greedy_equals_full_forward_argmax_unequal_lengths) {
  FERRY_REQUIRE_DEVICE();
  check_greedy_against_full({5, 12, 2});
}

TEST(infer, greedy_equals_full_forward_argmax_equal_lengths) {
  FERRY_REQUIRE_DEVICE();
  check_greedy_against_full({7, 7, 7});
}

// Tied embeddings: the head reads the embedding's matrix (resident, or its copy in the streamed
// head slot). Every mode, training and inference engines, evaluates the fp64 reference's loss (whose
// head reads the embedding) and generates the same tokens and logits; greedy decoding with the KV
// cache equals the full forward's argmax.
TEST(infer, tied_embeddings_in_every_mode) {
  FERRY_REQUIRE_DEVICE();
  check_greedy_against_full({5, 12, 2}, tied());
  auto prompts = prompts_of({6, 3, 10}, 21);
  at::Tensor tok = at::randint(3, 300, {2, 25}, at::kLong);
  generate_result first;
  for (auto mode : k_modes) {
    for (bool forward_only : {false, true}) {
      SCOPED_TRACE(std::string(engine::offload_mode_name(mode)) + (forward_only ? " forward_only" : ""));
      auto e = make_engine(infer_options(mode, forward_only), tied(), k_weights_seed, k_init_range);
      ASSERT_EQ(e->params().find("lm_head.weight"), nullptr);
      const auto hr = e->evaluate(tok);
      const double ref = reference_loss(*e, tok);
      EXPECT_NEAR(hr.loss_sum / double(hr.n_targets), ref, 1e-5 * std::abs(ref));
      generate_options g;
      g.max_new_tokens = 6;
      g.eos_id = -1;
      g.keep_logits = true;
      generate_result r = generate(*e, prompts, g);
      if (first.tokens.empty()) {
        first = r;
        continue;
      }
      EXPECT_EQ(r.tokens, first.tokens);
      for (size_t s = 0; s < r.logits.size(); ++s)
        EXPECT_LE((r.logits[s] - first.logits[s]).abs().max().item<double>(), k_cuda ? 1e-5 : 0.0) << "step " << s;
    }
  }
}

TEST(infer, batch_does_not_change_a_rows_tokens) {
  FERRY_REQUIRE_DEVICE();
  auto e = make_engine(infer_options(engine::offload_mode::offload_blocked), tiny(), k_weights_seed, k_init_range);
  auto prompts = prompts_of({4, 9, 6}, 3);
  generate_options g;
  g.max_new_tokens = 8;
  g.eos_id = -1;
  generate_result all = generate(*e, prompts, g);
  for (size_t b = 0; b < prompts.size(); ++b) {
    generate_result one = generate(*e, {prompts[b]}, g);
    EXPECT_EQ(one.tokens[0], all.tokens[b]) << "row " << b;
  }
}

TEST(infer, sampling_with_a_seed_is_deterministic) {
  FERRY_REQUIRE_DEVICE();
  auto e = make_engine(infer_options(engine::offload_mode::offload_overlapped), tiny(), k_weights_seed, k_init_range);
  auto prompts = prompts_of({3, 8, 5}, 5);
  generate_options g;
  g.max_new_tokens = 16;
  g.eos_id = -1;
  g.sampling = {0.9, 40, 0.95, 42};
  generate_result a = generate(*e, prompts, g);
  generate_result b = generate(*e, prompts, g);
  EXPECT_EQ(a.tokens, b.tokens);
  g.sampling.seed = 43;
  generate_result c = generate(*e, prompts, g);
  EXPECT_NE(a.tokens, c.tokens);
  g.sampling = {0.0, 0, 1.0, 42};
  generate_result greedy = generate(*e, prompts, g);
  g.sampling = {1.0, 1, 1.0, 42};   // top-k 1 is greedy whatever the seed
  EXPECT_EQ(generate(*e, prompts, g).tokens, greedy.tokens);
  g.sampling = {1.0, 0, 1e-6, 9};   // so is a vanishing nucleus
  EXPECT_EQ(generate(*e, prompts, g).tokens, greedy.tokens);
}

// The stop tests' start: two rows generated greedily with nothing to stop them (12 new tokens each).
struct free_running {
  std::unique_ptr<engine::engine> e =
      make_engine(infer_options(engine::offload_mode::offload_none), tiny(), k_weights_seed, k_init_range);
  std::vector<std::vector<int64_t>> prompts = prompts_of({4, 6}, 9);
  generate_options g = [] {
    generate_options o;
    o.max_new_tokens = 12;
    o.eos_id = -1;
    return o;
  }();
  generate_result free_run = generate(*e, prompts, g);
};

TEST(infer, stops_at_eos_per_row) {
  FERRY_REQUIRE_DEVICE();
  free_running run;
  auto& [e, prompts, g, free_run] = run;
  g.eos_id = free_run.tokens[0][2];   // row 0 must stop at its third token
  generate_result r = generate(*e, prompts, g);
  ASSERT_EQ(r.tokens[0].size(), 3u);
  EXPECT_EQ(r.tokens[0].back(), g.eos_id);
  for (size_t i = 0; i < r.tokens[1].size(); ++i) EXPECT_EQ(r.tokens[1][i], free_run.tokens[1][i]);
}

// A chat template's end of turn: stop_ids end a row like EOS, each row at its own.
TEST(infer, stops_at_any_stop_id) {
  FERRY_REQUIRE_DEVICE();
  free_running run;
  auto& [e, prompts, g, free_run] = run;
  ASSERT_EQ(free_run.tokens[1].size(), 12u);
  g.stop_ids = {free_run.tokens[1][4], free_run.tokens[0][1]};
  generate_result r = generate(*e, prompts, g);
  // Each row ends at its first token that is one of them.
  for (int b = 0; b < 2; ++b) {
    const auto& f = free_run.tokens[size_t(b)];
    size_t stop = 0;
    while (std::find(g.stop_ids.begin(), g.stop_ids.end(), f[stop]) == g.stop_ids.end()) ++stop;
    ASSERT_EQ(r.tokens[size_t(b)].size(), stop + 1) << "row " << b;
    for (size_t i = 0; i <= stop; ++i) EXPECT_EQ(r.tokens[size_t(b)][i], f[i]);
  }
}

TEST(infer, offload_modes_give_identical_logits) {
  FERRY_REQUIRE_DEVICE();
  auto prompts = prompts_of({6, 3, 10}, 21);
  at::Tensor tok = at::randint(3, 300, {2, 25}, at::kLong);
  std::vector<at::Tensor> first_logits;
  std::vector<std::vector<int64_t>> first_tokens;
  double first_loss = 0;
  for (auto mode : k_modes) {
    auto e = make_engine(infer_options(mode), tiny(), k_weights_seed, k_init_range);
    generate_options g;
    g.max_new_tokens = 6;
    g.eos_id = -1;
    g.keep_logits = true;
    generate_result r = generate(*e, prompts, g);
    auto hr = e->evaluate(tok);
    at::Tensor full = full_forward_logits(*e, tok.narrow(1, 0, 24));
    if (mode == engine::offload_mode::offload_none) {
      first_logits = r.logits;
      first_logits.push_back(full);
      first_tokens = r.tokens;
      first_loss = hr.loss_sum;
      continue;
    }
    EXPECT_EQ(r.tokens, first_tokens) << engine::offload_mode_name(mode);
    EXPECT_EQ(hr.loss_sum, first_loss) << engine::offload_mode_name(mode);
    for (size_t s = 0; s < r.logits.size(); ++s)
      EXPECT_TRUE(at::equal(r.logits[s], first_logits[s]))
          << engine::offload_mode_name(mode) << " step " << s << " max diff "
          << (r.logits[s] - first_logits[s]).abs().max().item<double>();
    EXPECT_TRUE(at::equal(full, first_logits.back())) << engine::offload_mode_name(mode) << " full forward";
  }
}

// An inference engine (no gradients or optimizer state) generates and evaluates exactly as a
// training engine does, in every mode.
TEST(infer, forward_only_engine_equals_training_engine) {
  FERRY_REQUIRE_DEVICE();
  at::Tensor tok = at::randint(3, 300, {2, 25}, at::kLong);
  for (auto mode : k_modes) {
    SCOPED_TRACE(engine::offload_mode_name(mode));
    auto train = make_engine(infer_options(mode), tiny(), k_weights_seed, k_init_range);
    auto infer = make_engine(infer_options(mode, /*forward_only=*/true), tiny(), k_weights_seed, k_init_range);
    ASSERT_FALSE(infer->params().has_optimizer_state());
    EXPECT_EQ(infer->plan().grad_slots, 0);
    EXPECT_EQ(infer->plan().host_moments, 0);
    for (const auto& lengths : {std::vector<int64_t>{6, 3, 10}, std::vector<int64_t>{5, 5}}) {
      auto prompts = prompts_of(lengths, 21);
      generate_options g;
      g.max_new_tokens = 6;
      g.eos_id = -1;
      g.keep_logits = true;
      generate_result want = generate(*train, prompts, g), got = generate(*infer, prompts, g);
      EXPECT_EQ(got.tokens, want.tokens);
      ASSERT_EQ(got.logits.size(), want.logits.size());
      for (size_t s = 0; s < got.logits.size(); ++s) {
        const double diff = (got.logits[s] - want.logits[s]).abs().max().item<double>();
        EXPECT_LE(diff, k_cuda ? 1e-5 : 0.0) << "step " << s;
      }
    }
    auto a = infer->evaluate(tok), b = train->evaluate(tok);
    EXPECT_EQ(a.n_targets, b.n_targets);
    EXPECT_NEAR(a.loss_sum, b.loss_sum, k_cuda ? 1e-6 * std::abs(b.loss_sum) : 0.0);
  }
}

// The inference forward in chunks of a few tokens (prefill, evaluation, the full-forward
// reference) gives what one chunk gives.
TEST(infer, chunked_forward_equals_one_chunk) {
  FERRY_REQUIRE_DEVICE();
  auto e = make_engine(infer_options(engine::offload_mode::offload_overlapped, /*forward_only=*/true), tiny(),
                       k_weights_seed, k_init_range);
  auto prompts = prompts_of({9, 4, 12}, 5);
  at::Tensor tok = at::randint(3, 300, {3, 21}, at::kLong);
  generate_options g;
  g.max_new_tokens = 5;
  g.eos_id = -1;
  g.keep_logits = true;
  generate_result one = generate(*e, prompts, g);
  auto loss_one = e->evaluate(tok);
  at::Tensor full_one = full_forward_logits(*e, tok);
  const int64_t old = model::block_set_forward_chunk_rows(4);   // 1 or 4 time steps at a time
  generate_result many = generate(*e, prompts, g);
  auto loss_many = e->evaluate(tok);
  at::Tensor full_many = full_forward_logits(*e, tok);
  model::block_set_forward_chunk_rows(old);
  EXPECT_EQ(many.tokens, one.tokens);
  for (size_t s = 0; s < one.logits.size(); ++s)
    EXPECT_LT((many.logits[s] - one.logits[s]).abs().max().item<double>(), 1e-4) << "step " << s;
  EXPECT_NEAR(loss_many.loss_sum, loss_one.loss_sum, 1e-5 * std::abs(loss_one.loss_sum));
  EXPECT_LT((full_many - full_one).abs().max().item<double>(), 1e-4);
}

TEST(infer, clear_errors) {
  FERRY_REQUIRE_DEVICE();
  auto e = make_engine(infer_options(engine::offload_mode::offload_overlapped), tiny(), k_weights_seed, k_init_range);
  generate_options g;
  g.max_new_tokens = 8;
  // 125 + 8 positions > the rotary table (max(max_seq 64, max_position_embeddings 128)).
  EXPECT_THROW(generate(*e, prompts_of({125}, 1), g), ferry::error);

  io::run_config cfg;
  cfg.max_length = 16;
  cfg.prompt = std::string(40, 'a');
  auto tok = io::make_tokenizer("byte");
  EXPECT_THROW(load_prompts(cfg, *tok, nullptr), ferry::config_error);
  cfg.prompt = "short";
  EXPECT_EQ(load_prompts(cfg, *tok, nullptr)[0].size(), 6u);   // BOS + 5 bytes

  temp_dir dir;
  io::run_config tc;
  tc.init = dir.path;
  std::ofstream(dir.path + "/tokenizer.json") << "{}";
  EXPECT_THROW(resolve_tokenizer(tc, tiny()), ferry::error);   // the directory's tokenizer.json, unreadable
  // A tokenizer.json without BOS (a single byte-level piece "a"): prompts start at the text, and
  // an empty prompt has nothing to start from.
  std::ofstream(dir.path + "/tokenizer.json")
      << R"({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": []}})";
  EXPECT_EQ(resolve_tokenizer(tc, tiny()), dir.path + "/tokenizer.json");
  auto no_bos = io::make_tokenizer(dir.path + "/tokenizer.json");
  ASSERT_EQ(no_bos->bos_id(), -1);
  cfg.prompt = "ab";
  EXPECT_EQ(load_prompts(cfg, *no_bos, nullptr)[0], (std::vector<int64_t>{0, 1}));
  cfg.prompt = "zz";  // no piece for 'z' and no unknown token: no ids at all
  EXPECT_THROW(load_prompts(cfg, *no_bos, nullptr), ferry::config_error);
  std::remove((dir.path + "/tokenizer.json").c_str());
  tc.tokenizer = dir.path + "/missing.model";
  tc.explicit_keys.push_back("tokenizer");
  EXPECT_THROW(resolve_tokenizer(tc, tiny()), ferry::config_error);
  model::llama_config small = tiny();
  small.vocab_size = 100;
  io::run_config bc;
  EXPECT_THROW(resolve_tokenizer(bc, small), ferry::config_error);    // byte needs 259 ids
}

void save_weights(engine::engine& e, const std::string& dir) {
  std::vector<io::named_f32> tensors;
  for (const auto& p : e.params().named_params())
    tensors.push_back({p.name, p.shape, e.params().master_view(p).data_ptr<float>()});
  io::write_hf_checkpoint(dir, e.config(), tensors, "F32");
}

// Untied and tied (no lm_head.weight in the file, tie_word_embeddings in config.json).
TEST(infer, checkpoint_round_trip_gives_the_saved_weights_and_logits) {
  FERRY_REQUIRE_DEVICE();
  for (const auto& cfg : {tiny(), tied()}) {
    SCOPED_TRACE(cfg.name);
    temp_dir dir;
    auto e = make_engine(infer_options(engine::offload_mode::offload_blocked), cfg, k_weights_seed, k_init_range);
    save_weights(*e, dir.path);
    auto loaded = make_engine(infer_options(engine::offload_mode::offload_blocked), io::load_hf_config(dir.path),
                              k_weights_seed, k_init_range);
    // Other weights first (make_engine's seed would give the saved ones): only the load can match.
    loaded->params().init_random(8, k_init_range);
    checkpoint::load_hf_weights(*loaded, dir.path);
    loaded->params_changed();
    const auto want = e->params().named_params(), got = loaded->params().named_params();
    ASSERT_EQ(got.size(), want.size());
    for (size_t i = 0; i < want.size(); ++i) {
      ASSERT_EQ(got[i].name, want[i].name);
      ASSERT_EQ(got[i].shape, want[i].shape) << want[i].name;
      // F32 on disk: bit for bit.
      EXPECT_TRUE(at::equal(loaded->params().master_view(got[i]), e->params().master_view(want[i])))
          << want[i].name << " differs after the round trip";
    }
    at::Tensor tok = at::randint(3, 300, {2, 17}, at::kLong);
    EXPECT_TRUE(at::equal(full_forward_logits(*loaded, tok), full_forward_logits(*e, tok))) << "logits after loading";
    EXPECT_EQ(io::hf_checkpoint_reader(dir.path).contains("lm_head.weight"), !cfg.tie_word_embeddings);
    EXPECT_EQ(io::load_hf_config(dir.path).tie_word_embeddings, cfg.tie_word_embeddings);
  }
}

TEST(infer, checkpoint_that_does_not_match_its_config_is_refused) {
  FERRY_REQUIRE_DEVICE();
  temp_dir dir;
  auto e = make_engine(infer_options(engine::offload_mode::offload_blocked), tiny(), k_weights_seed, k_init_range);
  save_weights(*e, dir.path);
  model::llama_config other = tiny();
  other.intermediate_size = 48;
  io::save_hf_config(other, dir.path + "/config.json");
  auto mismatched = make_engine(infer_options(engine::offload_mode::offload_blocked), io::load_hf_config(dir.path),
                                k_weights_seed, k_init_range);
  EXPECT_THROW(checkpoint::load_hf_weights(*mismatched, dir.path), ferry::error);
}

}  // namespace
}  // namespace ferry::infer
