#pragma once
// Shared by the engine suites. engine_test.cpp is compiled twice: for the host backend (label
// cpu, engine_options::cuda = false) and, with FERRY_TEST_CUDA=1, for CUDA (label gpu, skipped
// where no device exists). The reference is always a libtorch-autograd composition of the same
// model in fp64 on the CPU (tests/model/model_test_ref.h), trained with torch::optim::AdamW,
// torch::nn::utils::clip_grad_norm_ and a GradScaler emulation.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <gtest/gtest.h>

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
using step_hook = std::function<void(int64_t, engine&)>;
inline run_result run_engine(const engine_options& o, const std::vector<step_data>& data, const step_hook& before = {},
                             const model::llama_config& cfg = tiny_config()) {
  auto e = make_engine(o, cfg);
  run_result r;
  for (size_t k = 0; k < data.size(); ++k) {
    if (before) before(int64_t(k), *e);
    r.steps.push_back(e->train_step(data[k], lr_at(int64_t(k))));
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

// Reference model: fp64 autograd leaves initialised from an engine's master weights, HF order.
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

}  // namespace ferry::engine::test
