// One rank of dist_test's runs: reads the torchrun environment (src/dist/launch.h), connects over
// c10d (Gloo on the loopback), trains k_steps steps of its share of the global batch and writes
// its results for the test to compare with a one-rank run:
//   dist_worker KIND POISON(0|1) OUT_PREFIX [DIE_AT_STEP [CHECKPOINT_MODE OUTPUT_DIR [STEP]]]
// OUT_PREFIX.<rank>.steps  one line per step: loss skipped grad_norm clip_coef loss_scale
// OUT_PREFIX.<rank>.master this rank's shard of every unit's fp32 master, unit after unit
// OUT_PREFIX.<rank>.moments this rank's shard of every unit's moments decoded to fp32, m then v
// Built twice: dist_worker (host backend) and dist_gpu_worker (CUDA, FERRY_TEST_CUDA=1).
// DIE_AT_STEP: rank 1 exits abruptly (no goodbye to the others) before that step (1-based); -1 never.
// KIND shared_block: no engine; the ranks take turns on a shared block (share_host_memory) for 300
// rounds of 3 slots with random pauses, each writing its part and checking after publish that no
// part is older than the round (DIE_AT_STEP: rank 1 exits before that round), then post without
// waiting and wait_all (below); OUT_PREFIX.<rank>.steps gets "rounds N". Otherwise
// OUT_PREFIX.<rank>.shadows says "shared" or "gather" (how the store's shadows reached the ranks).
// CHECKPOINT_MODE (dist_checkpoint_test; checkpoints in OUTPUT_DIR, trainer step = steps taken):
//   save STEP     trains STEP steps, writes the result files, saves a checkpoint, stops
//   resume        resumes from OUTPUT_DIR's latest checkpoint and trains to k_steps
//   load          resumes from OUTPUT_DIR's latest checkpoint and writes the result files at once
//   init STEP     starts from the HF weights of OUTPUT_DIR/checkpoint-<STEP> at step STEP, trains to k_steps
//   die_in_save STEP, fail_in_save STEP
//                 saves after every step; from STEP on rank 1 may not write past 16 KiB of a file
//                 (RLIMIT_FSIZE), so its shard is cut short: die_in_save by SIGXFSZ (the rank dies in
//                 the middle of its file), fail_in_save with EFBIG (the rank's write throws)
#include <sys/resource.h>
#include <unistd.h>

#include <csignal>
#include <filesystem>

#include <chrono>
#include <cstdio>
#include <random>
#include <thread>
#include <cstdlib>
#include <fstream>
#include <string>

#include "src/checkpoint/checkpoint.h"
#include "src/common/error.h"
#include "src/dist/launch.h"
#include "src/dist/process_group.h"
#include "tests/dist/dist_run.h"

