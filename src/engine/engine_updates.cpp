// The engine's host tasks and updates on the update thread: each unit's statistics or speculative
// update, deferred speculation's updates (the embedding's in two parts: the rows the next step
// gathers first, then the rest), and the test hook's poison. The step itself is in engine.cpp.
#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>
#include <thread>

#include "src/common/error.h"
#include "src/engine/engine.h"

namespace ferry::engine {

// What runs on the update thread once unit u's gradient of the last micro-batch is summed on the
// host: a speculative update with its undo log, or only its statistics.
std::function<void()> engine::host_task(int64_t u, bool last, bool speculate, bool deferred, double mult,
                                        const cpu_optim::adamw_hparams& hp, int64_t step) {
  if (!last || grads_->is_resident(u)) return {};
  // Statistics taken where the gradient was made (gradient_path::stats_at_source) come with it,
  // poisoned there by the test hook; otherwise they are read from the host copy here.
  const bool at_source = grads_->stats_at_source(u);
  const bool poison = poison_now(u) && !at_source;
  return [this, u, speculate, deferred, mult, hp, step, poison, at_source] {
    if (poison) debug_poison(u);
    grads_->reduce(u);  // ranks: this rank's shard of the sum over the ranks
    step_validator::unit_record& rec = validator_->unit(u);
    if (!speculate || deferred) {   // deferred: the update follows (queue_deferred)
      rec.stats = at_source ? grads_->source_stats(u) : optim_->stats(u, mult);
      return;
    }
    dev_->debug_delay();
    if (!at_source) {
      rec.stats = optim_->step(u, mult, hp, step, &rec.log);
      rec.applied = rec.stats.nonfinite == 0;
      return;
    }
    // Known statistics: a non-finite gradient leaves the unit untouched, a finite one needs no
    // pre-scan.
    rec.stats = grads_->source_stats(u);
    rec.log.clear();
    rec.applied = rec.stats.nonfinite == 0;
    if (rec.applied) optim_->step(u, mult, hp, step, &rec.log, /*finite_known=*/true);
  };
}

void engine::queue_deferred(int64_t u, double mult, const cpu_optim::adamw_hparams& hp, int64_t step) {
  // In parts (engine_options::update_part), so that the update thread can take a unit the next
  // forward needs sooner between them; the parts together are one step with its undo log.
  const int64_t n = store_->unit(u).numel;
  const int64_t parts = opt_.update_part > 0 ? (n + opt_.update_part - 1) / opt_.update_part : 1;
  auto update = [this, u, mult, hp, step, parts](int64_t part) {
    step_validator::unit_record& rec = validator_->unit(u);
    if (part == 0) {
      rec.log.clear();
      rec.applied = false;
    }
    // A non-finite gradient skips the step: this unit is left untouched (nothing to undo).
    if (rec.stats.nonfinite != 0) return;
    debug_update_delay(parts);
    // The statistics (this step's task, run before) showed grad * mult finite: no pre-scan.
    if (parts > 1) optim_->step_part(u, mult, hp, step, &rec.log, part, parts);
    else optim_->step(u, mult, hp, step, &rec.log, /*finite_known=*/true);
    if (part + 1 < parts) return;
    rec.applied = true;
    deferred_log_bytes_ += int64_t(rec.log.bytes());
  };
  if (parts > 1) worker_->submit_update_parts(u, parts, update);
  else worker_->submit_update(u, [update] { update(0); }, /*by_unit=*/true);
}

void engine::debug_update_delay(int64_t parts) {
  dev_->debug_delay();
  if (opt_.debug_update_sleep_us > 0)
    std::this_thread::sleep_for(std::chrono::microseconds(opt_.debug_update_sleep_us / parts));
}

void engine::debug_poison(int64_t u) {
  FERRY_ASSERT(opt_.debug_poison_index >= 0 && opt_.debug_poison_index < store_->unit(u).numel,
               "debug_poison_index out of range");
  at::Tensor g;
  int64_t index = opt_.debug_poison_index;
  if (grads_->is_resident(u)) {
    g = grads_->resident_grad(u);
  } else {
    const host_grad hg = grads_->host_local(u);
    const at::ScalarType t = hg.dtype == cpu_optim::dtype::dtype_f32 ? at::kFloat : opt_.dtype;
    if (grads_->reduced_on_device(u)) {
      // The host buffer holds this rank's block of the sum over the ranks: the element's owner
      // poisons it (as a poisoned addend would have made the sum).
      index -= store_->shard_begin(u);
      if (index < 0 || index >= store_->shard_numel(u)) return;
    }
    g = at::from_blob(hg.data, {grads_->host_numel(u)}, at::TensorOptions().dtype(t));
  }
  g.narrow(0, index, 1).fill_(opt_.debug_poison_value);
}

int64_t engine::queue_embedding_split(const std::vector<micro_batch>& next, double mult,
                                      const cpu_optim::adamw_hparams& hp, int64_t step) {
  const int64_t eu = store_->embed_unit(), V = cfg_.vocab_size;
  const size_t h = size_t(cfg_.hidden_size), n = size_t(store_->unit(eu).numel);
  // The rows of the next step's first group (it gathers them before its first block); ids outside
  // the vocabulary are left for that step to refuse.
  split_.first.assign(size_t(V), 0);
  const int64_t group = std::max<int64_t>(1, plan_.micro_group);
  // The first micro-batch's ids, flat, which the first part gathers for it once they are current
  // (all within the vocabulary and the staging).
  at::Tensor ids0;
  bool stage = false;
  for (size_t j = 0; j < next.size() && int64_t(j) < group; ++j) {
    const at::Tensor ids = next[j].inputs.to(at::kLong).reshape({-1}).contiguous();
    const int64_t* id = ids.data_ptr<int64_t>();
    bool in_vocab = true;
    for (int64_t i = 0; i < ids.numel(); ++i) {
      if (id[i] >= 0 && id[i] < V) split_.first[size_t(id[i])] = 1;
      else in_vocab = false;
    }
    if (j == 0) {
      ids0 = ids.clone();
      stage = in_vocab && ids.numel() <= opt_.max_batch * opt_.max_seq;
    }
  }
  const int64_t rows = std::count(split_.first.begin(), split_.first.end(), uint8_t(1));
  if (rows == 0 || rows == V) {
    split_.first.clear();
    return 0;
  }
  // Runs of marked rows as element ranges; int8 moments widen them to whole quantization blocks
  // (whose scales the update rewrites together). The rest is the complement.
  const size_t q = store_->state().kind() == state_kind::state_int8 ? cpu_optim::k_quant_block : 1;
  split_.first_ranges.clear();
  split_.rest_ranges.clear();
  for (size_t r = 0; r < size_t(V); ++r) {
    if (!split_.first[r]) continue;
    const size_t b = (r * h) / q * q, e = std::min(n, ((r + 1) * h + q - 1) / q * q);
    if (!split_.first_ranges.empty() && split_.first_ranges.back().second >= b) split_.first_ranges.back().second = e;
    else split_.first_ranges.emplace_back(b, e);
  }
  size_t at = 0;
  for (const auto& [b, e] : split_.first_ranges) {
    if (b > at) split_.rest_ranges.emplace_back(at, b);
    at = e;
  }
  if (at < n) split_.rest_ranges.emplace_back(at, n);
  worker_->submit_update(
      eu,
      [this, eu, mult, hp, step, ids0, stage] {
        step_validator::unit_record& rec = validator_->unit(eu);
        rec.log.clear();
        rec.applied = false;
        split_.whole = true;
        if (rec.stats.nonfinite != 0) return;   // the step is skipped: nothing to update
        debug_update_delay();
        // Every statistic of the step is in: the embedding's task is the last one queued ahead, and
        // this update runs after it. So the verdict is known here. A step that needs a fix-up
        // updates the whole table with its undo log (as queue_deferred does); one that stands
        // updates the rows needed first, without a log, and leaves the rest to the second part.
        if (validator_->judge().fix) {
          optim_->step(eu, mult, hp, step, &rec.log, /*finite_known=*/true);
        } else {
          optim_->step_ranges(eu, mult, hp, step, split_.first_ranges);
          split_.whole = false;
          if (stage) pool_->stage_embed(ids0);
        }
        rec.applied = true;
        deferred_log_bytes_ += int64_t(rec.log.bytes());
      },
      /*by_unit=*/true);
  worker_->submit_update(
      split_.rest_unit,
      [this, eu, mult, hp, step] {
        if (split_.whole) return;
        debug_update_delay();
        optim_->step_ranges(eu, mult, hp, step, split_.rest_ranges);
      },
      /*by_unit=*/true, /*part_of=*/eu);
  return rows;
}

}  // namespace ferry::engine
