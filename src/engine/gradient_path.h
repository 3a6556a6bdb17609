#pragma once
// The gradient path: from the backward's device buffers to what the optimizer reads.
//   offloaded (blocked, overlapped)  each unit's gradient is written into one of two block
//       gradient slots (the head has its own), copied on the d2h queue into the unit's pinned
//       host buffer, and then, on the update thread: added into the unit's fp32 accumulator when
//       the step has several micro-batches (cpu_optim::accumulate), except the last one, which
//       stays in the host buffer and is added by the optimizer as it reads the sum; on the last
//       micro-batch the unit's host task (statistics, or a speculative update) runs. The embedding's input
//       gradient is scattered into its fp32 gradient on the host the same way. Where the host reads
//       exactly the slot (one group per step, one rank, not the embedding), the statistics are
//       taken from the slot before its copy (set_source_stats) and the host task only reads them.
//   resident (none)  every unit has its gradient buffer on the device; micro-batches accumulate
//       in place (the backward's accumulate flag) and nothing moves. Offloaded with
//       engine_options::resident_blocks, those blocks do the same (target() is their buffer, a
//       group's micro-batches add into it instead of fold(), send() moves nothing); the other
//       units take the offloaded path.
// Tied embeddings: the tied matrix has one gradient, the embedding's, summed from both uses. The
// head's backward writes its lm_head gradient (V, h) after the norm's in the head slot; on the host
// the head's task adds it into the embedding's fp32 gradient (it is the first to write that
// gradient in a step, so it overwrites on the first micro-batch and the scatter task then only
// adds), before the embedding's one update at the end of backward. Resident, the head's backward
// writes straight into the embedding's device gradient and the embedding's backward adds to it.
// Groups of micro-batches (memory_plan::micro_group > 1, offloaded): the engine runs a group's
// backwards of a unit one after another into the unit's slot, and fold() sums them in an fp32
// device buffer (one, the widest unit's size), rounding the group's sum into the slot once after
// the last; send() then moves that sum, and the host accumulates across groups as it does across
// micro-batches.
// Data-parallel ranks (param_store::shards), two ways:
//   on the host (default): the whole unit reaches the host; on the update thread, after the unit's
//       last micro-batch, reduce() sums it over the ranks in fp32 (a reduce-scatter of the host
//       buffers: Gloo, or staged through the GPUs by src/dist on CUDA) into this rank's shard,
//       which is all host() then shows the optimizer.
//   where it was made (engine_options::reduce_on_device; blocks, and the head and the embedding
//       unless tied): send() reduce-scatters the slot, padded to the ranks' equal blocks, in the
//       compute dtype on the compute queue and copies only this rank's block of the sum into the
//       unit's host buffer; reduce() then has nothing to do. The embedding's gradient stays on the
//       device in fp32 for the whole step (send_embed scatters every micro-batch into it), is
//       reduce-scattered in fp32 after the last, and its fp32 block is copied to the host.
#include <ATen/core/Tensor.h>

#include <functional>
#include <utility>
#include <vector>

#include "cpu_optim/adamw.h"
#include "src/engine/backend.h"
#include "src/engine/options.h"
#include "src/engine/param_store.h"
#include "src/engine/step_meter.h"
#include "src/engine/update_worker.h"
#include "src/model/layout.h"
#include "src/model/llama_config.h"

namespace ferry::engine {

// The gradient the optimizer reads for a unit: the host buffer and its dtype, plus (after several
// micro-batches) the fp32 sum of the earlier ones, which the optimizer adds in the same pass
// (cpu_optim::chunk_ref::grad_acc: the last micro-batch fused into the update).
struct host_grad {
  void* data = nullptr;
  cpu_optim::dtype dtype = cpu_optim::dtype::dtype_f32;
  const float* acc = nullptr;
};

cpu_optim::dtype to_optim_dtype(at::ScalarType t);

class gradient_path {
 public:
  // micro_group: the most micro-batches the engine runs together (memory_plan::micro_group).
  gradient_path(const model::llama_config& cfg, const engine_options& opt, backend& dev, param_store& store,
                update_worker& worker, step_meter& meter, int64_t micro_group = 1);
  ~gradient_path();
  gradient_path(const gradient_path&) = delete;
  gradient_path& operator=(const gradient_path&) = delete;

