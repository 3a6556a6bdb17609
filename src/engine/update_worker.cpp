#include "src/engine/update_worker.h"

#include <chrono>

namespace ferry::engine {

update_worker::update_worker(int64_t num_units, std::function<void()> on_start)
    : unit_version_(num_units, 0), unit_queued_(num_units, 0), unit_last_task_(num_units, 0),
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

void update_worker::submit(std::function<void()> fn, int64_t unit, int64_t version) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    tasks_.push_back(std::move(fn));
    marks_.emplace_back(unit, version);
    ++pending_;
    ++submitted_;
    if (unit >= 0) unit_last_task_[unit] = submitted_;
  }
  cv_task_.notify_one();
}

void update_worker::submit_update(int64_t u, std::function<void()> fn) {
  submit(std::move(fn), u, ++unit_queued_[size_t(u)]);
}

void update_worker::submit_task(int64_t u, std::function<void()> fn) { submit(std::move(fn), u, -1); }

void update_worker::loop() {
  for (;;) {
    std::function<void()> fn;
    std::pair<int64_t, int64_t> mark;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_task_.wait(lock, [&] { return stop_ || !tasks_.empty(); });
      if (tasks_.empty()) return;
      fn = std::move(tasks_.front());
      mark = marks_.front();
      tasks_.pop_front();
      marks_.pop_front();
    }
    auto t0 = std::chrono::steady_clock::now();
    std::exception_ptr err;
    try {
      fn();
    } catch (...) {
      err = std::current_exception();
    }
    double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    {
      std::lock_guard<std::mutex> lock(mu_);
      busy_ms_ += ms;
      if (err && !error_) error_ = err;
      if (mark.first >= 0 && mark.second > unit_version_[mark.first]) unit_version_[mark.first] = mark.second;
      --pending_;
      ++finished_;
    }
    cv_done_.notify_all();
  }
}

double update_worker::wait_updated(int64_t u) {
  const int64_t version = unit_queued_[size_t(u)];
  auto t0 = std::chrono::steady_clock::now();
  std::unique_lock<std::mutex> lock(mu_);
  cv_done_.wait(lock, [&] { return unit_version_[u] >= version || error_; });
  if (error_) std::rethrow_exception(error_);
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

double update_worker::wait_unit_tasks(int64_t u) {
  auto t0 = std::chrono::steady_clock::now();
  std::unique_lock<std::mutex> lock(mu_);
  cv_done_.wait(lock, [&] { return finished_ >= unit_last_task_[u] || error_; });
  if (error_) std::rethrow_exception(error_);
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

double update_worker::wait_idle() {
  auto t0 = std::chrono::steady_clock::now();
  std::unique_lock<std::mutex> lock(mu_);
  cv_done_.wait(lock, [&] { return pending_ == 0; });
  if (error_) {
    auto e = error_;
    error_ = nullptr;
    std::rethrow_exception(e);
  }
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

double update_worker::take_busy_ms() {
  std::lock_guard<std::mutex> lock(mu_);
  double ms = busy_ms_;
  busy_ms_ = 0;
  return ms;
}

}  // namespace ferry::engine
