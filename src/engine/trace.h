#pragma once
// A timeline of the training step for diagnosis: with FERRY_TRACE=<file> in the environment,
// every update-thread task, every wait of the engine's thread for an update, its gathers of
// embedding rows (from the staging's wait to the copy's launch), and (at the step's
// end) when the device finished each unit's forward and backward are appended to <file> as JSON
// lines {"what", "unit", "t0", "t1"} in milliseconds of one steady clock. Off (one branch per
// record) without it. scripts/bench/trace_step.py prints one step of it.
#include <cstdint>

namespace ferry::engine::trace {

bool enabled();
double now_ms();
void record(const char* what, int64_t unit, double t0, double t1);

}  // namespace ferry::engine::trace
