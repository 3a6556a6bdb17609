#include "src/engine/engine.h"

#include <ATen/ATen.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>

#include "src/common/error.h"
#if FERRY_WITH_CUDA
#include "gpu/ops.h"
#endif

namespace ferry::engine {
namespace {
using clock_type = std::chrono::steady_clock;

double ms_since(clock_type::time_point t0) {
  return std::chrono::duration<double, std::milli>(clock_type::now() - t0).count();
}

cpu_optim::dtype to_optim_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return cpu_optim::dtype::dtype_f16;
    case at::kBFloat16: return cpu_optim::dtype::dtype_bf16;
    case at::kFloat: return cpu_optim::dtype::dtype_f32;
    default: FERRY_ASSERT(false, "unsupported compute dtype ", t);
  }
  return cpu_optim::dtype::dtype_f32;
}

constexpr int kRecentSteps = 8;
}  // namespace

engine::engine(const model::llama_config& cfg, const engine_options& opt) : cfg_(cfg), opt_(opt) {
  FERRY_CONFIG_CHECK(!cfg.tie_word_embeddings, "model ", cfg.name,
                     ": tie_word_embeddings=true is not supported for training; untie the checkpoint first");
  dev_ = opt.cuda                  ? make_cuda_backend(opt.debug_delay_us, opt.seed)
         : opt.strict_host_backend ? make_strict_host_backend(opt.debug_delay_us, opt.seed)
                                   : make_host_backend(opt.debug_delay_us, opt.seed);
  plan_ = plan_memory(cfg, opt, opt.max_batch, opt.max_seq, 1);
  if (dev_->is_cuda()) {
    dev_->limit_memory(opt.gpu_mem_limit_gib);
    int64_t cap = opt.gpu_mem_limit_gib > 0 ? int64_t(opt.gpu_mem_limit_gib * double(1ull << 30)) : dev_->memory_stats().total;
    FERRY_CHECK(plan_.device_total <= cap, "model ", cfg.name, " at batch ", opt.max_batch, " x ", opt.max_seq,
                " tokens needs ", plan_.device_total >> 20, " MiB of GPU memory but ", cap >> 20,
                " MiB are usable; lower max_length or batch_size, use --offload overlapped, or a smaller model");
  }
  store_ = std::make_unique<param_store>(cfg, opt.dtype, *dev_, /*optimizer_state=*/!opt.forward_only);
  if (!opt.forward_only) adam_ = std::make_unique<cpu_optim::adamw>(opt.cpu_threads);
  worker_ = std::make_unique<update_worker>(store_->num_units());
  version_.assign(store_->num_units(), 0);
  unit_state_.assign(store_->num_units(), {});
  accum_.assign(store_->num_units(), nullptr);
  hp_.beta1 = float(opt.beta1);
  hp_.beta2 = float(opt.beta2);
  hp_.eps = float(opt.eps);
  hp_.weight_decay = float(opt.weight_decay);
  scaler_.scale = opt.dtype == at::kHalf ? opt.loss_scale : 1.0;

  auto dev_opts = at::TensorOptions().dtype(opt.dtype).device(dev_->device());
  rope_ = model::make_rope(cfg, rotary_positions(cfg, opt), dev_->device());
  if (opt.mode == offload_mode::offload_none) {
    for (int64_t u = 0; u < store_->num_units(); ++u) {
      int64_t n = store_->unit(u).numel;
      dev_half_.push_back(at::empty({n}, dev_opts));
      if (opt.forward_only) continue;
      dev_grad_.push_back(at::empty({n}, dev_opts));
      dev_master_.push_back(at::empty({n}, dev_opts.dtype(at::kFloat)));
      dev_m_.push_back(at::zeros({n}, dev_opts.dtype(at::kFloat)));
      dev_v_.push_back(at::zeros({n}, dev_opts.dtype(at::kFloat)));
    }
  } else {
    int64_t nslots = opt.mode == offload_mode::offload_blocked ? 1 : opt.prefetch + 1;
    for (int64_t i = 0; i < nslots; ++i) {
      block_slots_.emplace_back();
      block_slots_.back().buf = at::empty({cfg.block_params()}, dev_opts);
    }
    head_slot_.buf = at::empty({cfg.head_params()}, dev_opts);
    if (!opt.forward_only) {
      for (int i = 0; i < 2; ++i) grad_slots_.push_back({at::empty({cfg.block_params()}, dev_opts), nullptr});
      head_grad_.buf = at::empty({cfg.head_params()}, dev_opts);
    }
  }
  size_t staging = size_t(opt.max_batch * opt.max_seq * cfg.hidden_size) * c10::elementSize(opt.dtype);
  embed_in_ = dev_->host_alloc(staging);
  if (!opt.forward_only) embed_out_ = dev_->host_alloc(staging);
}

