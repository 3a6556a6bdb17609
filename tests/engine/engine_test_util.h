#pragma once
// Shared by the engine suites. engine_test.cpp is compiled twice: for the host backend (label
// cpu, engine_options::cuda = false) and, with FERRY_TEST_CUDA=1, for CUDA (label gpu, skipped
// where no device exists). The reference is always a libtorch-autograd composition of the same
// model in fp64 on the CPU (tests/model/model_test_ref.h), trained with torch::optim::AdamW,
// torch::nn::utils::clip_grad_norm_ and a GradScaler emulation.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "src/engine/engine.h"
#include "src/model/llama_config.h"
#include "tests/cuda_suite.h"
#include "tests/test_configs.h"

namespace ferry::engine::test {

using ::ferry::test::k_cuda_suite;

// The brief's tiny shape: odd vocabulary, GQA (2 query heads per kv head), head_dim 16.
inline model::llama_config tiny_config() {
  // vocab, hidden, intermediate, layers, heads, kv_heads, head_dim, max_positions, rms_norm_eps
  return ::ferry::test::tiny_llama("engine-test", {97, 64, 96, 3, 4, 2, 16, 64, 1e-5});
}

// The same shape with tied input and output embeddings (Llama 3.2's tie_word_embeddings), four
// query heads per kv head and head_dim 24, so heads * head_dim (96) != hidden_size (64).
inline model::llama_config tied_config() {
  model::llama_config c = tiny_config();
  c.name = "engine-tied-test";
  c.tie_word_embeddings = true;
  c.num_key_value_heads = 1;
  c.head_dim = 24;
  return c;
}

constexpr int64_t k_batch = 2, k_seq = 16;

// prefetch 1 gives two block slots for three layers, so the schedule evicts and reloads.
inline engine_options base_options(offload_mode m, at::ScalarType dtype) {
  engine_options o;
  o.mode = m;
  o.dtype = dtype;
  o.cuda = k_cuda_suite;
  o.strict_host_backend = true;   // the CPU build: copies complete only when waited for (backend_strict.cpp)
  o.prefetch = 1;
  o.cpu_threads = 1;
  // Deferred updates in parts (engine_options::update_part): the tiny model's blocks (two of the
  // AdamW's 16384-element blocks) in four parts, two of them empty.
  o.update_part = 10000;
  o.speculate = speculate_mode::speculate_on;
  o.beta1 = 0.9;
  o.beta2 = 0.95;
  o.eps = 1e-8;
  o.weight_decay = 0.1;
  o.clip_grad = 0;
  o.ce_chunk = 7;            // several loss chunks, the last one partial
  o.max_batch = k_batch;
  o.max_seq = k_seq;
  return o;
}

// step k's learning rate (a varying schedule, so a stale lr would show).
inline double lr_at(int64_t k) { return 2e-3 / double(1 + k); }

// One step's micro-batches, each (B, T+1) int64 on the CPU. Row 0's last label is -100, so rows
// have different target counts (normalisation over all targets is checked).
using step_data = std::vector<at::Tensor>;
inline at::Tensor random_tokens(int64_t B, int64_t T, int64_t vocab, uint64_t seed) {
  at::Generator gen = at::detail::createCPUGenerator(seed);
  at::Tensor t = at::randint(0, vocab, {B, T + 1}, gen, at::TensorOptions().dtype(at::kLong));
  t.index_put_({0, T}, -100);
  return t;
}
inline std::vector<step_data> make_data(int64_t steps, int64_t B = k_batch, int64_t T = k_seq, uint64_t seed = 7) {
  std::vector<step_data> d;
  for (int64_t k = 0; k < steps; ++k) d.push_back({random_tokens(B, T, tiny_config().vocab_size, seed * 1000 + k)});
  return d;
}

// What a run leaves: per-step results, final master weights and moments per unit (CPU clones).
// m, v hold the moments as stored (moments_copy): fp32 float; bf16 int16 bits; int8 int8 / uint8
// codes, with the int8 scales in m_scale, v_scale (empty tensors in the other kinds).
struct run_result {
  std::vector<step_result> steps;
  std::vector<at::Tensor> master, m, v, m_scale, v_scale;
};

// Unit u's moments as CPU tensor clones of their stored form (run_result's m, v, m_scale, v_scale).
struct unit_moments {
  at::Tensor m, v, m_scale, v_scale;
};
inline unit_moments moments_copy(param_store& ps, int64_t u) {
  state_lease s(ps.state(), u, false);
  auto blob = [](void* p, int64_t n, at::ScalarType t) {
    return at::from_blob(p, {n}, at::TensorOptions().dtype(t)).clone();
  };
  const int64_t n = s->n, blocks = int64_t(cpu_optim::quant_blocks(size_t(n)));
  unit_moments r;
  r.m_scale = at::empty({0}, at::kFloat);
  r.v_scale = at::empty({0}, at::kFloat);
  switch (s->moments) {
    case cpu_optim::moments_kind::f32:
      r.m = blob(s->exp_avg, n, at::kFloat);
      r.v = blob(s->exp_avg_sq, n, at::kFloat);
      break;
    case cpu_optim::moments_kind::bf16:
      r.m = blob(s->exp_avg, n, at::kShort);
      r.v = blob(s->exp_avg_sq, n, at::kShort);
      break;
    case cpu_optim::moments_kind::int8:
      r.m = blob(s->exp_avg, n, at::kChar);
      r.v = blob(s->exp_avg_sq, n, at::kByte);
      r.m_scale = blob(s->m_scale, blocks, at::kFloat);
      r.v_scale = blob(s->v_scale, blocks, at::kFloat);
      break;
  }
  return r;
}

constexpr uint64_t k_init_seed = 42;
constexpr double k_init_std = 0.05;

// The engine of the engine, checkpoint and infer suites: cfg under options o, its master weights
// HF-initialised by param_store::init_random(seed, init_std) and handed to the engine.
inline std::unique_ptr<engine> make_engine(const engine_options& o, const model::llama_config& cfg = tiny_config(),
                                           uint64_t seed = k_init_seed, double init_std = k_init_std) {
  // The host backend's "device" ops and the update thread's ATen ops would otherwise each bring an
  // OpenMP team to the CI's 2 cores, and spin-waiting teams slow the tiny model's steps tenfold.
  static const bool one_thread = (at::set_num_threads(1), true);
  (void)one_thread;
  auto e = std::make_unique<engine>(cfg, o);
  e->params().init_random(seed, init_std);
  e->params_changed();
  return e;
}

// Unit u's fp32 master weights, a CPU clone read through a lease (any tier, on disk too).
inline at::Tensor master_copy(param_store& ps, int64_t u) {
  state_lease s(ps.state(), u, false);
  return at::from_blob(s->master, {s->n}, at::TensorOptions().dtype(at::kFloat)).clone();
}

inline void snapshot(engine& e, run_result& r) {
  e.wait_updates();
  r.master.clear();
  r.m.clear();
  r.v.clear();
  r.m_scale.clear();
  r.v_scale.clear();
  for (int64_t u = 0; u < e.params().num_units(); ++u) {
    r.master.push_back(master_copy(e.params(), u));
    unit_moments mo = moments_copy(e.params(), u);
    r.m.push_back(mo.m);
    r.v.push_back(mo.v);
    r.m_scale.push_back(mo.m_scale);
    r.v_scale.push_back(mo.v_scale);
  }
}

// Unit u's moments decoded to fp32 (cpu_optim::decode_moments; the fp32 values themselves in fp32).
inline std::pair<at::Tensor, at::Tensor> decoded_moments(engine& e, int64_t u) {
  e.wait_updates();
  state_lease s(e.params().state(), u, false);
  at::Tensor m = at::empty({s->n}), v = at::empty({s->n});
  cpu_optim::decode_moments(moments_of(*s), m.data_ptr<float>(), v.data_ptr<float>());
  return {m, v};
}

// before(k, engine) runs before step k (0-based): parameter surgery for the injection tests.
// Each step is given the next one's batches, as the trainer gives them (train_step's `next`).
using step_hook = std::function<void(int64_t, engine&)>;
inline run_result run_engine(const engine_options& o, const std::vector<step_data>& data, const step_hook& before = {},
                             const model::llama_config& cfg = tiny_config()) {
  auto e = make_engine(o, cfg);
  run_result r;
  for (size_t k = 0; k < data.size(); ++k) {
    if (before) before(int64_t(k), *e);
    r.steps.push_back(e->train_step(data[k], lr_at(int64_t(k)), k + 1 < data.size() ? &data[k + 1] : nullptr));
  }
  snapshot(*e, r);
  return r;
}

// max over elements of |a - e| / (atol + rtol |e|); <= 1 means within the bound.
inline double bound_ratio(const at::Tensor& a, const at::Tensor& e, double atol, double rtol) {
  at::Tensor ad = a.to(at::kDouble), ed = e.to(at::kDouble);
  at::Tensor r = (ad - ed).abs() / (atol + rtol * ed.abs());
  return r.numel() ? r.max().item<double>() : 0.0;
}
inline double max_abs_diff(const at::Tensor& a, const at::Tensor& e) {
  return a.numel() ? (a.to(at::kDouble) - e.to(at::kDouble)).abs().max().item<double>() : 0.0;
}

// Reference model: fp64 autograd leaves initialised from an engine's master weights, HF order, of
// the store's shape. With tied embeddings there is no lm_head leaf: the head reads the embedding's,
// and autograd sums the gradients of both uses into it.
struct reference_model {
  model::llama_config cfg;
  std::vector<std::string> names;
  std::vector<at::Tensor> params;                // fp64 leaves, HF order (engine named_params order)
  std::map<std::string, at::Tensor> by_name;

