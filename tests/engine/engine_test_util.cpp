#include "tests/engine/engine_test_util.h"

#include <torch/nn/utils/clip_grad.h>
#include <torch/optim/adamw.h>

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "tests/model/model_test_ref.h"

namespace ferry::engine::test {
namespace ref = ::ferry::model::test::ref;

reference_model::reference_model(const param_store& store) : cfg(store.config()) {
  for (const auto& np : store.named_params()) {
    at::Tensor t = store.master_view(np).to(at::kDouble).clone().requires_grad_(true);
    names.push_back(np.name);
    params.push_back(t);
    by_name[np.name] = t;
  }
}

at::Tensor reference_model::loss_sum(const at::Tensor& tokens) const {
  const int64_t B = tokens.size(0), T = tokens.size(1) - 1;
  const model::llama_config& c = cfg;
  at::Tensor inputs = tokens.narrow(1, 0, T).contiguous();
  at::Tensor labels = tokens.narrow(1, 1, T).contiguous();
  at::Tensor x = by_name.at("model.embed_tokens.weight").index_select(0, inputs.reshape({-1})).view({B, T, -1});
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    ref::block_params bp{by_name.at(p + "input_layernorm.weight"),  by_name.at(p + "self_attn.q_proj.weight"),
                         by_name.at(p + "self_attn.k_proj.weight"), by_name.at(p + "self_attn.v_proj.weight"),
                         by_name.at(p + "self_attn.o_proj.weight"), by_name.at(p + "post_attention_layernorm.weight"),
                         by_name.at(p + "mlp.gate_proj.weight"),    by_name.at(p + "mlp.up_proj.weight"),
                         by_name.at(p + "mlp.down_proj.weight")};
    x = ref::block(x, bp, c);
  }
  at::Tensor xn = ref::rmsnorm(x, by_name.at("model.norm.weight"), c.rms_norm_eps);
  const char* lm = c.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight";
  at::Tensor logits = at::matmul(xn, by_name.at(lm).t());
  return ref::ce_sum(logits, labels);
}

param_pos locate(const param_store& store, int64_t unit, int64_t index) {
  auto named = store.named_params();
  for (size_t i = 0; i < named.size(); ++i)
    if (named[i].unit == unit && index >= named[i].offset && index < named[i].offset + named[i].numel)
      return {i, index - named[i].offset};
  ADD_FAILURE() << "no parameter holds unit " << unit << " element " << index;
  return {};
}

std::vector<at::Tensor> engine_params_from(const param_store& store, const run_result& r) {
  std::vector<at::Tensor> out;
  for (const auto& np : store.named_params()) {
    out.push_back(r.master[size_t(np.unit)].narrow(0, np.offset, np.numel).view(np.shape));
  }
  return out;
}

struct reference_trainer::impl {
  std::unique_ptr<torch::optim::AdamW> adam;
};

reference_trainer::reference_trainer(const param_store& store, const reference_options& o)
    : impl_(std::make_unique<impl>()), model_(std::make_unique<reference_model>(store)), opt_(o),
      scale_(o.scaler ? o.scale : 1.0) {
  impl_->adam = std::make_unique<torch::optim::AdamW>(
      model_->params, torch::optim::AdamWOptions(1e-3).betas({o.beta1, o.beta2}).eps(o.eps).weight_decay(o.weight_decay));
}

reference_trainer::~reference_trainer() = default;