engine::~engine() {
  try {
    if (worker_) worker_->wait_idle();
    if (dev_) dev_->synchronize();
  } catch (...) {
  }
  worker_.reset();
  for (float* p : accum_) std::free(p);
  if (dev_) {
    dev_->host_free(embed_in_);
    if (embed_out_) dev_->host_free(embed_out_);
  }
}

bool engine::speculating() const {
  if (opt_.mode != offload_mode::offload_overlapped) return false;
  if (opt_.speculate == speculate_mode::speculate_on) return true;
  if (opt_.speculate == speculate_mode::speculate_off) return false;
  // Speculate only after kRecentSteps steps in a row validated without a fix-up: a rollback is
  // exact for the moments (cpu_optim::undo_log) but costs a second pass over the unit's state, so
  // rollbacks stay at most one per kRecentSteps steps while clipping or overflow is rare, and
  // none while they are common (where speculating would not pay).
  if (int(recent_fixes_.size()) < kRecentSteps) return false;
  for (bool f : recent_fixes_)
    if (f) return false;
  return true;
}

void engine::params_changed() {
  // Not wait_updates(): in none mode it copies the device state back over the host weights the
  // caller has just changed.
  worker_->wait_idle();
  store_->refresh_shadows();
  for (auto& v : version_) ++v;  // every device copy is stale
  for (int64_t u = 0; u < store_->num_units(); ++u) worker_->submit([] {}, u, version_[u]);
  worker_->wait_idle();
  if (opt_.mode == offload_mode::offload_none && opt_.forward_only) {
    // Only the compute-dtype weights live on the device: upload the shadows (the master rounded
    // as the device's conversion would round it).
    for (int64_t u = 0; u < store_->num_units(); ++u) dev_half_[u].copy_(store_->shadow_tensor(u));
    dev_->synchronize();
  } else if (opt_.mode == offload_mode::offload_none) {
    for (int64_t u = 0; u < store_->num_units(); ++u) {
      dev_master_[u].copy_(store_->master_tensor(u));
      dev_m_[u].copy_(store_->exp_avg_tensor(u));
      dev_v_[u].copy_(store_->exp_avg_sq_tensor(u));
      dev_half_[u].copy_(dev_master_[u]);
    }
    dev_->synchronize();
  }
}

void engine::wait_updates() {
  worker_->wait_idle();
  if (opt_.mode == offload_mode::offload_none && !dev_master_.empty()) {
    // The host store is the checkpoint source: bring the device state back.
    for (int64_t u = 0; u < store_->num_units(); ++u) {
      store_->master_tensor(u).copy_(dev_master_[u]);
      store_->exp_avg_tensor(u).copy_(dev_m_[u]);
      store_->exp_avg_sq_tensor(u).copy_(dev_v_[u]);
    }
    dev_->synchronize();
  }
}

// ---- weight residency ----

bool engine::resident(int64_t u) const {
  if (u == store_->head_unit()) return head_slot_.unit == u && head_slot_.version == version_[u];
  for (const auto& s : block_slots_)
    if (s.unit == u && s.version == version_[u]) return true;
  return false;
}

engine::slot& engine::slot_for(int64_t u) {
  if (u == store_->head_unit()) return head_slot_;
  for (auto& s : block_slots_)
    if (s.unit == u && s.version == version_[u]) return s;
  FERRY_ASSERT(false, "unit ", u, " is not resident");
  return head_slot_;
}

// Copies unit u into a slot. The victim is the slot whose unit is needed furthest in the future
// (or never) among the uses from `at` on: the schedule is known, so this is Belady's choice.
void engine::load(int64_t u, const std::vector<int64_t>& uses, size_t at) {
  slot* target = nullptr;
  if (u == store_->head_unit()) {
    target = &head_slot_;
  } else {
    size_t best = 0;
    for (auto& s : block_slots_) {
      size_t next = std::numeric_limits<size_t>::max();
      if (s.unit >= 0 && s.version == version_[s.unit])
        for (size_t j = at; j < uses.size(); ++j)
          if (uses[j] == s.unit) { next = j; break; }
      if (!target || next > best) { target = &s; best = next; }
    }
    FERRY_ASSERT(best > at, "no free weight slot for unit ", u, " (prefetch window larger than the pool)");
  }
  // The host copy must hold this unit's latest update before it moves.
  stall_ms_ += worker_->wait_unit(u, version_[u]);
  if (target->released) dev_->wait(queue::queue_h2d, target->released);
  size_t bytes = size_t(store_->unit(u).numel) * c10::elementSize(opt_.dtype);
  event_ptr t0 = timing_ ? dev_->record(queue::queue_h2d, true) : nullptr;
  dev_->copy_h2d(target->buf, store_->shadow(u), bytes);
  target->ready = dev_->record(queue::queue_h2d, timing_);
  if (timing_) h2d_timers_.emplace_back(t0, target->ready);
  h2d_bytes_ += int64_t(bytes);
  target->unit = u;
  target->version = version_[u];
}