  explicit reference_model(const param_store& store);
  // Summed cross-entropy of one (B, T+1) batch (fp64 scalar, with autograd).
  at::Tensor loss_sum(const at::Tensor& tokens) const;
};

struct reference_options {
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.1;
  double clip_grad = 0;
  bool scaler = false;                          // GradScaler emulation (fp16 runs)
  double scale = 65536.0, growth = 2.0, backoff = 0.5;
  int64_t window = 2000;
};
inline reference_options reference_options_for(const engine_options& o) {
  reference_options r;
  r.beta1 = o.beta1;
  r.beta2 = o.beta2;
  r.eps = o.eps;
  r.weight_decay = o.weight_decay;
  r.clip_grad = o.clip_grad;
  r.scaler = o.dtype == at::kHalf;
  r.scale = o.loss_scale;
  r.growth = o.scale_growth;
  r.backoff = o.scale_backoff;
  r.window = o.scale_window;
  return r;
}

struct reference_step {
  double loss = 0, grad_norm = 0, clip_coef = 1, loss_scale = 1;
  bool skipped = false;
};

// Where a (unit, element) of the engine's flat buffers lives among the reference's parameters.
struct param_pos {
  size_t param = 0;
  int64_t offset = 0;
};
param_pos locate(const param_store& store, int64_t unit, int64_t index);

// A poisoned gradient element (the reference side of engine_options::debug_poison_*).
struct poison {
  int64_t step = -1;   // 0-based step index, -1 off
  param_pos where;
  double value = 0;
};

// torch::optim::AdamW + clip_grad_norm_ + GradScaler emulation over the reference model.
class reference_trainer {
 public:
  reference_trainer(const param_store& store, const reference_options& o);
  ~reference_trainer();
  reference_step step(const step_data& micro_batches, double lr, const poison& p = {});
  reference_model& model() { return *model_; }
  int64_t steps_taken() const { return step_index_; }

