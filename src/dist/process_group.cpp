#include "src/dist/process_group.h"

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#if FERRY_WITH_NCCL
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <ATen/ATen.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <optional>
#include <thread>

#include <nlohmann/json.hpp>

#include "src/common/error.h"

namespace ferry::dist {

struct process_group::impl {
  c10::intrusive_ptr<c10d::Store> store;      // the TCPStore (rank 0 hosts it)
  c10::intrusive_ptr<c10d::Store> beat;       // a second client for the heartbeat thread
  c10::intrusive_ptr<c10d::Backend> gloo[2];  // per comm_channel
#if FERRY_WITH_NCCL
  c10::intrusive_ptr<c10d::Backend> nccl[2];            // device tensors, made on first use
  std::optional<c10::cuda::CUDAStream> stage[2];        // per channel: host collectives staged on the device
  c10d::Backend& nccl_for(engine::comm_channel c, process_group& pg);
#endif
  c10d::Backend& backend_for(const at::Tensor& t, engine::comm_channel c, process_group& pg);
};

namespace {
constexpr auto kBeat = std::chrono::milliseconds(500);
constexpr auto kStartup = std::chrono::milliseconds(60000);   // share_host_memory's least patience
std::string beat_key(int r) { return "ferry/heartbeat/" + std::to_string(r); }
size_t index_of(engine::comm_channel c) { return c == engine::comm_channel::channel_engine ? 0 : 1; }
std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }
}  // namespace

#if FERRY_WITH_NCCL
c10d::Backend& process_group::impl::nccl_for(engine::comm_channel c, process_group& pg) {
  auto& g = nccl[index_of(c)];
  if (!g) {
    // NVLink multicast (NVLS) stays off unless the user asked for it. Connections are made when
    // the communicator is (not at a collective's first use), so a later step or checkpoint opens no
    // new shared-memory files or sockets: a rank at its file-size or descriptor limit mid-save
    // fails in its own write, as one rank would, not inside NCCL.
    ::setenv("NCCL_NVLS_ENABLE", "0", /*overwrite=*/0);
    ::setenv("NCCL_RUNTIME_CONNECT", "0", /*overwrite=*/0);
    auto o = c10d::ProcessGroupNCCL::Options::create();
    o->timeout = pg.opt_.timeout;
    auto prefixed = c10::make_intrusive<c10d::PrefixStore>("nccl" + std::to_string(index_of(c)), store);
    g = c10::make_intrusive<c10d::ProcessGroupNCCL>(prefixed, pg.rank(), pg.world(), o);
  }
  return *g;
}
#endif

c10d::Backend& process_group::impl::backend_for(const at::Tensor& t, engine::comm_channel c, process_group& pg) {
#if FERRY_WITH_NCCL
  if (t.is_cuda()) return nccl_for(c, pg);
#else
  (void)pg;
  FERRY_ASSERT(!t.is_cuda(), "a device tensor in a collective of a build without NCCL");
#endif
  return *gloo[index_of(c)];
}

process_group::process_group(const launch_info& launch, const group_options& opt)
    : launch_(launch), opt_(opt), impl_(std::make_unique<impl>()) {}

std::shared_ptr<process_group> process_group::connect(const launch_info& launch, const group_options& opt) {
  FERRY_ASSERT(launch.distributed(), "process_group::connect for one rank");
  std::shared_ptr<process_group> pg(new process_group(launch, opt));
  c10d::TCPStoreOptions so;
  so.port = uint16_t(launch.master_port);
  so.isServer = launch.rank == 0 && !launch.agent_store;
  so.numWorkers = size_t(launch.world);
  so.waitWorkers = true;
  so.timeout = opt.timeout;
  const auto t0 = std::chrono::steady_clock::now();
  try {
    pg->impl_->store = c10::make_intrusive<c10d::TCPStore>(launch.master_addr, so);
    c10d::TCPStoreOptions bo = so;
    bo.isServer = false;
    bo.waitWorkers = false;
    bo.numWorkers = std::nullopt;
    pg->impl_->beat = c10::make_intrusive<c10d::TCPStore>(launch.master_addr, bo);
  } catch (const std::exception& e) {
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    throw error(detail::str_cat("rank ", launch.rank, ": rendezvous at MASTER_ADDR=", launch.master_addr,
                                " MASTER_PORT=", launch.master_port, " failed after ", int(s), " s (all ", launch.world,
                                " ranks must start within the timeout, and rank 0 must be able to listen there): ",
                                first_line(e.what())));
  }
  for (size_t c = 0; c < 2; ++c) {
    auto o = c10d::ProcessGroupGloo::Options::create(opt.timeout);
    // Loopback for one machine, else the address this host resolves to (Gloo's own choice).
    o->devices.push_back(launch.master_addr == "127.0.0.1" || launch.master_addr == "localhost"
                             ? c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1")
                             : c10d::ProcessGroupGloo::createDefaultDevice());
    auto prefixed = c10::make_intrusive<c10d::PrefixStore>("gloo" + std::to_string(c), pg->impl_->store);
    pg->impl_->gloo[c] = c10::make_intrusive<c10d::ProcessGroupGloo>(prefixed, launch.rank, launch.world, o);
  }
  pg->heartbeat_ = std::thread([raw = pg.get()] {
    while (!raw->stop_.load()) {
      try {
        raw->impl_->beat->add(beat_key(raw->rank()), 1);
      } catch (...) {
        // rank 0 (the store) is gone: the next collective reports it
      }
      std::this_thread::sleep_for(kBeat);
    }
  });
  return pg;
}

