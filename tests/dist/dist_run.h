#pragma once
// The data-parallel engine runs that dist_test compares: one definition of the options and the
// data, shared by the worker process (one rank of a world) and the test (the one-rank reference
// with the whole global batch).
#include <cstdlib>
#include <string>

#include "tests/engine/engine_test_util.h"

namespace ferry::dist::test {

using engine::test::step_data;

// A global batch of k_global rows per step: world 1, 2, 3 each take an equal share.
constexpr int64_t k_global = 6, k_steps = 4;

// kind: "blocked" (fp32, no speculation), "overlapped" (fp32, speculate on: undo and redo run per
// shard), "fp16" (overlapped, fp16 compute with loss scaling), "nvme" (overlapped with the optimizer
// state on disk, a tier file of this rank's shards in $TMPDIR or /tmp; the one-rank reference keeps
// it in memory, which the tier matches bit for bit: nvme_training), "int8" and "bf16" (overlapped with
// that optimizer_state). clip 0.05 clips every step; poison
// makes step 2 (1-based) overflow (every rank writes +inf into one element of block 1's gradient,
// as one rank's backward would: the sum stays +inf).
// device: the CUDA device of this rank in the GPU build (dist_gpu_test, k_cuda_suite), -1 the current.
// A kind may end in "_gather": the ranks all-gather their shadows (dist_weights=gather) instead of
// sharing one set in shared memory (auto: shared, the ranks being on one machine); or in "_group":
// each rank runs its rows as one-row micro-batches in one group (engine_options::micro_group), the
// group's gradient summed on the device before it is reduced over the ranks. Any kind may end in
// "_lag" (after those): no speculation, so each step's updates run after its verdict and overlap the next
// step's forward, and the last rank's backend sleeps up to k_lag_us at every copy, compute phase
// and update (engine_options::debug_delay_us, set by the worker), so its update thread falls behind
// the others' and a reader of the shared shadows that did not wait for its shards loads stale ones.
constexpr int64_t k_lag_us = 4000;
inline bool kind_ends_with(const std::string& kind, const std::string& suffix) {
  return kind.size() > suffix.size() && kind.compare(kind.size() - suffix.size(), suffix.size(), suffix) == 0;
}
inline engine::engine_options run_options(const std::string& kind_arg, int64_t rows_per_rank, bool poison, int device = -1) {
  using namespace engine;
  const std::string base = kind_ends_with(kind_arg, "_lag") ? kind_arg.substr(0, kind_arg.size() - 4) : kind_arg;
  const bool gather = kind_ends_with(base, "_gather"), grouped = kind_ends_with(base, "_group");
  const std::string kind = gather || grouped ? base.substr(0, base.rfind('_')) : base;
  const bool half = kind == "fp16" || kind == "device_fp16";
  engine_options o = engine::test::base_options(kind == "blocked" ? offload_mode::offload_blocked : offload_mode::offload_overlapped,
                                        half ? at::kHalf : at::kFloat);
  o.strict_host_backend = true;
  o.device_index = device;
  o.speculate = kind == "blocked" || base != kind_arg ? speculate_mode::speculate_off : speculate_mode::speculate_on;
  o.clip_grad = 0.05;
  // "device", "device_fp16": the blocks' gradients reduce-scattered where they were made, in the
  // compute dtype (engine_options::reduce_on_device; no effect on the one-rank reference).
  o.reduce_on_device = kind.rfind("device", 0) == 0;
  o.shadows = gather ? shadow_mode::shadows_gather : shadow_mode::shadows_auto;
  o.max_batch = rows_per_rank;
  if (grouped && rows_per_rank != k_global) {   // the ranks; the one-rank reference runs one batch
    o.max_batch = 1;
    o.grad_accum = rows_per_rank;
  }
  if (kind == "int8") o.state = state_kind::state_int8;
  if (kind == "bf16") o.state = state_kind::state_bf16;
  if (kind == "nvme" && rows_per_rank != k_global) {   // the ranks, not the one-rank reference
    const char* tmp = std::getenv("TMPDIR");
    o.state_on = state_place::place_nvme;
    o.nvme.path = tmp && *tmp ? tmp : "/tmp";
    o.nvme.buffers = 2;
  }
  if (poison) {
    o.debug_poison_step = 2;
    o.debug_poison_unit = 2;
    o.debug_poison_index = 5;
  }
  return o;
}

// Step k's global batch (k_global rows); rank r of `world` takes rows [r*b, (r+1)*b), b = k_global/world.
inline std::vector<step_data> global_data() { return engine::test::make_data(k_steps, k_global); }
// A "_group" kind: the rank's rows one per micro-batch.
inline step_data rank_rows(const step_data& global, int rank, int world, const std::string& kind = "") {
  const int64_t b = k_global / world;
  step_data s;
  for (const at::Tensor& t : global) {
    if (!kind_ends_with(kind, "_group")) {
      s.push_back(t.narrow(0, rank * b, b).contiguous());
      continue;
    }
    for (int64_t r = 0; r < b; ++r) s.push_back(t.narrow(0, rank * b + r, 1).contiguous());
  }
  return s;
}

}  // namespace ferry::dist::test
