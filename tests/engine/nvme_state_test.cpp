// The optimizer state tier on disk (src/engine/nvme_state.*, uring_io.*): the I/O path, the file
// layout, read-ahead, training bit for bit like the host tier through a rollback, the plan, and the
// failures (full disk, unusable path, truncated file, failed write-back), each one line with the
// last checkpoint still loadable. CPU only (label cpu), on a scratch directory under the system
// temp dir; where the test runs as root it mounts a small tmpfs for the full disk (else a test
// hook makes the preallocation fail with ENOSPC).
#include <fcntl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <limits>
#include <mutex>
#include <string>
#include <vector>

#include "src/checkpoint/checkpoint.h"
#include "src/common/error.h"
#include "src/engine/nvme_state.h"
#include "src/engine/uring_io.h"
#include "src/io/atomic_file.h"
#include "tests/engine/engine_test_util.h"
#include "tests/scratch_dir.h"

namespace ferry::engine::test {
namespace {

namespace fs = std::filesystem;
const double k_inf = std::numeric_limits<double>::infinity();

struct scratch : ::ferry::test::scratch_dir {
  scratch() : ::ferry::test::scratch_dir("ferry_nvme_test") {}
};

std::vector<std::string> files_in(const std::string& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) out.push_back(e.path().filename().string());
  return out;
}

// A tmpfs of `bytes` at dir (read-only when asked), where the test may mount one (root); unmounted
// when destroyed. mounted() is false where mounting is not allowed.
struct small_mount {
  std::string dir;
  bool ok = false;
  small_mount(const std::string& d, int64_t bytes, bool read_only) : dir(d) {
    fs::create_directories(dir);
    const std::string opts = "size=" + std::to_string(bytes);
    ok = ::geteuid() == 0 && ::mount("tmpfs", dir.c_str(), "tmpfs", read_only ? MS_RDONLY : 0, opts.c_str()) == 0;
  }
  ~small_mount() {
    if (ok) ::umount2(dir.c_str(), MNT_DETACH);
  }
  bool mounted() const { return ok; }
};

engine_options nvme(engine_options o, const std::string& dir, int64_t buffers = 2, int64_t depth = 1) {
  o.state_on = state_place::place_nvme;
  o.nvme.path = dir;
  o.nvme.buffers = buffers;
  o.nvme.queue_depth = depth;
  return o;
}

engine_options with_place_host(engine_options o) {
  o.state_on = state_place::place_host;
  return o;
}

void expect_one_line(const std::string& msg) { EXPECT_EQ(msg.find('\n'), std::string::npos) << msg; }
void expect_mentions(const std::string& msg, const std::vector<std::string>& words) {
  for (const auto& w : words) EXPECT_NE(msg.find(w), std::string::npos) << "'" << w << "' missing in: " << msg;
}

// Every unit's master and moments bit for bit (run_result's clones).
void expect_same_state(const run_result& a, const run_result& b, const std::string& what) {
  ASSERT_EQ(a.master.size(), b.master.size()) << what;
  for (size_t u = 0; u < a.master.size(); ++u) {
    EXPECT_TRUE(a.master[u].equal(b.master[u])) << what << ": master, unit " << u;
    EXPECT_TRUE(a.m[u].equal(b.m[u])) << what << ": exp_avg, unit " << u;
    EXPECT_TRUE(a.v[u].equal(b.v[u])) << what << ": exp_avg_sq, unit " << u;
    EXPECT_TRUE(a.m_scale[u].equal(b.m_scale[u])) << what << ": exp_avg scales, unit " << u;
    EXPECT_TRUE(a.v_scale[u].equal(b.v_scale[u])) << what << ": exp_avg_sq scales, unit " << u;
  }
}

// ---- the I/O path ----

// An operation larger than one request is split into chunks with at most `depth` in flight, and
// lands byte for byte; a read past the end is short (err 0, done < want); a failing request's
// errno reaches the callback. The same through the pread/pwrite path.
void round_trip(bool use_uring) {
  SCOPED_TRACE(use_uring ? "io_uring" : "pread/pwrite");
  scratch d;
  const std::string path = d.path + "/f";
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT, 0600);
  ASSERT_GE(fd, 0);
  const int64_t n = 37 * 4096 + 4096;   // not a multiple of the chunk count
  std::vector<char> a(static_cast<size_t>(n)), b(static_cast<size_t>(n), 0);
  for (int64_t i = 0; i < n; ++i) a[size_t(i)] = char((i * 131 + i / 4096) & 0xff);
  std::mutex mu;
  std::condition_variable cv;
  std::vector<uring_result> got;
  auto done = [&](const uring_result& r) {
    std::lock_guard<std::mutex> lock(mu);
    got.push_back(r);
    cv.notify_all();
  };
  auto wait_for = [&](size_t k) {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return got.size() >= k; });
  };
  {
    uring_io io(3, 4096 * 2, use_uring);
    EXPECT_EQ(io.uring_error() == 0, use_uring);
    io.write(fd, a.data(), 0, n / 2, done);
    io.write(fd, a.data() + n / 2, n / 2, n - n / 2, done);
    wait_for(2);
    io.read(fd, b.data(), 0, n, done);
    wait_for(3);
    std::vector<char> tail(3 * 4096);
    io.read(fd, tail.data(), n - 4096, 3 * 4096, done);   // two thirds past the end
    wait_for(4);
    const int ro = ::open(path.c_str(), O_RDONLY);
    io.write(ro, a.data(), 0, 4096, done);
    wait_for(5);
    ::close(ro);
  }
  ::close(fd);
  for (int k = 0; k < 3; ++k) EXPECT_TRUE(got[size_t(k)].ok()) << "operation " << k << " err " << got[size_t(k)].err;
  EXPECT_EQ(std::memcmp(a.data(), b.data(), size_t(n)), 0);
  EXPECT_EQ(got[3].err, 0);
  EXPECT_EQ(got[3].want, 3 * 4096);
  EXPECT_EQ(got[3].done, 4096);
  EXPECT_EQ(got[4].err, EBADF);
}