void engine::prefetch(const std::vector<int64_t>& uses, size_t at) {
  if (opt_.mode != offload_mode::offload_overlapped) return;
  size_t end = std::min(uses.size(), at + 1 + size_t(opt_.prefetch));
  for (size_t j = at + 1; j < end; ++j)
    if (!resident(uses[j])) load(uses[j], uses, at);
}

engine::slot& engine::use_weights(int64_t u, const std::vector<int64_t>& uses, size_t at) {
  if (!resident(u)) load(u, uses, at);
  prefetch(uses, at);
  slot& s = slot_for(u);
  dev_->wait(queue::queue_compute, s.ready);
  delay();
  return s;
}

void engine::release(slot& s) { s.released = dev_->record(queue::queue_compute); }

// ---- the CPU side ----

cpu_optim::chunk_ref engine::chunk(int64_t u) const {
  bool accumulated = accum_[u] != nullptr;
  cpu_optim::chunk_ref c;
  c.param = store_->master(u);
  c.m = store_->exp_avg(u);
  c.v = store_->exp_avg_sq(u);
  c.grad = accumulated ? accum_[u] : store_->grad(u);
  c.grad_dtype = accumulated ? cpu_optim::dtype::dtype_f32 : to_optim_dtype(store_->grad_dtype(u));
  c.half_out = opt_.dtype == at::kFloat ? nullptr : store_->shadow(u);
  c.half_dtype = to_optim_dtype(opt_.dtype);
  c.n = size_t(store_->unit(u).numel);
  return c;
}

// Runs on the update thread: one unit's AdamW with gradient multiplier `mult`.
// A speculative update keeps the undo log that a rollback needs to restore the moments exactly.
void engine::host_update(int64_t u, double mult, const cpu_optim::adamw_hparams& hp, int64_t step,
                         bool speculative) {
  delay();
  unit_state_[u].stats = adam_->step(chunk(u), hp, step, float(mult), speculative ? &unit_state_[u].log : nullptr);
  unit_state_[u].applied = unit_state_[u].stats.nonfinite == 0;
  copy_f32_shadow(u);
}

// fp32 runs: AdamW writes no half copy, so the device-bound shadow is refreshed from the master.
void engine::copy_f32_shadow(int64_t u) {
  if (opt_.dtype == at::kFloat)
    cpu_optim::convert(store_->master(u), cpu_optim::dtype::dtype_f32, store_->shadow(u), cpu_optim::dtype::dtype_f32,
                       size_t(store_->unit(u).numel));
}

// Sends unit u's gradient (in g, numel elements) to the host and queues its CPU work.
void engine::send_grad(int64_t u, grad_slot& g, int64_t numel, bool first_micro, bool last_micro, bool speculate) {
  event_ptr computed = dev_->record(queue::queue_compute);
  dev_->wait(queue::queue_d2h, computed);
  size_t bytes = size_t(numel) * c10::elementSize(opt_.dtype);
  // The host gradient buffer may still be read by the previous micro-batch's accumulation (or a
  // previous step's update) on the update thread: the copy must not overwrite it before then.
  stall_ms_ += worker_->wait_unit_tasks(u);
  event_ptr t0 = dev_->record(queue::queue_d2h, true);
  dev_->copy_d2h(store_->grad(u), g.buf, bytes);
  g.copied = dev_->record(queue::queue_d2h, true);
  d2h_timers_.emplace_back(t0, g.copied);
  d2h_bytes_ += int64_t(bytes);

  event_ptr copied = g.copied;
  bool accumulate = accum_[u] != nullptr;
  bool poison = last_micro && poison_now(u);
  int64_t version = last_micro && speculate ? ++version_[u] : -1;
  double mult = cur_mult_;
  cpu_optim::adamw_hparams hp = hp_;
  int64_t step = adam_step_;
  worker_->submit(
      [this, u, copied, first_micro, last_micro, speculate, accumulate, poison, mult, hp, step] {
        copied->synchronize();
        delay();
        size_t n = size_t(store_->unit(u).numel);
        if (accumulate) {
          cpu_optim::accumulate(store_->grad(u), to_optim_dtype(store_->grad_dtype(u)), accum_[u], n, first_micro);
        }
        if (!last_micro) return;
        if (poison) debug_poison(u);
        if (speculate) host_update(u, mult, hp, step, true);
        else unit_state_[u].stats = adam_->stats(chunk(u).grad, chunk(u).grad_dtype, n, float(mult));
      },
      u, version);
  if (opt_.mode == offload_mode::offload_blocked) worker_->wait_idle();
}

