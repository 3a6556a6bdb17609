#include "src/engine/gradient_path.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "src/common/error.h"
#include "src/engine/backend_util.h"
#include "src/engine/trace.h"
#include "src/model/embed_head.h"
#if FERRY_WITH_CUDA
#include "gpu/ops.h"
#endif

namespace ferry::engine {

cpu_optim::dtype to_optim_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return cpu_optim::dtype::dtype_f16;
    case at::kBFloat16: return cpu_optim::dtype::dtype_bf16;
    case at::kFloat: return cpu_optim::dtype::dtype_f32;
    default: FERRY_ASSERT(false, "unsupported compute dtype ", t);
  }
  return cpu_optim::dtype::dtype_f32;
}

gradient_path::gradient_path(const model::llama_config& cfg, const engine_options& opt, backend& dev,
                             param_store& store, update_worker& worker, step_meter& meter, int64_t micro_group)
    : cfg_(cfg), opt_(opt), dev_(dev), store_(store), worker_(worker), meter_(meter) {
  auto dev_opts = at::TensorOptions().dtype(opt.dtype).device(dev.device());
  slot_of_.assign(size_t(store.num_units()), nullptr);
  accum_.assign(size_t(store.num_units()), nullptr);
  fused_.assign(size_t(store.num_units()), 0);
  src_sent_.assign(size_t(store.num_units()), 0);
  src_host_stats_.assign(size_t(store.num_units()), {});
  resident_.resize(size_t(store.num_units()));
  for (int64_t u = 0; u < store.num_units(); ++u)
    if (unit_resident(opt, u, store.num_units())) resident_[size_t(u)] = at::empty({store.unit(u).numel}, dev_opts);
  if (opt.mode == offload_mode::offload_none) {
    all_resident_ = true;
    return;
  }
  const shard_layout& sh = store.shards();
  // The store's shard_grads say which units are reduced where they were made (its host buffers
  // hold only their shards); they must be what the options ask for.
  for (int64_t u = 0; u < store.num_units(); ++u) {
    FERRY_ASSERT(store.grad_sharded(u) == unit_reduced_on_device(opt, cfg.tie_word_embeddings, u, store.num_units()),
                 "gradient_path: unit ", u, "'s gradient buffer is ", store.grad_sharded(u) ? "a shard" : "whole",
                 " but the options reduce it ", store.grad_sharded(u) ? "on the host" : "on the device",
                 " (build the store with units_reduced_on_device)");
  }
  // A slot whose units are reduce-scattered where they were made is padded to the ranks' equal
  // blocks (zeros the backward never writes) and has a buffer for this rank's block of the sum.
  auto make_slot = [&](int64_t n, bool reduced) {
    if (!reduced) return slot{at::empty({n}, dev_opts), nullptr, at::Tensor()};
    return slot{at::zeros({sh.padded(n)}, dev_opts), nullptr, at::empty({sh.per(n)}, dev_opts)};
  };
  for (int i = 0; i < 2; ++i) block_slots_.push_back(make_slot(cfg.block_params(), store.grad_sharded(1)));
  head_slot_ = make_slot(cfg.head_slot_params(), store.grad_sharded(store.head_unit()));
  if (micro_group > 1)
    group_sum_ = at::empty({std::max(cfg.block_params(), cfg.head_slot_params())}, dev_opts.dtype(at::kFloat));
  if (store.grad_sharded(store.embed_unit())) {
    // The embedding's fp32 gradient on the device, padded to the ranks' blocks (zeros past the
    // table), and this rank's block of its sum over the ranks; one rank: the table is its block.
    const int64_t n = cfg.embed_params();
    embed_grad_ = at::zeros({sh.padded(n)}, dev_opts.dtype(at::kFloat));
    embed_shard_ = sh.sharded() ? at::empty({sh.per(n)}, dev_opts.dtype(at::kFloat)) : embed_grad_;
  }
  // Summed on the host: pinned staging of the input gradient's rows.
  for (int64_t j = 0; j < (embed_grad_.defined() ? 0 : std::max<int64_t>(1, micro_group)); ++j)
    embed_out_.push_back(
        dev.host_alloc(size_t(opt.max_batch * opt.max_seq * cfg.hidden_size) * c10::elementSize(opt.dtype)));
  if (dev.is_cuda() && !sh.sharded()) {
    src_dev_ = at::zeros({2 * store.num_units()}, dev_opts.dtype(at::kFloat));
    src_pinned_ = static_cast<float*>(dev.host_alloc(size_t(2 * store.num_units()) * 4));
  }
  if (sh.sharded()) {
    // The fp32 sums of the units reduced on the host: one block, page-locked on CUDA (the
    // reduce-scatter's output is copied back from the device).
    auto floats = [&](int64_t u) {
      return ((store.grad_sharded(u) ? 1 : std::max<int64_t>(1, store.shard_numel(u))) + 15) / 16 * 16;
    };
    int64_t total = 0;
    for (int64_t u = 0; u < store.num_units(); ++u) total += floats(u);
    shard_block_ = static_cast<float*>(dev.host_alloc(size_t(total) * 4));
    float* p = shard_block_;
    for (int64_t u = 0; u < store.num_units(); ++u) {
      shard_grad_.push_back(p);
      p += floats(u);
    }
  }
}

