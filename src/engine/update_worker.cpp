#include "src/engine/update_worker.h"

#include <algorithm>
#include <chrono>

#include "src/engine/trace.h"

namespace ferry::engine {
namespace {
double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}
}  // namespace

update_worker::update_worker(int64_t num_units, std::function<void()> on_start)
    : unit_version_(num_units, 0), unit_queued_(num_units, 0), unit_pending_(num_units, 0),
      unit_tasks_queued_(num_units, 0),
      thread_([this, on_start = std::move(on_start)] {
        if (on_start) on_start();
        loop();
      }) {}

update_worker::~update_worker() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_task_.notify_all();
  thread_.join();
}

void update_worker::submit(entry e, int64_t cls) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    const bool task = e.version < 0;
    if (task) ++pending_tasks_;
    else ++pending_updates_;
    if (e.unit >= 0) ++unit_pending_[size_t(e.unit)];
    if (e.part_of >= 0) ++unit_pending_[size_t(e.part_of)];
    if (e.unit >= 0 && task) ++unit_tasks_queued_[size_t(e.unit)];
    queue_.emplace(std::make_pair(cls, seq_++), std::move(e));
  }
  cv_task_.notify_one();
}

void update_worker::submit_update(int64_t u, std::function<void()> fn, bool by_unit, int64_t part_of) {
  entry e;
  e.fn = std::move(fn);
  e.unit = u;
  e.version = ++unit_queued_[size_t(u)];
  e.part_of = part_of;
  submit(std::move(e), by_unit ? 2 + u : 1);
}

void update_worker::submit_update_parts(int64_t u, int64_t parts, std::function<void(int64_t)> fn) {
  entry e;
  e.fn_part = std::move(fn);
  e.unit = u;
  e.version = ++unit_queued_[size_t(u)];
  e.parts = std::max<int64_t>(1, parts);
  submit(std::move(e), 2 + u);
}

void update_worker::submit_task(int64_t u, std::function<void()> fn, bool ahead, std::function<bool()> ready) {
  entry e;
  e.fn = std::move(fn);
  e.unit = u;
  e.version = -1;
  if (ahead) e.ready = std::move(ready);
  submit(std::move(e), ahead ? 0 : 1);
}

update_worker::queue_type::iterator update_worker::next_locked() {
  auto it = queue_.begin();
  if (it->first.first != 0 || !it->second.ready || it->second.ready()) return it;
  for (auto jt = queue_.lower_bound({2, 0}); jt != queue_.end(); ++jt) {
    const entry& e = jt->second;
    if (unit_tasks_queued_[size_t(e.unit)] == 0 && (e.part_of < 0 || unit_tasks_queued_[size_t(e.part_of)] == 0))
      return jt;
  }
  return it;
}

void update_worker::loop() {
  for (;;) {
    entry e;
    queue_type::key_type key;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_task_.wait(lock, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;
      auto it = next_locked();
      key = it->first;
      e = std::move(it->second);
      queue_.erase(it);
      if (e.unit >= 0 && e.version < 0) --unit_tasks_queued_[size_t(e.unit)];
    }
    auto t0 = std::chrono::steady_clock::now();
    const double trace_t0 = trace::enabled() ? trace::now_ms() : 0;
    std::exception_ptr err;
    try {
      if (e.fn_part) e.fn_part(e.next_part);
      else e.fn();
    } catch (...) {
      err = std::current_exception();
    }
    const double ms = ms_since(t0);
    if (trace::enabled()) trace::record(e.version < 0 ? "task" : "update", e.unit, trace_t0, trace::now_ms());
    // Parts left: back to its place in the queue, still pending (its unit's waits go on).
    if (!err && e.fn_part && ++e.next_part < e.parts) {
      std::lock_guard<std::mutex> lock(mu_);
      busy_ms_ += ms;
      ++later_parts_;
      queue_.emplace(key, std::move(e));
      continue;
    }
    e.fn = nullptr;   // captured state goes before the waiters resume
    e.fn_part = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      busy_ms_ += ms;
      if (e.version < 0) busy_tasks_ms_ += ms;
      if (err && !error_) error_ = err;
      if (e.version >= 0) {
        if (e.version > unit_version_[size_t(e.unit)]) unit_version_[size_t(e.unit)] = e.version;
        --pending_updates_;
      } else {
        --pending_tasks_;
      }
      if (e.unit >= 0) --unit_pending_[size_t(e.unit)];
      if (e.part_of >= 0) --unit_pending_[size_t(e.part_of)];
    }
    cv_done_.notify_all();
  }
}

void update_worker::rethrow_locked() {
  if (!error_) return;
  auto e = error_;
  error_ = nullptr;
  std::rethrow_exception(e);
}

double update_worker::wait_updated(int64_t u) {
  const int64_t version = unit_queued_[size_t(u)];
  auto t0 = std::chrono::steady_clock::now();
  std::unique_lock<std::mutex> lock(mu_);
  cv_done_.wait(lock, [&] { return unit_version_[size_t(u)] >= version || error_; });
  if (error_) std::rethrow_exception(error_);
  return ms_since(t0);
}

bool update_worker::updated(int64_t u) {
  const int64_t version = unit_queued_[size_t(u)];
  std::lock_guard<std::mutex> lock(mu_);
  return unit_version_[size_t(u)] >= version;
}

double update_worker::wait_unit_tasks(int64_t u) {
  auto t0 = std::chrono::steady_clock::now();
  std::unique_lock<std::mutex> lock(mu_);
  cv_done_.wait(lock, [&] { return unit_pending_[size_t(u)] == 0 || error_; });
  if (error_) std::rethrow_exception(error_);
  return ms_since(t0);
}

double update_worker::wait_tasks() {
  auto t0 = std::chrono::steady_clock::now();
  std::unique_lock<std::mutex> lock(mu_);
  cv_done_.wait(lock, [&] { return pending_tasks_ == 0 || error_; });
  rethrow_locked();
  return ms_since(t0);
}

double update_worker::wait_idle() {
  auto t0 = std::chrono::steady_clock::now();
  std::unique_lock<std::mutex> lock(mu_);
  cv_done_.wait(lock, [&] { return pending_tasks_ == 0 && pending_updates_ == 0; });
  rethrow_locked();
  return ms_since(t0);
}

int64_t update_worker::pending_updates() {
  std::lock_guard<std::mutex> lock(mu_);
  return pending_updates_;
}

int64_t update_worker::later_parts_run() {
  std::lock_guard<std::mutex> lock(mu_);
  return later_parts_;
}

double update_worker::take_busy_ms(double* tasks_ms) {
  std::lock_guard<std::mutex> lock(mu_);
  double ms = busy_ms_;
  if (tasks_ms) *tasks_ms = busy_tasks_ms_;
  busy_ms_ = busy_tasks_ms_ = 0;
  return ms;
}

}  // namespace ferry::engine
