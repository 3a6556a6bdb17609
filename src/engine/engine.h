#pragma once
// The offload engine: runs one optimizer step of a LLaMA model whose fp32 master weights and
// AdamW moments live in host memory (param_store), streaming each unit's compute-dtype weights to
// the device just before use and its gradients back as soon as backward makes them, with the CPU
// AdamW of unit i running while the device computes the backward of unit i-1.
//
// Step, overlapped mode (ARCHITECTURE.md "The step"):
//   forward   embed rows gathered on the host -> blocks 1..L streamed through a pool of
//             prefetch+1 weight slots -> final norm + lm_head + chunked cross-entropy, whose
//             backward runs at once (no logits kept; with tied embeddings lm_head is the
//             embedding's matrix, and its gradient is added to the embedding's on the host)
//   backward  blocks L..1; the last units of the forward are still resident and are reused;
//             gradients go to one of two gradient slots, then to pinned host memory on the d2h
//             queue; the update thread waits for that copy and updates the unit
//   validate  clipping and fp16 overflow are global facts known after the last unit: the updates
//             made during backward used clip coefficient 1; a step that clips is redone, one that
//             overflowed is undone and skipped (loss scale halved). speculate=auto speculates
//             only after 8 steps in a row needed no fix-up; otherwise backward only gathers
//             statistics and the updates run after it, in forward order, overlapping the next
//             forward. (A rollback is exact to rounding of the speculative moments, not bit for
//             bit; speculate=off gives the blocked schedule's results bit for bit.) Speculating
//             on one rank with the state in host memory (defer_speculative), backward queues each
//             unit's statistics ahead of the updates and the step ends once they are in: when no
//             fix-up is needed the updates run on behind the next forward, lowest unit first.
//   next      the next forward of unit i waits only for unit i's update. Given the next step's
//             micro-batches (train_step's `next`), a deferred step updates first the embedding rows
//             the next forward gathers and the rest of the table after every other unit
//             (engine_options::embed_rows_first), so the next forward waits for those rows alone.
// Several micro-batches run in groups (memory_plan::micro_group, engine_options::micro_group):
// each unit is streamed in once per group and runs the forward (later the backward) of every
// micro-batch of the group before the next unit, and the group's gradients are summed on the
// device in fp32 (gradient_path::fold) before one copy to the host. One group per step moves what
// one batch of the same tokens moves and leaves the host only the update; the groups of a step
// are summed on the host.
// blocked: the same work with every copy and update synchronous. none: everything resident on
// the device with a device AdamW. engine_options::forward_only builds an inference engine of any
// mode: the weight slots (none: the compute-dtype weights) and nothing for gradients or AdamW.
//
// The three modes are one step loop (engine.cpp) over four parts, each a policy per mode:
//   weight_pool      where the device finds each unit's weights (resident / streamed slots)
//   gradient_path    where gradients go (resident, accumulated in place / to the host, summed there)
//   optimizer_path   where AdamW runs (device / update thread over the state tier)
//   step_validator   global statistics, clipping, overflow, loss scale, speculation and fix-ups
// below them param_store (layout, pinned shadows and gradients) and its state_tier (master weights
// and moments). README "Engine notes" walks through them.
#include <ATen/core/Tensor.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <utility>
#include <vector>

#include "src/engine/backend.h"
#include "src/engine/gradient_path.h"
#include "src/engine/memory_plan.h"
#include "src/engine/optimizer_path.h"
#include "src/engine/options.h"
#include "src/engine/param_store.h"
#include "src/engine/step_meter.h"
#include "src/engine/step_validator.h"
#include "src/engine/update_worker.h"
#include "src/engine/weight_pool.h"
#include "src/model/block.h"
#include "src/model/embed_head.h"
#include "src/model/llama_config.h"
#include "src/model/rope.h"

namespace ferry::engine {

// One micro-batch, int64 tensors on the CPU.
struct micro_batch {
  at::Tensor inputs;   // (B, T) token ids
  at::Tensor labels;   // (B, T) the target of each input position; -100: no loss there
  // (B, T) the rotary position of each token, or undefined for 0..T-1 in every row. Defined for
  // packed examples: each example is a run 0, 1, 2, ... of positions, and its tokens attend only to
  // earlier tokens of the same run.
  at::Tensor positions;

