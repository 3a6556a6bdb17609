#include "cpu_optim/bench/bench_nvme.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>

#include "cpu_optim/adamw.h"
#include "src/engine/nvme_state.h"
#include "src/engine/uring_io.h"

namespace ferry::bench {
namespace {

namespace co = ferry::cpu_optim;
namespace en = ferry::engine;
using clock_type = std::chrono::steady_clock;

double seconds_since(clock_type::time_point t0) {
  return std::chrono::duration<double>(clock_type::now() - t0).count();
}

struct aligned_free {
  void operator()(char* p) const { std::free(p); }
};
using aligned_buf = std::unique_ptr<char, aligned_free>;
aligned_buf aligned(size_t bytes) {
  return aligned_buf(static_cast<char*>(std::aligned_alloc(size_t(en::k_nvme_align), bytes)));
}

// The scratch file of the sequential passes: O_DIRECT where the filesystem takes it (as the tier).
struct bench_file {
  std::string path;
  int fd = -1;
  bool direct = true;
  bench_file(const std::string& dir, size_t bytes) : path(dir + "/ferry-bench-nvme-" + std::to_string(::getpid()) + ".tmp") {
    fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_DIRECT | O_CLOEXEC, 0600);
    if (fd < 0 && errno == EINVAL) {
      direct = false;
      fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    }
    if (fd >= 0 && ::fallocate(fd, 0, 0, off_t(bytes)) != 0) {
      std::fprintf(stderr, "ferry-bench-adamw --nvme: cannot preallocate %zu bytes in %s: %s\n", bytes, dir.c_str(),
                   std::strerror(errno));
      ::close(fd);
      fd = -1;
    }
  }
  ~bench_file() {
    if (fd >= 0) ::close(fd);
    ::unlink(path.c_str());
  }
};

// `total` bytes in operations of `op` bytes, `window` operations in flight (each with its own
// buffer, as the tier's units are), through uring_io at queue depth `depth`; seconds including the
// final fdatasync for writes.
double sequential(bench_file& f, bool write, size_t total, size_t op, int window, int depth) {
  std::vector<aligned_buf> bufs;
  for (int i = 0; i < window; ++i) {
    bufs.push_back(aligned(op));
    std::memset(bufs.back().get(), 0x5a + i, op);
  }
  std::mutex mu;
  std::condition_variable cv;
  std::vector<int> free_bufs;
  for (int i = 0; i < window; ++i) free_bufs.push_back(i);
  int failed = 0;
  const auto t0 = clock_type::now();
  {
    en::uring_io io(depth, en::k_nvme_chunk);
    for (size_t at = 0; at < total; at += op) {
      int b;
      {
        std::unique_lock<std::mutex> lock(mu);
        cv.wait(lock, [&] { return !free_bufs.empty(); });
        b = free_bufs.back();
        free_bufs.pop_back();
      }
      auto done = [&, b](const en::uring_result& r) {
        std::lock_guard<std::mutex> lock(mu);
        if (!r.ok()) ++failed;
        free_bufs.push_back(b);
        cv.notify_all();
      };
      const size_t len = std::min(op, total - at);
      if (write) io.write(f.fd, bufs[size_t(b)].get(), int64_t(at), int64_t(len), done);
      else io.read(f.fd, bufs[size_t(b)].get(), int64_t(at), int64_t(len), done);
    }
  }  // the destructor waits for every operation
  if (write) ::fdatasync(f.fd);
  const double s = seconds_since(t0);
  if (failed) std::fprintf(stderr, "ferry-bench-adamw --nvme: %d operations failed\n", failed);
  return s;
}

}  // namespace

