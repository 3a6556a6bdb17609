#include "src/engine/engine.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <limits>
#include <string>
#include <tuple>

#include "src/common/env.h"
#include "src/common/error.h"
#include "src/engine/trace.h"

namespace ferry::engine {
namespace {
using clock_type = std::chrono::steady_clock;

double ms_since(clock_type::time_point t0) {
  return std::chrono::duration<double, std::milli>(clock_type::now() - t0).count();
}

std::unique_ptr<backend> make_backend(const engine_options& o) {
  if (o.cuda) return make_cuda_backend(o.device_index, o.debug_delay_us, o.seed);
  if (o.strict_host_backend) return make_strict_host_backend(o.debug_delay_us, o.seed);
  return make_host_backend(o.debug_delay_us, o.seed);
}
}  // namespace

engine::engine(const model::llama_config& cfg, const engine_options& opt) : cfg_(cfg), opt_(opt) {
  check_options(opt_);
  check_resident_blocks(opt_, cfg_.num_hidden_layers, cfg_.name);
  // embed_grad=device where it cannot apply is refused here; auto is the plan's choice (below).
  if (opt_.embed_grad != embed_grad_place::embed_grad_auto)
    opt_ = resolve_embed_grad(opt_, cfg_.tie_word_embeddings, cfg_.embed_params());
  defer_ = opt_.defer_speculative && std::getenv("FERRY_SPECULATE_WAIT") == nullptr;
  source_stats_ = opt_.stats_at_source && std::getenv("FERRY_HOST_STATS") == nullptr;
  const char* rows_first = std::getenv("FERRY_EMBED_ROWS_FIRST");
  rows_first_ = opt_.embed_rows_first && !(rows_first && std::string(rows_first) == "0");
  if (const char* part = std::getenv("FERRY_UPDATE_PART"))
    opt_.update_part = env_integer("FERRY_UPDATE_PART", part, 0, std::numeric_limits<long>::max(),
                                   "a count of parameters per part of an update (0: each unit in one piece)");
  trace::enabled();   // FERRY_TRACE's file is opened (or refused, naming it) here, not in a worker thread
  dev_ = make_backend(opt_);
  // What the plan must fit (activation_checkpointing=auto fits it; the host backend plans for the
  // limit too, so the CPU tests can exercise it).
  const int64_t cap = opt_.gpu_mem_limit_gib > 0 ? gib_bytes(opt_.gpu_mem_limit_gib)
                      : dev_->is_cuda()          ? dev_->memory_stats().total
                                                 : 0;
  plan_ = plan_memory(cfg_, opt_, opt_.max_batch, opt_.max_seq, opt_.grad_accum, {}, cap);
  if (opt_.resident_blocks < 0) opt_.resident_blocks = plan_.resident_blocks;   // auto: the plan's count
  if (opt_.embed_grad == embed_grad_place::embed_grad_auto)
    opt_.embed_grad = plan_.embed_grad_device && !shards_of(opt_).sharded() ? embed_grad_place::embed_grad_device
                                                                             : embed_grad_place::embed_grad_host;
  if (dev_->is_cuda()) dev_->limit_memory(opt_.gpu_mem_limit_gib);
  // Before anything is allocated: the device's limit (CUDA) and the host's (host_mem_limit_gib).
  const std::string misfit = plan_misfit(plan_, cfg_, opt_, dev_->is_cuda() ? cap : 0);
  FERRY_CONFIG_CHECK(misfit.empty(), misfit);
  // Units reduce-scattered on the device bring only this rank's shard of their gradient to the host.
  store_ = std::make_unique<param_store>(
      cfg_, opt_.dtype, *dev_, /*optimizer_state=*/!opt_.forward_only, opt_.state,
      opt_.state_on == state_place::place_nvme ? &opt_.nvme : nullptr, opt_.comm, opt_.shadows,
      units_reduced_on_device(opt_, cfg_.tie_word_embeddings, int64_t(param_store::unit_numels(cfg_).size())));
  // One unit more than the store's: the second part of the embedding's update (queue_embedding_split).
  split_.rest_unit = store_->num_units();
  worker_ = std::make_unique<update_worker>(store_->num_units() + 1, [d = dev_.get()] { d->bind_thread(); });
  pool_ = std::make_unique<weight_pool>(cfg_, opt_, *dev_, *store_, *worker_, meter_);
  pool_->split_embedding(split_.rest_unit, &split_.first);
  if (!opt_.forward_only) {
    grads_ = std::make_unique<gradient_path>(cfg_, opt_, *dev_, *store_, *worker_, meter_, plan_.micro_group);
    optim_ = std::make_unique<optimizer_path>(opt_, *dev_, *store_, *grads_, *pool_);
  }
  validator_ = std::make_unique<step_validator>(opt_, store_->num_units());
  if (grads_ && !grads_->resident())
    for (int64_t u = 0; u < store_->num_units(); ++u)
      if (grads_->is_resident(u)) validator_->set_on_device(u);
  if (opt_.comm && opt_.comm->world() > 1) {
    // Every rank judges the step from the same sums, so all take the same decision.
    validator_->all_reduce = [comm = opt_.comm](cpu_optim::grad_stats& s) {
      at::Tensor t = at::tensor({s.sum_sq, double(s.nonfinite)}, at::kDouble);
      comm->all_reduce_sum(t, comm_channel::channel_engine);
      s.sum_sq = t[0].item<double>();
      s.nonfinite = int64_t(t[1].item<double>());
    };
  }
  rope_ = model::make_rope(cfg_, rotary_positions(cfg_, opt_), dev_->device());
}

engine::~engine() {
  try {
    if (worker_) worker_->wait_idle();
    if (dev_) dev_->synchronize();
  } catch (...) {
  }
  worker_.reset();  // its thread's tasks reference the parts below
}

void engine::params_changed() {
  // Not wait_updates(): in none mode it copies the device state back over the host weights the
  // caller has just changed.
  worker_->wait_idle();
  store_->refresh_shadows();
  pool_->unstage_embed();   // rows staged from the old table
  for (int64_t u = 0; u < store_->num_units(); ++u) worker_->submit_update(u, [] {});  // device copies are stale
  worker_->wait_idle();
  if (opt_.mode == offload_mode::offload_none || opt_.resident_blocks > 0) {
    pool_->refresh();
    if (optim_) optim_->upload();
    dev_->synchronize();
  }
}

void engine::wait_updates() {
  worker_->wait_idle();
  if ((opt_.mode == offload_mode::offload_none || opt_.resident_blocks > 0) && optim_) {
    optim_->download();  // the host tier is the checkpoint source
    dev_->synchronize();
  }
  store_->state().flush();
}

micro_batch micro_batch::from_tokens(const at::Tensor& tokens) {
  FERRY_CHECK(tokens.dim() == 2 && tokens.size(1) >= 2 && at::isIntegralType(tokens.scalar_type(), false),
              "a batch is (B, T+1) integer token ids with T >= 1; got ", tokens.scalar_type(), " ", tokens.sizes());
  const int64_t T = tokens.size(1) - 1;
  return {tokens.narrow(1, 0, T), tokens.narrow(1, 1, T), at::Tensor()};
}

micro_batch micro_batch::from_rows(const int64_t* inputs, const int64_t* labels, const int64_t* positions, int64_t B,
                                  int64_t T, int64_t columns) {
  FERRY_ASSERT(columns >= 1 && columns <= T, "from_rows: ", columns, " columns of ", T);
  auto take = [&](const int64_t* p) {
    return at::from_blob(const_cast<int64_t*>(p), {B, T}, at::kLong).narrow(1, 0, columns).clone();
  };
  return {take(inputs), take(labels), positions ? take(positions) : at::Tensor()};
}

void engine::check_batch(const micro_batch& mb, bool training) const {
  const at::Tensor &inputs = mb.inputs, &labels = mb.labels;
  FERRY_CHECK(inputs.dim() == 2 && inputs.size(1) >= 1 && at::isIntegralType(inputs.scalar_type(), false) &&
                  labels.sizes() == inputs.sizes() && at::isIntegralType(labels.scalar_type(), false),
              "a batch is (B, T) integer inputs and labels of the same shape, T >= 1; got inputs ",
              inputs.scalar_type(), " ", inputs.sizes(), " and labels ", labels.scalar_type(), " ", labels.sizes());
  const int64_t B = inputs.size(0), T = inputs.size(1);
  FERRY_CHECK(!training || B * T <= opt_.max_batch * opt_.max_seq, "batch of ", B, " x ", T,
              " tokens exceeds the planned ", opt_.max_batch, " x ", opt_.max_seq);
  check_token_ids(inputs);
  FERRY_CHECK(((labels == -100) | ((labels >= 0) & (labels < cfg_.vocab_size))).all().item<bool>(),
              "target id outside the model's vocabulary [0, ", cfg_.vocab_size, ") and not -100 (ignored)");
  if (mb.positions.defined()) {
    FERRY_CHECK(mb.positions.sizes() == inputs.sizes(), "packed positions ", mb.positions.sizes(),
                " must be shaped like the inputs ", inputs.sizes());
    model::check_positions(mb.positions, rope_.cos.size(0));
  }
}

void engine::check_token_ids(const at::Tensor& ids) const {
  FERRY_CHECK(ids.numel() == 0 || (ids.min().item<int64_t>() >= 0 && ids.max().item<int64_t>() < cfg_.vocab_size),
              "token id outside the model's vocabulary [0, ", cfg_.vocab_size, ")");
}

// The use order of units in one micro-batch: blocks forward, head, and for training the blocks
// backward.
std::vector<int64_t> engine::schedule(bool backward) const {
  std::vector<int64_t> uses;
  const int64_t L = cfg_.num_hidden_layers;
  for (int64_t i = 0; i < L; ++i) uses.push_back(store_->block_unit(i));
  uses.push_back(store_->head_unit());
  if (backward)
    for (int64_t i = L - 1; i >= 0; --i) uses.push_back(store_->block_unit(i));
  return uses;
}

// The order the offloaded updates acquire the units' state, which the state tier reads ahead in:
// speculative updates follow the backward (head, blocks L..1, embedding); otherwise the updates
// (and a speculative step's fix-ups) run after the backward in forward order. Resident blocks
// (engine_options::resident_blocks) are stepped on the device and take no part.
std::vector<int64_t> engine::update_order(bool speculate) const {
  std::vector<int64_t> order;
  if (speculate) {
    order.push_back(store_->head_unit());
    for (int64_t i = cfg_.num_hidden_layers - 1; i >= 0; --i) order.push_back(store_->block_unit(i));
    order.push_back(store_->embed_unit());
  } else {
    for (int64_t u = 0; u < store_->num_units(); ++u) order.push_back(u);
  }
  order.erase(std::remove_if(order.begin(), order.end(), [this](int64_t u) { return grads_->is_resident(u); }),
              order.end());
  return order;
}

step_result engine::train_step(const std::vector<at::Tensor>& micro_batches, double lr,
                               const std::vector<at::Tensor>* next) {
  auto batches = [](const std::vector<at::Tensor>& tokens) {
    std::vector<micro_batch> mbs;
    for (const at::Tensor& t : tokens) mbs.push_back(micro_batch::from_tokens(t));
    return mbs;
  };
  if (!next) return train_step(batches(micro_batches), lr);
  const std::vector<micro_batch> nx = batches(*next);
  return train_step(batches(micro_batches), lr, &nx);
}

step_result engine::train_step(const std::vector<micro_batch>& micro_batches, double lr,
                               const std::vector<micro_batch>* next) {
  FERRY_CHECK(!opt_.forward_only, "train_step on an inference engine (engine_options::forward_only): it has no ",
              "gradient buffers or optimizer state; build the engine without forward_only to train");
  FERRY_ASSERT(!micro_batches.empty(), "train_step without micro-batches");
  int64_t total_targets = 0;
  for (const auto& mb : micro_batches) {
    check_batch(mb, true);
    total_targets += (mb.labels != -100).sum().item<int64_t>();
  }
  const bool ranks = opt_.comm && opt_.comm->world() > 1;
  if (ranks) {
    // The loss is the mean over the global batch: every rank scales its gradient by the targets of
    // all ranks, so the sum over the ranks is the one-rank gradient of the whole batch.
    at::Tensor t = at::tensor({double(total_targets)}, at::kDouble);
    opt_.comm->all_reduce_sum(t, comm_channel::channel_engine);
    total_targets = int64_t(t.item<double>());
  }
  FERRY_CHECK(total_targets > 0, "the batch has no target tokens (every label is -100)");

  // From here on the step changes state.
  ++step_calls_;
  const auto t_start = clock_type::now();
  auto guard = dev_->enter_compute();
  dev_->reset_memory_peak();
  meter_.reset(/*time_copies=*/!grads_->resident());
  const engine_state& st = validator_->state();
  const bool speculate = validator_->speculating();
  // Deferred speculation (engine_options::defer_speculative): the units' statistics run ahead of
  // the speculative updates, which are queued by unit; the step ends at the verdict. Not with ranks
  // (their updates end in collectives, which must run in one order on every rank) nor with the
  // state on disk (the tier reads ahead in the order the updates acquire it).
  const bool deferred = defer_ && speculate && !ranks && opt_.state_on != state_place::place_nvme;
  const cpu_optim::adamw_hparams hp{float(lr), float(opt_.beta1), float(opt_.beta2), float(opt_.eps),
                                     float(opt_.weight_decay)};
  const int64_t step = st.optimizer_steps + 1;
  const double mult = 1.0 / st.scaler.scale;                       // unscales the gradient
  const double grad_scale = st.scaler.scale / double(total_targets);  // what the loss's backward starts from
  const std::vector<int64_t> uses = schedule(true);
  const int64_t L = cfg_.num_hidden_layers;
  const int64_t eu = store_->embed_unit(), hu = store_->head_unit();

  step_result r;
  r.loss_scale = st.scaler.scale;
  r.speculated = speculate;
  state_tier& tier = store_->state();
  if (!grads_->resident())
    for (int64_t u : update_order(speculate)) tier.prefetch(u);   // reads overlap the forward and backward
  // Groups of micro-batches (memory_plan::micro_group; resident: one at a time): each unit is
  // acquired once per group, runs the group's micro-batches one after another, and its gradient is
  // the group's sum (gradient_path::fold); the host sums the groups as it sums single micro-batches.
  const int64_t n_micro = int64_t(micro_batches.size());
  const int64_t group = grads_->resident() ? 1 : std::max<int64_t>(1, plan_.micro_group);
  grads_->begin_step((n_micro + group - 1) / group);
  grads_->set_tasks_ahead(deferred);
  if (source_stats_)
    grads_->set_source_stats(mult, [this, mult](const void* g, cpu_optim::dtype t, size_t n) {
      return optim_->stats_of(g, t, n, mult);
    });
  else
    grads_->set_source_stats(mult, {});
  int64_t previous_log_bytes = 0;   // deferred: the previous step's undo logs, once its updates have run
  struct micro_state {
    at::Tensor inputs, labels, x, dx;
    model::packing pk;   // packed rows: positions restart per example, attention stays within it
    std::vector<model::block_saved> saved;
    std::vector<at::Tensor> block_in;
    const model::packing* packed() const { return pk.positions.defined() ? &pk : nullptr; }
  };
  double loss_sum = 0;
  // FERRY_TRACE: when the device finished each unit's forward and backward (timed at the end).
  std::vector<std::tuple<const char*, int64_t, event_ptr>> gpu_marks;
  const bool tracing = trace::enabled() && dev_->is_cuda();
  const double trace_t0 = trace::enabled() ? trace::now_ms() : 0;
  auto mark = [&](const char* what, int64_t u) {
    if (tracing) gpu_marks.emplace_back(what, u, dev_->record(queue::queue_compute, true));
  };
  mark("gpu_start", -1);
  for (int64_t g0 = 0; g0 < n_micro; g0 += group) {
    const int64_t gn = std::min(group, n_micro - g0);
    const bool first = g0 == 0, last = g0 + gn == n_micro;
    auto task = [&](int64_t u) { return host_task(u, last, speculate, deferred, mult, hp, step); };
    // The test hook's poison, where the statistics are taken at the source: written there.
    auto poison_at_source = [&](int64_t u) {
      if (last && poison_now(u) && !grads_->is_resident(u) && grads_->stats_at_source(u))
        grads_->poison_source(u, opt_.debug_poison_index, opt_.debug_poison_value);
    };
    // Sends unit u's gradient; deferred, after the last micro-batch, its update follows.
    auto send = [&](int64_t u) {
      poison_at_source(u);
      grads_->send(u, first, last, task(u), speculate && !deferred);
      if (deferred && last && !grads_->is_resident(u)) queue_deferred(u, mult, hp, step);
    };
    std::vector<micro_state> ms(static_cast<size_t>(gn));
    for (int64_t j = 0; j < gn; ++j) {
      const micro_batch& mb = micro_batches[size_t(g0 + j)];
      micro_state& m = ms[size_t(j)];
      m.inputs = mb.inputs.to(at::kLong).contiguous();
      m.labels = mb.labels.to(at::kLong).contiguous().to(dev_->device());
      if (mb.positions.defined()) m.pk = model::make_packing(mb.positions, rope_);
      m.saved.resize(static_cast<size_t>(L));
      m.block_in.resize(static_cast<size_t>(plan_.recompute_blocks));
      m.x = pool_->embed(m.inputs);
    }

    // The first plan_.recompute_blocks blocks keep only their input; their forward runs again,
    // saving, just before their backward (block_forward_whole is block_forward's result, bit for bit).
    size_t at = 0;
    for (int64_t i = 0; i < L; ++i, ++at) {
      const int64_t u = store_->block_unit(i);
      const model::block_weights w = model::block_views(pool_->acquire(u, uses, at), cfg_);
      for (micro_state& m : ms) {
        if (i < plan_.recompute_blocks) {
          m.block_in[size_t(i)] = m.x;
          m.x = model::block_forward_whole(m.x, w, cfg_, rope_, m.packed());
        } else {
          m.x = model::block_forward(m.x, w, cfg_, rope_, m.saved[size_t(i)], m.packed());
        }
      }
      pool_->release(u);
      mark("gpu_fwd", u);
    }

    // The loss and its backward, in chunks: no logits kept.
    const model::head_weights hw = pool_->head_views(pool_->acquire(hu, uses, at++));
    // Every unit has been loaded since the previous step: its updates have all run.
    if (first) previous_log_bytes = deferred_log_bytes_.exchange(0);
    const at::Tensor head_grad = grads_->target(hu);
    model::head_weights hg = grads_->head_views(head_grad);
    for (int64_t j = 0; j < gn; ++j) {
      micro_state& m = ms[size_t(j)];
      model::head_result hr =
          model::head_forward_backward(m.x, hw.norm, hw.lm_head, m.labels, cfg_, opt_.ce_chunk, grad_scale, &m.dx,
                                       &hg.norm, &hg.lm_head, grads_->accumulate_on_device(hu, first && j == 0));
      m.x = at::Tensor();
      loss_sum += hr.loss_sum;
      grads_->fold(head_grad, j, gn);
    }
    pool_->release(hu);
    mark("gpu_head", hu);
    send(hu);

    for (int64_t i = L - 1; i >= 0; --i, ++at) {
      const int64_t u = store_->block_unit(i);
      const model::block_weights w = model::block_views(pool_->acquire(u, uses, at), cfg_);
      const at::Tensor g = grads_->target(u);
      const model::block_weights gv = model::block_views(g, cfg_);
      for (int64_t j = 0; j < gn; ++j) {
        micro_state& m = ms[size_t(j)];
        if (i < plan_.recompute_blocks) {
          model::block_forward(m.block_in[size_t(i)], w, cfg_, rope_, m.saved[size_t(i)], m.packed());
          m.block_in[size_t(i)] = at::Tensor();
        }
        m.dx = model::block_backward(m.dx, w, cfg_, rope_, m.saved[size_t(i)], gv,
                                     grads_->accumulate_on_device(u, first && j == 0));
        if (!grads_->is_resident(u)) grads_->fold(g, j, gn);   // resident: the backward added in place
      }
      pool_->release(u);
      mark("gpu_bwd", u);
      send(u);
    }
    // Resident blocks of an offloaded run: their statistics into the validator's records before
    // the embedding's task is queued (the split embedding update judges the step from them all).
    if (last && opt_.resident_blocks > 0) {
      for (int64_t u = 0; u < store_->num_units(); ++u)
        if (grads_->is_resident(u) && poison_now(u)) debug_poison(u);
      const std::vector<cpu_optim::grad_stats> rs = optim_->resident_unit_stats(mult);
      for (int64_t u = 0; u < store_->num_units(); ++u)
        if (grads_->is_resident(u)) {
          step_validator::unit_record& rec = validator_->unit(u);
          rec.stats = rs[size_t(u)];
          rec.applied = false;
          rec.log.clear();
        }
    }
    poison_at_source(eu);
    for (int64_t j = 0; j < gn; ++j) {
      const bool last_here = j + 1 == gn;
      grads_->send_embed(ms[size_t(j)].dx, ms[size_t(j)].inputs, first && j == 0, last && last_here,
                         last_here ? task(eu) : std::function<void()>(), speculate && !deferred, j);
      ms[size_t(j)].dx = at::Tensor();
    }
    if (deferred && last) {
      // The next step's rows first where its batches are known (untied: a tied head reads the
      // whole table at the end of the forward).
      if (rows_first_ && next && !next->empty() && !cfg_.tie_word_embeddings)
        r.embed_rows_first = queue_embedding_split(*next, mult, hp, step);
      if (r.embed_rows_first == 0) queue_deferred(eu, mult, hp, step);
    }
  }
  if (ranks) {
    at::Tensor t = at::tensor({loss_sum}, at::kDouble);
    opt_.comm->all_reduce_sum(t, comm_channel::channel_engine);
    loss_sum = t.item<double>();
  }
  r.loss = loss_sum / double(total_targets);
  r.n_targets = total_targets;

  // Validation: the global facts, then the updates or the fix-ups of the speculative ones.
  const auto t_tail = clock_type::now();
  step_verdict v;
  if (grads_->resident()) {
    for (int64_t u = 0; u < store_->num_units(); ++u)
      if (poison_now(u)) debug_poison(u);
    const cpu_optim::grad_stats total = optim_->resident_stats(mult);
    v = validator_->judge(&total);
    if (!v.skipped)
      for (int64_t u = 0; u < store_->num_units(); ++u) optim_->resident_step(u, mult * v.clip_coef, hp, step);
  } else if (deferred) {
    worker_->wait_tasks();   // the statistics; the speculative updates run on
    v = validator_->judge();
    if (v.fix) {
      worker_->wait_idle();  // the fix-ups redo or undo what the updates applied
      // A split embedding update took the same verdict and updated the table as one, with its log.
      FERRY_ASSERT(r.embed_rows_first == 0 || split_.whole, "the embedding's split update missed the fix-up");
      r.embed_rows_first = 0;
      r.rollbacks = validator_->queue_updates(v, speculate, mult, hp, step, *worker_, *optim_, *dev_);
      worker_->wait_idle();
    }
    r.undo_log_bytes = previous_log_bytes;
    r.tail_ms = ms_since(t_tail);
  } else {
    worker_->wait_idle();
    v = validator_->judge();
    if (speculate && v.fix)
      for (int64_t u : update_order(false)) tier.prefetch(u);   // the fix-ups re-acquire every unit
    r.undo_log_bytes = validator_->undo_log_bytes();
    r.rollbacks = validator_->queue_updates(v, speculate, mult, hp, step, *worker_, *optim_, *dev_);
    if (speculate || opt_.mode == offload_mode::offload_blocked) worker_->wait_idle();
    r.tail_ms = ms_since(t_tail);
  }
  // Resident blocks: the device AdamW with the verdict's multiplier, on the compute queue ahead of
  // the next forward.
  if (opt_.resident_blocks > 0 && !v.skipped)
    for (int64_t u = 0; u < store_->num_units(); ++u)
      if (grads_->is_resident(u)) optim_->resident_step(u, mult * v.clip_coef, hp, step);
  validator_->conclude(v);
  r.grad_norm = v.grad_norm;
  r.clip_coef = v.clip_coef;
  r.skipped = v.skipped;

  event_ptr last_mark = tracing ? dev_->record(queue::queue_compute, true) : nullptr;
  dev_->synchronize();
  if (trace::enabled()) {
    const double t_sync = trace::now_ms();
    for (auto& [what, u, e] : gpu_marks) {
      const double t = t_sync - dev_->elapsed_ms(e, last_mark);
      trace::record(what, u, t, t);
    }
    trace::record("step", int64_t(step_calls_), trace_t0, t_sync);
    trace::record("tail", -1, t_sync - ms_since(t_tail), t_sync);
  }
  meter_.timing = false;
  for (auto& [a, b] : meter_.h2d_timers) r.h2d_ms += dev_->elapsed_ms(a, b);
  for (auto& [a, b] : meter_.d2h_timers) r.d2h_ms += dev_->elapsed_ms(a, b);
  r.h2d_bytes = meter_.h2d_bytes;
  r.d2h_bytes = meter_.d2h_bytes;
  r.stall_update_ms = meter_.stall_ms;
  r.shard_wait_ms = meter_.shard_wait_ms;
  r.cpu_adam_ms = worker_->take_busy_ms(&r.cpu_tasks_ms);
  if (!grads_->resident()) r.updates_pending = worker_->pending_updates();
  const tier_io io = tier.take_io();   // write-backs of this step's last updates may still run
  r.disk_wait_ms = io.wait_ms;
  r.disk_read_bytes = io.read_bytes;
  r.disk_write_bytes = io.write_bytes;
  const device_memory_stats mem = dev_->memory_stats();
  r.gpu_alloc_peak = mem.allocated_peak;
  r.gpu_reserved_peak = mem.reserved_peak;
  r.step_ms = ms_since(t_start);
  return r;
}

}  // namespace ferry::engine
