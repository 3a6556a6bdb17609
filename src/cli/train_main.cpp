// ferry-train: parse, validate, wire, run.
#include <ATen/Context.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <thread>

#include "src/cli/cli_options.h"
#include "src/cli/wiring.h"
#include "src/dist/launch.h"
#include "src/dist/process_group.h"
#include "src/engine/backend.h"
#include "src/train/trainer.h"

namespace {
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
  if (launch.local_world > 1) {
    // The ranks of one machine split its cores (no oversubscription): the AdamW arena's threads
    // (cpu_threads 0 = all cores but one, shared out) and ATen's intra-op threads.
    const int cores = int(std::max(1u, std::thread::hardware_concurrency()));
    if (req.cfg.cpu_threads == 0) eo.cpu_threads = std::max(1, (cores - 1) / launch.local_world);
    at::set_num_threads(std::max(1, cores / launch.local_world));
  }
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
  // Rank 0 hosts the store: it leaves only after every rank is done with it.
  if (group) group->barrier("exit");
  return code;
}
}  // namespace

int main(int argc, char** argv) { return ferry::cli::run_main("ferry-train", train_main, argc, argv); }