process_group::~process_group() {
#if FERRY_WITH_NCCL
  // NCCL's communicators are shut down before the store they met through goes away.
  for (auto& g : impl_->nccl)
    if (g) {
      try {
        g->shutdown();
      } catch (const std::exception&) {
        // a rank that failed already: nothing left to close cleanly
      }
    }
#endif
  stop_ = true;
  if (heartbeat_.joinable()) heartbeat_.join();
}

// Which rank stopped: the ranks whose heartbeat did not move over a few beats (the store's host,
// rank 0, when the store itself no longer answers).
std::string process_group::who_stopped() {
  try {
    std::vector<int64_t> before(static_cast<size_t>(world()));
    for (int r = 0; r < world(); ++r) before[size_t(r)] = impl_->beat->add(beat_key(r), 0);
    std::this_thread::sleep_for(kBeat * 5);
    std::string names;
    for (int r = 0; r < world(); ++r)
      if (r != rank() && impl_->beat->add(beat_key(r), 0) == before[size_t(r)])
        names += (names.empty() ? "" : ", ") + std::to_string(r);
    if (names.empty()) return "a rank stopped answering (every heartbeat still moves: a rank is stuck in its step)";
    return (names.find(',') == std::string::npos ? "rank " : "ranks ") + names + " stopped (no heartbeat)";
  } catch (const std::exception&) {
    return "rank 0 stopped (its rendezvous store at " + launch_.master_addr + ":" + std::to_string(launch_.master_port) +
           " is gone)";
  }
}

template <class Fn>
void process_group::guarded(const char* what, Fn&& fn) {
  const auto t0 = std::chrono::steady_clock::now();
  try {
    fn();
  } catch (const std::exception& e) {
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    throw error(detail::str_cat(who_stopped(), ": ", what, " on rank ", rank(), " failed after ",
                                int(s * 10) / 10.0, " s (timeout ", opt_.timeout.count() / 1000.0,
                                " s); restart all ranks with --resume latest (", first_line(e.what()), ")"));
  }
}

void process_group::all_reduce_sum(at::Tensor& t, engine::comm_channel c) {
  guarded("all_reduce", [&] {
    std::vector<at::Tensor> v{t};
    impl_->backend_for(t, c, *this).allreduce(v)->wait(opt_.timeout);
  });
}

bool process_group::staged_on_device(const at::Tensor& t, engine::comm_channel c) const {
#if FERRY_WITH_NCCL
  return opt_.cuda && !t.is_cuda() && c == engine::comm_channel::channel_update;
#else
  (void)t;
  (void)c;
  return false;
#endif
}

// The host tensors of a CUDA run's reduce-scatter and all-gather travel through this rank's device:
// copied in on the channel's stream, reduced or gathered there by NCCL (NVLink or PCIe peer
// copies between the GPUs), copied back; the host blocks until the result is in `out`.
template <class Fn>
void process_group::on_device(engine::comm_channel c, Fn&& fn) {
#if FERRY_WITH_NCCL
  const c10::Device d(c10::kCUDA, static_cast<c10::DeviceIndex>(launch_.local_rank));
  c10::cuda::CUDAGuard dg(d);
  auto& s = impl_->stage[index_of(c)];
  if (!s) s = c10::cuda::getStreamFromPool(false, d.index());
  c10::cuda::CUDAStreamGuard sg(*s);
  fn(impl_->nccl_for(c, *this), d);
  s->synchronize();
#else
  (void)c;
  (void)fn;
  FERRY_ASSERT(false, "process_group::on_device in a build without NCCL");
#endif
}