  // Every unit resident (none).
  bool resident() const { return all_resident_; }
  // Unit u's gradient stays on the device (none: every unit; offloaded: the resident blocks).
  bool is_resident(int64_t u) const { return size_t(u) < resident_.size() && resident_[size_t(u)].defined(); }
  // Before a step of n_micro micro-batches (groups of micro-batches: the groups), each unit's
  // gradient sent once per micro-batch: fp32 accumulators for the offloaded units when n_micro > 1
  // (allocated once, kept for later steps).
  void begin_step(int64_t n_micro);
  // Whether this step's host tasks (copies, sums, statistics) run ahead of queued updates
  // (update_worker::submit_task; the engine's deferred speculation).
  void set_tasks_ahead(bool ahead) { tasks_ahead_ = ahead; }
  // Statistics at the source (engine_options::stats_at_source) for this step's gradients, with
  // multiplier mult (grad * mult, as cpu_optim::adamw::stats): on CUDA a kernel on the compute queue
  // (when mult <= 1, so a finite half gradient stays finite times mult); on the host backends
  // host_stats, called in send() on the slot (the same function the update thread would call on the
  // copy, so their results are the same bits). Empty host_stats: off for the step. Call after
  // begin_step.
  using stats_fn = std::function<cpu_optim::grad_stats(const void* data, cpu_optim::dtype dtype, size_t n)>;
  void set_source_stats(double mult, stats_fn host_stats);
  // Whether send() of unit u's last micro-batch takes its statistics at the source this step: the
  // host gradient is exactly the slot (one group per step, one rank, not the embedding), or the
  // embedding's table summed on the device (one rank, embed_grad=device; any groups).
  bool stats_at_source(int64_t u) const;
  // Unit u's statistics taken at the source; valid in its host task after its last send().
  bool has_source_stats(int64_t u) const { return src_sent_[size_t(u)] != 0; }
  cpu_optim::grad_stats source_stats(int64_t u) const;
  // Test hook (engine_options::debug_poison_*): writes `value` at `index` of unit u's gradient in
  // the slot target(u) handed out, on the compute queue, before its statistics and copy; the
  // embedding's summed on the device: into its table after the step's last scatter (send_embed).
  void poison_source(int64_t u, int64_t index, double value);
  // Bytes of the fp32 accumulators begin_step has allocated (none while every step is one group).
  int64_t accumulation_bytes() const { return accum_bytes_; }
  // Whether the backward of unit u adds into target(u) instead of overwriting it (resident, after
  // the step's first micro-batch).
  bool accumulate_on_device(int64_t u, bool first_micro) const { return is_resident(u) && !first_micro; }

  // Where the backward writes unit u's gradient (flat, param_store::grad_numel elements); the
  // compute queue waits until the slot's previous copy to the host is done.
  at::Tensor target(int64_t u);
  // A group of `count` micro-batches: the backward of micro-batch `index` (0-based) has written
  // its gradient into grad (a target()); sums it on the compute queue into the fp32 device buffer,
  // and after the last (index == count - 1) leaves the group's sum, rounded once to the compute
  // dtype, in grad for send(). count == 1: nothing to do.
  void fold(const at::Tensor& grad, int64_t index, int64_t count);
  // The norm's (h) and lm_head's (V, h) gradients in target(head unit); with tied embeddings,
  // resident, lm_head's is the embedding's gradient buffer.
  model::head_weights head_views(const at::Tensor& head_target);
  // Unit u's gradient of this micro-batch is complete in target(u): moves it to the host and
  // queues its accumulation; on the last micro-batch, `task` runs on the update thread after it
  // (as an update of unit u's weights when `updates_weights`). Resident (is_resident(u)):
  // nothing to move, and `task` must be empty (resident units are validated and stepped on the
  // device).
  void send(int64_t u, bool first_micro, bool last_micro, std::function<void()> task, bool updates_weights);
  // The embedding's input gradient dx (B,T,h) for tokens (B,T) on the CPU: scattered into the
  // embedding's gradient (on the host, or on the device when resident), then `task` as in send.
  // index: the micro-batch's place in its group (0-based): each has its own pinned staging, so a
  // group's copies do not wait for each other's scatters.
  void send_embed(const at::Tensor& dx, const at::Tensor& tokens, bool first_micro, bool last_micro,
                  std::function<void()> task, bool updates_weights, int64_t index = 0);