// One step as a PyTorch AMP loop writes it: scaler.scale(loss).backward() per micro-batch with the
// loss normalised over all target tokens; scaler.unscale_; clip_grad_norm_; scaler.step (skipped
// on any non-finite gradient); scaler.update.
reference_step reference_trainer::step(const step_data& micro_batches, double lr, const poison& p) {
  reference_step r;
  r.loss_scale = scale_;
  int64_t targets = 0;
  for (const auto& mb : micro_batches) targets += mb.narrow(1, 1, mb.size(1) - 1).ne(-100).sum().item<int64_t>();
  for (auto& t : model_->params) t.mutable_grad() = at::Tensor();
  double loss_sum = 0;
  for (const auto& mb : micro_batches) {
    at::Tensor l = model_->loss_sum(mb);
    loss_sum += l.item<double>();
    (l * (scale_ / double(targets))).backward();
  }
  r.loss = loss_sum / double(targets);
  if (p.step == step_index_) {
    at::Tensor g = model_->params[p.where.param].mutable_grad();
    g.view({-1}).narrow(0, p.where.offset, 1).fill_(p.value);
  }
  bool found_inf = false;
  for (auto& t : model_->params) {
    at::Tensor g = t.mutable_grad();
    g.mul_(1.0 / scale_);  // powers of two: exact in fp64
    found_inf = found_inf || !at::isfinite(g).all().item<bool>();
  }
  r.skipped = found_inf;
  if (!found_inf) {
    double norm = 0;
    for (auto& t : model_->params) norm += t.grad().square().sum().item<double>();
    r.grad_norm = std::sqrt(norm);
    if (opt_.clip_grad > 0) {
      torch::nn::utils::clip_grad_norm_(model_->params, opt_.clip_grad);
      r.clip_coef = std::min(1.0, opt_.clip_grad / (r.grad_norm + 1e-6));
    }
    for (auto& g : impl_->adam->param_groups()) static_cast<torch::optim::AdamWOptions&>(g.options()).lr(lr);
    impl_->adam->step();
  } else {
    r.grad_norm = std::nan("");
  }
  if (opt_.scaler) {
    if (found_inf) {
      scale_ *= opt_.backoff;
      good_ = 0;
    } else if (++good_ >= opt_.window) {
      scale_ *= opt_.growth;
      good_ = 0;
    }
  }
  ++step_index_;
  return r;
}

// ---- comparing runs ----

std::string mode_label(const engine_options& o) {
  std::string s = offload_mode_name(o.mode);
  if (o.mode == offload_mode::offload_overlapped)
    s += o.speculate == speculate_mode::speculate_on ? "/spec-on" : o.speculate == speculate_mode::speculate_off ? "/spec-off" : "/spec-auto";
  return s + " " + c10::toString(o.dtype) + " clip=" + std::to_string(o.clip_grad);
}

engine_options with(engine_options o, speculate_mode s) {
  o.speculate = s;
  return o;
}

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
    EXPECT_TRUE(a.m_scale[u].equal(b.m_scale[u])) << what << " exp_avg scales, unit " << u;
    EXPECT_TRUE(a.v_scale[u].equal(b.v_scale[u])) << what << " exp_avg_sq scales, unit " << u;
  }
}

trajectory_tol tolerance_for(at::ScalarType t) {
  const double lr = lr_at(0);
  switch (t) {
    case at::kFloat: return {1e-4 * lr, 1e-5, 0.01, 0.05 * lr, 2e-5, 1e-4, 1e-3, 1e-3};
    case at::kHalf: return {0.02 * lr, 1e-3, 0.05, 4 * lr, 5e-3, 2e-2, 0.1, 0.05};
    default: return {0.1 * lr, 1e-2, 0.05, 6 * lr, 2e-2, 5e-2, 0.1, 0.35};
  }
}

update_error update_error_of(const std::vector<at::Tensor>& got, const std::vector<at::Tensor>& want,
                             const model::llama_config& cfg) {
  auto e = make_engine(base_options(offload_mode::offload_blocked, at::kFloat), cfg);
  run_result init;
  snapshot(*e, init);
  const auto p0 = engine_params_from(e->params(), init);
  const auto names = e->params().named_params();
  update_error r;
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    at::Tensor dg = got[i].to(at::kDouble) - p0[i].to(at::kDouble);
    at::Tensor dw = want[i].to(at::kDouble) - p0[i].to(at::kDouble);
    const double n2 = (dg - dw).pow(2).sum().item<double>(), d2 = dw.pow(2).sum().item<double>();
    num += n2;
    den += d2;
    if (names[i].name.find("norm") != std::string::npos) r.norms = std::max(r.norms, std::sqrt(n2 / d2));
  }
  r.model = std::sqrt(num / den);
  return r;
}