void engine::debug_poison(int64_t u) const {
  cpu_optim::chunk_ref c = chunk(u);
  at::ScalarType t = accum_[u] ? at::kFloat : store_->grad_dtype(u);
  FERRY_ASSERT(opt_.debug_poison_index >= 0 && opt_.debug_poison_index < int64_t(c.n), "debug_poison_index out of range");
  at::from_blob(const_cast<void*>(c.grad), {int64_t(c.n)}, at::TensorOptions().dtype(t))
      .narrow(0, opt_.debug_poison_index, 1)
      .fill_(opt_.debug_poison_value);
}

// ---- the step ----

step_result engine::train_step(const std::vector<at::Tensor>& micro_batches, double lr) {
  FERRY_CHECK(!opt_.forward_only, "train_step on an inference engine (engine_options::forward_only): it has no ",
              "gradient buffers or optimizer state; build the engine without forward_only to train");
  FERRY_ASSERT(!micro_batches.empty(), "train_step without micro-batches");
  ++step_calls_;
  if (opt_.mode == offload_mode::offload_none) return train_step_resident(micro_batches, lr);
  auto t_start = clock_type::now();
  auto guard = dev_->enter_compute();
  dev_->reset_memory_peak();
  h2d_bytes_ = d2h_bytes_ = 0;
  stall_ms_ = 0;
  h2d_timers_.clear();
  d2h_timers_.clear();
  timing_ = true;

  const int64_t L = cfg_.num_hidden_layers;
  const int64_t n_micro = int64_t(micro_batches.size());
  if (n_micro > 1)
    for (int64_t u = 1; u < store_->num_units(); ++u)
      if (!accum_[u]) {
        void* p = nullptr;
        FERRY_CHECK(posix_memalign(&p, 64, size_t(store_->unit(u).numel) * 4) == 0,
                    "cannot allocate the gradient-accumulation buffers; lower grad_accum's memory by training a smaller model");
        accum_[u] = static_cast<float*>(p);
      }

  int64_t total_targets = 0;
  for (const auto& mb : micro_batches) total_targets += (mb.narrow(1, 1, mb.size(1) - 1) != -100).sum().item<int64_t>();
  FERRY_CHECK(total_targets > 0, "the batch has no target tokens (every label is -100)");

  const bool speculate = speculating();
  hp_.lr = float(lr);
  ++adam_step_;
  cur_mult_ = 1.0 / scaler_.scale;
  const double grad_scale = scaler_.scale / double(total_targets);

  // The use order of units in one micro-batch: blocks forward, head, blocks backward.
  std::vector<int64_t> uses;
  for (int64_t i = 0; i < L; ++i) uses.push_back(store_->block_unit(i));
  uses.push_back(store_->head_unit());
  for (int64_t i = L - 1; i >= 0; --i) uses.push_back(store_->block_unit(i));

  step_result r;
  r.loss_scale = scaler_.scale;
  r.speculated = speculate;
  double loss_sum = 0;
  for (int64_t mb = 0; mb < n_micro; ++mb) {
    const bool first = mb == 0, last = mb == n_micro - 1;
    const at::Tensor& tokens = micro_batches[mb];
    const int64_t B = tokens.size(0), T = tokens.size(1) - 1;
    FERRY_CHECK(B * T <= opt_.max_batch * opt_.max_seq, "batch of ", B, " x ", T, " tokens exceeds the planned ",
                opt_.max_batch, " x ", opt_.max_seq);
    at::Tensor inputs = tokens.narrow(1, 0, T).contiguous();
    at::Tensor labels = tokens.narrow(1, 1, T).contiguous().to(dev_->device());

    // forward
    at::Tensor x = embed(inputs);
    std::vector<model::block_saved> saved(L);
    size_t at = 0;
    for (int64_t i = 0; i < L; ++i, ++at) {
      slot& s = use_weights(store_->block_unit(i), uses, at);
      x = model::block_forward(x, model::block_views(s.buf, cfg_), cfg_, rope_, &saved[i]);
      release(s);
    }

    // loss and its backward, in chunks
    slot& hs = use_weights(store_->head_unit(), uses, at++);
    if (head_grad_.copied) dev_->wait(queue::queue_compute, head_grad_.copied);
    at::Tensor g_norm = head_grad_.buf.narrow(0, 0, cfg_.hidden_size);
    at::Tensor g_lm = head_grad_.buf.narrow(0, cfg_.hidden_size, cfg_.vocab_size * cfg_.hidden_size).view({cfg_.vocab_size, cfg_.hidden_size});
    at::Tensor dx;
    model::head_result hr = model::head_forward_backward(
        x, hs.buf.narrow(0, 0, cfg_.hidden_size),
        hs.buf.narrow(0, cfg_.hidden_size, cfg_.vocab_size * cfg_.hidden_size).view({cfg_.vocab_size, cfg_.hidden_size}),
        labels, cfg_, opt_.ce_chunk, grad_scale, &dx, &g_norm, &g_lm, false);
    release(hs);
    x = at::Tensor();
    loss_sum += hr.loss_sum;
    send_grad(store_->head_unit(), head_grad_, cfg_.head_params(), first, last, speculate);

    // backward
    for (int64_t i = L - 1; i >= 0; --i, ++at) {
      int64_t u = store_->block_unit(i);
      slot& s = use_weights(u, uses, at);
      grad_slot& g = grad_slots_[next_grad_slot_++ % grad_slots_.size()];
      if (g.copied) dev_->wait(queue::queue_compute, g.copied);
      dx = model::block_backward(dx, model::block_views(s.buf, cfg_), cfg_, rope_, saved[i],
                                 model::block_views(g.buf, cfg_), false);
      release(s);
      send_grad(u, g, cfg_.block_params(), first, last, speculate);
    }

    // the embedding's gradient is scattered on the host; the copy waits for all compute that made
    // its source, the contiguous layout included
    at::Tensor dx_rows = dx.contiguous();
    event_ptr computed = dev_->record(queue::queue_compute);
    dev_->wait(queue::queue_d2h, computed);
    // embed_out_ is read by the previous micro-batch's scatter task until it has run (that task
    // waited for the copy that filled it; copies into it are in order on the d2h queue).
    stall_ms_ += worker_->wait_unit_tasks(store_->embed_unit());
    size_t bytes = size_t(dx.numel()) * c10::elementSize(opt_.dtype);
    dev_->copy_d2h(embed_out_, dx_rows, bytes);
    embed_out_done_ = dev_->record(queue::queue_d2h);
    d2h_bytes_ += int64_t(bytes);
    event_ptr copied = embed_out_done_;
    const int64_t eu = store_->embed_unit();
    int64_t version = last && speculate ? ++version_[eu] : -1;
    double mult = cur_mult_;
    cpu_optim::adamw_hparams hp = hp_;
    int64_t step = adam_step_;
    at::Tensor tok = inputs;
    const bool poison = last && poison_now(eu);
    worker_->submit(
        [this, copied, tok, first, last, speculate, poison, mult, eu, hp, step] {
          copied->synchronize();
          delay();
          const int64_t h = cfg_.hidden_size;
          at::Tensor rows = at::from_blob(embed_out_, {tok.numel(), h}, at::TensorOptions().dtype(opt_.dtype));
          at::Tensor grad = store_->grad_tensor(eu).view({cfg_.vocab_size, h});
          if (first) grad.zero_();
          grad.index_add_(0, tok.reshape({-1}), rows.to(at::kFloat));
          if (!last) return;
          if (poison) debug_poison(eu);
          if (speculate) host_update(eu, mult, hp, step, true);
          else unit_state_[eu].stats = adam_->stats(store_->grad(eu), cpu_optim::dtype::dtype_f32,
                                                    size_t(store_->unit(eu).numel), float(mult));
        },
        eu, version);
    dx = at::Tensor();
    dx_rows = at::Tensor();
  }
  r.loss = loss_sum / double(total_targets);
  r.n_targets = total_targets;

  auto t_tail = clock_type::now();
  finish_step(r, speculate);
  r.tail_ms = ms_since(t_tail);
  dev_->synchronize();
  timing_ = false;
  for (auto& [a, b] : h2d_timers_) r.h2d_ms += dev_->elapsed_ms(a, b);
  for (auto& [a, b] : d2h_timers_) r.d2h_ms += dev_->elapsed_ms(a, b);
  r.h2d_bytes = h2d_bytes_;
  r.d2h_bytes = d2h_bytes_;
  r.stall_update_ms = stall_ms_;
  r.cpu_adam_ms = worker_->take_busy_ms();
  auto mem = dev_->memory_stats();
  r.gpu_alloc_peak = mem.allocated_peak;
  r.gpu_reserved_peak = mem.reserved_peak;
  r.step_ms = ms_since(t_start);
  return r;
}