// A reduce-scatter or all-gather: start(group, out, in) issues it on tensors of one place and
// returns its work. Host tensors of a CUDA run are staged through the device; device tensors are
// ordered on the current stream, which waits for the result while the host goes on (NCCL's own
// watchdog bounds a hang by the group's timeout); host tensors are done when this returns.
template <class Start>
void process_group::collective(const char* what, at::Tensor& out, const at::Tensor& in, engine::comm_channel c,
                               Start&& start) {
  guarded(what, [&] {
    if (staged_on_device(out, c)) {
      on_device(c, [&](c10d::Backend& g, const c10::Device& d) {
        at::Tensor din = in.to(d, /*non_blocking=*/true);
        at::Tensor dout = at::empty({out.numel()}, din.options());
        start(g, dout, din)->wait(opt_.timeout);
        out.copy_(dout, /*non_blocking=*/true);
      });
      return;
    }
    at::Tensor src = in;
    auto work = start(impl_->backend_for(out, c, *this), out, src);
    if (out.is_cuda()) work->wait();
    else work->wait(opt_.timeout);
  });
}

void process_group::reduce_scatter_sum(at::Tensor& out, const at::Tensor& in, engine::comm_channel c) {
  FERRY_ASSERT(in.numel() == out.numel() * world(), "reduce_scatter of ", in.numel(), " into ", out.numel(), " x ",
               world());
  collective("reduce_scatter", out, in, c,
             [](c10d::Backend& g, at::Tensor& o, at::Tensor& i) { return g._reduce_scatter_base(o, i); });
}

void process_group::all_gather(at::Tensor& out, const at::Tensor& in, engine::comm_channel c) {
  FERRY_ASSERT(out.numel() == in.numel() * world(), "all_gather of ", in.numel(), " x ", world(), " into ",
               out.numel());
  collective("all_gather", out, in, c,
             [](c10d::Backend& g, at::Tensor& o, at::Tensor& i) { return g._allgather_base(o, i); });
}

namespace {
// The shared block: a header of publish counters (row k: one int64 per rank, rows 64-byte
// aligned, the header page-aligned), then the data.
class shared_block final : public engine::shared_host_block {
 public:
  shared_block(void* base, size_t total, size_t header, size_t row, int rank, int world, int64_t slots,
               std::chrono::milliseconds timeout, std::function<std::string()> who_stopped)
      : base_(base), total_(total), header_(header), row_(row), rank_(rank), world_(world),
        slots_(slots), timeout_(timeout), who_stopped_(std::move(who_stopped)) {}
  ~shared_block() override { ::munmap(base_, total_); }
  void* data() const override { return static_cast<char*>(base_) + header_; }
  size_t bytes() const override { return total_ - header_; }

  // One thread posts a slot at a time (the update thread; the engine's while it is idle), so the
  // own counter is this rank's post count.
  void post(int64_t slot) override {
    check_slot(slot);
    std::atomic<int64_t>* mine = counter(slot, rank_);
    // The writes of this rank's part (by any thread that finished before this call) happen before
    // the release store; a rank that reads the count with acquire sees them.
    mine->store(mine->load(std::memory_order_relaxed) + 1, std::memory_order_release);
  }

  double wait_all(int64_t slot) override {
    check_slot(slot);
    const int64_t gen = counter(slot, rank_)->load(std::memory_order_acquire);
    const auto t0 = std::chrono::steady_clock::now();
    int64_t spins = 0;
    for (int r = 0; r < world_; ++r) {
      while (counter(slot, r)->load(std::memory_order_acquire) < gen) {
        // The ranks run in step (their units' gradients are reduced together): a short spin
        // usually ends the wait; past it, sleep so a slow rank gets the cores.
        if (++spins < 2048) {
          std::this_thread::yield();
          continue;
        }
        std::this_thread::sleep_for(std::chrono::microseconds(20));
        if ((spins & 1023) == 0 && std::chrono::steady_clock::now() - t0 > timeout_) {
          const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
          throw error(detail::str_cat(who_stopped_(), ": rank ", r, " had not written its shard of shared unit ", slot,
                                      " on rank ", rank_, " after ", int(s * 10) / 10.0, " s (timeout ",
                                      timeout_.count() / 1000.0, " s); restart all ranks with --resume latest"));
        }
      }
    }
    return spins ? std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() : 0.0;
  }

 private:
  void check_slot(int64_t slot) const {
    FERRY_ASSERT(slot >= 0 && slot < slots_, "shared block slot ", slot, " of ", slots_);
  }
  std::atomic<int64_t>* counter(int64_t slot, int r) const {
    return reinterpret_cast<std::atomic<int64_t>*>(static_cast<char*>(base_) + size_t(slot) * row_) + r;
  }
  void* base_;
  size_t total_, header_, row_;
  int rank_, world_;
  int64_t slots_;
  std::chrono::milliseconds timeout_;
  std::function<std::string()> who_stopped_;
};

size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }
}  // namespace