TEST(nvme_uring, chunked_round_trip_short_read_and_errors) {
  round_trip(true);
  round_trip(false);
}

// ---- the tier ----

std::vector<int64_t> tiny_units() { return param_store::unit_numels(tiny_config()); }

// Unit u's state filled with bytes that differ per unit and array.
void fill_unit(const state_view& s, int64_t u, state_kind k) {
  const size_t n = size_t(s.n), blocks = cpu_optim::quant_blocks(n);
  const size_t elem = k == state_kind::state_fp32 ? 4 : k == state_kind::state_bf16 ? 2 : 1;
  auto fill = [&](void* p, size_t bytes, int salt) {
    auto* c = static_cast<unsigned char*>(p);
    for (size_t i = 0; i < bytes; ++i) c[i] = static_cast<unsigned char>((i * 7 + size_t(u) * 31 + size_t(salt) * 101) & 0xff);
  };
  fill(s.master, n * 4, 1);
  fill(s.exp_avg, n * elem, 2);
  fill(s.exp_avg_sq, n * elem, 3);
  if (s.m_scale) {
    fill(s.m_scale, blocks * 4, 4);
    fill(s.v_scale, blocks * 4, 5);
  }
}

// The tier's file holds each unit at a 4096-aligned offset, exactly state_bytes bytes of the
// in-memory form in the documented order (master, int8 scales of m then v, m, v: offsets computed
// here independently of nvme_block_view); units evicted from the two buffers read back as written;
// host and disk bytes are the planner's figures; the file is removed with the tier.
TEST(nvme_state, file_layout_and_round_trip) {
  for (auto kind : {state_kind::state_fp32, state_kind::state_bf16, state_kind::state_int8}) {
    SCOPED_TRACE(state_kind_name(kind));
    scratch d;
    const std::vector<int64_t> units = tiny_units();
    nvme_options o;
    o.path = d.path;
    o.buffers = 2;
    std::string file;
    {
      auto tier = make_nvme_state(units, kind, true, o);
      ASSERT_EQ(tier->scratch_files().size(), 1u);
      file = tier->scratch_files()[0];
      EXPECT_EQ(fs::path(file).parent_path(), fs::path(d.path));
      EXPECT_EQ(fs::path(file).filename().string().rfind("ferry-state-" + std::to_string(::getpid()) + "-", 0), 0u) << file;
      EXPECT_FALSE(tier->in_memory());
      EXPECT_EQ(tier->disk_bytes(), nvme_file_bytes(units, kind, true));
      EXPECT_EQ(int64_t(fs::file_size(file)), tier->disk_bytes());
      EXPECT_EQ(tier->host_bytes(), nvme_buffer_bytes(units, kind, true, 2));
      // Moments start at zero.
      for (int64_t u = 0; u < tier->num_units(); ++u) {
        state_lease s(*tier, u, false);
        const size_t elem = kind == state_kind::state_fp32 ? 4 : kind == state_kind::state_bf16 ? 2 : 1;
        const auto* m = static_cast<const unsigned char*>(s->exp_avg);
        EXPECT_TRUE(std::all_of(m, m + size_t(s->n) * elem, [](unsigned char c) { return c == 0; })) << "unit " << u;
      }
      for (int64_t u = 0; u < tier->num_units(); ++u) {
        state_lease s(*tier, u, true);
        fill_unit(*s, u, kind);
      }
      tier->flush();
      // The raw file, unit by unit.
      const int fd = ::open(file.c_str(), O_RDONLY);
      ASSERT_GE(fd, 0);
      int64_t offset = 0;
      for (int64_t u = 0; u < int64_t(units.size()); ++u) {
        const int64_t n = units[size_t(u)], bytes = state_bytes(kind, true, n);
        EXPECT_EQ(offset % 4096, 0);
        std::vector<char> raw(static_cast<size_t>(bytes)), want(static_cast<size_t>(bytes));
        ASSERT_EQ(::pread(fd, raw.data(), size_t(bytes), off_t(offset)), ssize_t(bytes));
        const int64_t blocks = int64_t(cpu_optim::quant_blocks(size_t(n)));
        const int64_t elem = kind == state_kind::state_fp32 ? 4 : kind == state_kind::state_bf16 ? 2 : 1;
        state_view v;
        v.n = n;
        v.master = reinterpret_cast<float*>(want.data());
        const int64_t codes = 4 * n + (kind == state_kind::state_int8 ? 8 * blocks : 0);
        if (kind == state_kind::state_int8) {
          v.m_scale = reinterpret_cast<float*>(want.data() + 4 * n);
          v.v_scale = reinterpret_cast<float*>(want.data() + 4 * n + 4 * blocks);
        }
        v.exp_avg = want.data() + codes;
        v.exp_avg_sq = want.data() + codes + elem * n;
        EXPECT_EQ(codes + 2 * elem * n, bytes);
        fill_unit(v, u, kind);
        EXPECT_EQ(std::memcmp(raw.data(), want.data(), size_t(bytes)), 0) << "unit " << u;
        offset += (bytes + 4095) / 4096 * 4096;
      }
      ::close(fd);
      EXPECT_EQ(offset, tier->disk_bytes());
      // Back from the file (every unit but the two last ones was evicted): reversed order.
      for (int64_t u = tier->num_units() - 1; u >= 0; --u) {
        state_lease s(*tier, u, false);
        std::vector<char> want(size_t(state_bytes(kind, true, s->n)));
        state_view v = nvme_block_view(want.data(), kind, true, u, s->n);
        fill_unit(v, u, kind);
        EXPECT_EQ(std::memcmp(s->master, want.data(), want.size()), 0) << "unit " << u;
        EXPECT_EQ(s->seed, uint64_t(u) + 1);
      }
    }
    EXPECT_FALSE(fs::exists(file)) << file;
    EXPECT_TRUE(files_in(d.path).empty());
  }
}

