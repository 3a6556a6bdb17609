#pragma once
// The CUDA suites: every source under tests/ that runs on a CUDA device. Registered with
// ferry_add_test(... GPU), which compiles them with FERRY_TEST_CUDA=1 and labels them gpu; the
// model, engine and infer sources are also built for the CPU (label cpu) from the same file.
// A test calls FERRY_REQUIRE_DEVICE() first: in a CUDA suite it skips (tests/gtest_main.cpp makes
// that exit code 77, which ctest shows as skipped, never passed) where no device is usable; in a
// CPU build it does nothing.
#include <gtest/gtest.h>

#if defined(FERRY_WITH_CUDA) && FERRY_WITH_CUDA
#include "gpu/ops.h"
#endif

namespace ferry::test {
#if defined(FERRY_TEST_CUDA) && FERRY_TEST_CUDA
constexpr bool k_cuda_suite = true;
#else
constexpr bool k_cuda_suite = false;
#endif

// The one device probe of the suites: true when ferry's CUDA code is built (FERRY_WITH_CUDA) and the
// CUDA runtime counts a device. gpu::device_available() is cudaGetDeviceCount > 0, the same check as
// engine::cuda_usable() (which the model and gpu suites cannot link), and it clears the error the
// count leaves behind on a machine without a device. Not at::hasCUDA(): that asks libtorch, which
// can see a device that ferry was built without the code to use (a CUDA libtorch with
// FERRY_CUDA=OFF or no nvcc): the engine and infer suites would then fail instead of skip.
inline bool cuda_device_usable() {
#if defined(FERRY_WITH_CUDA) && FERRY_WITH_CUDA
  return gpu::device_available();
#else
  return false;
#endif
}
}  // namespace ferry::test

#define FERRY_REQUIRE_DEVICE()                                                                 \
  do {                                                                                         \
    if (::ferry::test::k_cuda_suite && !::ferry::test::cuda_device_usable())                   \
      GTEST_SKIP() << "no usable CUDA device here";                                            \
  } while (0)