int bench_nvme(const nvme_bench_args& a) {
  const size_t op = 64u << 20;   // one unit-sized operation
  const size_t total = std::max(op, a.file_bytes / op * op);
  double best_read = 0, best_write = 0;
  int best_read_depth = 0, best_write_depth = 0;
  bool direct = true;
  std::printf("nvme: sequential %.2f GiB in %zu MiB operations (4 in flight, each split into %lld KiB requests), "
              "in %s\n", double(total) / double(1u << 30), op >> 20, (long long)(en::k_nvme_chunk >> 10), a.path.c_str());
  std::printf("%-8s %6s %10s %10s\n", "io", "depth", "GB/s", "seconds");
  {
    bench_file f(a.path, total);
    if (f.fd < 0) return 1;
    direct = f.direct;
    for (int d : a.depths) {
      // The best of the repetitions: the disk's ceiling through this path, not a noisy neighbour.
      double w = 1e30, r = 1e30;
      for (int k = 0; k < a.reps; ++k) w = std::min(w, sequential(f, true, total, op, 4, d));
      for (int k = 0; k < a.reps; ++k) r = std::min(r, sequential(f, false, total, op, 4, d));
      const double wg = double(total) / w / 1e9, rg = double(total) / r / 1e9;
      std::printf("%-8s %6d %10.3f %10.3f\n%-8s %6d %10.3f %10.3f\n", "write", d, wg, w, "read", d, rg, r);
      std::fflush(stdout);
      if (wg > best_write) best_write = wg, best_write_depth = d;
      if (rg > best_read) best_read = rg, best_read_depth = d;
    }
  }
  std::printf("%s; best: write %.3f GB/s (depth %d), read %.3f GB/s (depth %d)\n",
              direct ? "O_DIRECT" : "buffered I/O (the filesystem refuses O_DIRECT: page-cache figures)", best_write,
              best_write_depth, best_read, best_read_depth);

  // The update through the tier: every unit prefetched in order, acquired, stepped (fp16 gradient
  // in, fp16 copy out, as the engine), released dirty (written behind).
  const size_t n = a.unit_params;
  co::adamw opt(a.threads);
  const co::adamw_hparams h{1e-4f, 0.9f, 0.999f, 1e-8f, 0.01f};
  std::vector<uint16_t> grad(n), half(n);
  for (size_t i = 0; i < n; ++i) grad[i] = uint16_t(0x3C00 ^ (i & 0x8000));   // fp16 +-1
  const std::vector<int64_t> numel(size_t(a.units), int64_t(n));
  std::printf("\nnvme: AdamW through the tier, %d units of %zu parameters, %d threads, queue depth %d\n", a.units, n,
              opt.num_threads(), best_read_depth);
  std::printf("%-6s %7s %10s %10s %10s %10s %10s %9s\n", "state", "buffers", "Gparam/s", "GB/s", "disk GB", "bound s",
              "seconds", "x bound");
  for (auto kind : {en::state_kind::state_fp32, en::state_kind::state_int8}) {
    // The same update in host memory: the ceiling without the disk.
    // One unit's AdamW step on its state view (fp16 gradient in, fp16 copy out).
    auto update = [&](const en::state_view& v, int64_t step) {
      co::chunk_ref c{v.master, v.exp_avg, v.exp_avg_sq, grad.data(), co::dtype::dtype_f16, half.data(),
                      co::dtype::dtype_f16, n};
      c.moments = v.moments;
      c.m_scale = v.m_scale;
      c.v_scale = v.v_scale;
      c.seed = v.seed;
      opt.step(c, h, step, 1.0f);
    };
    {
      std::unique_ptr<en::state_tier> mem = en::make_host_state(numel, kind, true);
      int64_t step = 0;
      double best = 1e30;
      for (int k = 0; k < a.reps; ++k) {
        const auto t0 = clock_type::now();
        ++step;
        for (int64_t u = 0; u < a.units; ++u) {
          en::state_lease s(*mem, u, true);
          update(*s, step);
        }
        best = std::min(best, seconds_since(t0));
      }
      std::printf("%-6s %7s %10.3f %10s %10s %10s %10.3f %9s\n", en::state_kind_name(kind), "memory",
                  double(n) * a.units / best / 1e9, "-", "-", "-", best, "-");
    }
    for (int b : a.buffers) {
      if (b >= a.units) {   // every unit would stay in its buffer: nothing read back, not the disk
        std::printf("%-6s %7d   skipped: as many buffers as units keep every unit in memory (raise --nvme-units)\n",
                    en::state_kind_name(kind), b);
        continue;
      }
      en::nvme_options o;
      o.path = a.path;
      o.buffers = b;
      o.queue_depth = best_read_depth;
      std::unique_ptr<en::state_tier> tier = en::make_nvme_state(numel, kind, true, o);
      int64_t step = 0;
      auto pass = [&] {
        ++step;
        for (int64_t u = 0; u < a.units; ++u) tier->prefetch(u);
        for (int64_t u = 0; u < a.units; ++u) {
          en::state_lease s(*tier, u, true);
          update(*s, step);
        }
        tier->flush();
      };
      pass();   // every unit written once (the first pass reads nothing: the file is still zeros)
      tier->take_io();
      double best = 1e30;
      en::tier_io io{};
      for (int k = 0; k < a.reps; ++k) {
        const auto t0 = clock_type::now();
        pass();
        const double s = seconds_since(t0);
        const en::tier_io got = tier->take_io();
        if (s < best) best = s, io = got;
      }
      const double moved = double(io.read_bytes + io.write_bytes);
      const double bound = double(io.read_bytes) / (best_read * 1e9) + double(io.write_bytes) / (best_write * 1e9);
      std::printf("%-6s %7d %10.3f %10.3f %10.3f %10.3f %10.3f %9.2f\n", en::state_kind_name(kind), b,
                  double(n) * a.units / best / 1e9, moved / best / 1e9, moved / 1e9, bound, best, best / bound);
      std::fflush(stdout);
    }
  }
  return 0;
}

}  // namespace ferry::bench