// prefetch(u) starts u's read at once when a buffer is free, and the acquire that follows reads
// nothing more; an acquire of a unit nobody asked for reads it itself.
TEST(nvme_state, prefetch_reads_ahead) {
  scratch d;
  const std::vector<int64_t> units = tiny_units();
  nvme_options o;
  o.path = d.path;
  o.buffers = 3;
  auto tier = make_nvme_state(units, state_kind::state_fp32, true, o);
  for (int64_t u = 0; u < tier->num_units(); ++u) {
    state_lease s(*tier, u, true);
    fill_unit(*s, u, state_kind::state_fp32);
  }
  tier->flush();
  // Units 0, 1 are out of the buffers now (the last three units were acquired after them).
  tier->take_io();
  const int64_t stride0 = nvme_unit_stride(state_kind::state_fp32, true, units[0]);
  const int64_t stride1 = nvme_unit_stride(state_kind::state_fp32, true, units[1]);
  tier->prefetch(0);
  tier_io io = tier->take_io();
  EXPECT_EQ(io.read_bytes, stride0) << "prefetch(0) did not start a read";
  {
    state_lease s(*tier, 0, false);
  }
  io = tier->take_io();
  EXPECT_EQ(io.read_bytes, 0) << "the acquire read unit 0 again";
  {
    state_lease s(*tier, 1, false);
  }
  io = tier->take_io();
  EXPECT_EQ(io.read_bytes, stride1);
  EXPECT_EQ(io.write_bytes, 0);
}

