#pragma once
// The CPU side of the step: one thread that runs host tasks (gradient statistics, AdamW updates,
// rollbacks) in the order they are queued, each spread over the optimizer's oneTBB arena. Tasks
// carry the device event they must wait for (the gradient copy), so the engine's thread never
// blocks on them; it blocks only where it needs a result (wait_idle, or a unit's update before
// that unit's weights are copied to the device again).
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace ferry::engine {

class update_worker {
 public:
  explicit update_worker(int64_t num_units);
  ~update_worker();
  update_worker(const update_worker&) = delete;
  update_worker& operator=(const update_worker&) = delete;

  // Queues `fn`; when it has run, unit `unit` (or none, -1) is marked as updated to `version`.
  void submit(std::function<void()> fn, int64_t unit = -1, int64_t version = 0);
  // Blocks until unit u's update reached `version`. Returns the milliseconds spent waiting.
  double wait_unit(int64_t u, int64_t version);
  // Blocks until every task queued so far for unit u (of any version: gradient accumulations
  // too) has run, so a host buffer those tasks read can be overwritten. Returns the ms waited.
  double wait_unit_tasks(int64_t u);
  // Blocks until every queued task has run; rethrows the first task exception.
  double wait_idle();
  // Milliseconds the worker spent running tasks since the last call.
  double take_busy_ms();

 private:
  void loop();

  std::mutex mu_;
  std::condition_variable cv_task_, cv_done_;
  std::deque<std::function<void()>> tasks_;
  std::deque<std::pair<int64_t, int64_t>> marks_;
  std::vector<int64_t> unit_version_;
  std::vector<int64_t> unit_last_task_;   // per unit: sequence number of its last queued task
  int64_t submitted_ = 0, finished_ = 0;  // tasks run in order, so finished_ is a sequence number
  int64_t pending_ = 0;
  bool stop_ = false;
  double busy_ms_ = 0;
  std::exception_ptr error_;
  std::thread thread_;
};

}  // namespace ferry::engine
