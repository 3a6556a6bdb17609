// The strict host backend (engine_options::strict_host_backend, set by the CPU engine tests): the
// host backend made to behave like a GPU where ordering matters, so that a missing record or wait
// in the engine fails a CPU test deterministically instead of passing because a memcpy happened
// at once.
//
// - Copies are queued on their queue (h2d, d2h) and run as late as they may: only when something
//   waits for them (wait(queue_compute, e), an event's synchronize() from any thread, or
//   synchronize()). A wait(queue_h2d / queue_d2h, e) on a copy queue's event is a queued task that
//   runs the other queue up to e first. Compute is the calling thread's ATen ops, so it is done
//   when it is recorded.
// - A copy's destination is poisoned (all bytes 0xFF: NaN in fp32, fp16 and bf16) when the copy is
//   queued, so whoever reads it before waiting for the copy reads NaN.
// - Three ordering rules are checked when a copy is queued; a violation throws, naming the missing
//   dependency (the engine's call is the bug):
//   h2d_overwrite  an h2d copy into a device buffer that compute has read since its previous copy
//                  needs the h2d queue to have waited for a compute event recorded after that read
//                  (the slot's release);
//   d2h_unordered  a d2h copy needs the d2h queue to have waited for the latest compute event (the
//                  compute work that wrote its source);
//   d2h_reuse      a second d2h copy from the same device buffer needs compute to have waited for
//                  the first (compute rewrote the buffer in between, which it may only do once the
//                  first copy has read it).
//   Buffers are tracked while their storage lives, so a freed tensor's address is not confused
//   with its successor.
// What this cannot express: on a GPU a compute-queue wait does not block the host, so the host may
// overwrite pinned memory that a queued copy still reads; here compute waits are host waits. The
// engine's host-side synchronize before rewriting a pinned staging buffer is therefore not
// checked here (README "Engine notes").
#include <c10/core/Storage.h>

#include <algorithm>
#include <cstring>
#include <deque>
#include <functional>
#include <mutex>
#include <vector>

#include "src/common/error.h"
#include "src/engine/backend.h"
#include "src/engine/backend_util.h"

namespace ferry::engine {
namespace {

class strict_backend;

class strict_event final : public event {
 public:
  strict_event(strict_backend* b, queue q, int64_t mark) : backend_(b), queue_(q), mark_(mark) {}
  void synchronize() override;
  bool ready() override;
  queue which() const { return queue_; }
  // copy queues: the number of tasks queued before it; compute: its sequence number (1, 2, ...)
  int64_t mark() const { return mark_; }

 private:
  strict_backend* backend_;
  queue queue_;
  int64_t mark_;
};

class strict_backend final : public backend {
 public:
  strict_backend(int64_t delay_us, uint64_t seed) : backend(delay_us, seed) {}
  ~strict_backend() override {
    try {
      synchronize();
    } catch (...) {
    }
  }

  at::Device device() const override { return at::Device(at::kCPU); }
  bool is_cuda() const override { return false; }
  std::string name() const override { return "host CPU (strict)"; }

  void* host_alloc(size_t bytes) override { return detail::host_alloc_aligned(bytes); }
  void host_free(void* p) override { std::free(p); }

  void copy_h2d(const at::Tensor& dst, const void* src, size_t bytes) override {
    debug_delay();
    std::lock_guard<std::mutex> lock(mu_);
    region& r = region_for(h2d_regions_, dst);
    FERRY_ASSERT(r.read_since_seq < 0 || lanes_[h2d].waited_compute > r.read_since_seq,
                 "bug (strict backend, h2d_overwrite): an h2d copy overwrites a device buffer that compute has read "
                 "since its previous copy, and the h2d queue has not waited for a compute event recorded after that "
                 "read (a missing wait(queue_h2d, <release event>))");
    std::memset(dst.data_ptr(), 0xFF, bytes);
    lane& l = lanes_[h2d];
    l.tasks.push_back([dst, src, bytes] { std::memcpy(dst.data_ptr(), src, bytes); });
    r.last_copy = ++l.queued;
    r.read_since_seq = -1;
  }

  void copy_d2h(void* dst, const at::Tensor& src, size_t bytes) override {
    debug_delay();
    std::lock_guard<std::mutex> lock(mu_);
    lane& l = lanes_[d2h];
    FERRY_ASSERT(l.waited_compute >= compute_seq_,
                 "bug (strict backend, d2h_unordered): a d2h copy is queued without the d2h queue waiting for the "
                 "latest compute event (a missing record(queue_compute) + wait(queue_d2h, ...) after the work that "
                 "wrote its source)");
    region& r = region_for(d2h_regions_, src);
    FERRY_ASSERT(r.last_copy <= compute_waited_d2h_,
                 "bug (strict backend, d2h_reuse): a second d2h copy from a device buffer, but compute never waited "
                 "for the first one, so it rewrote the buffer while the first copy could still be reading it (a "
                 "missing wait(queue_compute, <copied event>))");
    std::memset(dst, 0xFF, bytes);
    l.tasks.push_back([dst, src, bytes] { std::memcpy(dst, src.data_ptr(), bytes); });
    r.last_copy = ++l.queued;
  }

