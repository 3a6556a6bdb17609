#pragma once
// What the engine is asked to do. Filled by src/train and src/infer from the run config; the
// engine itself knows no files or flags.
#include <c10/core/ScalarType.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "src/engine/collectives.h"
#include "src/engine/nvme_state.h"
#include "src/engine/state_tier.h"

namespace ferry::engine {

enum class offload_mode {
  offload_none,        // half weights, fp32 master and moments all resident on the device; device AdamW
  offload_blocked,     // each transfer and update synchronous, nothing overlapped
  offload_overlapped,  // prefetch, gradient streaming, CPU AdamW overlapped with backward
};

// Activation checkpointing: which blocks keep only their input and recompute their forward in the
// backward (the first ones: their saved tensors would live longest).
enum class recompute_mode {
  recompute_none,
  recompute_blocks,  // every block
  recompute_auto,    // the fewest blocks that make the plan fit the device (memory_plan.h)
};

enum class speculate_mode {
  speculate_auto,  // speculate unless clipping or overflow fired on most recent steps
  speculate_on,
  speculate_off,
};

// Where a one-rank offloaded run sums the embedding's gradient (run-config key embed_grad):
// host: its input gradient's rows are copied to the host and scattered into the fp32 gradient
// there by the update thread; device: scattered on the device into an fp32 table there (V*h*4
// bytes of GPU memory), whose sum of the step's micro-batches crosses to the host once, with its
// statistics taken on the device; auto: device on CUDA when the model is untied, the table is at
// most 1 GiB (resolve_embed_grad) and the plan with it fits the GPU with the same group of
// micro-batches (plan_memory), else host. With ranks, dist_reduce decides.
enum class embed_grad_place { embed_grad_auto, embed_grad_host, embed_grad_device };

offload_mode parse_offload_mode(const std::string& s);  // throws config_error
embed_grad_place parse_embed_grad_place(const std::string& s);   // auto | host | device
shadow_mode parse_shadow_mode(const std::string& s);    // auto | shared | gather
const char* offload_mode_name(offload_mode m);
speculate_mode parse_speculate_mode(const std::string& s);
recompute_mode parse_recompute_mode(const std::string& s);  // none | blocks | auto
at::ScalarType parse_compute_dtype(const std::string& s);  // fp16 | bf16 | fp32

// A limit in GiB (gpu_mem_limit_gib, host_mem_limit_gib) in bytes; 0 stays 0 (no limit).
inline int64_t gib_bytes(double gib) { return static_cast<int64_t>(gib * double(int64_t(1) << 30)); }

struct engine_options {
  offload_mode mode = offload_mode::offload_overlapped;
  at::ScalarType dtype = at::kHalf;
  bool cuda = false;               // false: the host backend ("device" = CPU), used by the CPU tests
  int device_index = -1;           // the CUDA device, -1 = the current one
  int64_t prefetch = 2;            // layers copied ahead of the one computing
  int cpu_threads = 0;             // CPU AdamW threads, 0 = all cores but one
  state_kind state = state_kind::state_fp32;   // the form of master weights and moments (state_tier.h)
  state_place state_on = state_place::place_host;   // where they live (optimizer_state_on)
  nvme_options nvme;               // state_on == place_nvme: the directory, buffers, queue depth
  speculate_mode speculate = speculate_mode::speculate_auto;
  // A speculating step on one rank with the state in host memory ends at its verdict: once the
  // gradients' statistics are in, its updates run on behind the next step's forward, the units that
  // forward needs first taking precedence (engine::train_step). false, or the environment's
  // FERRY_SPECULATE_WAIT=1: the step waits for its updates, as it does with ranks and the disk tier.
  bool defer_speculative = true;
  // A deferred step (above) given the next step's micro-batches (engine::train_step's `next`) updates
  // the embedding in two parts: first the rows the next step's first group gathers, which its
  // forward waits for, then the rest, after every other unit's update (untied embeddings). The
  // result is the same bits. false, or the environment's FERRY_EMBED_ROWS_FIRST=0: one update of
  // the whole table, which the next forward waits for.
  bool embed_rows_first = true;
  // > 0: a deferred step's update of a unit (above) runs in parts of about this many parameters;
  // between two parts the update thread takes a gradient whose copy is done and the update of a
  // unit the next forward needs sooner (update_worker::submit_update_parts). The result is the same
  // bits. 0 (the default): each unit in one piece; on the H200 machines of 2026-11-29 parts of 8M
  // let the forward finish sooner but did not shorten a step bound by the host's AdamW
  // (BENCHMARKS.md "Updates in parts"). The environment's FERRY_UPDATE_PART, a count of
  // parameters, overrides.
  int64_t update_part = 0;
  // A unit's gradient statistics (squares and non-finite count, for clipping and the overflow
  // check) are taken where the backward made it, before the copy to the host, whenever the host
  // would read exactly that buffer (one rank, one group per step, not the embedding): on CUDA a
  // kernel on the compute queue, whose two floats follow the gradient to the host, so the update
  // thread does not read the gradient an extra time. false, or the environment's FERRY_HOST_STATS=1:
  // the update thread reads them from the host copy.
  bool stats_at_source = true;
  // One rank: where the embedding's gradient is summed (embed_grad_place); plan_memory decides
  // auto (memory_plan::embed_grad_device) and the engine takes its decision.
  embed_grad_place embed_grad = embed_grad_place::embed_grad_auto;
  recompute_mode recompute = recompute_mode::recompute_none;
  // AdamW and clipping
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.01;
  double clip_grad = 1.0;          // global-norm clip, 0 = off
  // dynamic loss scaling (fp16 only), as torch.amp.GradScaler
  double loss_scale = 65536.0;
  double scale_growth = 2.0, scale_backoff = 0.5;
  int64_t scale_window = 2000;
  int64_t ce_chunk = 1024;         // logit rows per chunk in the loss
  int64_t max_batch = 1, max_seq = 4096;   // activations are planned for this shape
  int64_t grad_accum = 1;          // micro-batches per step (the host's accumulation buffers are planned for it)
  // Offloaded modes: how many micro-batches of a step run together, layer by layer (run-config key
  // micro_batch_group). A group streams each unit's weights to the device once for all of its
  // micro-batches, runs their forwards, and later their backwards, one unit at a time, and sums
  // their gradients on the device in fp32 (gradient_path::fold), so the unit's gradient crosses to
  // the host once per group; the group's activations are all kept (or checkpointed) at once.
  // 1: each micro-batch runs the whole model and its gradient is summed on the host. 0 (auto): the
  // largest group of up to grad_accum micro-batches whose plan fits the device (memory_plan.h).
  // Offload none keeps everything resident and runs micro-batches one by one.
  int64_t micro_group = 0;
  // Offloaded training on one rank: the first resident_blocks blocks stay on the device with
  // their compute-dtype weights, gradients (micro-batches added in place, as offload none does),
  // fp32 master weights and AdamW moments, and the device AdamW updates them after the step's
  // verdict; the host updates the other units. Each such block takes 16 B/param of GPU memory in
  // fp16/bf16 (2 weights + 2 gradient + 12 state; fp32: 20) and its whole update off the host's AdamW, whose memory
  // traffic bounds an offloaded step once the GPU's work per step is larger than the update
  // (grad_accum > 1). The host's state tier keeps their copy for checkpoints (wait_updates
  // downloads it). Needs optimizer_state=fp32 in host memory. 0: every block streamed. -1 (auto):
  // as many as the device's memory holds beside the rest of the plan, decided after the group of
  // micro-batches, the recomputation and the embedding's gradient (plan_memory); none where no
  // limit is known (the host backend without gpu_mem_limit_gib, a dry run). The engine takes the
  // plan's count.
  int64_t resident_blocks = 0;
  // Rows of the rotary table: the most positions one sequence reaches (evaluation length, or prompt
  // plus new tokens). 0: max(max_seq, the model's max_position_embeddings).
  int64_t max_positions = 0;
  // An inference engine: evaluate, forward_blocks and generation only. No gradient slots or
  // embedding-gradient staging on the device, no AdamW moments or gradient buffers on the host (none
  // mode: only the compute-dtype weights on the device); train_step refuses. Planned accordingly.
  bool forward_only = false;
  double gpu_mem_limit_gib = 0;    // cap on usable device memory, 0 = whole card
  double host_mem_limit_gib = 0;   // the plan's host bytes must fit, 0 = not checked
  bool nvtx = false;
  // Race testing: each copy, compute phase and CPU update sleeps a random 0..debug_delay_us.
  int64_t debug_delay_us = 0;
  // Test hook: each deferred speculative update (defer_speculative) sleeps this long, spread over
  // its parts (update_part).
  int64_t debug_update_sleep_us = 0;
  // Tests: the host backend in its strict mode (make_strict_host_backend), where copies complete
  // only when waited for, their destinations read NaN until then, and ordering rules are checked.
  bool strict_host_backend = false;
  // Test hook (tests/engine only; never set by the CLI): on the debug_poison_step-th call of
  // train_step (1-based), element debug_poison_index of unit debug_poison_unit's gradient is
  // overwritten with debug_poison_value once it has reached the host (the device's buffer in
  // none mode, and the slot it is copied from when its statistics are taken there:
  // stats_at_source), before any statistic or update reads it. Injects fp16-style overflow or a NaN
  // into exactly one unit. -1: off.
  int64_t debug_poison_step = -1, debug_poison_unit = -1, debug_poison_index = 0;
  double debug_poison_value = std::numeric_limits<double>::infinity();
  uint64_t seed = 1234;
  // Data-parallel ranks (src/dist), null for one rank. With several, every unit's gradient is
  // summed over the ranks and each rank keeps and updates only its shard of the unit's master
  // weights and moments (shard_layout); the updated compute-dtype weights reach every rank as
  // `shadows` says.
  std::shared_ptr<collectives> comm;
  // With ranks (run-config key dist_reduce=device, the CLI's default): each block's (and an
  // untied head's) gradient is reduce-scattered where the backward made it, in the compute dtype
  // (NCCL on the GPUs; Gloo on the host backend), and only this rank's shard is copied to the
  // host; the embedding and a tied head are reduced on the host as before. Off: every unit's whole
  // gradient reaches the host and is reduce-scattered there in fp32.
  bool reduce_on_device = false;
  // With ranks (dist_weights): shared, the shadows live once per machine in memory every rank
  // maps (collectives::share_host_memory, page-locked by each process); a rank's update writes its
  // shard there and publish waits until every rank has written its own, so no weight crosses a
  // link between ranks. gather: each rank keeps a whole shadow and the shards are all-gathered.
  // shared where the ranks are not all on one machine is a config_error; auto picks.
  shadow_mode shadows = shadow_mode::shadows_auto;
};

// This rank's place among the ranks of opt.comm (rank 0 of 1 without).
inline shard_layout shards_of(const engine_options& opt) {
  return opt.comm ? shard_layout{opt.comm->rank(), opt.comm->world()} : shard_layout{};
}

// Whether unit u (0 the embedding, 1..L the blocks, L+1 the head) has its own device buffers
// (weight_pool, gradient_path, optimizer_path): every unit with offload none; offloaded, the first
// resident_blocks blocks (the engine's resolved count, not auto).
inline bool unit_resident(const engine_options& opt, int64_t u, int64_t num_units) {
  if (opt.mode == offload_mode::offload_none) return true;
  return u >= 1 && u <= std::min(opt.resident_blocks, num_units - 2);
}

// Whether unit u (0 the embedding, 1..L the blocks, L+1 the head) of an offloaded run has its
// gradient summed where the backward made it, so its host buffer holds only this rank's block of
// the sum. With ranks and reduce_on_device: every block, and the head and the embedding unless
// tied (the tied matrix's gradient is summed from both uses on the host). One rank: the
// embedding with embed_grad=device (resolved; auto counts as host), its one block the whole.
inline bool unit_reduced_on_device(const engine_options& opt, bool tied, int64_t u, int64_t num_units) {
  if (opt.mode == offload_mode::offload_none) return false;
  if (!shards_of(opt).sharded()) return u == 0 && !tied && opt.embed_grad == embed_grad_place::embed_grad_device;
  return opt.reduce_on_device && !(tied && (u == 0 || u == num_units - 1));
}

// unit_reduced_on_device of every unit: the units whose host gradient buffer holds only this
// rank's shard (param_store's shard_grads).
inline std::vector<bool> units_reduced_on_device(const engine_options& opt, bool tied, int64_t num_units) {
  std::vector<bool> r(static_cast<size_t>(num_units), false);
  for (int64_t u = 0; u < num_units; ++u) r[size_t(u)] = unit_reduced_on_device(opt, tied, u, num_units);
  return r;
}

// Combinations the engine does not run, as config_errors naming the keys (the engine's constructor
// and the CLI's wiring call it): a compact optimizer_state, or optimizer_state_on=nvme, with offload
// none, whose device AdamW keeps fp32 moments on the GPU; nvme without nvme_path; a
// micro_batch_group above 1 with offload none, or above grad_accum; resident_blocks with offload
// none, an inference engine, ranks, a compact optimizer_state or the state on disk (more blocks
// than the model has: the engine's constructor). An inference (forward_only) engine keeps no
// moments and passes (its master weights stay in host memory).
void check_options(const engine_options& o);
// resident_blocks beyond the `layers` blocks of the model named `model`: a config_error (the
// engine's constructor and the CLI's wiring).
void check_resident_blocks(const engine_options& o, int64_t layers, const std::string& model);
// o with embed_grad resolved for the model, before memory is considered (auto: device on CUDA,
// one rank, offloaded training, untied, an fp32 table of at most 1 GiB; else host; plan_memory
// then keeps device only where it fits). embed_grad=device where the embedding's gradient cannot
// be summed on the device (tied embeddings, offload none) is a config_error.
engine_options resolve_embed_grad(engine_options o, bool tied, int64_t embed_params);

}  // namespace ferry::engine