gradient_path::~gradient_path() {
  for (float* p : accum_) std::free(p);
  if (shard_block_) dev_.host_free(shard_block_);
  if (src_pinned_) dev_.host_free(src_pinned_);
  for (void* p : embed_out_) dev_.host_free(p);
}

void gradient_path::begin_step(int64_t n_micro) {
  accumulating_ = !resident() && n_micro > 1;
  if (!accumulating_) return;
  // The embedding's gradient is fp32 on the host already and sums its micro-batches itself.
  for (int64_t u = 1; u < store_.num_units(); ++u)
    if (!accum_[size_t(u)] && !is_resident(u)) {
      const int64_t n = std::max<int64_t>(1, host_numel(u));
      accum_[size_t(u)] = detail::alloc_floats(n, "the gradient-accumulation buffers (4 B/param)");
      accum_bytes_ += n * 4;
    }
}

void gradient_path::set_source_stats(double mult, stats_fn host_stats) {
  src_mult_ = mult;
  src_host_ = std::move(host_stats);
  src_on_ = bool(src_host_) && !resident() && (!dev_.is_cuda() || (src_dev_.defined() && mult <= 1.0));
}

bool gradient_path::stats_at_source(int64_t u) const {
  // One rank's embedding summed on the device: the table holds the step's whole sum, so with any
  // number of groups.
  if (u == store_.embed_unit()) return src_on_ && shard_grad_.empty() && store_.grad_sharded(u);
  return src_on_ && !accumulating_ && shard_grad_.empty() && !store_.grad_sharded(u);
}

cpu_optim::grad_stats gradient_path::source_stats(int64_t u) const {
  FERRY_ASSERT(src_sent_[size_t(u)], "gradient_path::source_stats: unit ", u, " has none this step");
  if (!src_pinned_) return src_host_stats_[size_t(u)];
  // fp32 squares of the half gradient, summed in fp32 in a fixed order (gpu::grad_stats_accumulate);
  // times mult^2 for grad * mult.
  cpu_optim::grad_stats st;
  st.sum_sq = double(src_pinned_[2 * u]) * src_mult_ * src_mult_;
  st.nonfinite = int64_t(src_pinned_[2 * u + 1]);
  return st;
}

at::Tensor gradient_path::stats_on_device(int64_t u, const at::Tensor& grad) {
  if (!src_pinned_) return at::Tensor();
  at::Tensor acc = src_dev_.narrow(0, 2 * u, 2);
#if FERRY_WITH_CUDA
  auto guard = dev_.enter_compute();
  acc.zero_();
  gpu::grad_stats_accumulate(grad, acc);
#endif
  return acc;
}

void gradient_path::stats_on_host(int64_t u, bool taken, const at::Tensor& grad) {
  src_sent_[size_t(u)] = taken;
  // Host backends: the compute queue's work is done when queued, so grad holds it now.
  if (taken && !src_pinned_)
    src_host_stats_[size_t(u)] = src_host_(grad.data_ptr(), to_optim_dtype(grad.scalar_type()), size_t(grad.numel()));
}

void gradient_path::wait_unit_tasks(int64_t u) {
  const double t_wait = trace::enabled() ? trace::now_ms() : 0;
  meter_.stall_ms += worker_.wait_unit_tasks(u);
  if (trace::enabled()) trace::record("wait_tasks", u, t_wait, trace::now_ms());
}

void gradient_path::poison_source(int64_t u, int64_t index, double value) {
  if (u == store_.embed_unit() && embed_grad_.defined()) {
    FERRY_ASSERT(index >= 0 && index < cfg_.embed_params(), "gradient_path::poison_source: index ", index,
                 " of the embedding");
    embed_poison_ = {index, value};   // after the step's last scatter into the table (send_embed)
    return;
  }
  FERRY_ASSERT(slot_of_[size_t(u)] && index >= 0 && index < host_numel(u), "gradient_path::poison_source: index ",
               index, " of unit ", u);
  slot_of_[size_t(u)]->buf.narrow(0, index, 1).fill_(value);
}