// Validates the step once every unit's statistics are in: global norm, clipping, overflow; fixes
// up speculative updates, or (not speculating) queues the updates in forward order.
void engine::finish_step(step_result& r, bool speculate) {
  worker_->wait_idle();
  double sum_sq = 0;
  int64_t nonfinite = 0;
  for (const auto& s : unit_state_) {
    sum_sq += s.stats.sum_sq;
    nonfinite += s.stats.nonfinite;
  }
  const double norm = std::sqrt(sum_sq);
  r.grad_norm = nonfinite ? std::numeric_limits<double>::quiet_NaN() : norm;
  double coef = 1.0;
  if (opt_.clip_grad > 0 && !nonfinite) coef = std::min(1.0, opt_.clip_grad / (norm + 1e-6));
  r.clip_coef = coef;
  r.skipped = nonfinite > 0;
  const double spec_mult = cur_mult_, final_mult = cur_mult_ * coef;
  const bool fix = r.skipped || coef < 1.0;
  const cpu_optim::adamw_hparams hp = hp_;
  const int64_t step = adam_step_;

  for (const auto& s : unit_state_) r.undo_log_bytes += int64_t(s.log.bytes());
  for (int64_t u = 0; u < store_->num_units(); ++u) {
    int64_t version = ++version_[u];
    if (speculate) {
      if (!fix) {
        worker_->submit([this, u] { unit_state_[u].log.clear(); }, u, version);
        continue;
      }
      ++r.rollbacks;
      worker_->submit(
          [this, u, skipped = r.skipped, spec_mult, final_mult, hp, step] {
            delay();
            // A unit whose gradient was non-finite was left untouched by step(); the whole step
            // is then skipped, so there is nothing to undo for it.
            if (!unit_state_[u].applied) return;
            cpu_optim::undo_log& log = unit_state_[u].log;
            if (skipped) adam_->undo(chunk(u), hp, step, float(spec_mult), &log);
            else adam_->redo(chunk(u), hp, step, float(spec_mult), float(final_mult), &log);
            log.clear();
            copy_f32_shadow(u);
          },
          u, version);
    } else if (!r.skipped) {
      worker_->submit([this, u, final_mult, hp, step] { host_update(u, final_mult, hp, step, false); }, u, version);
    } else {
      worker_->submit([] {}, u, version);
    }
  }
  if (speculate || opt_.mode == offload_mode::offload_blocked) worker_->wait_idle();

  if (r.skipped) --adam_step_;
  recent_fixes_.push_back(fix);
  if (int(recent_fixes_.size()) > kRecentSteps) recent_fixes_.erase(recent_fixes_.begin());
  // torch.amp.GradScaler: back off on overflow, grow after a window of good steps (fp16 only).
  if (opt_.dtype == at::kHalf) {
    if (r.skipped) {
      scaler_.scale *= opt_.scale_backoff;
      scaler_.good_steps = 0;
    } else if (++scaler_.good_steps >= opt_.scale_window) {
      scaler_.scale *= opt_.scale_growth;
      scaler_.good_steps = 0;
    }
  }
}

