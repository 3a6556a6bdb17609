#include "src/engine/nvme_state.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <filesystem>
#include <mutex>
#include <random>

#include "src/common/error.h"
#include "src/engine/uring_io.h"

namespace ferry::engine {

state_place parse_state_place(const std::string& s) {
  if (s == "host") return state_place::place_host;
  if (s == "nvme") return state_place::place_nvme;
  throw config_error("optimizer_state_on: unknown place '" + s + "' (valid: host, nvme)");
}

const char* state_place_name(state_place p) { return p == state_place::place_nvme ? "nvme" : "host"; }

namespace {
int64_t round_up(int64_t b) { return (b + k_nvme_align - 1) / k_nvme_align * k_nvme_align; }
double gib(int64_t b) { return double(b) / double(int64_t(1) << 30); }
}  // namespace

int64_t nvme_unit_stride(state_kind k, bool moments, int64_t numel) { return round_up(state_bytes(k, moments, numel)); }

int64_t nvme_file_bytes(const std::vector<int64_t>& unit_numel, state_kind k, bool moments) {
  int64_t b = 0;
  for (int64_t n : unit_numel) b += nvme_unit_stride(k, moments, n);
  return b;
}

int64_t nvme_buffer_bytes(const std::vector<int64_t>& unit_numel, state_kind k, bool moments, int64_t buffers) {
  int64_t stride = 0;
  for (int64_t n : unit_numel) stride = std::max(stride, nvme_unit_stride(k, moments, n));
  return buffers * stride;
}

int64_t nvme_free_bytes(const std::string& dir) {
  struct statvfs vs {};
  if (dir.empty() || ::statvfs(dir.c_str(), &vs) != 0) return -1;
  return int64_t(vs.f_bavail) * int64_t(vs.f_frsize);
}

state_view nvme_block_view(char* base, state_kind k, bool moments, int64_t u, int64_t n) {
  state_view v;
  v.n = n;
  v.seed = uint64_t(u) + 1;
  v.moments = moments_kind_of(k);
  v.master = reinterpret_cast<float*>(base);
  if (!moments) return v;
  char* at = base + 4 * n;
  if (v.moments == cpu_optim::moments_kind::int8) {
    const int64_t blocks = int64_t(cpu_optim::quant_blocks(size_t(n)));
    v.m_scale = reinterpret_cast<float*>(at);
    v.v_scale = v.m_scale + blocks;
    at += 8 * blocks;
  }
  const int64_t elem = v.moments == cpu_optim::moments_kind::f32 ? 4 : v.moments == cpu_optim::moments_kind::bf16 ? 2 : 1;
  v.exp_avg = at;
  v.exp_avg_sq = at + elem * n;
  FERRY_ASSERT(at + 2 * elem * n == base + state_bytes(k, moments, n), "nvme block layout differs from state_bytes");
  return v;
}

namespace {

using clock_type = std::chrono::steady_clock;

// The tier's file: created exclusively, closed and removed when destroyed.
struct scratch_file {
  std::string path;
  int fd = -1;
  int bad_fd = -1;   // debug_fail_write: a read-only descriptor of the same file
  ~scratch_file() {
    if (bad_fd >= 0) ::close(bad_fd);
    if (fd >= 0) ::close(fd);
    if (!path.empty()) ::unlink(path.c_str());
  }
};

struct free_deleter {
  void operator()(char* p) const { std::free(p); }
};

std::string random_suffix() {
  std::random_device rd;
  char buf[32];
  std::snprintf(buf, sizeof buf, "%08x%08x", rd(), rd());
  return buf;
}

// Files "ferry-state-<pid>-*.tier" in dir whose process is gone: count and bytes, for a notice.
std::pair<int, int64_t> stale_files(const std::string& dir) {
  int count = 0;
  int64_t bytes = 0;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    long pid = 0;
    if (std::sscanf(name.c_str(), "ferry-state-%ld-", &pid) != 1 || name.size() < 5 ||
        name.compare(name.size() - 5, 5, ".tier") != 0)
      continue;
    if (::kill(pid_t(pid), 0) == 0 || errno != ESRCH) continue;
    ++count;
    bytes += int64_t(e.file_size(ec));
  }
  return {count, bytes};
}

class nvme_state final : public state_tier {
 public:
  nvme_state(const std::vector<int64_t>& numel, state_kind kind, bool moments, const nvme_options& o)
      : kind_(kind), moments_(moments), opt_(o), numel_(numel) {
    const std::string& dir = o.path;
    FERRY_CONFIG_CHECK(!dir.empty(), "optimizer_state_on=nvme needs nvme_path, a directory on a local disk");
    FERRY_CONFIG_CHECK(o.buffers >= 2 && o.buffers <= 1024, "nvme_buffers must be in [2, 1024], got ", o.buffers);
    FERRY_CONFIG_CHECK(o.queue_depth >= 1 && o.queue_depth <= 4096, "nvme_queue_depth must be in [1, 4096], got ",
                       o.queue_depth);
    struct stat st {};
    FERRY_CONFIG_CHECK(::stat(dir.c_str(), &st) == 0, "nvme_path ", dir, " does not exist (", std::strerror(errno),
                       "); create the directory on a local disk or change nvme_path");
    FERRY_CONFIG_CHECK(S_ISDIR(st.st_mode), "nvme_path ", dir, " is not a directory; nvme_path names the directory ",
                       "the tier creates its scratch file in");

    int64_t at = 0;
    for (int64_t n : numel_) {
      offset_.push_back(at);
      stride_.push_back(nvme_unit_stride(kind, moments, n));
      at += stride_.back();
    }
    file_bytes_ = at;
    buffer_bytes_ = nvme_buffer_bytes(numel_, kind, moments, 1);
    written_.assign(numel_.size(), 0);
    buf_of_.assign(numel_.size(), -1);

    const auto [stale, stale_bytes] = stale_files(dir);
    if (stale > 0)
      note(std::to_string(stale) + " file(s) ferry-state-*.tier of runs no longer alive use " +
           fmt_gib(stale_bytes) + " there; they are never reused: remove them to free the space");
    file_.path = (std::filesystem::path(dir) / ("ferry-state-" + std::to_string(::getpid()) + "-" + random_suffix() +
                                                ".tier")).string();
    open_file();
    preallocate();
    if (direct_) probe_direct();
    if (o.debug_fail_write >= 0) file_.bad_fd = ::open(file_.path.c_str(), O_RDONLY | O_CLOEXEC);

    for (int64_t b = 0; b < o.buffers; ++b) {
      char* p = static_cast<char*>(std::aligned_alloc(size_t(k_nvme_align), size_t(buffer_bytes_)));
      FERRY_CHECK(p != nullptr, "cannot allocate ", buffer_bytes_, " bytes of host memory for an nvme tier buffer (",
                  o.buffers, " of them: nvme_buffers); lower nvme_buffers or free host memory");
      memory_.emplace_back(p);
      bufs_.push_back({p});
    }
    io_ = std::make_unique<uring_io>(o.queue_depth, k_nvme_chunk, !o.debug_no_uring);
    if (io_->uring_error() != 0)
      note(std::string("io_uring is not available (") + std::strerror(io_->uring_error()) +
           "); the tier reads and writes with pread/pwrite on one thread");
  }