// The update's pattern, every unit prefetched in order and then updated (acquired, released dirty)
// in that order, reads and writes each unit exactly once per pass whatever the buffer count: no
// read-ahead evicts a unit before its use, nor the unit an acquire is waiting for.
TEST(nvme_state, a_pass_moves_each_unit_once) {
  const std::vector<int64_t> units = tiny_units();
  int64_t strides = 0;
  for (int64_t n : units) strides += nvme_unit_stride(state_kind::state_fp32, true, n);
  for (int64_t buffers : {2, 3, 4}) {
    SCOPED_TRACE(std::to_string(buffers) + " buffers");
    scratch d;
    nvme_options o;
    o.path = d.path;
    o.buffers = buffers;
    auto tier = make_nvme_state(units, state_kind::state_fp32, true, o);
    for (int pass = 0; pass < 4; ++pass) {
      for (int64_t u = 0; u < tier->num_units(); ++u) tier->prefetch(u);
      for (int64_t u = 0; u < tier->num_units(); ++u) {
        state_lease s(*tier, u, true);
        s->master[0] += 1.0f;
      }
      tier->flush();
      const tier_io io = tier->take_io();
      EXPECT_EQ(io.read_bytes, pass > 0 ? strides : 0) << "pass " << pass;   // pass 0: never written, nothing read
      EXPECT_EQ(io.write_bytes, strides) << "pass " << pass;
    }
    for (int64_t u = 0; u < tier->num_units(); ++u) {
      state_lease s(*tier, u, false);
      EXPECT_EQ(s->master[0], 4.0f) << "unit " << u;
    }
  }
}

// ---- training through the tier ----

struct nvme_case {
  const char* name;
  state_kind kind;
  bool refuse_direct;   // the buffered I/O path (as on a filesystem without O_DIRECT)
  bool no_uring;        // the pread/pwrite path (as where a container refuses io_uring)
  double poison;        // the gradient spike at step k_fix_step: inf (skip: undo) or 1e3 with clip 50 (redo)
};

constexpr int64_t k_nvme_steps = 20, k_fix_step = 10;

// 20 steps of 2 micro-batches, speculating, with one fix-up at step 10 (every unit undone or
// redone, re-acquiring its state), two buffers and one request in flight (the most eviction and
// waiting): the losses, the step results and, at step 10 and at the end, every unit's master
// weights and moments are the host tier's bit for bit.
class nvme_training : public ::testing::TestWithParam<nvme_case> {};