double expect_tensor_close(const at::Tensor& got, const at::Tensor& want, const trajectory_tol& tol, const std::string& what) {
  at::Tensor d = (got.to(at::kDouble) - want.to(at::kDouble)).abs();
  at::Tensor tight = tol.atol + tol.rtol * want.to(at::kDouble).abs();
  double outside = d.gt(tight).to(at::kDouble).mean().item<double>();
  double worst = d.max().item<double>();
  EXPECT_LE(worst, tol.loose) << what << ": max |dp| " << worst;
  EXPECT_LE(outside, tol.frac) << what << ": " << outside * 100 << "% of elements outside " << tol.atol << " + "
                               << tol.rtol << "|p| (max |dp| " << worst << ")";
  return outside;
}

void expect_runs_close(const run_result& a, const run_result& b, const trajectory_tol& tol, const std::string& what) {
  ASSERT_EQ(a.steps.size(), b.steps.size());
  for (size_t k = 0; k < a.steps.size(); ++k) {
    EXPECT_NEAR(a.steps[k].loss, b.steps[k].loss, tol.loss) << what << " step " << k;
    EXPECT_EQ(a.steps[k].skipped, b.steps[k].skipped) << what << " step " << k;
  }
  double worst_frac = 0, worst_abs = 0;
  for (size_t u = 0; u < a.master.size(); ++u) {
    worst_frac = std::max(worst_frac, expect_tensor_close(a.master[u], b.master[u], tol, what + " unit " + std::to_string(u)));
    worst_abs = std::max(worst_abs, max_abs_diff(a.master[u], b.master[u]));
  }
  std::printf("  [%s] max |dp| %.3g (%.3g lr0), %.3g%% outside the tight bound\n", what.c_str(), worst_abs,
              worst_abs / lr_at(0), worst_frac * 100);
}

ref_run run_reference(const engine_options& o, const std::vector<step_data>& data, const poison& p,
                      const model::llama_config& cfg) {
  auto e = make_engine(base_options(offload_mode::offload_blocked, at::kFloat), cfg);   // only for the initial weights
  reference_trainer t(e->params(), reference_options_for(o));
  ref_run r;
  for (size_t k = 0; k < data.size(); ++k) r.steps.push_back(t.step(data[k], lr_at(int64_t(k)), p));
  for (auto& x : t.model().params) r.params.push_back(x.detach().clone());
  return r;
}

void expect_matches_reference(const run_result& got, const ref_run& want, const engine_options& o, const std::string& what,
                              const model::llama_config& cfg) {
  auto tol = tolerance_for(o.dtype);
  auto e = make_engine(base_options(offload_mode::offload_blocked, at::kFloat), cfg);
  ASSERT_EQ(got.steps.size(), want.steps.size());
  for (size_t k = 0; k < got.steps.size(); ++k) {
    const step_result& g = got.steps[k];
    const reference_step& w = want.steps[k];
    SCOPED_TRACE(what + " step " + std::to_string(k));
    EXPECT_EQ(g.skipped, w.skipped);
    EXPECT_EQ(g.loss_scale, w.loss_scale);
    if (std::isfinite(w.loss)) {
      EXPECT_NEAR(g.loss, w.loss, tol.loss);
    }
    if (!w.skipped) {
      EXPECT_NEAR(g.grad_norm, w.grad_norm, tol.norm_rel * w.grad_norm);
      EXPECT_NEAR(g.clip_coef, w.clip_coef, tol.norm_rel);
    }
  }
  auto params = engine_params_from(e->params(), got);
  auto names = e->params().named_params();
  double worst_frac = 0, worst_abs = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    worst_frac = std::max(worst_frac, expect_tensor_close(params[i], want.params[i], tol, what + " " + names[i].name));
    worst_abs = std::max(worst_abs, max_abs_diff(params[i], want.params[i]));
  }
  const update_error ue = update_error_of(params, want.params, cfg);
  EXPECT_LE(ue.model, tol.update_model) << what << ": relative error of the whole update";
  EXPECT_LE(ue.norms, tol.update_norms) << what << ": relative error of an RMSNorm weight's update";
  std::printf("  [%s] vs reference: max |dp| %.3g (%.3g lr0), %.3g%% outside the tight bound; update error %.3g, norms %.3g\n",
              what.c_str(), worst_abs, worst_abs / lr_at(0), worst_frac * 100, ue.model, ue.norms);
}

}  // namespace ferry::engine::test
