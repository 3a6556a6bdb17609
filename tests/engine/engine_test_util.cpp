#include "tests/engine/engine_test_util.h"

#include <torch/nn/utils/clip_grad.h>
#include <torch/optim/adamw.h>

#include <cmath>

#include "tests/model/model_test_ref.h"

namespace ferry::engine::test {
namespace ref = ::ferry::model::test::ref;

reference_model::reference_model(const param_store& store) {
  for (const auto& np : store.named_params()) {
    at::Tensor t = store.master_view(np).to(at::kDouble).clone().requires_grad_(true);
    names.push_back(np.name);
    params.push_back(t);
    by_name[np.name] = t;
  }
}

at::Tensor reference_model::loss_sum(const at::Tensor& tokens) const {
  const int64_t B = tokens.size(0), T = tokens.size(1) - 1;
  const model::llama_config c = tiny_config();
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
  at::Tensor logits = at::matmul(xn, by_name.at("lm_head.weight").t());
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

}  // namespace ferry::engine::test