at::Tensor gradient_path::target(int64_t u) {
  if (is_resident(u)) return resident_[size_t(u)];
  slot& s = u == store_.head_unit() ? head_slot_ : block_slots_[next_slot_++ % block_slots_.size()];
  if (s.copied) dev_.wait(queue::queue_compute, s.copied);
  slot_of_[size_t(u)] = &s;
  return s.buf.narrow(0, 0, store_.grad_numel(u));
}

void gradient_path::fold(const at::Tensor& grad, int64_t index, int64_t count) {
  if (count <= 1) return;
  FERRY_ASSERT(group_sum_.defined() && grad.dim() == 1 && grad.numel() <= group_sum_.numel() && index >= 0 &&
                   index < count,
               "gradient_path::fold: micro-batch ", index, " of a group of ", count, " (the engine was planned for ",
               group_sum_.defined() ? "groups" : "no groups", ")");
  at::Tensor sum = group_sum_.narrow(0, 0, grad.numel());
  if (index == 0) sum.copy_(grad);
  else if (index + 1 < count) sum.add_(grad);
  else {
    at::Tensor out = grad;   // a handle to the slot
    at::add_out(out, sum, grad);   // in fp32, rounded once into the slot
  }
}

model::head_weights gradient_path::head_views(const at::Tensor& head_target) {
  if (!resident() || !cfg_.tie_word_embeddings) return model::head_slot_views(head_target, cfg_);
  return {head_target, resident_[size_t(store_.embed_unit())].view({cfg_.vocab_size, cfg_.hidden_size})};
}

host_grad gradient_path::host_local(int64_t u) const {
  return {store_.grad(u), to_optim_dtype(store_.grad_dtype(u)), fused_[size_t(u)] ? accum_[size_t(u)] : nullptr};
}

int64_t gradient_path::host_numel(int64_t u) const {
  return store_.grad_sharded(u) ? store_.shard_numel(u) : store_.unit(u).numel;
}

host_grad gradient_path::host(int64_t u) const {
  if (shard_grad_.empty() || store_.grad_sharded(u)) return host_local(u);
  return {shard_grad_[size_t(u)], cpu_optim::dtype::dtype_f32, nullptr};
}

void gradient_path::reduce(int64_t u) {
  if (shard_grad_.empty() || store_.grad_sharded(u)) return;
  const int64_t n = store_.unit(u).numel, padded = store_.shards().padded(n);
  // The whole unit in fp32 (this rank's micro-batches summed, as the optimizer would read them),
  // zero-padded to the ranks' equal blocks, then summed over the ranks block by block.
  const host_grad g = host_local(u);
  float* full = store_.comm_scratch();
  if (u == store_.embed_unit()) {
    // fp32, padded with zeros (param_store), and made afresh by the next step's first micro-batch:
    // reduced in place.
    full = static_cast<float*>(g.data);
    if (g.acc) cpu_optim::accumulate(g.acc, cpu_optim::dtype::dtype_f32, full, size_t(n), /*overwrite=*/false);
  } else if (g.acc) {
    std::memcpy(full, g.acc, size_t(n) * 4);
    cpu_optim::accumulate(g.data, g.dtype, full, size_t(n), /*overwrite=*/false);
  } else {
    cpu_optim::convert(g.data, g.dtype, full, cpu_optim::dtype::dtype_f32, size_t(n));
  }
  std::fill(full + n, full + padded, 0.0f);
  at::Tensor in = at::from_blob(full, {padded}, at::kFloat);
  at::Tensor out = at::from_blob(shard_grad_[size_t(u)], {store_.shards().per(n)}, at::kFloat);
  if (store_.shard_numel(u) < store_.shards().per(n)) {
    // A short last block: the collective writes per(n) elements, the buffer holds fewer.
    at::Tensor tmp = at::empty({store_.shards().per(n)}, at::kFloat);
    store_.comm()->reduce_scatter_sum(tmp, in, comm_channel::channel_update);
    std::memcpy(shard_grad_[size_t(u)], tmp.data_ptr(), size_t(store_.shard_numel(u)) * 4);
    return;
  }
  store_.comm()->reduce_scatter_sum(out, in, comm_channel::channel_update);
}

void gradient_path::queue(int64_t u, std::function<void()> fn, bool updates_weights, const event_ptr& copied) {
  if (updates_weights) worker_.submit_update(u, std::move(fn));
  else worker_.submit_task(u, std::move(fn), tasks_ahead_, [copied] { return !copied || copied->ready(); });
  if (opt_.mode == offload_mode::offload_blocked) worker_.wait_idle();
}

