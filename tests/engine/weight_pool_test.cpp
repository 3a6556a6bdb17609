// The weight pool on the host backend (src/engine/weight_pool.h): in overlapped mode, acquiring a
// unit prefetches the next uses only where their updates have run, so the compute of one unit is
// never held back by a later unit's pending update (a deferred step's updates run on behind the
// next forward).
#include <gtest/gtest.h>

#include <chrono>
#include <future>

#include "src/engine/backend.h"
#include "src/engine/param_store.h"
#include "src/engine/step_meter.h"
#include "src/engine/update_worker.h"
#include "src/engine/weight_pool.h"
#include "tests/engine/engine_test_util.h"

namespace ferry::engine::test {
namespace {

TEST(weight_pool, prefetch_does_not_wait_for_a_later_units_update) {
  const model::llama_config cfg = tiny_config();
  engine_options o = base_options(offload_mode::offload_overlapped, at::kFloat);
  ASSERT_GE(o.prefetch, 1);
  auto dev = make_host_backend();
  param_store store(cfg, at::kFloat, *dev, /*optimizer_state=*/false);
  update_worker worker(store.num_units());
  step_meter meter;
  weight_pool pool(cfg, o, *dev, store, worker, meter);
  std::vector<int64_t> uses;
  for (int64_t i = 0; i < cfg.num_hidden_layers; ++i) uses.push_back(store.block_unit(i));
  uses.push_back(store.head_unit());

  // Block 1's update is queued and held: block 0 must still be handed out.
  std::promise<void> open;
  std::shared_future<void> gate = open.get_future().share();
  worker.submit_update(store.block_unit(1), [gate] { gate.wait(); });
  auto first = std::async(std::launch::async, [&] {
    pool.acquire(store.block_unit(0), uses, 0);
    pool.release(store.block_unit(0));
  });
  const bool returned = first.wait_for(std::chrono::seconds(5)) == std::future_status::ready;
  open.set_value();   // lets a blocked acquire finish either way
  first.get();
  EXPECT_TRUE(returned) << "acquire(block 0) waited for block 1's update";
  // Block 1 is then loaded at its own acquire, at the version its update made.
  const at::Tensor& w1 = pool.acquire(store.block_unit(1), uses, 1);
  EXPECT_TRUE(worker.updated(store.block_unit(1)));
  EXPECT_EQ(w1.numel(), store.unit(store.block_unit(1)).numel);
  pool.release(store.block_unit(1));
  worker.wait_idle();
}

}  // namespace
}  // namespace ferry::engine::test