// ---- shared forward pieces (training, evaluation, generation) ----

at::Tensor engine::embed(const at::Tensor& tokens) {
  const int64_t eu = store_->embed_unit();
  const int64_t h = cfg_.hidden_size;
  if (opt_.mode == offload_mode::offload_none)
    return model::embed_forward(tokens.to(dev_->device()), dev_half_[eu].view({cfg_.vocab_size, h}));
  stall_ms_ += worker_->wait_unit(eu, version_[eu]);
  if (embed_in_done_) embed_in_done_->synchronize();
  at::Tensor tok = tokens.to(at::kLong).contiguous();
  FERRY_CHECK(tok.numel() * h <= opt_.max_batch * opt_.max_seq * h, "batch larger than planned");
  FERRY_CHECK(tok.numel() == 0 || (tok.min().item<int64_t>() >= 0 && tok.max().item<int64_t>() < cfg_.vocab_size),
              "token id outside the model's vocabulary [0, ", cfg_.vocab_size, ")");
  at::Tensor table = store_->shadow_tensor(eu).view({cfg_.vocab_size, h});
  at::Tensor rows = at::from_blob(embed_in_, {tok.numel(), h}, at::TensorOptions().dtype(opt_.dtype));
  at::index_select_out(rows, table, 0, tok.reshape({-1}));
  at::Tensor x = at::empty({tok.size(0), tok.size(1), h}, at::TensorOptions().dtype(opt_.dtype).device(dev_->device()));
  size_t bytes = size_t(rows.numel()) * c10::elementSize(opt_.dtype);
  dev_->copy_h2d(x, embed_in_, bytes);
  embed_in_done_ = dev_->record(queue::queue_h2d);
  h2d_bytes_ += int64_t(bytes);
  dev_->wait(queue::queue_compute, embed_in_done_);
  return x;
}