TEST_P(nvme_training, bit_identical_to_the_host_tier) {
  const nvme_case c = GetParam();
  scratch d;
  std::vector<step_data> data;
  for (int64_t k = 0; k < k_nvme_steps; ++k)
    data.push_back({random_tokens(k_batch, k_seq, tiny_config().vocab_size, 500 + 2 * k),
                    random_tokens(k_batch, k_seq, tiny_config().vocab_size, 501 + 2 * k)});
  engine_options o = base_options(offload_mode::offload_overlapped, at::kFloat);
  o.state = c.kind;
  o.grad_accum = 2;
  o.speculate = speculate_mode::speculate_on;
  auto probe = make_engine(base_options(offload_mode::offload_blocked, at::kFloat));
  o.debug_poison_step = k_fix_step + 1;
  o.debug_poison_unit = probe->params().block_unit(1);
  o.debug_poison_index = probe->params().unit(o.debug_poison_unit).numel / 3;
  o.debug_poison_value = c.poison;
  o.clip_grad = std::isinf(c.poison) ? 0.0 : 50.0;
  engine_options on = nvme(o, d.path);
  on.nvme.debug_refuse_direct = c.refuse_direct;
  on.nvme.debug_no_uring = c.no_uring;

  auto host = make_engine(o), disk = make_engine(on);
  EXPECT_TRUE(host->params().state().in_memory());
  EXPECT_FALSE(disk->params().state().in_memory());
  EXPECT_EQ(disk->params().state().describe().find("buffered I/O") != std::string::npos, c.refuse_direct)
      << disk->params().state().describe();
  EXPECT_EQ(disk->params().state().describe().find("pread/pwrite") != std::string::npos, c.no_uring)
      << disk->params().state().describe();
  run_result h, n;
  for (int64_t k = 0; k < k_nvme_steps; ++k) {
    h.steps.push_back(host->train_step(data[size_t(k)], lr_at(k)));
    n.steps.push_back(disk->train_step(data[size_t(k)], lr_at(k)));
    const step_result &a = h.steps.back(), &b = n.steps.back();
    SCOPED_TRACE(std::string(c.name) + " step " + std::to_string(k));
    EXPECT_EQ(b.loss, a.loss);
    EXPECT_TRUE(b.grad_norm == a.grad_norm || (std::isnan(a.grad_norm) && std::isnan(b.grad_norm)));
    EXPECT_EQ(b.clip_coef, a.clip_coef);
    EXPECT_EQ(b.skipped, a.skipped);
    EXPECT_EQ(b.rollbacks, a.rollbacks);
    EXPECT_EQ(a.rollbacks, k == k_fix_step ? host->params().num_units() : 0);
    EXPECT_EQ(a.disk_write_bytes + a.disk_read_bytes, 0) << "the host tier moved disk bytes";
    EXPECT_GT(b.disk_write_bytes, 0);
    if (k == k_fix_step) {
      run_result hs, ns;
      snapshot(*host, hs);
      snapshot(*disk, ns);
      expect_same_state(ns, hs, std::string(c.name) + " after the fix-up");
    }
  }
  snapshot(*host, h);
  snapshot(*disk, n);
  expect_same_state(n, h, std::string(c.name) + " after 20 steps");
}

INSTANTIATE_TEST_SUITE_P(all, nvme_training,
                         ::testing::Values(nvme_case{"fp32_undo", state_kind::state_fp32, false, false, k_inf},
                                           nvme_case{"int8_undo", state_kind::state_int8, false, false, k_inf},
                                           nvme_case{"int8_redo_buffered", state_kind::state_int8, true, false, 1e3},
                                           nvme_case{"fp32_redo_buffered", state_kind::state_fp32, true, false, 1e3},
                                           nvme_case{"int8_undo_pread_pwrite", state_kind::state_int8, false, true, k_inf}),
                         [](const auto& info) { return std::string(info.param.name); });

// The planner charges what the tier allocates: buffers on the host, the file on disk, no master or
// moments in host memory; the host plan's what-if row with the state on disk is that plan.
TEST(nvme_engine, plan_counts_the_tier) {
  scratch d;
  for (auto kind : {state_kind::state_fp32, state_kind::state_int8}) {
    engine_options o = base_options(offload_mode::offload_overlapped, at::kFloat);
    o.state = kind;
    const engine_options on = nvme(o, d.path, 3);
    engine e(tiny_config(), on);
    const memory_plan& p = e.plan();
    const state_tier& tier = e.params().state();
    EXPECT_TRUE(p.state_on_disk);
    EXPECT_EQ(p.host_master + p.host_moments, 0);
    EXPECT_EQ(p.host_state_buffers, tier.host_bytes());
    EXPECT_EQ(p.disk_state, tier.disk_bytes());
    EXPECT_EQ(int64_t(fs::file_size(tier.scratch_files().at(0))), p.disk_state);
    EXPECT_EQ(e.params().host_bytes() - e.params().pinned_bytes() - tiny_config().embed_params() * 4, tier.host_bytes());
    plan_what_if w;
    w.state_on_disk = true;
    const memory_plan q = plan_memory(tiny_config(), with_place_host(on), k_batch, k_seq, 1, w);
    EXPECT_EQ(q.host_total, p.host_total);
    EXPECT_EQ(q.disk_state, p.disk_state);
    const memory_plan host = plan_memory(tiny_config(), o, k_batch, k_seq, 1);
    EXPECT_EQ(host.host_total - p.host_total, host.host_master + host.host_moments - p.host_state_buffers);
    EXPECT_THROW(e.params().master_tensor(0), ferry::error);
  }
}