  // The unit's summed gradient on the host, as the optimizer reads it (offloaded only); with ranks
  // the fp32 sum over the ranks of this rank's shard (param_store::shard_numel elements) once
  // reduce(u) has run.
  host_grad host(int64_t u) const;
  // This rank's own gradient of the whole unit (before reduce(u); host(u) with one rank).
  host_grad host_local(int64_t u) const;
  // Ranks: sums unit u's gradient over the ranks into this rank's shard (update thread, a
  // collective: every rank calls it for the same units in the same order). One rank: nothing.
  void reduce(int64_t u);
  // Ranks with engine_options::reduce_on_device: unit u's gradient is reduce-scattered where the
  // backward made it, so its host buffer (host_local) holds this rank's shard, summed over the ranks.
  bool reduced_on_device(int64_t u) const { return store_.grad_sharded(u); }
  // Elements of unit u's host gradient: its shard when reduced_on_device(u), else the whole unit.
  int64_t host_numel(int64_t u) const;
  // The resident gradient buffers (is_resident).
  at::Tensor& resident_grad(int64_t u) { return resident_[size_t(u)]; }

 private:
  struct slot {
    at::Tensor buf;
    event_ptr copied;
    at::Tensor shard;   // reduce_on_device: this rank's block of the sum over the ranks (buf is padded)
  };
  // The task waits for `copied` first (the worker may run other work until it is ready).
  void queue(int64_t u, std::function<void()> fn, bool updates_weights, const event_ptr& copied);
  // Statistics at the source of grad (what the host will read of unit u), in two halves around the
  // wait for the unit's earlier tasks. stats_on_device: on CUDA, the kernel on the compute queue
  // before the copy; returns its two floats for the 8-byte copy after the gradient's (undefined on
  // the host backends). stats_on_host: after the wait (those tasks may read the previous results),
  // records whether they were taken, and on the host backends takes them.
  at::Tensor stats_on_device(int64_t u, const at::Tensor& grad);
  void stats_on_host(int64_t u, bool taken, const at::Tensor& grad);
  // Waits for unit u's queued tasks before a copy overwrites what they read: the wait counts as a
  // stall and, with FERRY_TRACE, is a wait_tasks record.
  void wait_unit_tasks(int64_t u);

  const model::llama_config& cfg_;
  const engine_options& opt_;
  backend& dev_;
  param_store& store_;
  update_worker& worker_;
  step_meter& meter_;
  std::vector<at::Tensor> resident_;      // per unit, the resident ones' gradients (else undefined)
  bool all_resident_ = false;             // none
  at::Tensor group_sum_;                  // fp32, the widest unit: fold()'s sum of a group's micro-batches
  std::vector<slot> block_slots_;
  slot head_slot_;
  size_t next_slot_ = 0;
  std::vector<slot*> slot_of_;            // per unit: the slot target() handed out this micro-batch
  std::vector<float*> accum_;             // per unit: fp32 gradient sums when grad_accum > 1
  bool accumulating_ = false;             // this step has several micro-batches
  bool tasks_ahead_ = false;              // set_tasks_ahead
  int64_t accum_bytes_ = 0;               // of accum_
  // Per unit: its host gradient is the accumulator plus the last micro-batch in the host buffer.
  // Written by the engine thread only after the unit's earlier host tasks have run.
  std::vector<char> fused_;
  // Pinned staging of the embedding's input gradient, one per micro-batch of a group.
  std::vector<void*> embed_out_;
  // Ranks with the embedding reduced on the device: its fp32 gradient there (padded to the ranks'
  // blocks), this rank's block of the sum, and that block's latest copy to the host.
  // One rank (embed_grad=device): embed_shard_ is embed_grad_, the whole table.
  at::Tensor embed_grad_, embed_shard_;
  event_ptr embed_copied_;
  std::pair<int64_t, double> embed_poison_{-1, 0.0};   // poison_source of the embedding: (index, value)
  // Statistics at the source (set_source_stats): on for the step, the multiplier, the host backends'
  // function and results, and on CUDA the device's two floats per unit and their pinned copies.
  bool src_on_ = false;
  double src_mult_ = 1;
  stats_fn src_host_;
  std::vector<cpu_optim::grad_stats> src_host_stats_;
  std::vector<char> src_sent_;            // per unit: this step's last send() took them
  at::Tensor src_dev_;
  float* src_pinned_ = nullptr;
  std::vector<float*> shard_grad_;        // ranks: per unit, the fp32 sum over the ranks of this rank's shard
  float* shard_block_ = nullptr;          // ranks: the one (pinned) block shard_grad_ points into
};

}  // namespace ferry::engine
