// Data parallel over c10d on the host backend (Gloo on the loopback): 2 and 3 ranks, each a
// process of tests/dist/dist_worker.cpp, against one rank with the whole global batch in this
// process (the same options and data: tests/dist/dist_run.h). The partitioned step must give the
// one-rank trajectory within the engine's trajectory tolerance (engine_test_util.h
// tolerance_for), with clipping on every step and an injected overflow; a rank that dies makes
// the others stop within the collective timeout, naming it.
#include <chrono>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "src/common/error.h"
#include "src/dist/launch.h"
#include "src/engine/memory_plan.h"
#include "tests/dist/dist_run.h"
#include "tests/dist/dist_spawn.h"


namespace ferry::dist::test {
namespace {

// The ranks' results put together as one run: steps from rank 0 (every rank reports the same
// global facts: checked), each unit's master from the ranks' shards.
engine::test::run_result gather_run(const std::string& prefix, int world) {
  engine::test::run_result r;
  auto e = engine::test::make_engine(run_options("blocked", k_global, false));  // the unit sizes
  std::vector<std::string> step_text(static_cast<size_t>(world));
  for (int k = 0; k < world; ++k) step_text[size_t(k)] = slurp(prefix + "." + std::to_string(k) + ".steps");
  for (int k = 1; k < world; ++k) EXPECT_EQ(step_text[size_t(k)], step_text[0]) << "rank " << k << "'s step results";
  std::istringstream in(step_text[0]);
  std::string loss, skipped, norm, clip, scale;  // strtod reads the "nan" norm of a skipped step
  while (in >> loss >> skipped >> norm >> clip >> scale) {
    engine::step_result s;
    s.loss = std::strtod(loss.c_str(), nullptr);
    s.skipped = skipped != "0";
    s.grad_norm = std::strtod(norm.c_str(), nullptr);
    s.clip_coef = std::strtod(clip.c_str(), nullptr);
    s.loss_scale = std::strtod(scale.c_str(), nullptr);
    r.steps.push_back(s);
  }
  std::vector<std::ifstream> shards;
  for (int k = 0; k < world; ++k) shards.emplace_back(prefix + "." + std::to_string(k) + ".master", std::ios::binary);
  for (int64_t u = 0; u < e->params().num_units(); ++u) {
    const int64_t n = e->params().unit(u).numel;
    at::Tensor full = at::empty({n}, at::kFloat);
    for (int k = 0; k < world; ++k) {
      const engine::shard_layout l{k, world};
      shards[size_t(k)].read(static_cast<char*>(full.data_ptr()) + l.begin(n) * 4, std::streamsize(l.count(n) * 4));
      EXPECT_TRUE(shards[size_t(k)].good()) << "rank " << k << "'s master file is short at unit " << u;
    }
    r.master.push_back(full);
  }
  return r;
}

engine::test::run_result one_rank(const std::string& kind, bool poison) {
  return engine::test::run_engine(run_options(kind, k_global, poison), global_data());
}

struct dist_case {
  std::string kind;
  bool poison;
};

class dist_ranks : public ::testing::TestWithParam<dist_case> {};

// The GPU build (dist_gpu_test, label gpu) runs the same ranks one per device: the host-side
// collectives over CUDA ranks, as ferry-train runs them today (README "Data-parallel ranks").
std::vector<int> worlds() {
  if (!::ferry::test::k_cuda_suite) return {2, 3};
  std::vector<int> w;
  for (int n : {2, 3})
    if (n <= engine::cuda_device_count()) w.push_back(n);
  return w;
}

TEST_P(dist_ranks, partitioned_step_equals_one_rank) {
  FERRY_REQUIRE_DEVICE();
  if (worlds().empty()) GTEST_SKIP() << "needs 2 or more CUDA devices";
  const dist_case c = GetParam();
  const engine::test::run_result want = one_rank(c.kind, c.poison);
  for (int world : worlds()) {
    SCOPED_TRACE(c.kind + (c.poison ? " poisoned" : "") + ", " + std::to_string(world) + " ranks");
    const std::string prefix = scratch(c.kind + std::to_string(world));
    auto procs = spawn_ranks(world, {c.kind, c.poison ? "1" : "0", prefix}, c.kind + std::to_string(world), 60);
    const std::vector<int> codes = wait_ranks(procs, 240);
    bool ok = true;
    for (size_t k = 0; k < codes.size(); ++k) {
      EXPECT_EQ(codes[k], 0) << "rank " << k << ": " << slurp(procs[k].log);
      ok = ok && codes[k] == 0;
    }
    if (!ok) continue;
    // Ranks on one machine share their shadows unless the kind asks for the all-gather.
    const bool gather = run_options(c.kind, 1, false).shadows == engine::shadow_mode::shadows_gather;
    for (int k = 0; k < world; ++k)
      EXPECT_EQ(slurp(prefix + "." + std::to_string(k) + ".shadows"), gather ? "gather\n" : "shared\n") << "rank " << k;
    const engine::test::run_result got = gather_run(prefix, world);
    ASSERT_EQ(got.steps.size(), want.steps.size());
    // Each rank's half gradient is rounded before the sum: fp16 norms differ by ~2e-4 relative.
    const engine::test::trajectory_tol tol = engine::test::tolerance_for(run_options(c.kind, 1, false).dtype);
    for (size_t k = 0; k < want.steps.size(); ++k) {
      EXPECT_EQ(got.steps[k].skipped, want.steps[k].skipped) << "step " << k;
      EXPECT_EQ(got.steps[k].loss_scale, want.steps[k].loss_scale) << "step " << k;
      if (!want.steps[k].skipped) {
        EXPECT_NEAR(got.steps[k].grad_norm, want.steps[k].grad_norm, tol.norm_rel * want.steps[k].grad_norm)
            << "step " << k;
        EXPECT_NEAR(got.steps[k].clip_coef, want.steps[k].clip_coef, tol.norm_rel * want.steps[k].clip_coef)
            << "step " << k;
        EXPECT_LT(want.steps[k].clip_coef, 1.0) << "step " << k << " was to clip";
      }
    }
    if (c.poison) {
      EXPECT_TRUE(want.steps[1].skipped) << "the injected overflow skips step 2";
    }
    engine::test::expect_runs_close(got, want, tol, c.kind + " " + std::to_string(world) + " ranks");
    for (int k = 0; k < world; ++k) {
      std::remove((prefix + "." + std::to_string(k) + ".steps").c_str());
      std::remove((prefix + "." + std::to_string(k) + ".master").c_str());
      std::remove((prefix + "." + std::to_string(k) + ".shadows").c_str());
      std::remove(procs[size_t(k)].log.c_str());
    }
  }
}

INSTANTIATE_TEST_SUITE_P(kinds, dist_ranks,
                         ::testing::Values(dist_case{"blocked", false}, dist_case{"overlapped", true},
                                           dist_case{"fp16", true}, dist_case{"nvme", true},
                                           dist_case{"device", true}, dist_case{"device_fp16", true},
                                           dist_case{"fp16_gather", true}, dist_case{"device_gather", true},
                                           dist_case{"device_fp16_group", true}, dist_case{"device_lag", true}),
                         [](const auto& info) { return info.param.kind + (info.param.poison ? "_overflow" : ""); });

// Rank 1 of 2 exits abruptly (the worker's DIE_AT_STEP) under a 5 s collective timeout: rank 0
// must stop within 45 s with an error naming rank 1. Returns rank 0's log.
std::string rank0_log_after_rank1_dies(const std::vector<std::string>& args, const std::string& tag) {
  const auto t0 = std::chrono::steady_clock::now();
  auto procs = spawn_ranks(2, args, tag, 5);
  const std::vector<int> codes = wait_ranks(procs, 60);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const std::string log = slurp(procs[0].log);
  EXPECT_EQ(codes[1], 9);
  EXPECT_EQ(codes[0], 1) << log;
  EXPECT_NE(log.find("rank 1 stopped"), std::string::npos) << log;
  EXPECT_LT(s, 45.0);
  std::printf("  rank 0 stopped %.1f s after the start: %s", s, log.c_str());
  return log;
}

TEST(dist_failures, a_dead_rank_stops_the_others_naming_it) {
  FERRY_REQUIRE_DEVICE();
  if (worlds().empty()) GTEST_SKIP() << "needs 2 or more CUDA devices";
  const std::string log = rank0_log_after_rank1_dies({"overlapped", "0", scratch("dead"), "2"}, "dead");
  int lines = 0;
  for (char ch : log) lines += ch == '\n';
  EXPECT_EQ(lines, 1) << "one line: " << log;
}

// The shared block under the engine's shared shadows: after publish every rank's part is of this
// round (or, from a rank that went on, the next), over 300 rounds of random pauses; post returns
// without the others (a rank posts while they wait for it in a barrier) and wait_all waits for
// them; a rank that dies makes the others stop within the timeout, naming it.
TEST(dist_shared, publish_waits_for_every_rank_and_names_a_dead_one) {
  FERRY_REQUIRE_DEVICE();
  if (worlds().empty()) GTEST_SKIP() << "needs 2 or more CUDA devices";
  for (int world : worlds()) {
    const std::string prefix = scratch("shared" + std::to_string(world));
    auto procs = spawn_ranks(world, {"shared_block", "0", prefix}, "shared" + std::to_string(world), 30);
    const std::vector<int> codes = wait_ranks(procs, 120);
    for (int k = 0; k < world; ++k) {
      EXPECT_EQ(codes[size_t(k)], 0) << "rank " << k << ": " << slurp(procs[size_t(k)].log);
      EXPECT_EQ(slurp(prefix + "." + std::to_string(k) + ".steps"), "rounds 300\n") << "rank " << k;
      std::remove((prefix + "." + std::to_string(k) + ".steps").c_str());
    }
  }
  const std::string log = rank0_log_after_rank1_dies({"shared_block", "0", scratch("shared_dead"), "40"}, "shared_dead");
  EXPECT_NE(log.find("shared unit"), std::string::npos) << log;
}

// A rank of `world` alone in the process: the plan and the store need only rank() and world().
// No collective is expected, except with `gathers` an all-gather, which puts only this rank's
// block in place (the other ranks' blocks are not what a test looks at); with `shares`, shared
// memory that only this process maps.
class silent_ranks final : public engine::collectives {
 public:
  silent_ranks(int rank, int world, bool gathers = false, bool shares = false)
      : rank_(rank), world_(world), gathers_(gathers), shares_(shares) {}
  int rank() const override { return rank_; }
  int world() const override { return world_; }
  void all_reduce_sum(at::Tensor&, engine::comm_channel) override { ADD_FAILURE() << "no collective expected"; }
  void reduce_scatter_sum(at::Tensor&, const at::Tensor&, engine::comm_channel) override { ADD_FAILURE(); }
  void all_gather(at::Tensor& out, const at::Tensor& in, engine::comm_channel) override {
    if (!gathers_) ADD_FAILURE() << "no all-gather expected";
    else out.narrow(0, rank_ * in.numel(), in.numel()).copy_(in);
  }
  std::unique_ptr<engine::shared_host_block> share_host_memory(size_t bytes, int64_t) override {
    if (!shares_) return nullptr;
    class block final : public engine::shared_host_block {
     public:
      explicit block(size_t bytes) : bytes_(bytes), data_(std::aligned_alloc(4096, (bytes + 4095) / 4096 * 4096)) {
        std::memset(data_, 0, bytes);
      }
      ~block() override { std::free(data_); }
      void* data() const override { return data_; }
      size_t bytes() const override { return bytes_; }
      void post(int64_t) override {}
      double wait_all(int64_t) override { return 0; }

     private:
      size_t bytes_;
      void* data_;
    };
    return std::make_unique<block>(bytes);
  }

