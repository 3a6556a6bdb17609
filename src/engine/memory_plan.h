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
  int64_t grad_slots = 0;     // two block gradient slots + the head's (none: every unit)
  int64_t optimizer = 0;      // none mode only: fp32 master, m, v on the device
  int64_t activations = 0;    // saved for backward by every block, plus the layer inputs
  int64_t workspace = 0;      // the largest transient: attention scores, MLP, logits chunk
  int64_t device_total = 0;
  // host bytes
  int64_t host_master = 0;    // fp32 master weights
  int64_t host_moments = 0;   // fp32 m and v
  int64_t host_pinned = 0;    // compute-dtype shadow + gradient (4 B/param for fp16)
  int64_t host_other = 0;     // embedding fp32 gradient, staging, accumulation buffers
  int64_t host_total = 0;

  std::string describe() const;   // a few aligned lines, in GiB
};

memory_plan plan_memory(const model::llama_config& cfg, const engine_options& opt, int64_t batch, int64_t seq,
                        int64_t grad_accum);

}  // namespace ferry::engine