int main(int argc, char** argv) {
  using namespace ferry;
  return run_tool("dist_worker", [&] {
    FERRY_CONFIG_CHECK(argc >= 4, "usage: dist_worker KIND POISON OUT_PREFIX [DIE_AT_STEP [CHECKPOINT_MODE OUTPUT_DIR [STEP]]]");
    const std::string kind = argv[1], prefix = argv[3];
    const bool poison = std::string(argv[2]) == "1";
    const int die_at = argc > 4 ? std::atoi(argv[4]) : -1;
    const std::string mode = argc > 5 ? argv[5] : "", out_dir = argc > 6 ? argv[6] : "";
    const int64_t mode_step = argc > 7 ? std::atoll(argv[7]) : -1;
    const dist::launch_info launch = dist::read_launch_env(-1);
    // The GPU build (dist_gpu_worker): one device per rank, as ferry-train binds LOCAL_RANK.
    engine::engine_options o = dist::test::run_options(kind, dist::test::k_global / launch.world, poison,
                                                       test::k_cuda_suite ? launch.local_rank : -1);
    if (dist::test::kind_ends_with(kind, "_lag") && launch.rank == launch.world - 1) {
      o.debug_delay_us = dist::test::k_lag_us;
    }
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
    if (kind == "shared_block") {
      FERRY_CHECK(group, "shared_block needs ranks");
      constexpr int64_t slots = 3, rounds = 300, stride = 8;   // one cache line per rank's part
      auto block = group->share_host_memory(size_t(slots * launch.world * stride * 8), slots);
      FERRY_CHECK(block, "share_host_memory returned null with every rank on this machine");
      auto* d = static_cast<volatile int64_t*>(block->data());
      std::mt19937 rng(unsigned(launch.rank + 1));
      for (int64_t round = 1; round <= rounds; ++round) {
        if (launch.rank == 1 && round == die_at) _exit(9);
        for (int64_t slot = 0; slot < slots; ++slot) {
          std::this_thread::sleep_for(std::chrono::microseconds(rng() % 300));
          d[(slot * launch.world + launch.rank) * stride] = round;
          block->publish(slot);
          for (int r = 0; r < launch.world; ++r) {
            const int64_t v = d[(slot * launch.world + r) * stride];
            // A rank that went on may already have written the next round, never two ahead.
            FERRY_CHECK(v == round || v == round + 1, "rank ", launch.rank, ", round ", round, ", slot ", slot,
                        ": rank ", r, "'s part holds round ", v);
          }
        }
      }
      // post does not wait for the others (the update thread goes on to its next unit): rank 0
      // posts twice more while the others are held in a barrier it must reach; wait_all then
      // returns only once every rank has posted as often.
      const int64_t final_round = rounds + 2;
      if (launch.rank == 0)
        for (int64_t round = rounds + 1; round <= final_round; ++round) {
          d[launch.rank * stride] = round;
          block->post(0);
        }
      group->barrier("posted");
      if (launch.rank != 0) {
        std::this_thread::sleep_for(std::chrono::milliseconds(200));
        for (int64_t round = rounds + 1; round <= final_round; ++round) {
          d[launch.rank * stride] = round;
          block->post(0);
        }
      }
      block->wait_all(0);
      for (int r = 0; r < launch.world; ++r)
        FERRY_CHECK(d[r * stride] == final_round, "rank ", launch.rank, " after wait_all: rank ", r, "'s part holds round ",
                    d[r * stride], ", not ", final_round);
      std::ofstream(prefix + "." + std::to_string(launch.rank) + ".steps") << "rounds " << rounds << "\n";
      group->barrier("done");
      return 0;
    }
    auto e = engine::test::make_engine(o);
    FERRY_CHECK(!dist::test::kind_ends_with(kind, "_group") || e->plan().micro_group == o.grad_accum,
                "kind ", kind, ": planned groups of ", e->plan().micro_group, ", not all ", o.grad_accum, " micro-batches");
    std::ofstream(prefix + "." + std::to_string(launch.rank) + ".shadows")
        << (e->params().shadows_shared() ? "shared" : "gather") << "\n";
    const auto data = dist::test::global_data();
    checkpoint::trainer_state st;
    st.seed = 7;
    st.model_name = "tiny";
    if (mode == "resume" || mode == "load") st = checkpoint::load_checkpoint(*e, checkpoint::resolve_checkpoint("latest", out_dir));
    if (mode == "init") {
      char name[64];
      std::snprintf(name, sizeof name, "checkpoint-%06lld", static_cast<long long>(mode_step));
      checkpoint::load_hf_weights(*e, (std::filesystem::path(out_dir) / name).string());
      e->params_changed();
      st.step = mode_step;
    }
    const bool save_each = mode == "die_in_save" || mode == "fail_in_save";
    auto save = [&] { checkpoint::save_checkpoint(*e, st, out_dir, 2); };
    std::ofstream steps(prefix + "." + std::to_string(launch.rank) + ".steps");
    auto write_results = [&] {
      e->wait_updates();
      std::ofstream master(prefix + "." + std::to_string(launch.rank) + ".master", std::ios::binary);
      for (int64_t u = 0; u < e->params().num_units(); ++u) {   // through the tier: in memory or on disk
        engine::state_lease s(e->params().state(), u, false);
        master.write(reinterpret_cast<const char*>(s->master), std::streamsize(s->n * 4));
      }
      master.close();
      std::ofstream moments(prefix + "." + std::to_string(launch.rank) + ".moments", std::ios::binary);
      for (int64_t u = 0; u < e->params().num_units(); ++u) {
        const auto [m, v] = engine::test::decoded_moments(*e, u);
        moments.write(reinterpret_cast<const char*>(m.data_ptr()), std::streamsize(m.numel() * 4));
        moments.write(reinterpret_cast<const char*>(v.data_ptr()), std::streamsize(v.numel() * 4));
      }
      moments.close();
    };
    const int64_t last = mode == "load" ? st.step : int64_t(data.size());
    for (int64_t k = st.step; k < last; ++k) {
      if (mode == "save" && k == mode_step) {
        write_results();
        save();
        if (group) group->barrier("done");
        return 0;
      }
      if (launch.rank == 1 && k + 1 == die_at) _exit(9);
      const engine::step_result r =
          e->train_step(dist::test::rank_rows(data[size_t(k)], launch.rank, launch.world, kind), engine::test::lr_at(k));
      ++st.step;
      st.data_cursor += dist::test::k_global;
      char line[256];
      std::snprintf(line, sizeof line, "%.17g %d %.17g %.17g %.17g\n", r.loss, int(r.skipped), r.grad_norm, r.clip_coef,
                    r.loss_scale);
      steps << line;
      if (save_each) {
        if (launch.rank == 1 && st.step == mode_step) {
          if (mode == "fail_in_save") std::signal(SIGXFSZ, SIG_IGN);
          const rlimit lim{16 << 10, 16 << 10};
          setrlimit(RLIMIT_FSIZE, &lim);
        }
        save();
      }
    }
    write_results();
    steps.close();
    if (group) group->barrier("done");
    return 0;
  });
}