at::Tensor engine::forward_blocks(at::Tensor x, const block_fn& fn) {
  auto guard = dev_->enter_compute();
  const int64_t L = cfg_.num_hidden_layers;
  if (opt_.mode == offload_mode::offload_none) {
    for (int64_t i = 0; i < L; ++i)
      x = fn(i, model::block_views(dev_half_[store_->block_unit(i)], cfg_), x);
    return x;
  }
  std::vector<int64_t> uses;
  for (int64_t i = 0; i < L; ++i) uses.push_back(store_->block_unit(i));
  uses.push_back(store_->head_unit());
  for (int64_t i = 0; i < L; ++i) {
    slot& s = use_weights(store_->block_unit(i), uses, size_t(i));
    x = fn(i, model::block_views(s.buf, cfg_), x);
    release(s);
  }
  return x;
}

std::pair<at::Tensor, at::Tensor> engine::head_weights() {
  const int64_t h = cfg_.hidden_size, V = cfg_.vocab_size;
  at::Tensor flat;
  if (opt_.mode == offload_mode::offload_none) {
    flat = dev_half_[store_->head_unit()];
  } else {
    std::vector<int64_t> uses{store_->head_unit()};
    flat = use_weights(store_->head_unit(), uses, 0).buf;
  }
  return {flat.narrow(0, 0, h), flat.narrow(0, h, V * h).view({V, h})};
}

model::head_result engine::evaluate(const at::Tensor& tokens) {
  auto guard = dev_->enter_compute();
  const int64_t T = tokens.size(1) - 1;
  at::Tensor inputs = tokens.narrow(1, 0, T).contiguous();
  at::Tensor labels = tokens.narrow(1, 1, T).contiguous().to(dev_->device());
  // Moved in: the embedding output is freed once the first block has read it.
  // Resident weights leave memory to spare: one pass per block, no chunks (block_forward_whole).
  const bool whole = opt_.mode == offload_mode::offload_none;
  at::Tensor x = forward_blocks(embed(inputs), [&](int64_t, const model::block_weights& w, const at::Tensor& in) {
    return whole ? model::block_forward_whole(in, w, cfg_, rope_) : model::block_forward(in, w, cfg_, rope_, nullptr);
  });
  auto [norm_w, lm_w] = head_weights();
  auto hr = model::head_forward_backward(x, norm_w, lm_w, labels, cfg_, opt_.ce_chunk, 1.0, nullptr, nullptr, nullptr, false);
  release_head();
  return hr;
}

void engine::release_head() {
  if (opt_.mode != offload_mode::offload_none) release(head_slot_);
}

// ---- none: everything resident on the device ----

