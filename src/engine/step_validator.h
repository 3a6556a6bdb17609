#pragma once
// The step validator: the facts about a step that only all of its gradients decide, and what
// follows from them.
//   statistics   each unit's (sum of squares, non-finite count) of its unscaled gradient, summed
//                into the global norm; `all_reduce` is where data-parallel ranks will sum theirs,
//                so every rank takes the same decision
//   decisions    global-norm clipping, fp16 overflow (skip the step, back the loss scale off),
//                loss-scale growth (torch.amp.GradScaler's rule)
//   speculation  whether this step's updates run during backward (speculate=auto: only after
//                kRecentSteps steps in a row needed no fix-up), each unit's undo log, and the
//                fix-ups once the verdict is known: redo with the clip coefficient, undo a skipped
//                step, or (not speculating) the updates themselves, queued in forward order
// engine_state is what a checkpoint saves beside the weights and moments.
#include <cstdint>
#include <functional>
#include <vector>

#include "cpu_optim/adamw.h"
#include "src/engine/options.h"
#include "src/engine/optimizer_path.h"
#include "src/engine/update_worker.h"

namespace ferry::engine {

// The scaler of torch.amp.GradScaler: scale, growth tracker.
struct loss_scaler_state {
  double scale = 65536.0;
  int64_t good_steps = 0;
};

// The engine's training state beside the tier's weights and moments: AdamW's step count (skipped
// steps do not count), the loss scaler, and which recent steps needed a fix-up (drives
// speculate=auto, so a resumed run takes the same path).
struct engine_state {
  int64_t optimizer_steps = 0;
  loss_scaler_state scaler;
  std::vector<bool> recent_fixes;
};

struct step_verdict {
  double grad_norm = 0;   // of the unscaled gradient before clipping; NaN when non-finite
  double clip_coef = 1;
  bool skipped = false;   // non-finite gradient: no update
  bool fix = false;       // speculative updates must be redone or undone
};

class step_validator {
 public:
  static constexpr int kRecentSteps = 8;

  step_validator(const engine_options& opt, int64_t num_units);

  engine_state& state() { return state_; }
  const engine_state& state() const { return state_; }
  // Whether this step's updates run speculatively during backward.
  bool speculating() const;

  // Per unit, written by its host task on the update thread.
  struct unit_record {
    cpu_optim::grad_stats stats;
    bool applied = false;     // a speculative update of this step was applied
    cpu_optim::undo_log log;  // what undoing it needs beyond the new moments
  };
  unit_record& unit(int64_t u) { return units_[size_t(u)]; }
  // Units stepped on the device (engine_options::resident_blocks): the engine writes their
  // statistics into their records before the verdict and steps them itself; queue_updates skips them.
  void set_on_device(int64_t u) { on_device_[size_t(u)] = 1; }
  int64_t undo_log_bytes() const;

  // Ranks: sums the step's statistics over every rank in place (unset: one rank).
  std::function<void(cpu_optim::grad_stats&)> all_reduce;

  // The verdict from the units' statistics, or from `total` when the statistics were gathered as
  // one (the resident schedule).
  step_verdict judge(const cpu_optim::grad_stats* total = nullptr);

  // Offloaded: queues, per unit in forward order (not those on the device), the fix-up of its speculative update or (not
  // speculating) the update itself. Returns the units rolled back.
  int64_t queue_updates(const step_verdict& v, bool speculate, double spec_mult, const cpu_optim::adamw_hparams& hp,
                        int64_t step, update_worker& worker, optimizer_path& optim, backend& dev);

  // After the step's updates: the step count, the recent-fix window and the loss scaler.
  void conclude(const step_verdict& v);

 private:
  const engine_options& opt_;
  std::vector<unit_record> units_;
  std::vector<char> on_device_;
  engine_state state_;
};

}  // namespace ferry::engine