void gradient_path::send(int64_t u, bool first_micro, bool last_micro, std::function<void()> task, bool updates_weights) {
  if (is_resident(u)) {
    FERRY_ASSERT(!task, "resident gradients take no host task");
    return;
  }
  slot& s = *slot_of_[size_t(u)];
  const bool reduced = store_.grad_sharded(u);
  if (reduced) {
    // Summed over the ranks where it was made (a collective of the engine's thread, in backward
    // order on every rank): NCCL runs after the backward on the compute queue, which waits for it;
    // only this rank's block then crosses to the host.
    const int64_t n = store_.unit(u).numel;
    at::Tensor in = s.buf.narrow(0, 0, store_.shards().padded(n));
    at::Tensor out = s.shard.narrow(0, 0, store_.shards().per(n));
    auto guard = dev_.enter_compute();
    store_.comm()->reduce_scatter_sum(out, in, comm_channel::channel_engine);
  }
  // Statistics at the source of what the host will read: the unit's first host_numel(u) elements
  // of the slot. On CUDA a kernel on the compute queue before the copy's wait; on the host
  // backends (below) after the unit's earlier tasks, which may read the previous results, have run.
  const bool src_stats = last_micro && stats_at_source(u);
  const at::Tensor src_grad = src_stats ? s.buf.narrow(0, 0, host_numel(u)) : at::Tensor();
  const at::Tensor src_acc = src_stats ? stats_on_device(u, src_grad) : at::Tensor();
  event_ptr computed = dev_.record(queue::queue_compute);
  dev_.wait(queue::queue_d2h, computed);
  const size_t bytes = size_t(store_.host_grad_numel(u)) * c10::elementSize(opt_.dtype);
  // The host gradient buffer may still be read by the previous micro-batch's accumulation (or a
  // previous step's update) on the update thread: the copy must not overwrite it before then.
  wait_unit_tasks(u);
  stats_on_host(u, src_stats, src_grad);
  // The last micro-batch is not added into the accumulator: the optimizer reads both.
  float* acc = accumulating_ && !last_micro ? accum_[size_t(u)] : nullptr;
  fused_[size_t(u)] = accumulating_ && last_micro && accum_[size_t(u)];
  event_ptr t0 = dev_.record(queue::queue_d2h, true);
  dev_.copy_d2h(store_.grad(u), reduced ? s.shard : s.buf, bytes);
  // Read by u's host task, which follows the copy; the previous step's task has run (waited above).
  if (src_acc.defined()) dev_.copy_d2h(src_pinned_ + 2 * u, src_acc, 8);
  s.copied = dev_.record(queue::queue_d2h, true);
  meter_.d2h_timers.emplace_back(t0, s.copied);
  meter_.d2h_bytes += int64_t(bytes);

  event_ptr copied = s.copied;
  const bool tied_head = u == store_.head_unit() && cfg_.tie_word_embeddings;
  queue(u,
        [this, u, copied, acc, tied_head, first_micro, last_micro, task = std::move(task)] {
          copied->synchronize();
          dev_.debug_delay();
          // The tied lm_head's gradient into the embedding's, which the scatter task adds to next.
          if (tied_head)
            cpu_optim::accumulate(static_cast<const char*>(store_.grad(u)) + cfg_.hidden_size * c10::elementSize(opt_.dtype),
                                  to_optim_dtype(opt_.dtype), static_cast<float*>(store_.grad(store_.embed_unit())),
                                  size_t(cfg_.embed_params()), first_micro);
          if (acc)
            cpu_optim::accumulate(store_.grad(u), to_optim_dtype(store_.grad_dtype(u)), acc, size_t(host_numel(u)),
                                  first_micro);
          if (last_micro && task) task();
        },
        last_micro && updates_weights, copied);
}

