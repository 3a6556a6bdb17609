#pragma once
// What a run needs, computed before anything is allocated: the device's weight and gradient
// slots, saved activations (model::block_saved_bytes), workspace; the host's master weights,
// moments and pinned buffers. --dry-run prints it, the engine refuses to start a run that does
// not fit, and the largest-model finder searches over it.
#include <cstdint>
#include <string>

#include "src/engine/options.h"
#include "src/model/llama_config.h"

namespace ferry::engine {

struct memory_plan {
  // device bytes
  int64_t weight_slots = 0;   // block slots + head slot (none: every unit, resident)
  int64_t grad_slots = 0;     // two block gradient slots + the head's (none: every unit; forward_only: 0)
  int64_t optimizer = 0;      // none mode only: fp32 master, m, v on the device (forward_only: 0)
  int64_t activations = 0;    // saved for backward by every block, plus the layer inputs
                              // (forward_only: one layer's input and output)
  int64_t workspace = 0;      // the largest transient: attention scores, MLP, logits chunk; rotary
                              // tables and cuBLAS workspace
  int64_t device_total = 0;
  // host bytes
  int64_t host_master = 0;    // fp32 master weights
  int64_t host_moments = 0;   // fp32 m and v (forward_only: 0)
  int64_t host_pinned = 0;    // compute-dtype shadow + gradient (4 B/param for fp16; forward_only 2)
  int64_t host_other = 0;     // embedding fp32 gradient, staging, accumulation buffers
  int64_t host_total = 0;

  std::string describe() const;   // a few aligned lines, in GiB
};

// opt.forward_only: an inference engine (no gradient slots or optimizer state anywhere; activations
// are one layer's input and output, the workspace the larger of a block's chunked forward and the
// loss head's logits chunk). Generation's KV cache is the caller's and not part of the plan.
memory_plan plan_memory(const model::llama_config& cfg, const engine_options& opt, int64_t batch, int64_t seq,
                        int64_t grad_accum);

// Rows of the engine's rotary table (engine_options::max_positions, or its default).
int64_t rotary_positions(const model::llama_config& cfg, const engine_options& opt);

}  // namespace ferry::engine