std::unique_ptr<engine::shared_host_block> process_group::share_host_memory(size_t bytes, int64_t slots) {
  static_assert(std::atomic<int64_t>::is_always_lock_free, "shared counters need lock-free 64-bit atomics");
  if (launch_.local_world != launch_.world) return nullptr;
  const size_t row = round_up(size_t(world()) * sizeof(int64_t), 64);
  const size_t header = round_up(size_t(slots) * row, 4096);
  const size_t total = header + round_up(std::max<size_t>(bytes, 1), 4096);
  const std::string key = "ferry/shared/" + std::to_string(shared_blocks_++);
  // Start-up, not a step: the ranks arrive here after starting their devices, which under load
  // may be seconds apart, so the waits allow at least kStartup.
  const auto patience = std::max<std::chrono::milliseconds>(opt_.timeout, kStartup);
  int fd = -1;
  std::string failure;
  guarded("shared memory setup", [&] {
    if (rank() == 0) {
      fd = ::memfd_create("ferry-shared-shadows", MFD_CLOEXEC);
      if (fd < 0 || ::ftruncate(fd, off_t(total)) != 0)
        failure = detail::str_cat("rank 0 cannot make ", total >> 20, " MiB of shared memory: ", std::strerror(errno));
      const std::string where = failure.empty() ? std::to_string(::getpid()) + " " + std::to_string(fd) : "-";
      impl_->store->set(key, std::vector<uint8_t>(where.begin(), where.end()));
    } else {
      impl_->store->wait({key}, patience);
      const std::vector<uint8_t> v = impl_->store->get(key);
      const std::string where(v.begin(), v.end());
      if (where != "-") {
        const std::string path = "/proc/" + where.substr(0, where.find(' ')) + "/fd/" + where.substr(where.find(' ') + 1);
        fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
        if (fd < 0)
          failure = detail::str_cat("rank ", rank(), " cannot open rank 0's shared memory ", path, ": ",
                                    std::strerror(errno));
      }
    }
  });
  void* base = MAP_FAILED;
  if (fd >= 0 && failure.empty()) {
    base = ::mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED)
      failure = detail::str_cat("rank ", rank(), " cannot map ", total >> 20, " MiB of shared memory: ", std::strerror(errno));
  }
  // Every rank reports once it has mapped the block (or failed); rank 0 keeps its descriptor open
  // until every rank has reported, so every other rank has opened its own.
  guarded("shared memory setup", [&] {
    for (const std::string& s : exchange(key + "/", failure.empty() ? "ok" : failure, patience))
      if (s != "ok" && failure.empty()) failure = s;
  });
  if (fd >= 0) ::close(fd);
  if (!failure.empty()) {
    if (base != MAP_FAILED) ::munmap(base, total);
    throw error(failure + "; the ranks of one machine share their half weights there (dist_weights=shared or auto): "
                "use dist_weights=gather");
  }
  return std::make_unique<shared_block>(base, total, header, row, rank(), world(), slots, opt_.timeout,
                                        [this] { return who_stopped(); });
}

std::vector<std::string> process_group::exchange(const std::string& key_prefix, const std::string& mine,
                                                 std::chrono::milliseconds timeout) {
  impl_->store->set(key_prefix + std::to_string(rank()), std::vector<uint8_t>(mine.begin(), mine.end()));
  std::vector<std::string> all(static_cast<size_t>(world()));
  for (int r = 0; r < world(); ++r) {
    const std::string key = key_prefix + std::to_string(r);
    impl_->store->wait({key}, timeout);
    const std::vector<uint8_t> v = impl_->store->get(key);
    all[size_t(r)].assign(v.begin(), v.end());
  }
  return all;
}

void process_group::barrier(const std::string& name) {
  guarded("barrier", [&] {
    const std::string key = "ferry/barrier/" + name;
    impl_->store->add(key, 1);
    const auto deadline = std::chrono::steady_clock::now() + opt_.timeout;
    while (impl_->store->add(key, 0) < world()) {
      if (std::chrono::steady_clock::now() > deadline) throw std::runtime_error("barrier " + name + " timed out");
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  });
}

void process_group::check_same_config(const std::string& config_json) {
  std::vector<std::string> all;
  guarded("config exchange", [&] { all = exchange("ferry/config/", config_json, opt_.timeout); });
  // Every rank has read every config before any rank may stop (rank 0 hosts the store).
  barrier("config");
  const nlohmann::json ref = nlohmann::json::parse(all[0]);
  for (int r = 1; r < world(); ++r) {
    if (all[size_t(r)] == all[0]) continue;
    const nlohmann::json other = nlohmann::json::parse(all[size_t(r)]);
    std::string key = "?", a, b;
    for (auto it = ref.begin(); it != ref.end(); ++it)
      if (!other.contains(it.key()) || other[it.key()] != it.value()) {
        key = it.key();
        a = it.value().dump();
        b = other.contains(key) ? other[key].dump() : "(missing)";
        break;
      }
    throw config_error(detail::str_cat("rank ", r, "'s run config differs from rank 0's at key '", key, "' (", b,
                                       " against ", a, "): start every rank with the same config and flags"));
  }
}

}  // namespace ferry::dist
