#pragma once
// How this process was launched: the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK,
// LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), read once at start-up. No variables: one rank, as
// a plain `ferry-train` run. Every inconsistency is a config_error of one line naming the variable
// and what would be valid, raised before anything is built, on every rank alike.
#include <functional>
#include <string>

namespace ferry::dist {

struct launch_info {
  int rank = 0, world = 1;              // RANK, WORLD_SIZE
  int local_rank = 0, local_world = 1;  // LOCAL_RANK, LOCAL_WORLD_SIZE: the ranks of this machine
  std::string master_addr;              // MASTER_ADDR:MASTER_PORT, where rank 0 hosts the TCPStore
  int master_port = 0;
  // TORCHELASTIC_USE_AGENT_STORE=True: torchrun's agent already serves the TCPStore at
  // MASTER_ADDR:MASTER_PORT, so rank 0 connects to it rather than hosting one.
  bool agent_store = false;
  bool distributed() const { return world > 1; }
};

// env(name): the variable's value or null. visible_gpus: the CUDA devices this process sees, or -1
// on the host backend (no device check).
launch_info read_launch(const std::function<const char*(const char*)>& env, int visible_gpus);
// The same over the process environment.
launch_info read_launch_env(int visible_gpus);

}  // namespace ferry::dist
