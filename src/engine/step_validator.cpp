#include "src/engine/step_validator.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace ferry::engine {

step_validator::step_validator(const engine_options& opt, int64_t num_units)
    : opt_(opt), units_(size_t(num_units)), on_device_(size_t(num_units), 0) {
  state_.scaler.scale = opt.dtype == at::kHalf ? opt.loss_scale : 1.0;
}

bool step_validator::speculating() const {
  if (opt_.mode != offload_mode::offload_overlapped) return false;
  if (opt_.speculate == speculate_mode::speculate_on) return true;
  if (opt_.speculate == speculate_mode::speculate_off) return false;
  // Speculate only after kRecentSteps steps in a row validated without a fix-up: a rollback is
  // exact for the moments (cpu_optim::undo_log) but costs a second pass over the unit's state, so
  // rollbacks stay at most one per kRecentSteps steps while clipping or overflow is rare, and
  // none while they are common (where speculating would not pay).
  const auto& recent = state_.recent_fixes;
  if (int(recent.size()) < kRecentSteps) return false;
  return std::none_of(recent.begin(), recent.end(), [](bool f) { return f; });
}

int64_t step_validator::undo_log_bytes() const {
  int64_t b = 0;
  for (const auto& u : units_) b += int64_t(u.log.bytes());
  return b;
}

step_verdict step_validator::judge(const cpu_optim::grad_stats* total) {
  cpu_optim::grad_stats sum;
  if (total) {
    sum = *total;
  } else {
    for (const auto& u : units_) {
      sum.sum_sq += u.stats.sum_sq;
      sum.nonfinite += u.stats.nonfinite;
    }
  }
  if (all_reduce) all_reduce(sum);
  step_verdict v;
  const double norm = std::sqrt(sum.sum_sq);
  v.skipped = sum.nonfinite > 0;
  v.grad_norm = v.skipped ? std::numeric_limits<double>::quiet_NaN() : norm;
  if (opt_.clip_grad > 0 && !v.skipped) v.clip_coef = std::min(1.0, opt_.clip_grad / (norm + 1e-6));
  v.fix = v.skipped || v.clip_coef < 1.0;
  return v;
}

int64_t step_validator::queue_updates(const step_verdict& v, bool speculate, double spec_mult,
                                      const cpu_optim::adamw_hparams& hp, int64_t step, update_worker& worker,
                                      optimizer_path& optim, backend& dev) {
  const double final_mult = spec_mult * v.clip_coef;
  int64_t rollbacks = 0;
  for (int64_t u = 0; u < int64_t(units_.size()); ++u) {
    if (on_device_[size_t(u)]) continue;
    unit_record& rec = units_[size_t(u)];
    if (speculate) {
      if (!v.fix) {
        worker.submit_update(u, [&rec] { rec.log.clear(); });
        continue;
      }
      ++rollbacks;
      worker.submit_update(u, [&rec, &optim, &dev, u, skipped = v.skipped, spec_mult, final_mult, hp, step] {
        dev.debug_delay();
        // A unit whose gradient was non-finite was left untouched by step(); the whole step is
        // then skipped, so there is nothing to undo for it (with ranks: in this rank's shard).
        if (!rec.applied) {
          optim.republish(u);
          return;
        }
        if (skipped) optim.undo(u, spec_mult, hp, step, rec.log);
        else optim.redo(u, spec_mult, final_mult, hp, step, rec.log);
        rec.log.clear();
      });
    } else if (!v.skipped) {
      // Not skipped: every unit's gradient times spec_mult was finite, and final_mult <= spec_mult
      // (clip coefficient <= 1), so the optimizer need not scan it again.
      worker.submit_update(u, [&rec, &optim, &dev, u, final_mult, hp, step] {
        dev.debug_delay();
        rec.stats = optim.step(u, final_mult, hp, step, nullptr, /*finite_known=*/true);
        rec.applied = rec.stats.nonfinite == 0;
      });
    } else {
      worker.submit_update(u, [] {});
    }
  }
  return rollbacks;
}

void step_validator::conclude(const step_verdict& v) {
  if (!v.skipped) ++state_.optimizer_steps;
  state_.recent_fixes.push_back(v.fix);
  if (int(state_.recent_fixes.size()) > kRecentSteps) state_.recent_fixes.erase(state_.recent_fixes.begin());
  // torch.amp.GradScaler: back off on overflow, grow after a window of good steps (fp16 only).
  if (opt_.dtype == at::kHalf) {
    auto& s = state_.scaler;
    if (v.skipped) {
      s.scale *= opt_.scale_backoff;
      s.good_steps = 0;
    } else if (++s.good_steps >= opt_.scale_window) {
      s.scale *= opt_.scale_growth;
      s.good_steps = 0;
    }
  }
}

}  // namespace ferry::engine
