// CUDA runtime helpers: pinned and device buffers (exact size, round trip through the GPU on an
// owned stream), events, host callbacks, memory info, and the pinning error message.
#include <gtest/gtest.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "gpu/ops.h"
#include "gpu/runtime.h"
#include "src/common/error.h"
#include "tests/gpu/gpu_test_util.h"

namespace {

using namespace ferry::gpu;

TEST(runtime, pinned_round_trip_through_device) {
  FERRY_REQUIRE_DEVICE();
  const size_t bytes = (1 << 20) + 3;  // exact, not rounded
  pinned_buffer src(bytes), dst(bytes);
  ASSERT_EQ(src.bytes(), bytes);
  for (size_t i = 0; i < bytes; ++i) src.as<uint8_t>()[i] = static_cast<uint8_t>(i * 31 + 7);
  std::memset(dst.data(), 0, bytes);
  device_buffer dev(bytes);
  ASSERT_EQ(dev.bytes(), bytes);
  stream s;
  event done(true), start(true);
  start.record(s.get());
  copy_async(dev.data(), src.data(), bytes, cudaMemcpyHostToDevice, s.get());
  copy_async(dst.data(), dev.data(), bytes, cudaMemcpyDeviceToHost, s.get());
  done.record(s.get());
  done.synchronize();
  EXPECT_TRUE(done.query());
  EXPECT_GE(event::elapsed_ms(start, done), 0.f);
  EXPECT_EQ(std::memcmp(src.data(), dst.data(), bytes), 0);
}

TEST(runtime, buffers_are_move_only_owners) {
  FERRY_REQUIRE_DEVICE();
  pinned_buffer a(64);
  void* p = a.data();
  pinned_buffer b(std::move(a));
  EXPECT_EQ(b.data(), p);
  EXPECT_EQ(a.data(), nullptr);
  EXPECT_EQ(a.bytes(), 0u);
  pinned_buffer empty(0);
  EXPECT_EQ(empty.data(), nullptr);
  device_buffer d(128), e;
  e = std::move(d);
  EXPECT_EQ(e.bytes(), 128u);
}

TEST(runtime, host_func_runs_in_stream_order) {
  FERRY_REQUIRE_DEVICE();
  stream s;
  std::vector<int> order;
  std::atomic<int> calls{0};
  for (int i = 0; i < 4; ++i) launch_host_func(s.get(), [&order, &calls, i] { order.push_back(i); ++calls; });
  event e;
  e.record(s.get());
  s.wait(e);
  s.synchronize();
  EXPECT_EQ(calls.load(), 4);
  EXPECT_EQ(order, (std::vector<int>{0, 1, 2, 3}));
}

TEST(runtime, memory_info_is_sane) {
  FERRY_REQUIRE_DEVICE();
  const memory_info_t info = memory_info();
  EXPECT_GT(info.total_bytes, 0u);
  EXPECT_LE(info.free_bytes, info.total_bytes);
}

TEST(runtime, impossible_allocations_throw_clear_errors) {
  FERRY_REQUIRE_DEVICE();
  const size_t huge = size_t{1} << 52;  // 4 PiB
  try {
    pinned_buffer b(huge);
    FAIL() << "pinning 4 PiB succeeded";
  } catch (const ferry::error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("could not pin"), std::string::npos) << msg;
    EXPECT_NE(msg.find(std::to_string(huge)), std::string::npos) << msg;
  }
  EXPECT_THROW(device_buffer d(huge), ferry::error);
  // The failures left no sticky error behind.
  device_buffer ok(16);
  EXPECT_NE(ok.data(), nullptr);
}

}  // namespace