  // One sequence of T+1 tokens per row: inputs [:, :-1], labels [:, 1:].
  static micro_batch from_tokens(const at::Tensor& tokens);
  // Copies the first `columns` columns of (B, T) row-major buffers (the rest is padding the step
  // need not run); positions may be null (undefined positions).
  static micro_batch from_rows(const int64_t* inputs, const int64_t* labels, const int64_t* positions, int64_t B,
                               int64_t T, int64_t columns);
};

struct step_result {
  double loss = 0;          // mean cross-entropy over the step's target tokens
  int64_t n_targets = 0;
  double grad_norm = 0;     // global norm of the unscaled gradient before clipping
  double clip_coef = 1;     // applied multiplier (1 when no clipping)
  bool skipped = false;     // non-finite gradient: no update (fp16: loss scale reduced)
  double loss_scale = 1;    // the scale used for this step's backward
  bool speculated = false;  // updates ran during backward
  int64_t rollbacks = 0;    // units undone or redone after validation
  // Host memory of the speculative updates' undo logs (cpu_optim::undo_log); a deferred speculating
  // step (engine_options::defer_speculative) reports its previous step's, whose updates have run.
  int64_t undo_log_bytes = 0;
  // Updates still queued or running when the step returned (a deferred speculating step's, or a
  // non-speculating step's, which run behind the next forward).
  int64_t updates_pending = 0;
  // where the time went (milliseconds) and what moved
  double step_ms = 0, h2d_ms = 0, d2h_ms = 0, cpu_adam_ms = 0, stall_update_ms = 0, tail_ms = 0;
  // Of cpu_adam_ms (the update thread's busy time): its gradient tasks (waits for their copies,
  // sums, statistics, the embedding's scatter), the rest being updates.
  double cpu_tasks_ms = 0;
  // Shared shadows (ranks on one machine): the engine's thread waiting, after its own update of a
  // unit, for the other ranks' shards of it before loading it.
  double shard_wait_ms = 0;
  int64_t h2d_bytes = 0, d2h_bytes = 0;
  // The optimizer state tier on disk (optimizer_state_on=nvme; 0 otherwise): time its acquires
  // blocked on the disk (on the update thread: part of cpu_adam_ms, and of the stall where the
  // device waited for an update), and the bytes read and written back during the step.
  double disk_wait_ms = 0;
  int64_t disk_read_bytes = 0, disk_write_bytes = 0;
  int64_t gpu_alloc_peak = 0, gpu_reserved_peak = 0;
  // Rows of the embedding updated first, ahead of the rest of its table, for the next step's forward
  // (engine_options::embed_rows_first); 0 when the table was updated as one.
  int64_t embed_rows_first = 0;
};

class engine {
 public:
  engine(const model::llama_config& cfg, const engine_options& opt);
  ~engine();
  engine(const engine&) = delete;
  engine& operator=(const engine&) = delete;

  const model::llama_config& config() const { return cfg_; }
  const engine_options& options() const { return opt_; }
  param_store& params() { return *store_; }
  backend& device() { return *dev_; }
  gradient_path& gradients() { return *grads_; }   // training engines only (tests)
  const memory_plan& plan() const { return plan_; }

  // After changing the master weights (init, load, resume): refreshes shadows and device copies.
  void params_changed();

  // One optimizer step over micro-batches (-100 labels are ignored). The loss is normalised over
  // all target tokens of all micro-batches. lr is this step's learning rate. Every input is checked
  // before anything changes: a refused batch leaves the engine as it was. Refused on a
  // forward_only engine. next (optional): the micro-batches the next call will train on, whose
  // embedding rows this step's update makes current first (engine_options::embed_rows_first); only
  // their token ids are read, and a next call with other batches is still correct, only slower.
  step_result train_step(const std::vector<micro_batch>& micro_batches, double lr,
                         const std::vector<micro_batch>* next = nullptr);
  // The same with each micro-batch (B, T+1) tokens (micro_batch::from_tokens).
  step_result train_step(const std::vector<at::Tensor>& micro_batches, double lr,
                         const std::vector<at::Tensor>* next = nullptr);

  // Forward only: summed loss and target count of one batch ((B, T+1) tokens: from_tokens).
  // Packed batches run each block in one pass (block_forward_whole), as training does.
  model::head_result evaluate(const micro_batch& batch);
  model::head_result evaluate(const at::Tensor& tokens);