step_result engine::train_step_resident(const std::vector<at::Tensor>& micro_batches, double lr) {
  auto t_start = clock_type::now();
  auto guard = dev_->enter_compute();
  dev_->reset_memory_peak();
  const int64_t L = cfg_.num_hidden_layers, h = cfg_.hidden_size, V = cfg_.vocab_size;
  const int64_t n_micro = int64_t(micro_batches.size());
  int64_t total_targets = 0;
  for (const auto& mb : micro_batches) total_targets += (mb.narrow(1, 1, mb.size(1) - 1) != -100).sum().item<int64_t>();
  FERRY_CHECK(total_targets > 0, "the batch has no target tokens (every label is -100)");
  const double grad_scale = scaler_.scale / double(total_targets);
  step_result r;
  r.loss_scale = scaler_.scale;
  double loss_sum = 0;
  const int64_t eu = store_->embed_unit(), hu = store_->head_unit();
  for (int64_t mb = 0; mb < n_micro; ++mb) {
    const bool acc = mb > 0;
    const at::Tensor& tokens = micro_batches[mb];
    const int64_t T = tokens.size(1) - 1;
    at::Tensor inputs = tokens.narrow(1, 0, T).contiguous().to(dev_->device());
    at::Tensor labels = tokens.narrow(1, 1, T).contiguous().to(dev_->device());
    at::Tensor x = model::embed_forward(inputs, dev_half_[eu].view({V, h}));
    std::vector<model::block_saved> saved(L);
    for (int64_t i = 0; i < L; ++i)
      x = model::block_forward(x, model::block_views(dev_half_[store_->block_unit(i)], cfg_), cfg_, rope_, &saved[i]);
    at::Tensor g_norm = dev_grad_[hu].narrow(0, 0, h), g_lm = dev_grad_[hu].narrow(0, h, V * h).view({V, h});
    at::Tensor dx;
    auto hr = model::head_forward_backward(x, dev_half_[hu].narrow(0, 0, h), dev_half_[hu].narrow(0, h, V * h).view({V, h}),
                                           labels, cfg_, opt_.ce_chunk, grad_scale, &dx, &g_norm, &g_lm, acc);
    loss_sum += hr.loss_sum;
    for (int64_t i = L - 1; i >= 0; --i) {
      int64_t u = store_->block_unit(i);
      dx = model::block_backward(dx, model::block_views(dev_half_[u], cfg_), cfg_, rope_, saved[i],
                                 model::block_views(dev_grad_[u], cfg_), acc);
    }
    at::Tensor g_emb = dev_grad_[eu].view({V, h});
    model::embed_backward(dx, inputs, g_emb, acc);
  }
  r.loss = loss_sum / double(total_targets);
  r.n_targets = total_targets;

  for (int64_t u = 0; u < store_->num_units(); ++u)
    if (poison_now(u)) dev_grad_[u].narrow(0, opt_.debug_poison_index, 1).fill_(opt_.debug_poison_value);
  double sum_sq = 0;
  int64_t nonfinite = 0;
  for (auto& g : dev_grad_) {
    at::Tensor gf = g.to(at::kFloat);
    sum_sq += gf.square().sum().item<double>();
    nonfinite += at::isfinite(gf).logical_not().sum().item<int64_t>();
  }
  const double mult0 = 1.0 / scaler_.scale;
  const double norm = std::sqrt(sum_sq) * mult0;
  r.skipped = nonfinite > 0;
  r.grad_norm = r.skipped ? std::numeric_limits<double>::quiet_NaN() : norm;
  r.clip_coef = (opt_.clip_grad > 0 && !r.skipped) ? std::min(1.0, opt_.clip_grad / (norm + 1e-6)) : 1.0;
  if (!r.skipped) {
    ++adam_step_;
    const double mult = mult0 * r.clip_coef;
    for (int64_t u = 0; u < store_->num_units(); ++u) {
#if FERRY_WITH_CUDA
      if (dev_->is_cuda()) {
        // The kernel writes a half/bf16 copy; in fp32 compute the weights are the master copy.
        at::Tensor half_out = opt_.dtype == at::kFloat ? at::Tensor() : dev_half_[u];
        gpu::adamw_step(dev_master_[u], dev_m_[u], dev_v_[u], dev_grad_[u], half_out, lr, opt_.beta1, opt_.beta2,
                        opt_.eps, opt_.weight_decay, adam_step_, mult);
        if (opt_.dtype == at::kFloat) dev_half_[u].copy_(dev_master_[u]);
        continue;
      }
#endif
      cpu_optim::chunk_ref c{dev_master_[u].data_ptr<float>(), dev_m_[u].data_ptr<float>(), dev_v_[u].data_ptr<float>(),
                             dev_grad_[u].data_ptr(), to_optim_dtype(opt_.dtype),
                             opt_.dtype == at::kFloat ? nullptr : dev_half_[u].data_ptr(), to_optim_dtype(opt_.dtype),
                             size_t(dev_master_[u].numel())};
      hp_.lr = float(lr);
      adam_->step(c, hp_, adam_step_, float(mult));
      if (opt_.dtype == at::kFloat) dev_half_[u].copy_(dev_master_[u]);
    }
  }
  if (opt_.dtype == at::kHalf) {
    if (r.skipped) {
      scaler_.scale *= opt_.scale_backoff;
      scaler_.good_steps = 0;
    } else if (++scaler_.good_steps >= opt_.scale_window) {
      scaler_.scale *= opt_.scale_growth;
      scaler_.good_steps = 0;
    }
  }
  dev_->synchronize();
  auto mem = dev_->memory_stats();
  r.gpu_alloc_peak = mem.allocated_peak;
  r.gpu_reserved_peak = mem.reserved_peak;
  r.step_ms = ms_since(t_start);
  return r;
}

}  // namespace ferry::engine
