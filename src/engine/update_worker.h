#pragma once
// The CPU side of the step: one thread that runs host tasks (gradient statistics, AdamW updates,
// rollbacks), each spread over the optimizer's oneTBB arena. Tasks carry the device event they
// must wait for (the gradient copy), so the engine's thread never blocks on them; it blocks only
// where it needs a result (wait_idle, the statistics before the verdict, or a unit's update before
// that unit's weights are copied to the device again).
//
// Order: tasks run in the order queued, except that tasks queued `ahead` run before all others
// (in their own order), and updates queued `by_unit` run after all others, lowest unit first (the
// next forward's order), each unit's in the order queued. One exception keeps the thread busy:
// while the next task queued ahead is not `ready` (its gradient is still being copied), the first
// update queued by unit whose unit has no task queued before it runs instead. The engine queues by
// unit only the speculative updates of a step whose gradient tasks it queues ahead, and queues
// nothing else until those have run (train_step's deferred speculation).
// An update queued in parts (submit_update_parts) goes back to its place in the queue after each
// part but the last, so whatever would run before it there runs between its parts: a gradient task
// whose copy is done, then a lower unit's update. A long update of a unit the next forward needs
// late does not hold back one it needs sooner.
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <thread>
#include <utility>
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
  // This is the one place a unit's version moves. by_unit: see the order above.
  // part_of >= 0: u is a second part of unit part_of (its own unit number, so its own version and
  // place in the by-unit order; the embedding's rows the next forward does not gather first): the
  // update also reads part_of's host buffers, so wait_unit_tasks(part_of) waits for it too, and it
  // never runs before the gradient tasks of part_of queued before it.
  void submit_update(int64_t u, std::function<void()> fn, bool by_unit = false, int64_t part_of = -1);
  // An update queued by unit that runs as fn(0), fn(1), ..., fn(parts - 1), with other tasks
  // possibly between them (the order above). The unit's version moves after the last part; a part
  // that throws ends the update (the later parts do not run).
  void submit_update_parts(int64_t u, int64_t parts, std::function<void(int64_t)> fn);
  // Queues a task that reads unit u's host buffers without changing its weights (gradient
  // accumulation, statistics). wait_unit_tasks(u) waits for it, wait_updated(u) does not.
  // `ready` (ahead only; empty: always) says whether fn would run without blocking.
  void submit_task(int64_t u, std::function<void()> fn, bool ahead = false, std::function<bool()> ready = {});
  // Updates queued so far for unit u (a device copy loaded at this version is current).
  int64_t queued_version(int64_t u) const { return unit_queued_[size_t(u)]; }
  // Blocks until every update queued so far for unit u has run. Returns the ms waited.
  double wait_updated(int64_t u);
  // Whether every update queued so far for unit u has run (wait_updated would return at once).
  bool updated(int64_t u);
  // Blocks until every task queued so far for unit u (of any kind: gradient tasks and updates)
  // has run, so a host buffer those tasks read can be overwritten. Returns the ms waited.
  double wait_unit_tasks(int64_t u);
  // Blocks until every queued gradient task has run (updates may still be queued); rethrows the
  // first task exception. Returns the ms waited.
  double wait_tasks();
  // Blocks until every queued task has run; rethrows the first task exception.
  double wait_idle();
  // Updates queued and not yet finished.
  int64_t pending_updates();
  // Times an update queued in parts went back to the queue after a part (tests).
  int64_t later_parts_run();
  // Milliseconds the worker spent running tasks since the last call: all of them, and of those the
  // gradient tasks' (copy waits, sums, statistics; not updates) in *tasks_ms.
  double take_busy_ms(double* tasks_ms = nullptr);

 private:
  struct entry {
    std::function<void()> fn;
    int64_t unit = -1, version = -1;   // version -1: a gradient task
    std::function<bool()> ready;
    int64_t part_of = -1;    // submit_update's part_of
    // submit_update_parts: fn_part(part) for part = next_part, ..., parts - 1.
    std::function<void(int64_t)> fn_part;
    int64_t parts = 1, next_part = 0;
  };
  void loop();
  void submit(entry e, int64_t cls);
  void rethrow_locked();

  std::mutex mu_;
  std::condition_variable cv_task_, cv_done_;
  // Queued, keyed (class, sequence): class 0 tasks queued ahead, 1 the rest in their order, 2 + unit
  // updates queued by unit. The lowest key runs next.
  using queue_type = std::map<std::pair<int64_t, int64_t>, entry>;
  queue_type queue_;
  // The entry to run next (mu_ held, queue_ not empty).
  queue_type::iterator next_locked();
  int64_t seq_ = 0;

  std::vector<int64_t> unit_version_;   // per unit: updates run (the engine thread's waits)
  std::vector<int64_t> unit_queued_;    // per unit: updates queued (engine thread only)
  std::vector<int64_t> unit_pending_;   // per unit: tasks of any kind queued or running
  std::vector<int64_t> unit_tasks_queued_;   // per unit: gradient tasks queued, not yet started
  int64_t pending_tasks_ = 0, pending_updates_ = 0;   // queued or running, of each kind
  int64_t later_parts_ = 0;
  bool stop_ = false;
  double busy_ms_ = 0, busy_tasks_ms_ = 0;
  std::exception_ptr error_;
  std::thread thread_;
};

}  // namespace ferry::engine