  ~nvme_state() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      closing_ = true;   // completions start no further prefetches
    }
    io_.reset();   // every read and write-back completes (their callbacks use the members below)
  }

  state_kind kind() const override { return kind_; }
  bool has_moments() const override { return moments_; }
  int64_t num_units() const override { return int64_t(numel_.size()); }
  int64_t host_bytes() const override { return buffer_bytes_ * opt_.buffers; }
  int64_t disk_bytes() const override { return file_bytes_; }
  bool in_memory() const override { return false; }
  std::vector<std::string> scratch_files() const override { return {file_.path}; }

  std::string describe() const override {
    std::string s = "optimizer state on disk: " + file_.path + " (" + fmt_gib(file_bytes_) + "), " +
                    std::to_string(opt_.buffers) + " buffers of " + std::to_string(buffer_bytes_ >> 20) +
                    " MiB, " +
                    (io_->uring_error() == 0 ? "io_uring queue depth " + std::to_string(opt_.queue_depth) + " x " +
                                                   std::to_string(k_nvme_chunk >> 20) + " MiB"
                                             : std::string("pread/pwrite")) +
                    ", " + (direct_ ? "O_DIRECT" : "buffered I/O");
    for (const auto& n : notes_) s += "\nnotice: " + n;
    return s;
  }

  state_view acquire(int64_t u) override {
    FERRY_ASSERT(u >= 0 && u < num_units(), "unit ", u, " of ", num_units());
    std::unique_lock<std::mutex> lock(mu_);
    drop_wanted(u);
    clock_type::time_point t0{};
    auto wait = [&] {
      if (t0 == clock_type::time_point{}) t0 = clock_type::now();
      cv_.wait(lock);
    };
    int b;
    for (;;) {
      throw_if_failed();
      b = buf_of_[size_t(u)];
      if (b >= 0) {
        buffer& x = bufs_[size_t(b)];
        if (x.st == buf_state::reading || x.st == buf_state::writing) {
          x.claimed = true;
          wait();
          continue;
        }
        FERRY_ASSERT(x.st == buf_state::idle, "unit ", u, " of the nvme tier acquired while it is held");
        break;
      }
      b = victim(true);
      if (b < 0) {
        ++waiters_;
        wait();
        --waiters_;
        continue;
      }
      load(b, u, false);
      if (buf_of_[size_t(u)] == b) bufs_[size_t(b)].claimed = true;
    }
    buffer& x = bufs_[size_t(b)];
    x.st = buf_state::held;
    x.fresh = false;
    x.claimed = false;
    x.used = ++clock_;
    if (t0 != clock_type::time_point{}) wait_ms_ += ms_since(t0);
    return nvme_block_view(x.data, kind_, moments_, u, numel_[size_t(u)]);
  }

  void release(int64_t u, bool dirty) override {
    std::lock_guard<std::mutex> lock(mu_);
    const int b = buf_of_[size_t(u)];
    if (b < 0 || bufs_[size_t(b)].st != buf_state::held) {
      std::fprintf(stderr, "bug: nvme tier: unit %lld released without being acquired\n", (long long)u);
      std::abort();
    }
    buffer& x = bufs_[size_t(b)];
    x.used = ++clock_;
    if (!dirty || !error_.empty()) {
      x.st = buf_state::idle;
      settle();
      return;
    }
    if (!intact("writing", u)) {
      x.st = buf_state::idle;
      settle();
      return;
    }
    x.st = buf_state::writing;
    written_[size_t(u)] = 1;
    write_bytes_ += stride_[size_t(u)];
    const int fd = opt_.debug_fail_write >= 0 && writes_ >= opt_.debug_fail_write ? file_.bad_fd : file_.fd;
    ++writes_;
    io_->write(fd, x.data, offset_[size_t(u)], stride_[size_t(u)], [this, b](const uring_result& r) { written(b, r); });
  }

  void prefetch(int64_t u) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (!error_.empty()) return;
    const int b = buf_of_[size_t(u)];
    if (b >= 0) {
      bufs_[size_t(b)].fresh = true;   // asked for again: not a victim for other prefetches
      return;
    }
    if (std::find(wanted_.begin(), wanted_.end(), u) != wanted_.end()) return;
    wanted_.push_back(u);
    start_prefetches();
  }

  void flush() override {
    std::unique_lock<std::mutex> lock(mu_);
    auto writing = [&] {
      return std::any_of(bufs_.begin(), bufs_.end(), [](const buffer& x) { return x.st == buf_state::writing; });
    };
    if (writing()) {
      const auto t0 = clock_type::now();
      cv_.wait(lock, [&] { return !writing(); });
      wait_ms_ += ms_since(t0);
    }
    throw_if_failed();
  }

  tier_io take_io() override {
    std::lock_guard<std::mutex> lock(mu_);
    tier_io r{wait_ms_, read_bytes_, write_bytes_};
    wait_ms_ = 0;
    read_bytes_ = write_bytes_ = 0;
    return r;
  }

 private:
  enum class buf_state {
    empty,    // holds no unit
    reading,  // a read of `unit` is in flight
    idle,     // holds `unit` as the file does (or newer, never yet written: see written_)
    held,     // between acquire and release
    writing,  // the write-back of `unit` is in flight
  };
  struct buffer {
    char* data;
    int64_t unit = -1;
    buf_state st = buf_state::empty;
    bool fresh = false;   // read by a prefetch (or asked for by one) and not acquired since
    bool claimed = false; // loaded for a waiting acquire: never a victim until that acquire takes it
    uint64_t used = 0;    // clock_ at the last acquire, release or read
  };

  static double ms_since(clock_type::time_point t0) {
    return std::chrono::duration<double, std::milli>(clock_type::now() - t0).count();
  }
  static std::string fmt_gib(int64_t b) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%lld bytes, %.2f GiB", (long long)b, gib(b));
    return buf;
  }
  void note(const std::string& s) { notes_.push_back("nvme_path " + opt_.path + ": " + s); }

  void open_file() {
    const int base = O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC;
    direct_ = !opt_.debug_refuse_direct;
    int fd = direct_ ? ::open(file_.path.c_str(), base | O_DIRECT, 0600) : -1;
    if (fd < 0 && (!direct_ || errno == EINVAL)) {
      if (direct_) note("the filesystem refuses O_DIRECT; the tier uses buffered I/O");
      else note("O_DIRECT off (test hook); the tier uses buffered I/O");
      direct_ = false;
      fd = ::open(file_.path.c_str(), base, 0600);
    }
    FERRY_CONFIG_CHECK(fd >= 0, "nvme_path ", opt_.path, ": cannot create the tier file ", file_.path, ": ",
                       std::strerror(errno), "; nvme_path must be a writable directory on a local disk");
    file_.fd = fd;
  }

  void preallocate() {
    int err = opt_.debug_fallocate_errno;
    if (err == 0 && ::fallocate(file_.fd, 0, 0, off_t(file_bytes_)) != 0) err = errno;
    if (err == EOPNOTSUPP) {
      note("the filesystem cannot preallocate (fallocate); space is taken as units are written");
      if (::ftruncate(file_.fd, off_t(file_bytes_)) != 0) err = errno;
      else err = 0;
    }
    if (err == 0) return;
    if (err == ENOSPC || err == EFBIG || err == EDQUOT) {
      const int64_t free_bytes = nvme_free_bytes(opt_.path);
      throw config_error("nvme_path " + opt_.path + ": the optimizer state tier needs " + fmt_gib(file_bytes_) +
                         " of disk but " + (free_bytes >= 0 ? fmt_gib(free_bytes) : std::string("an unknown amount")) +
                         " are free (" + std::strerror(err) +
                         "); free space there, point nvme_path at a larger disk, or use a smaller optimizer_state");
    }
    throw config_error("nvme_path " + opt_.path + ": cannot preallocate " + fmt_gib(file_bytes_) + " for " +
                       file_.path + ": " + std::strerror(err));
  }

  // Some filesystems accept O_DIRECT at open and refuse the I/O itself: one aligned read tells.
  void probe_direct() {
    std::unique_ptr<char, free_deleter> p(static_cast<char*>(std::aligned_alloc(size_t(k_nvme_align), size_t(k_nvme_align))));
    FERRY_CHECK(p != nullptr, "cannot allocate 4 KiB of host memory");
    if (::pread(file_.fd, p.get(), size_t(k_nvme_align), 0) >= 0 || errno != EINVAL) return;
    const int fd = ::open(file_.path.c_str(), O_RDWR | O_CLOEXEC);
    FERRY_CONFIG_CHECK(fd >= 0, "nvme_path ", opt_.path, ": cannot reopen ", file_.path, ": ", std::strerror(errno));
    ::close(file_.fd);
    file_.fd = fd;
    direct_ = false;
    note("the filesystem refuses O_DIRECT I/O; the tier uses buffered I/O");
  }

  void throw_if_failed() const {
    if (!error_.empty()) throw error(error_);
  }
  void fail(const std::string& msg) {
    if (error_.empty()) error_ = msg;
  }
  std::string io_error(const char* what, int64_t u, const uring_result& r) const {
    const std::string where = "nvme tier " + file_.path + ": " + what + " unit " + std::to_string(u) + " (" +
                              std::to_string(stride_[size_t(u)]) + " bytes at offset " +
                              std::to_string(offset_[size_t(u)]) + ")";
    if (r.err) return where + " failed: " + std::strerror(r.err);
    return where + " transferred only " + std::to_string(r.done) + " bytes" +
           (what[0] == 'r' ? ": the file is shorter than the tier made it (truncated?)" : ": is the disk full?");
  }

  // The file still has the length the tier gave it. A file cut short under the run would read as
  // zeros (not as a short read) wherever a later write-back beyond the cut extended it again, so
  // every read and write checks the length first: the first I/O after a truncation fails.
  bool intact(const char* what, int64_t u) {
    struct stat st {};
    if (::fstat(file_.fd, &st) == 0 && int64_t(st.st_size) >= file_bytes_) return true;
    fail("nvme tier " + file_.path + ": " + what + " unit " + std::to_string(u) + ": the file is " +
         std::to_string(int64_t(st.st_size)) + " bytes, shorter than the " + std::to_string(file_bytes_) +
         " the tier made (truncated?)");
    return false;
  }

  void drop_wanted(int64_t u) {
    auto it = std::find(wanted_.begin(), wanted_.end(), u);
    if (it != wanted_.end()) wanted_.erase(it);
  }

  // A buffer to load a unit into, emptied: an empty one, else the least recently used idle one that
  // no prefetch asked for, else (for an acquire, which must not wait on hints) the idle one a
  // prefetch filled last; never one loaded for a waiting acquire (its read may complete before the
  // acquire wakes). -1 when every buffer is held, claimed or has I/O in flight.
  int victim(bool for_acquire) {
    int best = -1;
    for (size_t b = 0; b < bufs_.size(); ++b)
      if (bufs_[b].st == buf_state::empty) return int(b);
    for (size_t b = 0; b < bufs_.size(); ++b) {
      const buffer& x = bufs_[b];
      if (x.st == buf_state::idle && !x.fresh && !x.claimed && (best < 0 || x.used < bufs_[size_t(best)].used))
        best = int(b);
    }
    if (best < 0 && for_acquire)
      for (size_t b = 0; b < bufs_.size(); ++b) {
        const buffer& x = bufs_[b];
        if (x.st == buf_state::idle && !x.claimed && (best < 0 || x.used > bufs_[size_t(best)].used)) best = int(b);
      }
    if (best >= 0) {
      buf_of_[size_t(bufs_[size_t(best)].unit)] = -1;
      bufs_[size_t(best)].unit = -1;
      bufs_[size_t(best)].st = buf_state::empty;
    }
    return best;
  }

  // Unit u into empty buffer b: read, or zeros for a unit never written (the preallocated file
  // reads as zeros; this skips reading it).
  void load(int b, int64_t u, bool fresh) {
    buffer& x = bufs_[size_t(b)];
    x.unit = u;
    x.fresh = fresh;
    x.claimed = false;
    x.used = ++clock_;
    buf_of_[size_t(u)] = b;
    if (!written_[size_t(u)]) {
      std::memset(x.data, 0, size_t(stride_[size_t(u)]));
      x.st = buf_state::idle;
      return;
    }
    if (!intact("reading", u)) {
      buf_of_[size_t(u)] = -1;
      x.unit = -1;
      x.st = buf_state::empty;
      cv_.notify_all();
      return;
    }
    x.st = buf_state::reading;
    read_bytes_ += stride_[size_t(u)];
    io_->read(file_.fd, x.data, offset_[size_t(u)], stride_[size_t(u)], [this, b](const uring_result& r) { read(b, r); });
  }

  void start_prefetches() {
    while (!wanted_.empty() && waiters_ == 0 && error_.empty() && !closing_) {
      const int64_t u = wanted_.front();
      if (buf_of_[size_t(u)] >= 0) {
        wanted_.pop_front();
        continue;
      }
      const int b = victim(false);
      if (b < 0) return;
      wanted_.pop_front();
      load(b, u, true);
    }
  }

  // After a buffer changed state: queued prefetches may start, waiting acquires may proceed.
  void settle() {
    start_prefetches();
    cv_.notify_all();
  }

  // Completion callbacks (the I/O thread).
  void read(int b, const uring_result& r) {
    std::lock_guard<std::mutex> lock(mu_);
    buffer& x = bufs_[size_t(b)];
    if (r.ok()) {
      x.st = buf_state::idle;
    } else {
      fail(io_error("reading", x.unit, r));
      buf_of_[size_t(x.unit)] = -1;
      x.unit = -1;
      x.st = buf_state::empty;
    }
    settle();
  }
  void written(int b, const uring_result& r) {
    std::lock_guard<std::mutex> lock(mu_);
    buffer& x = bufs_[size_t(b)];
    if (!r.ok()) fail(io_error("writing", x.unit, r));
    x.st = buf_state::idle;
    settle();
  }

  const state_kind kind_;
  const bool moments_;
  const nvme_options opt_;
  const std::vector<int64_t> numel_;
  std::vector<int64_t> offset_, stride_;
  int64_t file_bytes_ = 0, buffer_bytes_ = 0;
  bool direct_ = true;
  std::vector<std::string> notes_;
  scratch_file file_;   // destroyed after io_ (declared before it): no I/O is in flight by then
  std::vector<std::unique_ptr<char, free_deleter>> memory_;

  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<buffer> bufs_;
  std::vector<int> buf_of_;        // per unit: the buffer holding it, -1 none
  std::vector<char> written_;      // per unit: written to the file at least once
  std::deque<int64_t> wanted_;     // prefetches not yet started, in order
  int waiters_ = 0;                // acquires waiting for a buffer (prefetches yield to them)
  bool closing_ = false;
  uint64_t clock_ = 0;
  int64_t writes_ = 0;
  std::string error_;              // the first failed I/O, one line
  double wait_ms_ = 0;
  int64_t read_bytes_ = 0, write_bytes_ = 0;
  std::unique_ptr<uring_io> io_;
};

}  // namespace

std::unique_ptr<state_tier> make_nvme_state(const std::vector<int64_t>& unit_numel, state_kind kind, bool moments,
                                            const nvme_options& o) {
  return std::make_unique<nvme_state>(unit_numel, kind, moments, o);
}

}  // namespace ferry::engine
