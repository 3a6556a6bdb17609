#pragma once
// Test sources built twice, for the CPU and (with FERRY_TEST_CUDA=1, label gpu) for CUDA, ask here
// which build they are in and skip the CUDA build's tests where no device is usable.
#include <gtest/gtest.h>

namespace ferry::test {
#if defined(FERRY_TEST_CUDA) && FERRY_TEST_CUDA
constexpr bool k_cuda_suite = true;
#else
constexpr bool k_cuda_suite = false;
#endif
}  // namespace ferry::test

// In the CUDA build, skips the test unless `usable` (an expression) holds; a no-op on the CPU.
#define FERRY_SKIP_UNLESS_CUDA(usable)                                                         \
  do {                                                                                         \
    if (::ferry::test::k_cuda_suite && !(usable)) GTEST_SKIP() << "no usable CUDA device here"; \
  } while (0)
