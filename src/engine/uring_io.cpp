#include "src/engine/uring_io.h"

#include <liburing.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "src/common/error.h"

namespace ferry::engine {
namespace {
constexpr uint64_t k_stop = std::numeric_limits<uint64_t>::max();

// A broken invariant on the completion thread, where nothing could catch an exception.
[[noreturn]] void die(const char* what, int err) {
  std::fprintf(stderr, "bug: uring_io: %s failed: %s\n", what, std::strerror(err));
  std::abort();
}
}  // namespace

struct uring_io::ring {
  io_uring r;
};

struct uring_io::op {
  bool write = false;
  int fd = -1;
  char* buf = nullptr;
  int64_t offset = 0, len = 0;
  int64_t issued = 0;       // bytes handed to requests so far
  int64_t outstanding = 0;  // requests in flight
  uring_result res;
  callback done;
};

uring_io::uring_io(int64_t depth, int64_t chunk, bool use_uring)
    : ring_(std::make_unique<ring>()), depth_(depth), chunk_(chunk), slots_(size_t(depth)) {
  FERRY_ASSERT(depth >= 1 && chunk >= 4096 && chunk <= (int64_t(1) << 30), "uring_io depth ", depth, " chunk ", chunk);
  // One entry more than the requests in flight: the stop message of the destructor.
  const int e = use_uring ? io_uring_queue_init(unsigned(depth + 1), &ring_->r, 0) : -ENOSYS;
  if (e != 0) {
    uring_error_ = -e;
    thread_ = std::thread([this] { sync_loop(); });
    return;
  }
  for (int64_t s = depth - 1; s >= 0; --s) free_slots_.push_back(s);
  thread_ = std::thread([this] { loop(); });
}

uring_io::~uring_io() {
  if (uring_error_ != 0) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      idle_.wait(lock, [&] { return ops_open_ == 0; });
      stop_ = true;
    }
    work_.notify_all();
    thread_.join();
    return;
  }
  {
    std::unique_lock<std::mutex> lock(mu_);
    idle_.wait(lock, [&] { return ops_open_ == 0; });
    io_uring_sqe* s = io_uring_get_sqe(&ring_->r);
    if (!s) die("io_uring_get_sqe (stop)", EBUSY);
    io_uring_prep_nop(s);
    io_uring_sqe_set_data64(s, k_stop);
    int r;
    while ((r = io_uring_submit(&ring_->r)) < 0 && (r == -EINTR || r == -EAGAIN || r == -EBUSY)) std::this_thread::yield();
    if (r < 0) die("io_uring_submit (stop)", -r);
  }
  thread_.join();
  io_uring_queue_exit(&ring_->r);
}

void uring_io::read(int fd, void* buf, int64_t offset, int64_t len, callback done) {
  queue(false, fd, buf, offset, len, std::move(done));
}

void uring_io::write(int fd, const void* buf, int64_t offset, int64_t len, callback done) {
  // The kernel only reads a write's buffer; io_uring_prep_write takes it as const.
  queue(true, fd, const_cast<void*>(buf), offset, len, std::move(done));
}

void uring_io::queue(bool write, int fd, void* buf, int64_t offset, int64_t len, callback done) {
  FERRY_ASSERT(len > 0 && offset >= 0, "uring_io operation of ", len, " bytes at ", offset);
  auto o = std::make_unique<op>();
  o->write = write;
  o->fd = fd;
  o->buf = static_cast<char*>(buf);
  o->offset = offset;
  o->len = len;
  o->res.want = len;
  o->done = std::move(done);
  std::lock_guard<std::mutex> lock(mu_);
  ++ops_open_;
  queued_.push_back(o.release());
  if (uring_error_ != 0) work_.notify_one();
  else pump();
}

void uring_io::pump() {
  bool any = false;
  while (!queued_.empty() && !free_slots_.empty()) {
    io_uring_sqe* s = io_uring_get_sqe(&ring_->r);
    if (!s) break;
    op* o = queued_.front();
    const int64_t slot = free_slots_.back();
    free_slots_.pop_back();
    const int64_t at = o->issued, n = std::min(chunk_, o->len - at);
    slots_[size_t(slot)] = {o, n};
    if (o->write) io_uring_prep_write(s, o->fd, o->buf + at, unsigned(n), uint64_t(o->offset + at));
    else io_uring_prep_read(s, o->fd, o->buf + at, unsigned(n), uint64_t(o->offset + at));
    io_uring_sqe_set_data64(s, uint64_t(slot));
    o->issued += n;
    ++o->outstanding;
    if (o->issued == o->len) queued_.pop_front();
    any = true;
  }
  // A submit may take fewer entries than were prepared; the rest stay in the ring for the next.
  while (any && io_uring_sq_ready(&ring_->r) > 0) {
    const int r = io_uring_submit(&ring_->r);
    if (r >= 0 || r == -EINTR || r == -EAGAIN || r == -EBUSY) continue;
    die("io_uring_submit", -r);
  }
}

void uring_io::loop() {
  for (;;) {
    io_uring_cqe* cqe = nullptr;
    const int e = io_uring_wait_cqe(&ring_->r, &cqe);
    if (e == -EINTR || e == -EAGAIN) continue;
    if (e < 0) die("io_uring_wait_cqe", -e);
    std::vector<op*> finished;
    bool stop = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      unsigned head, seen = 0;
      io_uring_for_each_cqe(&ring_->r, head, cqe) {
        ++seen;
        const uint64_t tag = io_uring_cqe_get_data64(cqe);
        if (tag == k_stop) {
          stop = true;
          continue;
        }
        const request q = slots_[size_t(tag)];
        free_slots_.push_back(int64_t(tag));
        op* o = q.owner;
        if (cqe->res < 0) {
          if (o->res.err == 0) o->res.err = -cqe->res;
        } else {
          o->res.done += cqe->res;   // less than q.len: a short transfer (end of file)
        }
        if (--o->outstanding == 0 && o->issued == o->len) finished.push_back(o);
      }
      io_uring_cq_advance(&ring_->r, seen);
      pump();
    }
    for (op* o : finished) {
      o->done(o->res);
      delete o;
    }
    if (!finished.empty()) {
      std::lock_guard<std::mutex> lock(mu_);
      ops_open_ -= int64_t(finished.size());
      idle_.notify_all();
    }
    if (stop) return;
  }
}

void uring_io::sync_loop() {
  for (;;) {
    op* o;
    {
      std::unique_lock<std::mutex> lock(mu_);
      work_.wait(lock, [&] { return stop_ || !queued_.empty(); });
      if (queued_.empty()) return;
      o = queued_.front();
      queued_.pop_front();
    }
    for (int64_t at = 0; at < o->len;) {
      const size_t n = size_t(std::min(chunk_, o->len - at));
      const ssize_t r = o->write ? ::pwrite(o->fd, o->buf + at, n, off_t(o->offset + at))
                                 : ::pread(o->fd, o->buf + at, n, off_t(o->offset + at));
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) {
        o->res.err = errno;
        break;
      }
      if (r == 0) break;   // end of file: a short transfer
      o->res.done += r;
      at += r;
    }
    o->done(o->res);
    delete o;
    std::lock_guard<std::mutex> lock(mu_);
    --ops_open_;
    idle_.notify_all();
  }
}

}  // namespace ferry::engine
