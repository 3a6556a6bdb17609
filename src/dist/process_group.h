#pragma once
// This rank's connection to the others, over libtorch's c10d: rendezvous through a TCPStore that
// rank 0 hosts at MASTER_ADDR:MASTER_PORT, collectives through ProcessGroupGloo on host tensors
// (the host backend, CI's 2-3 ranks on the loopback) and, in CUDA builds, ProcessGroupNCCL on
// device tensors. Implements the engine's collectives (src/engine/collectives.h): one Gloo group
// per channel, so the engine's thread and the update thread never interleave calls on one group.
//
// Failures stop every rank within a bounded time with one line naming the rank: each collective
// runs under `timeout`; when one fails (a peer closed its connection or did not answer), the
// ranks' heartbeats in the store say which rank stopped. A rank whose store host (rank 0) is gone
// names rank 0.
#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "src/dist/launch.h"
#include "src/engine/collectives.h"

namespace ferry::dist {

struct group_options {
  // Rendezvous (every rank connected) and each collective must finish within this.
  std::chrono::milliseconds timeout{std::chrono::seconds(300)};
  // A CUDA run (device LOCAL_RANK): in builds with NCCL, device tensors use a NCCL group, and the
  // host tensors of the update thread's reduce-scatter and all-gather are staged through the device
  // and reduced or gathered there by NCCL (all-reduces and the engine thread's host collectives stay
  // on Gloo). Without NCCL everything is Gloo.
  bool cuda = false;
};

class process_group final : public engine::collectives {
 public:
  // Connects this rank (launch.distributed() must hold): throws ferry::error naming MASTER_ADDR and
  // MASTER_PORT when the ranks do not all arrive within the timeout.
  static std::shared_ptr<process_group> connect(const launch_info& launch, const group_options& opt);
  ~process_group() override;
  process_group(const process_group&) = delete;
  process_group& operator=(const process_group&) = delete;

  int rank() const override { return launch_.rank; }
  int world() const override { return launch_.world; }
  const launch_info& launch() const { return launch_; }

  void all_reduce_sum(at::Tensor& t, engine::comm_channel c) override;
  void reduce_scatter_sum(at::Tensor& out, const at::Tensor& in, engine::comm_channel c) override;
  void all_gather(at::Tensor& out, const at::Tensor& in, engine::comm_channel c) override;
  // With every rank on this machine (LOCAL_WORLD_SIZE == WORLD_SIZE): rank 0 makes an anonymous
  // shared-memory file (memfd), the others open it through /proc/<pid>/fd, every rank maps it;
  // publish spins, then sleeps, on per-slot counters in its first pages. Null across machines. A
  // rank that cannot map it makes every rank throw the same line.
  std::unique_ptr<engine::shared_host_block> share_host_memory(size_t bytes, int64_t slots) override;

  // Before the first step: every rank publishes its canonical run config (JSON object text) and
  // compares every rank's with rank 0's; a difference is a config_error, the same line on every
  // rank, naming the first rank and key that differ and both values.
  void check_same_config(const std::string& config_json);
  // Every rank reaches this point (through the store; the engine's channel may be busy elsewhere).
  void barrier(const std::string& name);

  struct impl;

 private:
  explicit process_group(const launch_info& launch, const group_options& opt);
  // Runs a collective; a failure becomes one line naming the rank that stopped.
  template <class Fn>
  void guarded(const char* what, Fn&& fn);
  // Whether a host tensor's reduce-scatter or all-gather runs through the device: the update
  // thread's, in a CUDA run (group_options::cuda). The engine's thread's host collectives (start-up
  // and checkpoint gathers, not per step) stay on Gloo, so its NCCL group exists only where device
  // tensors use it (dist_reduce=device).
  bool staged_on_device(const at::Tensor& t, engine::comm_channel c) const;
  template <class Fn>
  void on_device(engine::comm_channel c, Fn&& fn);
  template <class Start>
  void collective(const char* what, at::Tensor& out, const at::Tensor& in, engine::comm_channel c, Start&& start);
  std::string who_stopped();
  // Every rank sets key_prefix<rank> to `mine` in the store and reads every rank's, waiting up to
  // `timeout` for each (callers run it under guarded()).
  std::vector<std::string> exchange(const std::string& key_prefix, const std::string& mine,
                                    std::chrono::milliseconds timeout);

  launch_info launch_;
  group_options opt_;
  std::unique_ptr<impl> impl_;
  std::atomic<bool> stop_{false};
  int shared_blocks_ = 0;   // share_host_memory calls so far: each block's store keys
  std::thread heartbeat_;
};

}  // namespace ferry::dist
