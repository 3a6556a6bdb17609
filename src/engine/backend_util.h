#pragma once
// Pieces the backends share (backend_host.cpp, backend_strict.cpp, backend_cuda.cpp).
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <random>

namespace ferry::engine::detail {

// 64-byte aligned host memory for the host backends (at least 64 bytes; free with std::free).
// Throws ferry::error naming the size when the host cannot provide it.
void* host_alloc_aligned(size_t bytes);
// n floats of 64-byte aligned pageable host memory (free with std::free) for `what` (the optimizer
// state, the accumulation buffers, ...): the error names it and the size.
float* alloc_floats(int64_t n, const char* what);
// `bytes` of 64-byte aligned pageable host memory (free with std::free) for `what`, as alloc_floats.
void* alloc_bytes(size_t bytes, const char* what);

// Race testing (engine_options::debug_delay_us): each call sleeps a random 0..max_us, from a
// seeded generator shared by the threads that call it. max_us <= 0: no delay.
class random_delay {
 public:
  random_delay(int64_t max_us, uint64_t seed) : max_us_(max_us), rng_(seed) {}
  void operator()();

 private:
  int64_t max_us_;
  std::mutex mu_;
  std::mt19937_64 rng_;
};

}  // namespace ferry::engine::detail