 private:
  int rank_, world_;
  bool gathers_, shares_;
};

// A rank draws its shard of every unit in pieces, never the whole unit, and keeps exactly the
// one-rank values of its shard; drawing a slot in pieces gives the values of drawing it whole.
TEST(dist_init, a_rank_draws_only_up_to_its_shard_and_keeps_the_one_rank_values) {
  const model::llama_config cfg = engine::test::tiny_config();
  auto host = engine::make_host_backend();
  engine::param_store whole(cfg, at::kFloat, *host, true), pieces(cfg, at::kFloat, *host, true);
  const int64_t big = int64_t(1) << 40;   // every slot in one piece
  whole.init_random(11, 0.02, big);
  pieces.init_random(11, 0.02, 48);
  for (int64_t u = 0; u < whole.num_units(); ++u)
    EXPECT_TRUE(whole.master_tensor(u).equal(pieces.master_tensor(u))) << "unit " << u << " drawn in pieces of 48";
  for (int world : {2, 3}) {
    for (int r = 0; r < world; ++r) {
      auto comm = std::make_shared<silent_ranks>(r, world, /*gathers=*/true);
      engine::param_store store(cfg, at::kFloat, *host, true, engine::state_kind::state_fp32, nullptr, comm,
                                engine::shadow_mode::shadows_gather);
      store.init_random(11, 0.02, 64);
      for (int64_t u = 0; u < store.num_units(); ++u) {
        const at::Tensor want = whole.master_tensor(u).narrow(0, store.shard_begin(u), store.shard_numel(u));
        EXPECT_TRUE(store.master_tensor(u).equal(want)) << "rank " << r << " of " << world << ", unit " << u;
        EXPECT_TRUE(store.shadow_tensor(u).narrow(0, store.shard_begin(u), store.shard_numel(u)).equal(want))
            << "rank " << r << " of " << world << ", unit " << u << "'s shadow";
      }
    }
  }
}

// The optimizer state of a rank is its shard: the store's tier allocates shard_numel per unit,
// 1/world of the one-rank tier (to a block's rounding), and the planner charges rank 0's shards,
// the largest, so it bounds every rank's tier.
TEST(dist_plan, a_rank_holds_and_plans_its_share_of_the_state) {
  const model::llama_config cfg = engine::test::tiny_config();
  engine::engine_options o = run_options("overlapped", 2, false);
  auto host = engine::make_host_backend();
  const engine::memory_plan one = engine::plan_memory(cfg, o, 2, engine::test::k_seq, 1);
  for (int world : {2, 3}) {
    int64_t biggest = 0;
    for (int r = 0; r < world; ++r) {
      engine::engine_options ro = o;
      ro.comm = std::make_shared<silent_ranks>(r, world);
      engine::param_store store(cfg, at::kFloat, *host, true, engine::state_kind::state_fp32, nullptr, ro.comm);
      const engine::memory_plan p = engine::plan_memory(cfg, ro, 2, engine::test::k_seq, 1);
      EXPECT_LE(store.state().host_bytes(), p.host_master + p.host_moments) << "rank " << r << " of " << world;
      biggest = std::max(biggest, store.state().host_bytes());
      int64_t n = 0;
      for (int64_t u = 0; u < store.num_units(); ++u) n += store.shard_numel(u);
      EXPECT_LE(std::abs(double(n) - double(store.total_params()) / world), double(store.num_units()));
    }
    const engine::memory_plan p = engine::plan_memory(cfg, [&] {
      engine::engine_options ro = o;
      ro.comm = std::make_shared<silent_ranks>(0, world);
      return ro;
    }(), 2, engine::test::k_seq, 1);
    EXPECT_EQ(biggest, p.host_master + p.host_moments) << world << " ranks: rank 0's tier is the plan's";
    EXPECT_LT(double(p.host_master + p.host_moments), 1.01 * double(one.host_master + one.host_moments) / world);

    // On disk: rank 0's tier file and buffers hold its shards, and the plan charges exactly those.
    engine::engine_options ro = o;
    ro.comm = std::make_shared<silent_ranks>(0, world);
    const char* tmp = std::getenv("TMPDIR");
    ro.state_on = engine::state_place::place_nvme;
    ro.nvme.path = tmp && *tmp ? tmp : "/tmp";
    ro.nvme.buffers = 2;
    engine::param_store store(cfg, at::kFloat, *host, true, engine::state_kind::state_fp32, &ro.nvme, ro.comm);
    const engine::memory_plan d = engine::plan_memory(cfg, ro, 2, engine::test::k_seq, 1);
    EXPECT_EQ(d.disk_state, store.state().disk_bytes()) << world << " ranks on disk";
    EXPECT_EQ(d.host_state_buffers, store.state().host_bytes()) << world << " ranks on disk";
  }
}

// dist_reduce=device: each rank's pinned gradient buffers hold its shards of the blocks' (and the
// untied head's) gradients, so a rank pins about (1 - 1/world) of those fewer bytes than with
// host reduction. The plan (rank 0's) stays an upper bound of the store's pinned bytes, and what it
// charges beyond them (the gradient shards' fp32 sums and the collective scratch) does not grow
// with device reduction: a plan still charging whole gradient buffers would, at 3 ranks.
TEST(dist_plan, device_reduction_pins_only_the_shards_of_the_gradients) {
  const model::llama_config cfg = engine::test::tiny_config();
  auto host = engine::make_host_backend();
  const int64_t units = cfg.num_hidden_layers + 2;
  for (int world : {2, 3}) {
    int64_t pinned[2] = {0, 0}, beyond[2] = {0, 0}, planned[2] = {0, 0};
    for (int device = 0; device < 2; ++device) {
      engine::engine_options ro = run_options(device ? "device" : "overlapped", 2, false);
      ro.comm = std::make_shared<silent_ranks>(0, world);
      engine::param_store store(cfg, at::kFloat, *host, true, engine::state_kind::state_fp32, nullptr, ro.comm,
                                engine::shadow_mode::shadows_gather,
                                engine::units_reduced_on_device(ro, cfg.tie_word_embeddings, units));
      const engine::memory_plan p = engine::plan_memory(cfg, ro, 2, engine::test::k_seq, 1);
      for (int64_t u = 0; u < units; ++u)
        EXPECT_EQ(store.grad_tensor(u).numel(), device ? store.shard_numel(u) : store.unit(u).numel) << "unit " << u;
      pinned[device] = store.pinned_bytes();
      planned[device] = p.host_pinned;
      beyond[device] = p.host_pinned - store.pinned_bytes();
      EXPECT_GE(beyond[device], 0) << world << " ranks, dist_reduce " << (device ? "device" : "host");
    }
    EXPECT_LE(beyond[1], beyond[0] + 64 * units) << world << " ranks";
    // At least the blocks' other shards; at most those and the head's.
    const double share = 1.0 - 1.0 / world, saved = double(pinned[0] - pinned[1]);
    const double blocks = double(cfg.num_hidden_layers * cfg.block_params() * 4);
    EXPECT_GE(saved, 0.98 * share * blocks) << world << " ranks";
    EXPECT_LE(saved, 1.02 * share * (blocks + double(cfg.head_params() * 4))) << world << " ranks";
    // The plan also keeps only this rank's block of the embedding's fp32 gradient, not the padded table.
    const engine::shard_layout sh{0, world};
    const double embed_saved = double((sh.padded(cfg.embed_params()) - sh.per(cfg.embed_params())) * 4);
    EXPECT_GE(double(planned[0] - planned[1]), 0.98 * share * blocks + embed_saved) << world << " ranks";
  }
}

// The collectives' fp32 scratch of a whole unit exists only where a unit is gathered or reduced on
// the host: shared shadows with every unit reduced on the device need none (the embedding's
// gradient included), and the plan charges it only where it can exist, so
// it stays an upper bound of the store's page-locked bytes.
TEST(dist_plan, shared_shadows_with_device_reduction_pin_no_collective_scratch) {
  const model::llama_config cfg = engine::test::tiny_config();
  auto host = engine::make_host_backend();
  const int64_t units = cfg.num_hidden_layers + 2;
  const int world = 2;
  int64_t widest = 0;
  for (int64_t n : engine::param_store::unit_numels(cfg)) widest = std::max(widest, engine::shard_layout{0, world}.padded(n));
  int64_t plan_pinned[2][2] = {};
  for (int shared = 0; shared < 2; ++shared) {
    for (int device = 0; device < 2; ++device) {
      engine::engine_options ro = run_options(device ? "device" : "overlapped", 2, false);
      ro.comm = std::make_shared<silent_ranks>(0, world, false, /*shares=*/true);
      ro.shadows = shared ? engine::shadow_mode::shadows_shared : engine::shadow_mode::shadows_gather;
      engine::param_store store(cfg, at::kFloat, *host, true, engine::state_kind::state_fp32, nullptr, ro.comm,
                                ro.shadows, engine::units_reduced_on_device(ro, cfg.tie_word_embeddings, units));
      const std::string what = std::string(shared ? "shared" : "gathered") + " shadows, dist_reduce " +
                               (device ? "device" : "host");
      EXPECT_EQ(store.shadows_shared(), bool(shared)) << what;
      EXPECT_EQ(store.comm_scratch() == nullptr, shared && device) << what;
      // The embedding's fp32 host gradient: reduced on the device, this rank's block only.
      const int64_t embed_floats = device ? store.shards().per(cfg.embed_params()) : store.shards().padded(cfg.embed_params());
      EXPECT_EQ(store.grad_tensor(store.embed_unit()).numel(),
                device ? store.shard_numel(store.embed_unit()) : cfg.embed_params()) << what;
      const engine::memory_plan p = engine::plan_memory(cfg, ro, 2, engine::test::k_seq, 1);
      plan_pinned[shared][device] = p.host_pinned;
      // The store's pinned block (shared shadows counted), its embedding gradient and the scratch.
      const int64_t pinned = store.pinned_bytes() + embed_floats * 4 +
                             (store.comm_scratch() ? widest * 4 : 0);
      EXPECT_GE(p.host_pinned, pinned) << what;
    }
  }
  // Without the scratch the plan charges at least the widest unit's padded fp32 less.
  EXPECT_LE(plan_pinned[1][1], plan_pinned[0][1] - widest * 4);
  EXPECT_EQ(plan_pinned[1][0], plan_pinned[0][0]);
}

// The torchrun environment's checks (src/dist/launch.h), each one line.
launch_info launch_of(const std::vector<std::pair<const char*, const char*>>& vars, int gpus) {
  return read_launch(
      [&](const char* name) -> const char* {
        for (const auto& [k, v] : vars)
          if (std::string(k) == name) return v;
        return nullptr;
      },
      gpus);
}

std::string launch_error(const std::vector<std::pair<const char*, const char*>>& vars, int gpus) {
  try {
    launch_of(vars, gpus);
  } catch (const config_error& e) {
    EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos);
    return e.what();
  }
  return "";
}

TEST(dist_launch, reads_torchrun_and_refuses_bad_launches) {
  EXPECT_FALSE(launch_of({}, -1).distributed());
  const launch_info l = launch_of({{"RANK", "2"}, {"WORLD_SIZE", "4"}, {"LOCAL_RANK", "0"}, {"LOCAL_WORLD_SIZE", "2"},
                                   {"MASTER_ADDR", "10.0.0.1"}, {"MASTER_PORT", "29500"}},
                                  2);
  EXPECT_EQ(l.rank, 2);
  EXPECT_EQ(l.world, 4);
  EXPECT_EQ(l.local_rank, 0);
  EXPECT_EQ(l.local_world, 2);
  EXPECT_EQ(l.master_addr, "10.0.0.1");
  EXPECT_EQ(l.master_port, 29500);
  EXPECT_FALSE(launch_of({{"WORLD_SIZE", "1"}}, -1).distributed());
  EXPECT_NE(launch_error({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_PORT", "1"}}, -1).find("MASTER_ADDR"),
            std::string::npos);
  EXPECT_NE(launch_error({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "h"}}, -1).find("MASTER_PORT"),
            std::string::npos);
  EXPECT_NE(launch_error({{"RANK", "2"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "h"}, {"MASTER_PORT", "1"}}, -1)
                .find("RANK=2 is outside"),
            std::string::npos);
  EXPECT_NE(launch_error({{"WORLD_SIZE", "2"}}, -1).find("without RANK"), std::string::npos);
  EXPECT_NE(launch_error({{"RANK", "1"}}, -1).find("without WORLD_SIZE"), std::string::npos);
  EXPECT_NE(launch_error({{"RANK", "0"}, {"WORLD_SIZE", "x"}}, -1).find("WORLD_SIZE='x'"), std::string::npos);
  EXPECT_NE(launch_error({{"RANK", "0"}, {"WORLD_SIZE", "3"}, {"MASTER_ADDR", "h"}, {"MASTER_PORT", "1"}}, 2)
                .find("LOCAL_WORLD_SIZE=3 ranks on this machine but 2 GPUs"),
            std::string::npos);
  EXPECT_NE(launch_error({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "h"}, {"MASTER_PORT", "70000"}}, -1)
                .find("MASTER_PORT"),
            std::string::npos);
}

}  // namespace
}  // namespace ferry::dist::test