  event_ptr record(queue q, bool) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (q == queue::queue_compute) return std::make_shared<strict_event>(this, q, ++compute_seq_);
    return std::make_shared<strict_event>(this, q, lanes_[lane_of(q)].queued);
  }

  void wait(queue waiter, const event_ptr& e) override {
    FERRY_ASSERT(e != nullptr, "bug: wait on a null event");
    auto* se = dynamic_cast<strict_event*>(e.get());
    FERRY_ASSERT(se != nullptr, "bug: an event of another backend");
    std::lock_guard<std::mutex> lock(mu_);
    if (waiter == queue::queue_compute) {
      if (se->which() == queue::queue_compute) return;
      run_until(lane_of(se->which()), se->mark());
      if (se->which() == queue::queue_h2d) {
        // compute may now read the buffer whose copy this event marks the end of (the engine
        // records each copy's event right after it), until compute's next record
        for (auto& r : h2d_regions_)
          if (r.last_copy == se->mark()) r.read_since_seq = compute_seq_;
      } else {
        compute_waited_d2h_ = std::max(compute_waited_d2h_, se->mark());
      }
      return;
    }
    lane& l = lanes_[lane_of(waiter)];
    if (se->which() == queue::queue_compute) {
      l.waited_compute = std::max(l.waited_compute, se->mark());
      return;
    }
    if (se->which() == waiter) return;  // a queue is in order with itself
    const int other = lane_of(se->which());
    const int64_t mark = se->mark();
    l.tasks.push_back([this, other, mark] { run_until(other, mark); });
    ++l.queued;
  }

  double elapsed_ms(const event_ptr&, const event_ptr&) override { return 0; }

  void synchronize() override {
    std::lock_guard<std::mutex> lock(mu_);
    run_until(h2d, lanes_[h2d].queued);
    run_until(d2h, lanes_[d2h].queued);
  }

  std::shared_ptr<void> enter_compute() override { return nullptr; }
  device_memory_stats memory_stats() override { return {}; }
  void reset_memory_peak() override {}
  void limit_memory(double) override {}

  void run_to(queue q, int64_t mark) {
    std::lock_guard<std::mutex> lock(mu_);
    run_until(lane_of(q), mark);
  }
  bool reached(queue q, int64_t mark) {
    std::lock_guard<std::mutex> lock(mu_);
    return lanes_[lane_of(q)].done >= mark;
  }

 private:
  static constexpr int h2d = 0, d2h = 1;
  static int lane_of(queue q) { return q == queue::queue_h2d ? h2d : d2h; }

  struct lane {
    std::deque<std::function<void()>> tasks;   // queued, not yet run
    int64_t queued = 0, done = 0;               // tasks ever queued / run
    int64_t waited_compute = 0;                 // the latest compute event this queue waits for
  };
  struct region {
    region(c10::weak_intrusive_ptr<c10::StorageImpl> s, const void* p) : storage(std::move(s)), ptr(p) {}
    c10::weak_intrusive_ptr<c10::StorageImpl> storage;
    const void* ptr;
    int64_t last_copy = 0;        // the queue's task count after this buffer's latest copy (0: none)
    int64_t read_since_seq = -1;  // h2d: the compute sequence number when compute was allowed to read it
  };

  // The record of a device buffer (by address and live storage); dead buffers' records are dropped.
  region& region_for(std::vector<region>& regions, const at::Tensor& t) {
    regions.erase(std::remove_if(regions.begin(), regions.end(), [](const region& r) { return r.storage.expired(); }),
                  regions.end());
    for (auto& r : regions)
      if (r.ptr == t.data_ptr() && r.storage.lock().get() == t.storage().unsafeGetStorageImpl()) return r;
    regions.emplace_back(t.storage().getWeakStorageImpl(), t.data_ptr());
    return regions.back();
  }

  // Runs lane k's tasks until `mark` of them have run. Called with mu_ held; a task that waits for
  // the other queue runs that one first (still under mu_).
  void run_until(int k, int64_t mark) {
    lane& l = lanes_[k];
    while (l.done < mark) {
      FERRY_ASSERT(!l.tasks.empty(), "bug (strict backend): an event past the end of its queue");
      std::function<void()> task = std::move(l.tasks.front());
      l.tasks.pop_front();
      task();
      ++l.done;
    }
  }

  std::mutex mu_;
  lane lanes_[2];
  int64_t compute_seq_ = 0;
  int64_t compute_waited_d2h_ = 0;   // the latest d2h event compute has waited for
  std::vector<region> h2d_regions_, d2h_regions_;
};

void strict_event::synchronize() {
  if (queue_ == queue::queue_compute) return;
  backend_->run_to(queue_, mark_);
}

bool strict_event::ready() { return queue_ == queue::queue_compute || backend_->reached(queue_, mark_); }

}  // namespace

std::unique_ptr<backend> make_strict_host_backend(int64_t debug_delay_us, uint64_t seed) {
  return std::make_unique<strict_backend>(debug_delay_us, seed);
}

}  // namespace ferry::engine
