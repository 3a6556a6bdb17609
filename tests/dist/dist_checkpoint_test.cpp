// Sharded checkpoints (src/checkpoint/checkpoint.h "Ranks"): ranks as processes of
// tests/dist/dist_worker.cpp (Gloo on the loopback) save at step k_save with N ranks, resume with M
// ranks: each rank loads exactly the saved state of its new shards (int8 at another world: encoded
// again), and, training on to k_steps, the final masters and moments are the uninterrupted one-rank
// run's (same global batch) within the engine's trajectory tolerance (tolerance_for, as dist_test).
// A rank whose shard is cut short (dying in the middle of it, or failing to write it) leaves the
// previous checkpoint as latest and loadable, and a damaged manifest or a missing shard is refused
// with one line naming the file.
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "src/checkpoint/checkpoint.h"
#include "src/common/error.h"
#include "src/io/atomic_file.h"
#include "tests/dist/dist_run.h"
#include "tests/dist/dist_spawn.h"

namespace ferry::dist::test {
namespace {
namespace fs = std::filesystem;

constexpr int64_t k_save = 2;   // the checkpoint's step (k_steps = 4 in all)

// A run's final state, each unit whole: masters and moments decoded to fp32.
struct final_state {
  std::vector<at::Tensor> master, m, v;
  std::vector<double> loss;   // the steps this process (or rank 0) ran
};

// The ranks' final shards (dist_worker's .master and .moments files) put together per unit.
final_state gather_state(const std::string& prefix, int world) {
  auto e = engine::test::make_engine(run_options("blocked", k_global, false));  // the unit sizes
  final_state r;
  std::vector<std::ifstream> master, moments;
  for (int k = 0; k < world; ++k) {
    master.emplace_back(prefix + "." + std::to_string(k) + ".master", std::ios::binary);
    moments.emplace_back(prefix + "." + std::to_string(k) + ".moments", std::ios::binary);
  }
  for (int64_t u = 0; u < e->params().num_units(); ++u) {
    const int64_t n = e->params().unit(u).numel;
    at::Tensor p = at::empty({n}), m = at::empty({n}), v = at::empty({n});
    for (int k = 0; k < world; ++k) {
      const engine::shard_layout l{k, world};
      const auto bytes = std::streamsize(l.count(n) * 4);
      master[size_t(k)].read(reinterpret_cast<char*>(p.data_ptr<float>() + l.begin(n)), bytes);
      moments[size_t(k)].read(reinterpret_cast<char*>(m.data_ptr<float>() + l.begin(n)), bytes);
      moments[size_t(k)].read(reinterpret_cast<char*>(v.data_ptr<float>() + l.begin(n)), bytes);
      EXPECT_TRUE(master[size_t(k)].good() && moments[size_t(k)].good()) << "rank " << k << "'s files are short at unit " << u;
    }
    r.master.push_back(p);
    r.m.push_back(m);
    r.v.push_back(v);
  }
  std::istringstream in(slurp(prefix + ".0.steps"));
  std::string loss, rest;
  while (in >> loss && std::getline(in, rest)) r.loss.push_back(std::strtod(loss.c_str(), nullptr));
  return r;
}

// The uninterrupted one-rank run with the whole global batch; from_step > 0: started from the HF
// weights of `init` at that step (moments zero), as dist_worker's init mode.
final_state one_rank(const std::string& kind, int64_t from_step = 0, const std::string& init = "") {
  auto e = engine::test::make_engine(run_options(kind, k_global, false));
  if (!init.empty()) {
    checkpoint::load_hf_weights(*e, init);
    e->params_changed();
  }
  final_state r;
  const auto data = global_data();
  for (int64_t k = from_step; k < int64_t(data.size()); ++k)
    r.loss.push_back(e->train_step(data[size_t(k)], engine::test::lr_at(k)).loss);
  e->wait_updates();
  for (int64_t u = 0; u < e->params().num_units(); ++u) {
    r.master.push_back(engine::test::master_copy(e->params(), u));
    const auto [m, v] = engine::test::decoded_moments(*e, u);
    r.m.push_back(m);
    r.v.push_back(v);
  }
  return r;
}

// The runs compared with one rank keep fp32 state and compute in fp32.
engine::test::trajectory_tol tolerance(const std::string&) { return engine::test::tolerance_for(at::kFloat); }

void expect_close(const final_state& got, const final_state& want, const std::string& kind, const std::string& what) {
  const engine::test::trajectory_tol tol = tolerance(kind);
  ASSERT_EQ(got.loss.size(), want.loss.size()) << what << ": steps run after the checkpoint";
  for (size_t k = 0; k < want.loss.size(); ++k) EXPECT_NEAR(got.loss[k], want.loss[k], tol.loss) << what << " step " << k;
  ASSERT_EQ(got.master.size(), want.master.size());
  // Moments: against each unit's largest, at the relative precision the steps' norms keep.
  const double moments_rel = tol.norm_rel;
  for (size_t u = 0; u < want.master.size(); ++u) {
    engine::test::expect_tensor_close(got.master[u], want.master[u], tol, what + " master unit " + std::to_string(u));
    for (const auto& [g, w, name] : {std::tuple{got.m[u], want.m[u], "exp_avg"}, std::tuple{got.v[u], want.v[u], "exp_avg_sq"}}) {
      const double scale = w.abs().max().item<double>();
      EXPECT_GT(scale, 0) << what << " unit " << u << " " << name << " is zero in the reference";
      EXPECT_LE((g - w).abs().max().item<double>(), moments_rel * scale) << what << " unit " << u << " " << name;
    }
  }
}

// Runs `world` ranks of dist_worker; true when all exit 0 (else failures with their logs).
bool run_ranks(int world, const std::vector<std::string>& args, const std::string& tag) {
  auto procs = spawn_ranks(world, args, tag, 60);
  const std::vector<int> codes = wait_ranks(procs, 240);
  bool ok = true;
  for (size_t k = 0; k < codes.size(); ++k) {
    EXPECT_EQ(codes[k], 0) << tag << " rank " << k << ": " << slurp(procs[k].log);
    ok = ok && codes[k] == 0;
    std::remove(procs[k].log.c_str());
  }
  return ok;
}

void remove_results(const std::string& prefix, int world) {
  for (int k = 0; k < world; ++k)
    for (const char* x : {".steps", ".master", ".moments"}) std::remove((prefix + "." + std::to_string(k) + x).c_str());
}

std::string read_text(const fs::path& p) { return slurp(p.string()); }

struct resume_case {
  std::string kind;
  int save_world, resume_world;
};

class dist_resume : public ::testing::TestWithParam<resume_case> {};

// CUDA: the GPU build runs the same ranks one per device (skipped with fewer devices than ranks).
bool have_devices(int world) {
  return !::ferry::test::k_cuda_suite || world <= 1 || world <= engine::cuda_device_count();
}

TEST_P(dist_resume, continues_the_one_rank_run) {
  FERRY_REQUIRE_DEVICE();
  const resume_case c = GetParam();
  if (!have_devices(std::max(c.save_world, c.resume_world))) GTEST_SKIP() << "needs more CUDA devices";
  const std::string tag = c.kind + std::to_string(c.save_world) + "to" + std::to_string(c.resume_world);
  const std::string dir = scratch(tag + "-out"), prefix = scratch(tag);
  io::remove_tree(dir);
  ASSERT_TRUE(run_ranks(c.save_world, {c.kind, "0", prefix + "-save", "-1", "save", dir, std::to_string(k_save)},
                        tag + "-save"));
  const fs::path ckpt = fs::path(dir) / "checkpoint-000002";
  EXPECT_EQ(read_text(fs::path(dir) / "latest"), "checkpoint-000002\n");
  EXPECT_TRUE(fs::is_regular_file(ckpt / "model.safetensors"));
  if (c.save_world > 1) {
    EXPECT_FALSE(fs::exists(ckpt / "optimizer.safetensors"));
    for (int r = 0; r < c.save_world; ++r) {
      char name[96];
      std::snprintf(name, sizeof name, "optimizer-rank%05d-of-%05d.safetensors", r, c.save_world);
      EXPECT_TRUE(fs::is_regular_file(ckpt / name)) << name;
    }
    EXPECT_NE(read_text(ckpt / "shards.json").find("\"world_size\": " + std::to_string(c.save_world)), std::string::npos);
  } else {
    EXPECT_TRUE(fs::is_regular_file(ckpt / "optimizer.safetensors"));   // one rank: the one-rank layout
    EXPECT_FALSE(fs::exists(ckpt / "shards.json"));
  }
  // What a rank loads is what the saved ranks held: masters bit for bit, moments too (int8 at another
  // world: encoded again over the new blocks, within half a code step).
  ASSERT_TRUE(run_ranks(c.resume_world, {c.kind, "0", prefix + "-load", "-1", "load", dir}, tag + "-load"));
  {
    const final_state saved = gather_state(prefix + "-save", c.save_world);
    const final_state loaded = gather_state(prefix + "-load", c.resume_world);
    const bool requantized = c.kind == "int8" && c.save_world != c.resume_world;
    for (size_t u = 0; u < saved.master.size(); ++u) {
      EXPECT_TRUE(at::equal(loaded.master[u], saved.master[u])) << tag << " master unit " << u;
      for (const auto& [g, w, name] :
           {std::tuple{loaded.m[u], saved.m[u], "exp_avg"}, std::tuple{loaded.v[u], saved.v[u], "exp_avg_sq"}}) {
        EXPECT_GT(w.abs().max().item<double>(), 0) << tag << " unit " << u << " " << name << " saved as zero";
        if (requantized) {
          // Half a fourth-root code step at the top of m's range: 2/127 relative (cpu_optim/README.md).
          EXPECT_LE((g - w).abs().max().item<double>(), 2 * w.abs().max().item<double>() / 127) << tag << " unit " << u << " " << name;
          EXPECT_FALSE(at::equal(g, w)) << tag << " unit " << u << " " << name << ": other blocks, other codes";
        } else {
          EXPECT_TRUE(at::equal(g, w)) << tag << " unit " << u << " " << name;
        }
      }
    }
  }
  remove_results(prefix + "-save", c.save_world);
  remove_results(prefix + "-load", c.resume_world);
  // And the run goes on as the uninterrupted one-rank run (same global batch). Compact moments are
  // rounded per shard (int8 blocks start at each shard, bf16 rounds stochastically), so ranks follow
  // the one-rank trajectory only to those roundings: that comparison is fp32's.
  if (c.kind != "int8" && c.kind != "bf16") {
    ASSERT_TRUE(run_ranks(c.resume_world, {c.kind, "0", prefix, "-1", "resume", dir}, tag + "-resume"));
    const final_state want = one_rank(c.kind);
    final_state tail = want;
    tail.loss.erase(tail.loss.begin(), tail.loss.begin() + k_save);
    expect_close(gather_state(prefix, c.resume_world), tail, c.kind, tag);
    remove_results(prefix, c.resume_world);
  }
  io::remove_tree(dir);
}

INSTANTIATE_TEST_SUITE_P(worlds, dist_resume,
                         ::testing::Values(resume_case{"blocked", 2, 1}, resume_case{"blocked", 1, 2},
                                           resume_case{"blocked", 2, 3}, resume_case{"blocked", 3, 2},
                                           resume_case{"int8", 2, 3}, resume_case{"int8", 3, 3},
                                           resume_case{"bf16", 3, 1},
                                           resume_case{"nvme", 2, 3}),
                         [](const auto& info) {
                           return info.param.kind + "_" + std::to_string(info.param.save_world) + "_to_" +
                                  std::to_string(info.param.resume_world);
                         });

// init with ranks: every rank reads the HF weights (of a 2-rank checkpoint) and keeps its shards;
// 3 ranks then train as one rank started from the same weights.
TEST(dist_init, every_rank_takes_its_shards_of_the_hf_weights) {
  FERRY_REQUIRE_DEVICE();
  if (!have_devices(3)) GTEST_SKIP() << "needs 3 CUDA devices";
  const std::string dir = scratch("init-out"), prefix = scratch("init");
  io::remove_tree(dir);
  ASSERT_TRUE(run_ranks(2, {"blocked", "0", prefix + "-save", "-1", "save", dir, std::to_string(k_save)}, "init-save"));
  ASSERT_TRUE(run_ranks(3, {"blocked", "0", prefix, "-1", "init", dir, std::to_string(k_save)}, "init-3"));
  const final_state want = one_rank("blocked", k_save, (fs::path(dir) / "checkpoint-000002").string());
  expect_close(gather_state(prefix, 3), want, "blocked", "init with 3 ranks");
  remove_results(prefix, 3);
  io::remove_tree(dir);
}

// Rank 1's shard of the step-2 checkpoint is cut short; the step-1 checkpoint stays latest, no
// partial directory is left, and one rank resumes from it onto the one-rank trajectory.
void expect_previous_kept(const std::string& mode) {
  const std::string dir = scratch(mode + "-out"), prefix = scratch(mode);
  io::remove_tree(dir);
  auto procs = spawn_ranks(2, {"blocked", "0", prefix + "-run", "-1", mode, dir, "2"}, mode, 10);
  const std::vector<int> codes = wait_ranks(procs, 120);
  const std::string log0 = slurp(procs[0].log), log1 = slurp(procs[1].log);
  if (mode == "die_in_save") {
    EXPECT_EQ(codes[1], 128 + SIGXFSZ) << log1;
    EXPECT_NE(log0.find("rank 1 stopped"), std::string::npos) << log0;
  } else {
    EXPECT_EQ(codes[1], 1) << log1;
    EXPECT_NE(log1.find("checkpoint-000002 not written"), std::string::npos) << log1;
    EXPECT_NE(log0.find("checkpoint-000002 not written: 1 other rank(s) failed"), std::string::npos) << log0;
  }
  EXPECT_EQ(codes[0], 1) << log0;
  int lines = 0;
  for (char ch : log0) lines += ch == '\n';
  EXPECT_EQ(lines, 1) << "one line: " << log0;
  EXPECT_EQ(read_text(fs::path(dir) / "latest"), "checkpoint-000001\n");
  EXPECT_TRUE(fs::is_directory(fs::path(dir) / "checkpoint-000001"));
  EXPECT_FALSE(fs::exists(fs::path(dir) / "checkpoint-000002"));
  EXPECT_FALSE(fs::exists(fs::path(dir) / ".checkpoint-000002.tmp")) << "rank 0 removes the partial directory";
  for (auto& p : procs) std::remove(p.log.c_str());
  remove_results(prefix + "-run", 2);
  ASSERT_TRUE(run_ranks(1, {"blocked", "0", prefix, "-1", "resume", dir}, mode + "-resume"));
  final_state want = one_rank("blocked");
  want.loss.erase(want.loss.begin(), want.loss.begin() + 1);
  expect_close(gather_state(prefix, 1), want, "blocked", mode + ", resumed at step 1");
  remove_results(prefix, 1);
  io::remove_tree(dir);
}

TEST(dist_checkpoint_failures, a_rank_dying_in_its_shard_keeps_the_previous_checkpoint) {
  FERRY_REQUIRE_DEVICE();
  if (!have_devices(2)) GTEST_SKIP() << "needs 2 CUDA devices";
  expect_previous_kept("die_in_save");
}

TEST(dist_checkpoint_failures, a_rank_failing_to_write_its_shard_keeps_the_previous_checkpoint) {
  FERRY_REQUIRE_DEVICE();
  if (!have_devices(2)) GTEST_SKIP() << "needs 2 CUDA devices";
  expect_previous_kept("fail_in_save");
}

// A damaged copy of a 2-rank checkpoint: the error is one line naming the file.
TEST(dist_checkpoint_failures, a_damaged_manifest_or_missing_shard_is_named) {
  FERRY_REQUIRE_DEVICE();
  if (!have_devices(2)) GTEST_SKIP() << "needs 2 CUDA devices";
  const std::string dir = scratch("damaged-out"), prefix = scratch("damaged");
  io::remove_tree(dir);
  ASSERT_TRUE(run_ranks(2, {"blocked", "0", prefix, "-1", "save", dir, std::to_string(k_save)}, "damaged"));
  const fs::path ckpt = fs::path(dir) / "checkpoint-000002";
  auto load_error = [&](const fs::path& d) {
    auto e = engine::test::make_engine(run_options("blocked", k_global, false));
    try {
      checkpoint::load_checkpoint(*e, d.string());
    } catch (const error& ex) {
      EXPECT_EQ(std::string(ex.what()).find('\n'), std::string::npos) << ex.what();
      return std::string(ex.what());
    }
    return std::string("(loaded)");
  };
  EXPECT_EQ(load_error(ckpt), "(loaded)");   // intact, with one rank
  const fs::path missing = fs::path(dir) / "missing", corrupt = fs::path(dir) / "corrupt",
                 cut = fs::path(dir) / "cut";
  for (const fs::path& p : {missing, corrupt, cut}) {   // (not fs::copy: see io::remove_tree)
    fs::create_directories(p);
    for (const auto& f : fs::directory_iterator(ckpt)) fs::copy_file(f.path(), p / f.path().filename());
  }
  fs::remove(missing / "optimizer-rank00001-of-00002.safetensors");
  EXPECT_NE(load_error(missing).find((missing / "optimizer-rank00001-of-00002.safetensors").string() + ": missing"),
            std::string::npos)
      << load_error(missing);
  std::ofstream(corrupt / "shards.json") << "{\"format\": \"ferry-sharded-v1\", \"world_size\": ";
  EXPECT_NE(load_error(corrupt).find((corrupt / "shards.json").string() + ": not a valid manifest"), std::string::npos)
      << load_error(corrupt);
  fs::resize_file(cut / "optimizer-rank00000-of-00002.safetensors", 4096);
  EXPECT_NE(load_error(cut).find("optimizer-rank00000-of-00002.safetensors"), std::string::npos) << load_error(cut);
  io::remove_tree(dir);
}

}  // namespace
}  // namespace ferry::dist::test
