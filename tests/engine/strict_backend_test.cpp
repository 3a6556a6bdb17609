// The strict host backend on its own (src/engine/backend_strict.cpp): copies complete only when
// waited for, their destinations read NaN until then, and each ordering rule throws on the misuse it
// names while the correct sequence passes. The engine-level evidence (each record/wait removed from
// the engine fails engine_test under this backend) is listed in README "Engine notes".
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <thread>

#include "src/common/error.h"
#include "src/engine/backend.h"

namespace ferry::engine::test {
namespace {

using q = queue;

at::Tensor filled(int64_t n, float v) { return at::full({n}, v, at::kFloat); }

// Expects `f` to throw a bug naming `rule`.
template <class F>
void expect_rule(const std::string& rule, F&& f) {
  try {
    f();
    ADD_FAILURE() << "no violation of " << rule;
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find(rule), std::string::npos) << e.what();
  }
}

TEST(strict_backend, h2d_copy_lands_only_when_waited_for) {
  auto b = make_strict_host_backend();
  std::vector<float> host(8, 3.0f);
  at::Tensor dev = filled(8, 1.0f);
  b->copy_h2d(dev, host.data(), 8 * sizeof(float));
  event_ptr ready = b->record(q::queue_h2d);
  EXPECT_TRUE(std::isnan(dev[0].item<float>())) << "a read before the wait must see the poison";
  b->wait(q::queue_compute, ready);
  EXPECT_EQ(dev[7].item<float>(), 3.0f);
}

TEST(strict_backend, d2h_copy_lands_when_any_thread_synchronizes) {
  auto b = make_strict_host_backend();
  std::vector<float> host(4, 0.0f);
  at::Tensor dev = filled(4, 5.0f);
  event_ptr computed = b->record(q::queue_compute);
  b->wait(q::queue_d2h, computed);
  b->copy_d2h(host.data(), dev, 4 * sizeof(float));
  event_ptr copied = b->record(q::queue_d2h);
  EXPECT_TRUE(std::isnan(host[0]));
  std::thread worker([&] { copied->synchronize(); });
  worker.join();
  EXPECT_EQ(host[3], 5.0f);
}

TEST(strict_backend, h2d_overwrite_needs_the_release) {
  std::vector<float> host(4, 1.0f);
  for (bool released : {true, false}) {
    auto b = make_strict_host_backend();
    at::Tensor slot = filled(4, 0.0f);
    b->copy_h2d(slot, host.data(), 16);
    b->wait(q::queue_compute, b->record(q::queue_h2d));   // compute reads the slot
    event_ptr release = b->record(q::queue_compute);
    if (released) {
      b->wait(q::queue_h2d, release);
      EXPECT_NO_THROW(b->copy_h2d(slot, host.data(), 16));
    } else {
      expect_rule("h2d_overwrite", [&] { b->copy_h2d(slot, host.data(), 16); });
    }
  }
}

TEST(strict_backend, d2h_needs_the_compute_before_it) {
  std::vector<float> host(4);
  auto b = make_strict_host_backend();
  at::Tensor g = filled(4, 2.0f);
  b->record(q::queue_compute);   // compute work the copy does not wait for
  expect_rule("d2h_unordered", [&] { b->copy_d2h(host.data(), g, 16); });
}

TEST(strict_backend, d2h_reuse_needs_compute_to_wait_for_the_copy) {
  std::vector<float> host(4);
  for (bool waited : {true, false}) {
    auto b = make_strict_host_backend();
    at::Tensor g = filled(4, 2.0f);
    b->wait(q::queue_d2h, b->record(q::queue_compute));
    b->copy_d2h(host.data(), g, 16);
    event_ptr copied = b->record(q::queue_d2h);
    if (waited) b->wait(q::queue_compute, copied);   // before compute rewrites g
    b->wait(q::queue_d2h, b->record(q::queue_compute));
    if (waited) {
      EXPECT_NO_THROW(b->copy_d2h(host.data(), g, 16));
    } else {
      expect_rule("d2h_reuse", [&] { b->copy_d2h(host.data(), g, 16); });
    }
  }
}

// A freed buffer's address may come back for a new tensor: that is not a reuse.
TEST(strict_backend, a_new_tensor_at_an_old_address_is_a_new_buffer) {
  std::vector<float> host(1024);
  auto b = make_strict_host_backend();
  for (int k = 0; k < 20; ++k) {
    at::Tensor dx = filled(1024, float(k));
    b->wait(q::queue_d2h, b->record(q::queue_compute));
    b->copy_d2h(host.data(), dx, 4096);
    b->record(q::queue_d2h)->synchronize();   // the host waits; compute never does
    EXPECT_EQ(host[1023], float(k));
  }
}

// A wait queued on one copy queue for the other runs the other first.
TEST(strict_backend, cross_queue_wait_orders_the_copies) {
  auto b = make_strict_host_backend();
  std::vector<float> a(4, 7.0f), back(4, 0.0f);
  at::Tensor dev = filled(4, 0.0f);
  b->copy_h2d(dev, a.data(), 16);
  event_ptr in = b->record(q::queue_h2d);
  b->wait(q::queue_d2h, b->record(q::queue_compute));
  b->wait(q::queue_d2h, in);
  b->copy_d2h(back.data(), dev, 16);
  b->record(q::queue_d2h)->synchronize();
  EXPECT_EQ(back[0], 7.0f);
}

}  // namespace
}  // namespace ferry::engine::test
