#pragma once
// What a run needs, computed before anything is allocated: the device's weight and gradient
// slots, saved activations (model::block_saved_bytes), workspace; the host's master weights,
// moments and pinned buffers. --dry-run prints it, the engine refuses to start a run that does
// not fit, and the largest-model finder searches over it.
#include <cstdint>
#include <optional>
#include <string>

#include "src/engine/options.h"
#include "src/model/llama_config.h"

namespace ferry::engine {

struct memory_plan {
  // device bytes
  int64_t weight_slots = 0;   // block slots + head slot (none: every unit, resident), + resident blocks
  int64_t grad_slots = 0;     // two block gradient slots + the head's (none: every unit; forward_only: 0),
                              // + resident blocks
  int64_t optimizer = 0;      // fp32 master, m, v on the device: none mode's, or the resident blocks'
                              // (engine_options::resident_blocks; forward_only: 0)
  int64_t activations = 0;    // saved for backward by every block, plus the layer inputs
                              // (forward_only: one layer's input and output)
  int64_t recompute_blocks = 0;  // blocks that keep only their input (activation checkpointing)
  int64_t micro_group = 1;    // micro-batches run together, layer by layer (engine_options::micro_group)
  int64_t resident_blocks = 0;   // blocks kept on the device with their state (engine_options::resident_blocks;
                                 // auto: this plan's choice)
  bool embed_grad_device = false;   // the embedding's gradient is summed on the device (embed_grad;
                                    // with ranks, reduced there); auto: this plan's choice
  int64_t workspace = 0;      // the largest transient: attention scores, MLP, logits chunk; rotary
                              // tables and cuBLAS workspace
  int64_t device_total = 0;
  // host bytes
  state_kind state = state_kind::state_fp32;   // the state tier's kind (optimizer_state) planned
  int64_t host_master = 0;    // fp32 master weights (optimizer_state_on=nvme: 0, they are on disk)
  int64_t host_moments = 0;   // m and v in the tier's kind, int8 scales included (forward_only, nvme: 0)
  int64_t host_state_buffers = 0;  // optimizer_state_on=nvme: the tier's buffers (nvme_buffers x the
                                   // largest unit's state), which replace master and moments
  int64_t host_pinned = 0;    // compute-dtype shadow + gradient (4 B/param for fp16; forward_only 2)
  int64_t host_other = 0;     // embedding fp32 gradient, staging, accumulation buffers
  int64_t host_total = 0;
  // disk bytes
  bool state_on_disk = false;  // optimizer_state_on=nvme
  int64_t disk_state = 0;      // the tier's file on nvme_path: every unit's state, 4096-aligned

  std::string describe() const;   // a few aligned lines, in GiB
};

// Why the plan does not fit the run's limits (opt.host_mem_limit_gib; the device's usable bytes,
// 0 = not checked), naming the tier and its bytes, or "" when it fits. The engine refuses such a
// run before it allocates; --dry-run prints the same line.
std::string plan_misfit(const memory_plan& p, const model::llama_config& cfg, const engine_options& opt,
                        int64_t device_bytes);

// Capabilities the planner prices before the engine runs them, so the largest-model finder can say
// what each would buy (its what-if rows come from here, through ferry-train --plan-json):
struct plan_what_if {
  // Activation checkpointing of this many blocks (the first ones; -1: as opt.recompute says).
  int64_t recompute_blocks = -1;
  // The state tier's kind (optimizer_state) instead of opt.state: its exact bytes (state_bytes per
  // unit). Offloaded modes only: offload none keeps fp32 state (check_options).
  std::optional<state_kind> state;
  // true: the fp32 master weights and moments in a file on local disk (optimizer_state_on=nvme),
  // streamed through opt.nvme.buffers host buffers; false: in host memory (unset: as opt.state_on).
  // Offloaded modes only, as the kind.
  std::optional<bool> state_on_disk;
  // Micro-batches run together (engine_options::micro_group; 0: as opt.micro_group says).
  int64_t micro_group = 0;
};

// opt.forward_only: an inference engine (no gradient slots or optimizer state anywhere; activations
// are one layer's input and output, the workspace the larger of a block's chunked forward and the
// loss head's logits chunk). Generation's KV cache is the caller's and not part of the plan.
// device_bytes: the usable device memory, which recompute_mode::recompute_auto fits the plan into
// (0: opt.gpu_mem_limit_gib, and without that no block is recomputed). micro_group auto (0) takes
// the largest group of up to grad_accum micro-batches that fits it, each group size planned with
// the recomputation opt.recompute asks for (auto: the fewest blocks that fit that group); with no
// limit known, the whole step is one group. A group of g keeps g micro-batches' activations at
// the start of its backward (activation_bytes with `group`), one fp32 gradient sum of the widest
// unit on the device (gradient_path::fold), and the host's fp32 accumulation buffers only when a
// step has more micro-batches than one group.
// resident_blocks auto (-1): the most blocks (up to all) whose plan, with the group, recomputation
// and embedding placement the plan without them chose, fits the limit with the slack below to spare;
// none without a limit.
// On CUDA, auto leaves k_allocator_slack of that memory to the caching allocator's split and
// cached blocks, which the plan (tensors alive at the peak) does not count: a 16.8 B model whose
// plan took 23.27 of 23.5 GiB ran out of memory with 22.20 GiB allocated and 1.21 GiB reserved
// but unallocated (an H200, 2026-11-28; 5.2% of the cap).
constexpr double k_allocator_slack = 1.0 / 16;
memory_plan plan_memory(const model::llama_config& cfg, const engine_options& opt, int64_t batch, int64_t seq,
                        int64_t grad_accum, const plan_what_if& what_if = {}, int64_t device_bytes = 0);

// Host bytes of the state tier of model cfg in this kind: state_bytes over param_store's units
// (exactly what the tier allocates: its host_bytes()); with ranks, rank 0's shards (ceil(n / world) of each
// unit, the largest), which bound every rank's tier.
int64_t state_host_bytes(const model::llama_config& cfg, state_kind kind, bool moments, const shard_layout& shards = {});

// Device bytes of the activations kept for the backward when the first `recomputed` blocks keep
// only their input: the others' saved tensors (model::block_saved_bytes) and inputs, plus, while a
// recomputed block runs its backward, its own saved tensors (at most one at a time), for a group
// of `group` micro-batches of (batch, seq) run layer by layer.
int64_t activation_bytes(const model::llama_config& cfg, int64_t batch, int64_t seq, int64_t elem_size,
                         int64_t recomputed, int64_t group = 1);

// Rows of the engine's rotary table (engine_options::max_positions, or its default).
int64_t rotary_positions(const model::llama_config& cfg, const engine_options& opt);

}  // namespace ferry::engine
