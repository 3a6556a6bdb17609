#include "src/engine/backend_util.h"

#include <chrono>
#include <cstdlib>
#include <thread>

#include "src/common/error.h"

namespace ferry::engine::detail {

void* host_alloc_aligned(size_t bytes) {
  void* p = nullptr;
  const size_t rounded = (bytes + 63) / 64 * 64;
  FERRY_CHECK(posix_memalign(&p, 64, rounded == 0 ? 64 : rounded) == 0, "cannot allocate ", bytes,
              " bytes of host memory; reduce the model size or free memory");
  return p;
}

void* alloc_bytes(size_t bytes, const char* what) {
  void* p = nullptr;
  FERRY_CHECK(posix_memalign(&p, 64, bytes == 0 ? 64 : (bytes + 63) / 64 * 64) == 0, "cannot allocate ", bytes >> 20,
              " MiB of host memory for ", what, "; train a smaller model or add memory");
  return p;
}

float* alloc_floats(int64_t n, const char* what) {
  return static_cast<float*>(alloc_bytes(static_cast<size_t>(n) * sizeof(float), what));
}

void random_delay::operator()() {
  if (max_us_ <= 0) return;
  int64_t us;
  {
    std::lock_guard<std::mutex> lock(mu_);
    us = std::uniform_int_distribution<int64_t>(0, max_us_)(rng_);
  }
  std::this_thread::sleep_for(std::chrono::microseconds(us));
}

}  // namespace ferry::engine::detail
