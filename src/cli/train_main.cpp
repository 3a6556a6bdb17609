// ferry-train: parse, validate, wire, run.
#include <ATen/Context.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "src/cli/cli_options.h"
#include "src/cli/wiring.h"
#include "src/common/proc_status.h"
#include "src/dist/launch.h"
#include "src/dist/numa.h"
#include "src/dist/process_group.h"
#include "src/engine/backend.h"
#include "src/io/atomic_file.h"
#include "src/train/trainer.h"

namespace {
// The ranks of one machine split its cores (no oversubscription): the AdamW arena's threads
// (cpu_threads 0 = all cores but one, shared out) and ATen's intra-op threads. On a machine with
// several NUMA nodes a CUDA rank is first bound to its GPU's node and shares that node's cores with
// the ranks whose GPUs sit there (dist/numa.h; memory then comes from the node by first touch).
// Returns the node (-1: not bound).
int place_rank(const ferry::dist::launch_info& launch, bool cuda, int cfg_cpu_threads,
               ferry::engine::engine_options& eo) {
  using namespace ferry;
  int cores = int(std::max(1u, std::thread::hardware_concurrency())), sharing = launch.local_world, node = -1;
  if (cuda) {
    std::vector<std::string> bus_ids;
    for (int r = 0; r < launch.local_world; ++r) bus_ids.push_back(engine::cuda_pci_bus_id(r));
    const dist::numa_placement p = dist::plan_numa_placement(bus_ids, launch.local_rank);
    const std::vector<int> cpus = dist::allowed_cpus_of(p.cpus);   // a cpuset may hold fewer
    if (p.node >= 0 && dist::bind_to_cpus(cpus)) {
      node = p.node;
      cores = int(cpus.size());
      sharing = p.ranks_on_node;
      if (launch.rank == 0)
        std::printf("numa: rank 0 bound to node %d (%d cores, shared by %d of this machine's %d ranks)\n", node,
                    cores, sharing, launch.local_world);
    }
  }
  if (cfg_cpu_threads == 0) eo.cpu_threads = std::max(1, (cores - 1) / sharing);
  at::set_num_threads(std::max(1, cores / sharing));
  return node;
}

// This process's peak resident set in bytes: VmHWM of /proc/self/status, the peak of this address
// space. Not getrusage's ru_maxrss: Linux carries that across execve, so a rank forked by
// torchrun's Python agent would report the agent's size.
int64_t peak_rss_bytes() { return ferry::proc_status_bytes({"VmHWM"})[0]; }

// A data-parallel rank's own peaks, for scripts/bench.sh --gpus (rank 0 alone writes
// metrics.jsonl and prints; every rank writes this): <output_dir>/ranks/rank<R>.json with the
// rank, its GPU's caching-allocator peaks (allocated and reserved bytes, 0 on the host backend)
// and the process's peak resident set (VmHWM, bytes; pinned host buffers count).
void write_rank_stats(const std::string& output_dir, const ferry::dist::launch_info& launch, bool cuda, int numa_node,
                      int code) {
  const ferry::engine::device_memory_stats mem =
      cuda ? ferry::engine::cuda_memory_stats(launch.local_rank) : ferry::engine::device_memory_stats{};
  const int64_t host_peak = peak_rss_bytes();
  char line[512];
  std::snprintf(line, sizeof line,
                "{\"rank\": %d, \"world\": %d, \"local_rank\": %d, \"local_world\": %d, \"device\": \"%s\", "
                "\"numa_node\": %d, \"gpu_alloc_peak\": %lld, \"gpu_reserved_peak\": %lld, \"host_peak_rss\": %lld, "
                "\"exit_code\": %d}\n",
                launch.rank, launch.world, launch.local_rank, launch.local_world, cuda ? "cuda" : "cpu", numa_node,
                (long long)mem.allocated_peak, (long long)mem.reserved_peak, (long long)host_peak, code);
  const std::string dir = output_dir + "/ranks";
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);   // a failure shows in write_file_atomic's error
  ferry::io::write_file_atomic(dir + "/rank" + std::to_string(launch.rank) + ".json", line);
}

int train_main(int argc, char** argv) {
  using namespace ferry;
  cli::cli_request req = cli::parse_cli(argc, argv, cli::tool::tool_train);
  if (req.exit_now) return 0;
  cli::resolve_auto(req.cfg, engine::cuda_usable());
  // torchrun's environment: checked on every rank before anything is built.
  const bool cuda = req.cfg.device == "cuda";
  const dist::launch_info launch = dist::read_launch_env(cuda ? engine::cuda_device_count() : -1);
  model::llama_config mc = cli::resolve_model(req.cfg);
  engine::engine_options eo = cli::engine_options_for(req.cfg, mc);
  if (launch.distributed() && cuda) eo.device_index = launch.local_rank;
  const int numa_node = launch.local_world > 1 ? place_rank(launch, cuda, req.cfg.cpu_threads, eo) : -1;
  if (!req.plan_json.empty()) cli::write_plan_json(req.plan_json, req.cfg, mc, eo);
  if (req.dry_run) {
    cli::print_dry_run(req.cfg, mc, eo);
    return 0;
  }
  std::shared_ptr<dist::process_group> group;
  if (launch.distributed()) {
    dist::group_options go;
    go.timeout = std::chrono::milliseconds(int64_t(req.cfg.dist_timeout_s * 1000));
    go.cuda = cuda;
    group = dist::process_group::connect(launch, go);
    group->check_same_config(io::to_json(req.cfg));
    eo.comm = group;
    engine::check_options(eo);
  }
  io::data_options data = cli::data_options_for(req.cfg, mc);
  const int code = train::run_training(req.cfg, mc, eo, data);
  if (launch.distributed()) write_rank_stats(req.cfg.output_dir, launch, cuda, numa_node, code);
  // Rank 0 hosts the store: it leaves only after every rank is done with it.
  if (group) group->barrier("exit");
  return code;
}
}  // namespace

int main(int argc, char** argv) { return ferry::cli::run_main("ferry-train", train_main, argc, argv); }
