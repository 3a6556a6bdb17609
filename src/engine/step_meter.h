#pragma once
// What one step moved and waited for, filled by the weight pool and the gradient path and read
// into step_result at the end of train_step. Copies are timed with device events only while
// `timing` is on (training steps), so evaluation and generation record no timing events.
#include <cstdint>
#include <utility>
#include <vector>

#include "src/engine/backend.h"

namespace ferry::engine {

struct step_meter {
  bool timing = false;
  int64_t h2d_bytes = 0, d2h_bytes = 0;
  double stall_ms = 0;        // the engine's thread waiting for the update thread
  double shard_wait_ms = 0;   // then for the other ranks' shards of shared shadows
  std::vector<std::pair<event_ptr, event_ptr>> h2d_timers, d2h_timers;

  void reset(bool time_copies) {
    *this = step_meter{};
    timing = time_copies;
  }
};

}  // namespace ferry::engine
