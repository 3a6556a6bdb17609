#pragma once
// Checked CUDA calls (STYLE.md rule 4). A failing call throws ferry::error naming the statement,
// the CUDA error and where it happened; FERRY_CUDA_LAUNCH_CHECK() follows every kernel launch so a
// bad launch configuration is reported at its launcher, not at the next unrelated call.
#include <cuda_runtime_api.h>

#include "src/common/error.h"

namespace ferry::gpu::detail {
[[noreturn]] inline void throw_cuda_error(cudaError_t err, const char* stmt, const char* file, int line) {
  throw ::ferry::error(::ferry::detail::str_cat("CUDA error ", cudaGetErrorName(err), " (", cudaGetErrorString(err),
                                                ") from `", stmt, "` at ", file, ":", line));
}
}  // namespace ferry::gpu::detail

#define FERRY_CUDA_CHECK(stmt)                                                            \
  do {                                                                                    \
    const cudaError_t ferry_cuda_err_ = (stmt);                                           \
    if (ferry_cuda_err_ != cudaSuccess)                                                   \
      ::ferry::gpu::detail::throw_cuda_error(ferry_cuda_err_, #stmt, __FILE__, __LINE__); \
  } while (0)

#define FERRY_CUDA_LAUNCH_CHECK() FERRY_CUDA_CHECK(cudaGetLastError())
