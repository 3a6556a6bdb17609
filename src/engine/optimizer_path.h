#pragma once
// The optimizer path: AdamW on one unit wherever its state is.
//   offloaded  on the update thread, over the unit's state in the tier (state_tier) and its summed
//              host gradient (gradient_path::host), writing the compute-dtype shadow the weight
//              pool loads next; statistics, speculative steps with their undo log, undo and redo.
//              With ranks each of these runs on this rank's shard of the unit (its master,
//              moments and reduced gradient) and ends by gathering the other ranks' shards of
//              the compute-dtype copy (param_store::publish_shadow)
//   resident   (none, and the resident blocks of an offloaded run: engine_options::resident_blocks)
//              fp32 master and moments on the device, the fused device AdamW (gpu::adamw_step; the
//              CPU kernel on the host backend), statistics of the resident gradients accumulated on
//              the device with one host sync per step
#include <ATen/core/Tensor.h>

#include <memory>
#include <utility>
#include <vector>

#include "cpu_optim/adamw.h"
#include "src/engine/backend.h"
#include "src/engine/gradient_path.h"
#include "src/engine/options.h"
#include "src/engine/param_store.h"
#include "src/engine/weight_pool.h"

namespace ferry::engine {

class optimizer_path {
 public:
  optimizer_path(const engine_options& opt, backend& dev, param_store& store, gradient_path& grads, weight_pool& pool);
  ~optimizer_path();

  // Offloaded units (update thread). mult multiplies the gradient (1/loss scale x clip).
  cpu_optim::grad_stats stats(int64_t u, double mult);
  // The same statistics of n elements of a gradient elsewhere (gradient_path::set_source_stats).
  cpu_optim::grad_stats stats_of(const void* grad, cpu_optim::dtype dtype, size_t n, double mult);
  // finite_known: the step's statistics already showed every grad * mult finite (cpu_optim
  // skips its pre-scan; see adamw::step).
  cpu_optim::grad_stats step(int64_t u, double mult, const cpu_optim::adamw_hparams& hp, int64_t step,
                             cpu_optim::undo_log* log, bool finite_known = false);
  // step() on the elements of `ranges` of unit u alone (cpu_optim::adamw::step_ranges: no undo
  // log, the gradient known finite), its shadow written there: one rank only. A unit stepped range
  // by range over a partition of its elements ends as one step() leaves it.
  void step_ranges(int64_t u, double mult, const cpu_optim::adamw_hparams& hp, int64_t step,
                   const std::vector<std::pair<size_t, size_t>>& ranges);
  // step(u, ..., log, finite_known = true) in `parts` calls (cpu_optim::adamw::step_part), for
  // an update the update thread may interrupt between parts: parts 0, ..., parts - 1 in turn leave
  // the unit, its shadow and the log as that step does. One rank only.
  void step_part(int64_t u, double mult, const cpu_optim::adamw_hparams& hp, int64_t step, cpu_optim::undo_log* log,
                 int64_t part, int64_t parts);
  void undo(int64_t u, double mult, const cpu_optim::adamw_hparams& hp, int64_t step, const cpu_optim::undo_log& log);
  void redo(int64_t u, double old_mult, double new_mult, const cpu_optim::adamw_hparams& hp, int64_t step,
            const cpu_optim::undo_log& log);

  // Ranks: a unit this rank's shard did not change (its speculative update was not applied) still
  // takes part in the all-gather the other ranks' fix-ups end with. One rank: nothing.
  void republish(int64_t u);

  // Resident units (the engine's thread, compute queue). resident_stats: summed over every unit
  // (none); resident_unit_stats: per unit, zero for the units not resident (resident_blocks).
  cpu_optim::grad_stats resident_stats(double mult);
  std::vector<cpu_optim::grad_stats> resident_unit_stats(double mult);
  void resident_step(int64_t u, double mult, const cpu_optim::adamw_hparams& hp, int64_t step);
  // Resident state <-> the host tier: upload after the host weights changed, download before a
  // checkpoint reads the tier.
  void upload();
  void download();

 private:
  cpu_optim::chunk_ref chunk(int64_t u, const state_view& s) const;
  void* shadow_shard(int64_t u) const;
  void publish(int64_t u, const state_view& s);
  void publish_range(int64_t u, const state_view& s, size_t b, size_t e);

  const engine_options& opt_;
  backend& dev_;
  param_store& store_;
  gradient_path& grads_;
  weight_pool& pool_;
  std::unique_ptr<cpu_optim::adamw> adam_;
  // The host backend's resident steps beside the update thread's (resident_blocks): their own
  // kernel object, so the engine's thread never shares adam_ with the update thread.
  std::unique_ptr<cpu_optim::adamw> resident_adam_;
  cpu_optim::adamw& resident_adam() { return resident_adam_ ? *resident_adam_ : *adam_; }
  std::vector<at::Tensor> master_, m_, v_;   // per unit, defined for the resident ones
};

}  // namespace ferry::engine