void gradient_path::send_embed(const at::Tensor& dx, const at::Tensor& tokens, bool first_micro, bool last_micro,
                               std::function<void()> task, bool updates_weights, int64_t index) {
  const int64_t eu = store_.embed_unit(), h = cfg_.hidden_size;
  if (resident()) {
    FERRY_ASSERT(!task, "resident gradients take no host task");
    at::Tensor g = resident_[size_t(eu)].view({cfg_.vocab_size, h});
    // Tied: the head's backward has written this micro-batch's lm_head gradient here already.
    model::embed_backward(dx, tokens.to(dev_.device()), g, !first_micro || cfg_.tie_word_embeddings);
    return;
  }
  if (store_.grad_sharded(eu)) {
    // Summed where it was made: every micro-batch of the step scatters into the device's fp32
    // gradient. After the last, with ranks, a reduce-scatter on the compute queue (a collective of
    // the engine's thread, after the blocks' on every rank) and only this rank's block crosses;
    // one rank (embed_grad=device): the table crosses, its statistics taken first.
    const int64_t n = cfg_.embed_params();
    at::Tensor g = embed_grad_.narrow(0, 0, n).view({cfg_.vocab_size, h});
    // The table's previous copy to the host must be done before this step's first scatter (one
    // rank) or the collective (ranks) rewrites what it reads.
    if (embed_copied_ && (store_.shards().sharded() ? last_micro : first_micro))
      dev_.wait(queue::queue_compute, embed_copied_);
    {
      auto guard = dev_.enter_compute();
      model::embed_backward(dx, tokens.to(dev_.device()), g, !first_micro);
    }
    if (!last_micro) return;
    if (embed_poison_.first >= 0) {
      auto guard = dev_.enter_compute();
      embed_grad_.narrow(0, embed_poison_.first, 1).fill_(embed_poison_.second);
      embed_poison_.first = -1;
    }
    if (store_.shards().sharded()) {
      auto guard = dev_.enter_compute();
      store_.comm()->reduce_scatter_sum(embed_shard_, embed_grad_, comm_channel::channel_engine);
    }
    const bool src_stats = stats_at_source(eu);
    const at::Tensor src_acc = src_stats ? stats_on_device(eu, g.view({-1})) : at::Tensor();
    event_ptr computed = dev_.record(queue::queue_compute);
    dev_.wait(queue::queue_d2h, computed);
    // The host copy may still be read by the previous step's update of the embedding.
    wait_unit_tasks(eu);
    stats_on_host(eu, src_stats, g.view({-1}));
    const size_t bytes = size_t(store_.shard_numel(eu)) * 4;
    event_ptr t0 = dev_.record(queue::queue_d2h, true);
    dev_.copy_d2h(store_.grad(eu), embed_shard_, bytes);
    if (src_acc.defined()) dev_.copy_d2h(src_pinned_ + 2 * eu, src_acc, 8);
    embed_copied_ = dev_.record(queue::queue_d2h, true);
    meter_.d2h_timers.emplace_back(t0, embed_copied_);
    meter_.d2h_bytes += int64_t(bytes);
    queue(eu,
          [this, copied = embed_copied_, task = std::move(task)] {
            copied->synchronize();
            dev_.debug_delay();
            if (task) task();
          },
          updates_weights, embed_copied_);
    return;
  }
  // The copy waits for all compute that made its source, the contiguous layout included.
  at::Tensor rows_dev = dx.contiguous();
  event_ptr computed = dev_.record(queue::queue_compute);
  dev_.wait(queue::queue_d2h, computed);
  // A group's micro-batches have their own staging; the previous group's (or step's) scatter
  // tasks read them until they have run, and the previous step's update reads the fp32 gradient
  // the first scatter rewrites: the group's first copy waits for them all (those tasks waited for
  // the copies that filled their staging; copies are in order on the d2h queue).
  FERRY_ASSERT(index >= 0 && index < int64_t(embed_out_.size()), "gradient_path::send_embed: micro-batch ", index,
               " of a group, planned for ", embed_out_.size());
  if (index == 0) wait_unit_tasks(eu);
  void* staging = embed_out_[size_t(index)];
  const size_t bytes = size_t(dx.numel()) * c10::elementSize(opt_.dtype);
  dev_.copy_d2h(staging, rows_dev, bytes);
  event_ptr copied = dev_.record(queue::queue_d2h);
  meter_.d2h_bytes += int64_t(bytes);
  at::Tensor tok = tokens;
  queue(eu,
        [this, eu, h, copied, tok, staging, first_micro, last_micro, task = std::move(task)] {
          copied->synchronize();
          dev_.debug_delay();
          at::Tensor grad = store_.grad_tensor(eu).view({cfg_.vocab_size, h});
          if (first_micro && !cfg_.tie_word_embeddings) grad.zero_();   // tied: the head's task wrote it
          // index_add_ of the rows in fp32, bit for bit, in parallel over distinct tokens.
          const at::Tensor ids = tok.reshape({-1}).to(at::kLong).contiguous();
          cpu_optim::scatter_add_rows(staging, to_optim_dtype(opt_.dtype), ids.data_ptr<int64_t>(),
                                      size_t(ids.numel()), size_t(h), grad.data_ptr<float>(),
                                      size_t(cfg_.vocab_size));
          if (last_micro && task) task();
        },
        last_micro && updates_weights, copied);
}

}  // namespace ferry::engine
