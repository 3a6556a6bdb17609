// One rank of dist_test's runs: reads the torchrun environment (src/dist/launch.h), connects over
// c10d (Gloo on the loopback), trains k_steps steps of its share of the global batch and writes
// its results for the test to compare with a one-rank run:
//   dist_worker KIND POISON(0|1) OUT_PREFIX [DIE_AT_STEP]
// OUT_PREFIX.<rank>.steps  one line per step: loss skipped grad_norm clip_coef loss_scale
// OUT_PREFIX.<rank>.master this rank's shard of every unit's fp32 master, unit after unit
// Built twice: dist_worker (host backend) and dist_gpu_worker (CUDA, FERRY_TEST_CUDA=1).
// DIE_AT_STEP: rank 1 exits abruptly (no goodbye to the others) before that step (1-based).
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>

#include "src/common/error.h"
#include "src/dist/launch.h"
#include "src/dist/process_group.h"
#include "tests/dist/dist_run.h"

int main(int argc, char** argv) {
  using namespace ferry;
  return run_tool("dist_worker", [&] {
    FERRY_CONFIG_CHECK(argc >= 4, "usage: dist_worker KIND POISON OUT_PREFIX [DIE_AT_STEP]");
    const std::string kind = argv[1], prefix = argv[3];
    const bool poison = std::string(argv[2]) == "1";
    const int die_at = argc > 4 ? std::atoi(argv[4]) : -1;
    const dist::launch_info launch = dist::read_launch_env(-1);
    // The GPU build (dist_gpu_worker): one device per rank, as ferry-train binds LOCAL_RANK.
    engine::engine_options o = dist::test::run_options(kind, dist::test::k_global / launch.world, poison,
                                                       test::k_cuda_suite ? launch.local_rank : -1);
    std::shared_ptr<dist::process_group> group;
    if (launch.distributed()) {
      dist::group_options go;
      const char* t = std::getenv("FERRY_TEST_DIST_TIMEOUT_S");
      go.timeout = std::chrono::milliseconds(int64_t(1000 * (t ? std::atof(t) : 60)));
      // The GPU build: as ferry-train's CUDA ranks (with NCCL, the unit collectives through the GPUs).
      go.cuda = test::k_cuda_suite;
      group = dist::process_group::connect(launch, go);
      o.comm = group;
    }
    auto e = engine::test::make_engine(o);
    const auto data = dist::test::global_data();
    std::ofstream steps(prefix + "." + std::to_string(launch.rank) + ".steps");
    for (int64_t k = 0; k < int64_t(data.size()); ++k) {
      if (launch.rank == 1 && k + 1 == die_at) _exit(9);
      const engine::step_result r =
          e->train_step(dist::test::rank_rows(data[size_t(k)], launch.rank, launch.world), engine::test::lr_at(k));
      char line[256];
      std::snprintf(line, sizeof line, "%.17g %d %.17g %.17g %.17g\n", r.loss, int(r.skipped), r.grad_norm, r.clip_coef,
                    r.loss_scale);
      steps << line;
    }
    e->wait_updates();
    std::ofstream master(prefix + "." + std::to_string(launch.rank) + ".master", std::ios::binary);
    for (int64_t u = 0; u < e->params().num_units(); ++u) {   // through the tier: in memory or on disk
      engine::state_lease s(e->params().state(), u, false);
      master.write(reinterpret_cast<const char*>(s->master), std::streamsize(s->n * 4));
    }
    master.close();
    steps.close();
    if (group) group->barrier("done");
    return 0;
  });
}
