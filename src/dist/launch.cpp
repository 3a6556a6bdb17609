#include "src/dist/launch.h"

#include <cerrno>
#include <cstdlib>
#include <string>

#include "src/common/env.h"
#include "src/common/error.h"

namespace ferry::dist {
namespace {
int read_int(const char* name, const char* value, long lo, long hi) { return int(env_integer(name, value, lo, hi)); }
}  // namespace

launch_info read_launch(const std::function<const char*(const char*)>& env, int visible_gpus) {
  launch_info l;
  const char* world = env("WORLD_SIZE");
  const char* rank = env("RANK");
  if (!world) {
    FERRY_CONFIG_CHECK(!rank, "RANK=", rank, " is set without WORLD_SIZE: launch with torchrun ",
                       "(torchrun --no-python --nproc-per-node N ferry-train ...) or unset RANK for one rank");
    return l;
  }
  l.world = read_int("WORLD_SIZE", world, 1, 1 << 20);
  FERRY_CONFIG_CHECK(rank || l.world == 1, "WORLD_SIZE=", l.world, " without RANK: launch with torchrun ",
                     "(torchrun --no-python --nproc-per-node ", l.world, " ferry-train ...)");
  if (rank) {
    errno = 0;
    char* end = nullptr;
    const long r = std::strtol(rank, &end, 10);
    FERRY_CONFIG_CHECK(*rank && end && *end == '\0' && errno == 0 && r >= 0 && r < l.world, "RANK=", rank,
                       " is outside [0, WORLD_SIZE=", l.world, "): each of the ", l.world,
                       " ranks needs a distinct RANK in 0..", l.world - 1);
    l.rank = int(r);
  }
  l.local_world = l.world;
  l.local_rank = l.rank;
  if (const char* lw = env("LOCAL_WORLD_SIZE")) l.local_world = read_int("LOCAL_WORLD_SIZE", lw, 1, l.world);
  if (const char* lr = env("LOCAL_RANK")) {
    l.local_rank = read_int("LOCAL_RANK", lr, 0, 1 << 20);
    FERRY_CONFIG_CHECK(l.local_rank < l.local_world, "LOCAL_RANK=", l.local_rank, " is outside [0, LOCAL_WORLD_SIZE=",
                       l.local_world, ")");
  } else if (l.local_world < l.world) {
    l.local_rank = l.rank % l.local_world;
  }
  if (!l.distributed()) return l;
  const char* addr = env("MASTER_ADDR");
  const char* port = env("MASTER_PORT");
  FERRY_CONFIG_CHECK(addr && *addr, "WORLD_SIZE=", l.world, " but MASTER_ADDR is not set: set MASTER_ADDR and ",
                     "MASTER_PORT to rank 0's host and a free port, or launch with torchrun");
  FERRY_CONFIG_CHECK(port && *port, "WORLD_SIZE=", l.world, " but MASTER_PORT is not set: set it to a free port ",
                     "on MASTER_ADDR=", addr, ", or launch with torchrun");
  l.master_addr = addr;
  l.master_port = read_int("MASTER_PORT", port, 1, 65535);
  const char* agent = env("TORCHELASTIC_USE_AGENT_STORE");
  l.agent_store = agent && std::string(agent) == "True";
  FERRY_CONFIG_CHECK(visible_gpus < 0 || l.local_world <= visible_gpus, "LOCAL_WORLD_SIZE=", l.local_world,
                     " ranks on this machine but ", visible_gpus, " GPU", visible_gpus == 1 ? " is" : "s are",
                     " visible: start at most ", visible_gpus, " ranks per machine (--nproc-per-node) or make more ",
                     "GPUs visible (CUDA_VISIBLE_DEVICES)");
  return l;
}

launch_info read_launch_env(int visible_gpus) {
  return read_launch([](const char* name) { return std::getenv(name); }, visible_gpus);
}

}  // namespace ferry::dist