 private:
  struct impl;
  std::unique_ptr<impl> impl_;
  std::unique_ptr<reference_model> model_;
  reference_options opt_;
  double scale_;
  int64_t good_ = 0, step_index_ = 0;
};

// The engine's final master weights as fp32 tensors by HF name, from a run_result's unit clones.
std::vector<at::Tensor> engine_params_from(const param_store& store, const run_result& r);

// ---- comparing runs (engine_test.cpp, engine_tied_test.cpp) ----

// "overlapped/spec-on float clip=0.05" and the like.
std::string mode_label(const engine_options& o);
engine_options with(engine_options o, speculate_mode s);

// Every unit's master, m and v bit-identical, and the same losses and skips.
void expect_bit_identical(const run_result& a, const run_result& b, const std::string& what);

// Two runs whose gradients differ by rounding (fp32: ~1e-6 relative; bf16/fp16: the forward is
// rounded to 2^-8 / 2^-11 at every stored activation). AdamW normalises each element's step by
// sqrt(v) + eps, so a gradient error dg moves p by about lr * dg / (|g| + eps) per step: tiny for
// most elements, but up to ~lr for the few whose gradient is itself at the rounding level (there
// the step's direction is noise). Hence two bounds on |dp|:
//   tight: atol + rtol |p|, which all but a small fraction of each tensor's elements must meet;
//   loose: every element within `loose` (a fraction of one step's lr, or a few steps for halves).
// The measured worst cases are printed.
struct trajectory_tol {
  double atol, rtol, frac, loose, loss, norm_rel;
  double update_model, update_norms;   // bounds of update_error (below)
};
// One tolerance for speculative and direct runs alike: with the undo log a redo restores m, v
// exactly where the new moments cannot (before it, speculative runs with clipping needed 3% of
// the elements outside the tight bound in fp32; now they show the direct runs' 0.1%).
trajectory_tol tolerance_for(at::ScalarType t);

// The element bounds above cannot see a systematic bug in half precision: over 5 steps no element
// moves more than sum(lr) ~ 2.3 lr0, under the loose bound, and the tight bound's 1% of |p| is 5 lr0
// for RMSNorm weights (~1). The whole update (p_final - p_init) can: its relative error
// ||dp_got - dp_want|| / ||dp_want||, over the whole model and per RMSNorm weight (the max).
// Measured, whole model / norms, 5 steps: correct runs fp32 2e-5 / 7e-5, fp16 0.03 / 0.008, bf16
// 0.07-0.08 / 0.05 on the CPU and 0.074 / 0.167 on an H100 (bf16 rounds the norm weights, ~1, to
// 2^-8 ~ 2 lr0, more than their 5-step update); in engine_reference.update_bounds_catch_real_bugs
// (weight decay 1): no bias correction 0.47 / 0.29, no weight decay 0.13-0.15 / 0.94, 1% of the
// elements never updated 0.10-0.12 / 0.16. The bounds sit between. got and want are by HF name
// (engine_params_from) of a model of shape cfg, initialised by make_engine.
struct update_error {
  double model = 0, norms = 0;
};
update_error update_error_of(const std::vector<at::Tensor>& got, const std::vector<at::Tensor>& want,
                             const model::llama_config& cfg = tiny_config());

// got vs want (same shapes): every element within tol.loose, at most tol.frac of them outside
// the tight bound. Returns the fraction outside the tight bound.
double expect_tensor_close(const at::Tensor& got, const at::Tensor& want, const trajectory_tol& tol, const std::string& what);
// Losses, skips and every unit's master weights of two runs within tol.
void expect_runs_close(const run_result& a, const run_result& b, const trajectory_tol& tol, const std::string& what);

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
struct ref_run {
  std::vector<reference_step> steps;
  std::vector<at::Tensor> params;
};
// The reference trained from make_engine's initial weights of a model of shape cfg.
ref_run run_reference(const engine_options& o, const std::vector<step_data>& data, const poison& p = {},
                      const model::llama_config& cfg = tiny_config());
void expect_matches_reference(const run_result& got, const ref_run& want, const engine_options& o, const std::string& what,
                              const model::llama_config& cfg = tiny_config());

}  // namespace ferry::engine::test
