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
  // on_start runs first on the worker's thread (the engine binds it to the device there).
  explicit update_worker(int64_t num_units, std::function<void()> on_start = {});
  ~update_worker();
  update_worker(const update_worker&) = delete;
  update_worker& operator=(const update_worker&) = delete;

  // Queues an update of unit u's weights (an AdamW step, a fix-up, or an empty task after the
  // weights changed elsewhere): the unit's host copy is stale for the device until it has run.
  // This is the one place a unit's version moves.
  void submit_update(int64_t u, std::function<void()> fn);
  // Queues a task that reads unit u's host buffers without changing its weights (gradient
  // accumulation, statistics): wait_unit_tasks(u) waits for it, wait_updated(u) does not.
  void submit_task(int64_t u, std::function<void()> fn);
  // Updates queued so far for unit u (a device copy loaded at this version is current).
  int64_t queued_version(int64_t u) const { return unit_queued_[size_t(u)]; }
  // Blocks until every update queued so far for unit u has run. Returns the ms waited.
  double wait_updated(int64_t u);
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
  void submit(std::function<void()> fn, int64_t unit, int64_t version);

  std::vector<int64_t> unit_version_;     // per unit: updates run (the engine thread's waits)
  std::vector<int64_t> unit_queued_;      // per unit: updates queued (engine thread only)
  std::vector<int64_t> unit_last_task_;   // per unit: sequence number of its last queued task
  int64_t submitted_ = 0, finished_ = 0;  // tasks run in order, so finished_ is a sequence number
  int64_t pending_ = 0;
  bool stop_ = false;
  double busy_ms_ = 0;
  std::exception_ptr error_;
  std::thread thread_;
};

}  // namespace ferry::engine
