// The update thread's queue on its own (src/engine/update_worker.h): tasks queued ahead run before
// everything queued earlier, updates queued by unit run last and lowest unit first, and each wait
// waits for what it names and no more. The engine's use of it (deferred speculation) is in
// engine_test (engine_speculation.a_deferred_step_ends_before_its_updates).
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <future>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "src/engine/update_worker.h"

namespace ferry::engine::test {
namespace {

// Holds the worker in its first task until open() so that what follows is all queued at once.
struct gate {
  std::promise<void> p;
  std::shared_future<void> f = p.get_future().share();
  void hold(update_worker& w) {
    w.submit_task(-1, [f = f] { f.wait(); });
  }
  void open() { p.set_value(); }
};

TEST(update_worker, ahead_first_by_unit_last_lowest_unit_first) {
  update_worker w(5);
  std::mutex mu;
  std::string order;
  auto note = [&](char c) {
    return [&, c] {
      std::lock_guard<std::mutex> lock(mu);
      order += c;
    };
  };
  gate g;
  g.hold(w);
  w.submit_update(3, note('A'), /*by_unit=*/true);
  w.submit_task(1, note('B'));
  w.submit_task(2, note('C'), /*ahead=*/true);
  w.submit_update(0, note('D'), /*by_unit=*/true);
  w.submit_update(3, note('E'), /*by_unit=*/true);
  w.submit_task(4, note('F'), /*ahead=*/true);
  w.submit_update(2, note('G'));
  g.open();
  w.wait_idle();
  // Ahead in their order (C F), then the rest in theirs (B G), then by unit: 0 (D), 3 (A E).
  EXPECT_EQ(order, "CFBGDAE");
  EXPECT_EQ(w.queued_version(3), 2);
  EXPECT_EQ(w.queued_version(0), 1);
}

TEST(update_worker, wait_tasks_leaves_the_updates_running) {
  update_worker w(2);
  gate g, slow;
  std::atomic<bool> stats_done{false}, update_done{false};
  g.hold(w);
  w.submit_update(0, [&, f = slow.f] {
    f.wait();
    update_done = true;
  }, /*by_unit=*/true);
  w.submit_task(1, [&] { stats_done = true; }, /*ahead=*/true);
  g.open();
  w.wait_tasks();
  EXPECT_TRUE(stats_done);
  EXPECT_FALSE(update_done);
  EXPECT_EQ(w.pending_updates(), 1);
  slow.open();
  w.wait_updated(0);
  EXPECT_TRUE(update_done);
  w.wait_idle();
  EXPECT_EQ(w.pending_updates(), 0);
}

// A host buffer a queued update reads may be overwritten only after that update: wait_unit_tasks
// waits for updates too, and only for the unit's own.
TEST(update_worker, wait_unit_tasks_covers_the_units_updates) {
  update_worker w(3);
  gate g, other;
  std::atomic<bool> done{false};
  g.hold(w);
  w.submit_update(2, [&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    done = true;
  }, /*by_unit=*/true);
  w.submit_update(1, [f = other.f] { f.wait(); }, /*by_unit=*/true);
  g.open();
  // Unit 1's update runs first (lowest unit) and waits for `other`; unit 2's has not run, so
  // wait_unit_tasks(2) must not return until it has.
  std::thread opener([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    other.open();
  });
  w.wait_unit_tasks(2);
  EXPECT_TRUE(done);
  opener.join();
  w.wait_idle();
}

// While the next task queued ahead is not ready (its copy is not done), an update queued by unit
// runs instead, but never one whose unit still has a task queued before it (its statistics).
// The order tasks ran in, as letters; the one noted 'D' completes a copy (`copied`) as it runs.
struct run_order {
  std::mutex mu;
  std::string order;
  std::atomic<bool> copied{false};
  std::function<void()> note(char c) {
    return [this, c] {
      std::lock_guard<std::mutex> lock(mu);
      order += c;
      if (c == 'D') copied = true;
    };
  }
};

TEST(update_worker, updates_fill_the_wait_for_a_copy) {
  update_worker w(4);
  run_order r;
  gate g;
  g.hold(w);
  w.submit_task(1, r.note('S'), /*ahead=*/true, [&] { return r.copied.load(); });   // unit 1's statistics
  w.submit_update(1, r.note('U'), /*by_unit=*/true);   // the lowest unit, but it waits for S
  w.submit_update(2, r.note('D'), /*by_unit=*/true);   // runs while S waits
  g.open();
  w.wait_idle();
  EXPECT_EQ(r.order, "DSU");
}

// A second part of a unit (submit_update's part_of: the embedding's rows not needed first) has its
// own version and place, last in the by-unit order, but belongs to its unit for the rest: it does
// not fill the wait for that unit's copy (its statistics come first), and wait_unit_tasks of that
// unit waits for it, while wait_updated of that unit does not.
TEST(update_worker, a_second_part_waits_for_its_units_tasks) {
  {
    update_worker w(4);   // units 0, 2, 3, and 1: the second part of unit 0
    run_order r;
    gate g;
    g.hold(w);
    w.submit_task(0, r.note('S'), /*ahead=*/true, [&] { return r.copied.load(); });   // unit 0's statistics
    w.submit_update(0, r.note('H'), /*by_unit=*/true);
    w.submit_update(1, r.note('C'), /*by_unit=*/true, /*part_of=*/0);
    w.submit_update(3, r.note('D'), /*by_unit=*/true);   // completes the copy
    g.open();
    w.wait_idle();
    // D fills the wait for the copy; C may not, though it comes first in the by-unit order.
    EXPECT_EQ(r.order, "DSHC");
    EXPECT_EQ(w.queued_version(1), 1);
    EXPECT_EQ(w.queued_version(0), 1);
  }
  update_worker w(2);
  gate g, rest;
  std::atomic<bool> returned{false}, part_done{false};
  g.hold(w);
  w.submit_update(0, [] {}, /*by_unit=*/true);
  w.submit_update(1, [&, f = rest.f] {
    f.wait();
    part_done = true;
  }, /*by_unit=*/true, /*part_of=*/0);
  g.open();
  w.wait_updated(0);   // does not wait for the second part
  EXPECT_FALSE(part_done);
  std::thread waiter([&] {
    w.wait_unit_tasks(0);   // does
    returned = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  EXPECT_FALSE(returned) << "wait_unit_tasks(0) returned while unit 0's second part was still queued";
  rest.open();
  waiter.join();
  EXPECT_TRUE(part_done);
  w.wait_idle();
}

// An update queued in parts (submit_update_parts: the engine's deferred AdamW steps) goes back to
// its place after each part, so a gradient task whose copy completed meanwhile runs next, then the
// lower unit's update that task released, and only then the rest of the parts. The unit counts as
// updated only after its last part. A part that throws ends the update: the rest do not run, the
// waits rethrow, and the unit's version moves as for any failed update.
TEST(update_worker, an_update_in_parts_lets_lower_units_in_between) {
  {
    update_worker w(4);
    run_order r;
    gate g;
    std::atomic<int> updated_early{0};
    g.hold(w);
    w.submit_task(1, r.note('S'), /*ahead=*/true, [&] { return r.copied.load(); });   // unit 1's statistics
    w.submit_update(1, r.note('U'), /*by_unit=*/true);
    w.submit_update_parts(3, 3, [&, note = r.note('D')](int64_t part) {
      if (part == 0) note();   // completes S's copy
      else r.note(char('0' + part))();
      if (part > 0 && w.updated(3)) ++updated_early;
    });
    g.open();
    w.wait_idle();
    EXPECT_EQ(r.order, "DSU12") << "D is part 0 of unit 3; S and U must run between its parts";
    EXPECT_EQ(updated_early.load(), 0) << "unit 3 counted as updated before its last part";
    EXPECT_TRUE(w.updated(3));
    EXPECT_EQ(w.queued_version(3), 1);
    EXPECT_EQ(w.later_parts_run(), 2);
  }
  update_worker w(2);
  std::string ran;
  w.submit_update_parts(0, 3, [&](int64_t part) {
    ran += char('0' + part);
    if (part == 1) throw std::runtime_error("part 1");
  });
  EXPECT_THROW(w.wait_idle(), std::runtime_error);
  EXPECT_EQ(ran, "01");
  EXPECT_TRUE(w.updated(0));
  w.submit_update_parts(1, 2, [&](int64_t part) { ran += char('a' + part); });
  EXPECT_NO_THROW(w.wait_idle());
  EXPECT_EQ(ran, "01ab");
}

TEST(update_worker, a_failed_task_is_rethrown_by_the_waits) {
  update_worker w(1);
  w.submit_task(0, [] { throw std::runtime_error("boom"); }, /*ahead=*/true);
  EXPECT_THROW(w.wait_tasks(), std::runtime_error);
  w.submit_update(0, [] {}, /*by_unit=*/true);
  EXPECT_NO_THROW(w.wait_idle());
}

}  // namespace
}  // namespace ferry::engine::test
