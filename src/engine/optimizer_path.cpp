#include "src/engine/optimizer_path.h"

#include <ATen/ATen.h>

#include <cstring>

#include "src/common/error.h"
#if FERRY_WITH_CUDA
#include "gpu/ops.h"
#endif

namespace ferry::engine {

optimizer_path::optimizer_path(const engine_options& opt, backend& dev, param_store& store, gradient_path& grads,
                               weight_pool& pool)
    : opt_(opt), dev_(dev), store_(store), grads_(grads), pool_(pool) {
  adam_ = std::make_unique<cpu_optim::adamw>(opt.cpu_threads);
  const bool none = opt.mode == offload_mode::offload_none;
  if (!none && opt.resident_blocks == 0) return;
  // The device AdamW keeps fp32 moments (check_options refuses another kind with offload none or
  // resident blocks).
  FERRY_ASSERT(store.state().kind() == state_kind::state_fp32, "resident optimizer state over a ",
               state_kind_name(store.state().kind()), " state tier");
  if (!none && !dev.is_cuda()) resident_adam_ = std::make_unique<cpu_optim::adamw>(1);
  auto f32 = at::TensorOptions().dtype(at::kFloat).device(dev.device());
  master_.resize(size_t(store.num_units()));
  m_.resize(size_t(store.num_units()));
  v_.resize(size_t(store.num_units()));
  for (int64_t u = 0; u < store.num_units(); ++u) {
    if (!pool.is_resident(u)) continue;
    const int64_t n = store.unit(u).numel;
    master_[size_t(u)] = at::empty({n}, f32);
    m_[size_t(u)] = at::zeros({n}, f32);
    v_[size_t(u)] = at::zeros({n}, f32);
  }
}

optimizer_path::~optimizer_path() = default;

cpu_optim::chunk_ref optimizer_path::chunk(int64_t u, const state_view& s) const {
  const host_grad g = grads_.host(u);
  cpu_optim::chunk_ref c;
  c.param = s.master;
  c.m = s.exp_avg;
  c.v = s.exp_avg_sq;
  c.moments = s.moments;
  c.m_scale = s.m_scale;
  c.v_scale = s.v_scale;
  c.seed = s.seed;
  c.grad = g.data;
  c.grad_dtype = g.dtype;
  c.grad_acc = g.acc;
  c.half_out = opt_.dtype == at::kFloat ? nullptr : shadow_shard(u);
  c.half_dtype = to_optim_dtype(opt_.dtype);
  c.n = size_t(s.n);
  return c;
}

// This rank's part of unit u's shadow (the whole shadow with one rank).
void* optimizer_path::shadow_shard(int64_t u) const {
  return static_cast<char*>(store_.shadow(u)) + store_.shard_begin(u) * int64_t(c10::elementSize(opt_.dtype));
}

// After the shard's update: fp32 runs refresh the device-bound shadow from the master (AdamW wrote
// no half copy); with ranks, the other ranks' shards are gathered into the shadow.
void optimizer_path::publish(int64_t u, const state_view& s) {
  if (opt_.dtype == at::kFloat)
    cpu_optim::convert(s.master, cpu_optim::dtype::dtype_f32, shadow_shard(u), cpu_optim::dtype::dtype_f32, size_t(s.n));
  store_.publish_shadow(u, comm_channel::channel_update);
}

// publish() of the elements [b, e) alone, one rank: fp32 runs copy them from the master to the
// shadow; with a half compute dtype AdamW wrote them there.
void optimizer_path::publish_range(int64_t u, const state_view& s, size_t b, size_t e) {
  if (opt_.dtype == at::kFloat)
    std::memcpy(static_cast<float*>(shadow_shard(u)) + b, s.master + b, (e - b) * sizeof(float));
}

void optimizer_path::republish(int64_t u) { store_.publish_shadow(u, comm_channel::channel_update); }

cpu_optim::grad_stats optimizer_path::stats(int64_t u, double mult) {
  const host_grad g = grads_.host(u);
  return adam_->stats(g.data, g.dtype, size_t(store_.shard_numel(u)), float(mult), g.acc);
}

cpu_optim::grad_stats optimizer_path::stats_of(const void* grad, cpu_optim::dtype dtype, size_t n, double mult) {
  return adam_->stats(grad, dtype, n, float(mult));
}

cpu_optim::grad_stats optimizer_path::step(int64_t u, double mult, const cpu_optim::adamw_hparams& hp, int64_t step,
                                           cpu_optim::undo_log* log, bool finite_known) {
  state_lease s(store_.state(), u, true);
  cpu_optim::grad_stats st = adam_->step(chunk(u, *s), hp, step, float(mult), log, finite_known);
  publish(u, *s);
  return st;
}

void optimizer_path::step_ranges(int64_t u, double mult, const cpu_optim::adamw_hparams& hp, int64_t step,
                                 const std::vector<std::pair<size_t, size_t>>& ranges) {
  FERRY_ASSERT(!store_.shards().sharded(), "optimizer_path::step_ranges with ranks");
  state_lease s(store_.state(), u, true);
  adam_->step_ranges(chunk(u, *s), hp, step, float(mult), ranges);
  for (const auto& [b, e] : ranges) publish_range(u, *s, b, e);
}

void optimizer_path::step_part(int64_t u, double mult, const cpu_optim::adamw_hparams& hp, int64_t step,
                               cpu_optim::undo_log* log, int64_t part, int64_t parts) {
  FERRY_ASSERT(!store_.shards().sharded(), "optimizer_path::step_part with ranks");
  state_lease s(store_.state(), u, true);
  adam_->step_part(chunk(u, *s), hp, step, float(mult), log, size_t(part), size_t(parts));
  const auto [b, e] = adam_->part_range(size_t(s->n), size_t(part), size_t(parts));
  publish_range(u, *s, b, e);
}

void optimizer_path::undo(int64_t u, double mult, const cpu_optim::adamw_hparams& hp, int64_t step,
                          const cpu_optim::undo_log& log) {
  state_lease s(store_.state(), u, true);
  adam_->undo(chunk(u, *s), hp, step, float(mult), &log);
  publish(u, *s);
}

void optimizer_path::redo(int64_t u, double old_mult, double new_mult, const cpu_optim::adamw_hparams& hp, int64_t step,
                          const cpu_optim::undo_log& log) {
  state_lease s(store_.state(), u, true);
  adam_->redo(chunk(u, *s), hp, step, float(old_mult), float(new_mult), &log);
  publish(u, *s);
}

cpu_optim::grad_stats optimizer_path::resident_stats(double mult) {
  cpu_optim::grad_stats total;
#if FERRY_WITH_CUDA
  if (dev_.is_cuda()) {
    at::Tensor acc = at::zeros({2}, at::TensorOptions().dtype(at::kFloat).device(dev_.device()));
    for (int64_t u = 0; u < store_.num_units(); ++u) gpu::grad_stats_accumulate(grads_.resident_grad(u), acc);
    at::Tensor host = acc.to(at::kCPU);
    total.sum_sq = double(host[0].item<float>()) * mult * mult;
    total.nonfinite = int64_t(host[1].item<float>());
    return total;
  }
#endif
  // The host backend: the units' statistics in order, summed (the same kernel and threads).
  for (const cpu_optim::grad_stats& s : resident_unit_stats(mult)) {
    total.sum_sq += s.sum_sq;
    total.nonfinite += s.nonfinite;
  }
  return total;
}

std::vector<cpu_optim::grad_stats> optimizer_path::resident_unit_stats(double mult) {
  std::vector<cpu_optim::grad_stats> out(size_t(store_.num_units()));
#if FERRY_WITH_CUDA
  if (dev_.is_cuda()) {
    // Two floats per unit (gpu::grad_stats_accumulate: fp32 squares summed in a fixed order), one
    // copy to the host for all of them.
    at::Tensor acc = at::zeros({2 * store_.num_units()}, at::TensorOptions().dtype(at::kFloat).device(dev_.device()));
    for (int64_t u = 0; u < store_.num_units(); ++u)
      if (grads_.is_resident(u)) {
        at::Tensor pair = acc.narrow(0, 2 * u, 2);
        gpu::grad_stats_accumulate(grads_.resident_grad(u), pair);
      }
    const at::Tensor host = acc.to(at::kCPU);
    const float* f = host.data_ptr<float>();
    for (int64_t u = 0; u < store_.num_units(); ++u) {
      out[size_t(u)].sum_sq = double(f[2 * u]) * mult * mult;
      out[size_t(u)].nonfinite = int64_t(f[2 * u + 1]);
    }
    return out;
  }
#endif
  // The host backend: the function the offloaded units' statistics use (stats_of), so a resident
  // unit's are the bits it would have had offloaded.
  for (int64_t u = 0; u < store_.num_units(); ++u) {
    if (!grads_.is_resident(u)) continue;
    const at::Tensor& g = grads_.resident_grad(u);
    out[size_t(u)] = resident_adam().stats(g.data_ptr(), to_optim_dtype(opt_.dtype), size_t(g.numel()), float(mult));
  }
  return out;
}

void optimizer_path::resident_step(int64_t u, double mult, const cpu_optim::adamw_hparams& hp, int64_t step) {
  at::Tensor& half = pool_.resident(u);
  at::Tensor& grad = grads_.resident_grad(u);
#if FERRY_WITH_CUDA
  if (dev_.is_cuda()) {
    // The kernel writes a half/bf16 copy; in fp32 compute the weights are the master copy.
    at::Tensor half_out = opt_.dtype == at::kFloat ? at::Tensor() : half;
    gpu::adamw_step(master_[size_t(u)], m_[size_t(u)], v_[size_t(u)], grad, half_out, hp.lr, hp.beta1, hp.beta2, hp.eps,
                    hp.weight_decay, step, mult);
    if (opt_.dtype == at::kFloat) half.copy_(master_[size_t(u)]);
    return;
  }
#endif
  cpu_optim::chunk_ref c{master_[size_t(u)].data_ptr<float>(), m_[size_t(u)].data_ptr<float>(), v_[size_t(u)].data_ptr<float>(),
                         grad.data_ptr(), to_optim_dtype(opt_.dtype), opt_.dtype == at::kFloat ? nullptr : half.data_ptr(),
                         to_optim_dtype(opt_.dtype), size_t(master_[size_t(u)].numel())};
  resident_adam().step(c, hp, step, float(mult));
  if (opt_.dtype == at::kFloat) half.copy_(master_[size_t(u)]);
}

void optimizer_path::upload() {
  for (int64_t u = 0; u < int64_t(master_.size()); ++u) {
    if (!master_[size_t(u)].defined()) continue;
    state_lease s(store_.state(), u, false);
    auto cpu = [&](float* p) { return at::from_blob(p, {s->n}, at::TensorOptions().dtype(at::kFloat)); };
    master_[size_t(u)].copy_(cpu(s->master));
    m_[size_t(u)].copy_(cpu(exp_avg_f32(*s)));
    v_[size_t(u)].copy_(cpu(exp_avg_sq_f32(*s)));
  }
}

void optimizer_path::download() {
  for (int64_t u = 0; u < int64_t(master_.size()); ++u) {
    if (!master_[size_t(u)].defined()) continue;
    state_lease s(store_.state(), u, true);
    auto cpu = [&](float* p) { return at::from_blob(p, {s->n}, at::TensorOptions().dtype(at::kFloat)); };
    cpu(s->master).copy_(master_[size_t(u)]);
    cpu(exp_avg_f32(*s)).copy_(m_[size_t(u)]);
    cpu(exp_avg_sq_f32(*s)).copy_(v_[size_t(u)]);
  }
}

}  // namespace ferry::engine