// ---- failures: one line, and the last checkpoint still loads ----

// A run saved at step 2 (host tier, in `out`), its state, and a check that a fresh host engine
// loads that checkpoint to exactly that state.
struct saved_run {
  std::string checkpoint;
  run_result state;
};
saved_run save_a_run(const engine_options& o, const std::string& out) {
  auto e = make_engine(o);
  const auto data = make_data(2);
  for (int64_t k = 0; k < 2; ++k) e->train_step(data[size_t(k)], lr_at(k));
  saved_run r;
  checkpoint::trainer_state st;
  st.step = 2;
  st.model_name = "engine-test";
  r.checkpoint = checkpoint::save_checkpoint(*e, st, out, 2);
  snapshot(*e, r.state);
  return r;
}
void expect_loads(const saved_run& r, const std::string& what) {
  auto e = make_engine(base_options(offload_mode::offload_overlapped, at::kFloat));
  checkpoint::load_checkpoint(*e, checkpoint::resolve_checkpoint("latest", fs::path(r.checkpoint).parent_path().string()));
  run_result got;
  snapshot(*e, got);
  expect_same_state(got, r.state, what + ": the last checkpoint");
}

// The message of the config_error an nvme engine of options o throws at construction.
std::string refusal(const engine_options& o) {
  try {
    engine e(tiny_config(), o);
  } catch (const config_error& err) {
    return err.what();
  } catch (const std::exception& err) {
    ADD_FAILURE() << "not a config_error: " << err.what();
    return err.what();
  }
  ADD_FAILURE() << "the engine was built";
  return "";
}

// Too little disk for the tier: refused at construction (before any step, nothing written, no file
// left), one line naming nvme_path, the bytes needed and the bytes free. A 256 KiB tmpfs where the
// test may mount one, else the preallocation's ENOSPC injected.
TEST(nvme_failures, full_disk_is_refused_before_the_first_step) {
  scratch d;
  const engine_options o = base_options(offload_mode::offload_overlapped, at::kFloat);
  const saved_run run = save_a_run(o, d.path + "/out");
  small_mount disk(d.path + "/small", 256 << 10, false);
  engine_options on = nvme(o, disk.dir);
  if (!disk.mounted()) on.nvme.debug_fallocate_errno = ENOSPC;
  std::printf("  [full disk] %s\n", disk.mounted() ? "a 256 KiB tmpfs" : "ENOSPC injected (cannot mount here)");
  const std::string msg = refusal(on);
  expect_one_line(msg);
  const int64_t need = nvme_file_bytes(param_store::unit_numels(tiny_config()), state_kind::state_fp32, true);
  expect_mentions(msg, {"nvme_path " + disk.dir, std::to_string(need) + " bytes", "free"});
  EXPECT_TRUE(files_in(disk.dir).empty()) << "a tier file was left in " << disk.dir;
  expect_loads(run, "full disk");
}

// A missing directory, a file instead of a directory, and a directory the process cannot write
// (read-only tmpfs for root, else mode 0555): each one line naming nvme_path; nothing left behind.
TEST(nvme_failures, unusable_path_is_refused) {
  scratch d;
  const engine_options o = base_options(offload_mode::offload_overlapped, at::kFloat);
  const saved_run run = save_a_run(o, d.path + "/out");
  {
    const std::string msg = refusal(nvme(o, d.path + "/missing"));
    expect_one_line(msg);
    expect_mentions(msg, {"nvme_path " + d.path + "/missing", "does not exist"});
  }
  {
    const std::string file = d.path + "/a-file";
    io::write_file_atomic(file, "x");
    const std::string msg = refusal(nvme(o, file));
    expect_one_line(msg);
    expect_mentions(msg, {"nvme_path " + file, "not a directory"});
  }
  {
    small_mount ro(d.path + "/ro", 1 << 20, true);
    if (!ro.mounted()) ::chmod(ro.dir.c_str(), 0555);
    const bool unwritable = ::access(ro.dir.c_str(), W_OK) != 0 || ro.mounted();
    if (!unwritable) {
      std::printf("  [unwritable] cannot make an unwritable directory here (root without mount); case not run\n");
    } else {
      const std::string msg = refusal(nvme(o, ro.dir));
      expect_one_line(msg);
      expect_mentions(msg, {"nvme_path " + ro.dir, "cannot create the tier file", "writable"});
      EXPECT_TRUE(files_in(ro.dir).empty());
    }
    ::chmod(ro.dir.c_str(), 0755);
  }
  {
    engine_options none = nvme(o, d.path);
    none.mode = offload_mode::offload_none;
    none.cuda = false;
    const std::string msg = refusal(none);
    expect_one_line(msg);
    expect_mentions(msg, {"optimizer_state_on=nvme", "offload"});
  }
  expect_loads(run, "unusable path");
}

