#pragma once
// Data-parallel ranks as the engine sees them: the collectives a partitioned (ZeRO-2) step needs,
// and how every unit is split between the ranks. The engine knows nothing of c10d, stores or
// launchers; src/dist implements this over libtorch's ProcessGroupGloo (host tensors) and, in
// CUDA builds, ProcessGroupNCCL (device tensors).
//
// Two channels, each its own process group: collectives are matched by their order on a group,
// and the engine's thread (target counts, statistics, loss, weight refreshes) and the update
// thread (each unit's reduce-scatter and all-gather) issue theirs independently of each other.
// On one channel every rank issues the same calls in the same order (the schedule is the same on
// every rank), which is what makes the decisions identical.
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>

namespace ferry::engine {

enum class comm_channel {
  channel_engine,  // the engine's thread
  channel_update,  // the update thread
};

// With ranks, how every rank's shadow (the compute-dtype weights its device streams) gets the
// other ranks' shards after an update (run-config key dist_weights).
enum class shadow_mode {
  shadows_auto,    // shared where every rank is on one machine, else gathered
  shadows_shared,  // one shadow per machine in shared memory; each rank writes its shard in place
  shadows_gather,  // a whole shadow per rank; the shards are all-gathered unit by unit
};

// Host memory that every rank maps at once (all ranks on one machine), with one arrival counter
// per slot per rank: the compute-dtype shadows the ranks of a machine share instead of
// all-gathering them (engine_options::shadows). post(k): this rank has written its part of slot k
// (returns at once; the writes before it are visible to a rank whose wait_all returned).
// wait_all(k): returns, with the milliseconds it waited, once every rank has posted slot k as
// often as this rank has (the j-th posts of slot k on each rank are matched, as collectives are by
// their order), and throws a std::runtime_error naming the rank that stopped when one has not
// arrived within the group's timeout. publish(k) is both. The memory is zeroed at creation.
class shared_host_block {
 public:
  virtual ~shared_host_block() = default;
  virtual void* data() const = 0;     // 4096-byte aligned
  virtual size_t bytes() const = 0;
  virtual void post(int64_t slot) = 0;
  virtual double wait_all(int64_t slot) = 0;
  void publish(int64_t slot) {
    post(slot);
    wait_all(slot);
  }
};

class collectives {
 public:
  virtual ~collectives() = default;
  virtual int rank() const = 0;
  virtual int world() const = 0;
  // Every call blocks until done; a rank that died or stopped answering makes it throw a
  // std::runtime_error naming the rank within the group's timeout.
  // t (any shape, contiguous, float64/float32) is replaced by its sum over the ranks.
  virtual void all_reduce_sum(at::Tensor& t, comm_channel c) = 0;
  // in: (world * n) float32, or the compute dtype for a gradient reduced where it was made
  // (engine_options::reduce_on_device); out: (n) the same dtype, this rank's block of the sum over
  // the ranks. Device tensors are ordered on the current stream, which waits for the result; the
  // host does not.
  virtual void reduce_scatter_sum(at::Tensor& out, const at::Tensor& in, comm_channel c) = 0;
  // in: (n) any dtype; out: (world * n) the same dtype, rank r's `in` at [r*n, (r+1)*n).
  virtual void all_gather(at::Tensor& out, const at::Tensor& in, comm_channel c) = 0;
  // Every rank's view of one block of `bytes` zeroed shared memory with `slots` publish counters,
  // or null where the ranks cannot share memory (not all on one machine). A collective: every
  // rank calls it with the same arguments.
  virtual std::unique_ptr<shared_host_block> share_host_memory(size_t bytes, int64_t slots) {
    (void)bytes;
    (void)slots;
    return nullptr;
  }
};

// How a unit of n elements is split: every rank owns a block of per(n) = ceil(n / world)
// elements, rank r [r*per, (r+1)*per) clipped to n (the last blocks may be short or empty), so
// reduce-scatter and all-gather run on world * per elements padded with zeros.
struct shard_layout {
  int rank = 0, world = 1;
  bool sharded() const { return world > 1; }
  int64_t per(int64_t n) const { return (n + world - 1) / world; }
  int64_t padded(int64_t n) const { return per(n) * world; }
  int64_t begin(int64_t n) const { return std::min<int64_t>(n, rank * per(n)); }
  int64_t count(int64_t n) const { return std::min<int64_t>(n, begin(n) + per(n)) - begin(n); }
};

}  // namespace ferry::engine