  // Streams the blocks through fn in forward order (the forward half of the training schedule):
  // x (B,T,h) on the device -> fn(layer, weights, x) -> next x. Used by evaluation and generation.
  using block_fn = std::function<at::Tensor(int64_t layer, const model::block_weights& w, const at::Tensor& x)>;
  at::Tensor forward_blocks(at::Tensor x, const block_fn& fn);
  // Embedding rows of tokens (B,T) on the device, gathered on the host from the shadow copy.
  at::Tensor embed(const at::Tensor& tokens);
  // Final norm and lm_head weights on the device (loaded into the head slot). Call
  // release_head() once the work that reads them is queued.
  std::pair<at::Tensor, at::Tensor> head_weights();
  void release_head();
  const model::rope_cache& rope() const { return rope_; }

  // Blocks until every pending CPU update is applied and the state tier holds the latest state,
  // its write-backs complete (before saving a checkpoint, at the end). Throws ferry::error when a
  // write-back of a tier on disk failed.
  void wait_updates();
  // Step count, loss scaler, recent fix-ups: what checkpoints save beside the tier's state and
  // restore (then params_changed()).
  engine_state& state() { return validator_->state(); }
  bool speculating() const { return validator_->speculating(); }
  // Times a deferred update went back to the update thread's queue between two of its parts
  // (engine_options::update_part), since the engine began: tests.
  int64_t update_parts_resumed() const { return worker_->later_parts_run(); }

 private:
  void check_batch(const micro_batch& batch, bool training) const;
  void check_token_ids(const at::Tensor& ids) const;   // every id in [0, vocab_size)
  std::vector<int64_t> schedule(bool backward) const;
  std::vector<int64_t> update_order(bool speculate) const;
  std::function<void()> host_task(int64_t u, bool last, bool speculate, bool deferred, double mult,
                                  const cpu_optim::adamw_hparams& hp, int64_t step);
  // Deferred speculation: queues unit u's speculative update (by unit, after the statistics).
  void queue_deferred(int64_t u, double mult, const cpu_optim::adamw_hparams& hp, int64_t step);
  // Deferred speculation with the next step's batches (engine_options::embed_rows_first): marks the
  // embedding rows their first group gathers and queues the embedding's update in two parts.
  // Returns the rows marked, 0 where a split does not pay (every row is needed first), in which
  // case nothing is queued.
  int64_t queue_embedding_split(const std::vector<micro_batch>& next, double mult, const cpu_optim::adamw_hparams& hp,
                                int64_t step);
  // engine_options::debug_poison_* (test hook): whether unit u's gradient is poisoned this step,
  // and the write itself (on the gradient the update reads).
  bool poison_now(int64_t u) const {
    return step_calls_ == opt_.debug_poison_step && u == opt_.debug_poison_unit;
  }
  void debug_poison(int64_t u);
  // The test hooks before a deferred update, or each of its `parts`: the backend's random delay
  // and engine_options::debug_update_sleep_us, spread over the parts.
  void debug_update_delay(int64_t parts = 1);

  model::llama_config cfg_;
  engine_options opt_;
  std::unique_ptr<backend> dev_;
  memory_plan plan_;
  std::unique_ptr<param_store> store_;
  std::unique_ptr<update_worker> worker_;
  step_meter meter_;
  std::unique_ptr<weight_pool> pool_;
  std::unique_ptr<gradient_path> grads_;
  std::unique_ptr<optimizer_path> optim_;
  std::unique_ptr<step_validator> validator_;
  model::rope_cache rope_;
  int64_t step_calls_ = 0;   // train_step calls, for the debug_poison test hook
  bool defer_ = false;       // engine_options::defer_speculative, unless FERRY_SPECULATE_WAIT is set
  bool source_stats_ = false;   // engine_options::stats_at_source, unless FERRY_HOST_STATS is set
  // Deferred speculative updates: the bytes of the undo logs they wrote (update thread), taken by
  // the next step once they have all run.
  std::atomic<int64_t> deferred_log_bytes_{0};
  bool rows_first_ = false;   // engine_options::embed_rows_first, unless FERRY_EMBED_ROWS_FIRST=0
  // The embedding's update in two parts (queue_embedding_split). The engine's thread writes the
  // marks and ranges before queueing the parts, and again only after the second part has run (the
  // next step's gradient copy waits for it); the parts run on the update thread, first then rest.
  struct embedding_split {
    int64_t rest_unit = -1;              // the update thread's unit of the second part
    std::vector<uint8_t> first;          // per vocabulary row: updated in the first part
    std::vector<std::pair<size_t, size_t>> first_ranges, rest_ranges;   // element ranges of the table
    bool whole = false;                  // the first part updated the whole table (a fix-up follows)
  } split_;
};

}  // namespace ferry::engine