// The tier file cut short under a running nvme engine: the next step stops with one line naming
// the file and the unit (a short read), no checkpoint can be taken from the broken tier, the
// engine removes its file, and the checkpoint saved before loads.
TEST(nvme_failures, truncated_file_stops_with_one_line) {
  scratch d;
  fs::create_directories(d.path + "/tier");
  const engine_options on = nvme(base_options(offload_mode::offload_overlapped, at::kFloat), d.path + "/tier");
  const saved_run run = save_a_run(on, d.path + "/out");
  auto e = make_engine(on);
  checkpoint::load_checkpoint(*e, run.checkpoint);
  const std::string file = e->params().state().scratch_files().at(0);
  ASSERT_EQ(::truncate(file.c_str(), off_t(fs::file_size(file) / 2)), 0);
  std::string msg;
  try {
    const auto data = make_data(3);
    for (int64_t k = 0; k < 3; ++k) e->train_step(data[size_t(k)], lr_at(k + 2));
    e->wait_updates();
  } catch (const ferry::error& err) {
    msg = err.what();
  }
  ASSERT_FALSE(msg.empty()) << "training went on over a truncated tier file";
  expect_one_line(msg);
  expect_mentions(msg, {file, "unit", "truncated"});
  checkpoint::trainer_state st;
  st.step = 5;
  EXPECT_THROW(checkpoint::save_checkpoint(*e, st, d.path + "/out", 2), ferry::error);
  e.reset();
  EXPECT_FALSE(fs::exists(file));
  expect_loads(run, "truncated tier file");
}

// A write-back that fails (its completion carries EBADF, through the test hook) stops the run with
// one line naming the file, the unit and the cause; the checkpoint saved before loads.
TEST(nvme_failures, failed_write_back_stops_with_one_line) {
  scratch d;
  fs::create_directories(d.path + "/tier");
  const engine_options o = base_options(offload_mode::offload_overlapped, at::kFloat);
  const saved_run run = save_a_run(o, d.path + "/out");
  engine_options on = nvme(o, d.path + "/tier");
  on.nvme.debug_fail_write = 3 * int64_t(param_store::unit_numels(tiny_config()).size());   // in the third step
  std::string msg;
  {
    auto e = make_engine(on);
    try {
      const auto data = make_data(4);
      for (int64_t k = 0; k < 4; ++k) e->train_step(data[size_t(k)], lr_at(k));
      e->wait_updates();
    } catch (const ferry::error& err) {
      msg = err.what();
    }
  }
  ASSERT_FALSE(msg.empty()) << "a failed write-back went unnoticed";
  expect_one_line(msg);
  expect_mentions(msg, {"nvme tier " + d.path + "/tier/ferry-state-", "writing unit", std::strerror(EBADF)});
  EXPECT_TRUE(files_in(d.path + "/tier").empty());
  expect_loads(run, "failed write-back");
}

// Files of runs no longer alive are never reused (the new file has its own name) and are named in
// the tier's notice; the tier removes only its own file.
TEST(nvme_failures, stale_files_are_not_reused) {
  scratch d;
  const std::string stale = d.path + "/ferry-state-4194400-0123456789abcdef.tier";   // above pid_max
  io::write_file_atomic(stale, std::string(8192, 'x'));
  {
    engine e(tiny_config(), nvme(base_options(offload_mode::offload_overlapped, at::kFloat), d.path));
    const std::string file = e.params().state().scratch_files().at(0);
    EXPECT_NE(file, stale);
    expect_mentions(e.params().state().describe(), {"1 file(s) ferry-state-*.tier", "never reused"});
    EXPECT_EQ(files_in(d.path).size(), 2u);
  }
  EXPECT_EQ(files_in(d.path), std::vector<std::string>{fs::path(stale).filename().string()});
}

}  // namespace
}  // namespace ferry::engine::test
