#pragma once
// What a device's allocator charges for one tensor, as its peak statistics count it. The planner
// adds these, not raw tensor sizes, wherever it promises an upper bound that a test measures.
#include <algorithm>
#include <cstdint>

namespace ferry::model {

// PyTorch's CUDA caching allocator hands out blocks in multiples of 512 bytes (512 at least) and
// counts whole blocks; a request over 1 MiB may get a cached block up to 1 MiB larger, which it
// does not split (it splits large blocks only when more than 1 MiB would remain). The CPU
// allocator charges the bytes asked for. Zero bytes allocate nothing.
inline int64_t device_charge(int64_t bytes, bool cuda) {
  if (!cuda || bytes <= 0) return std::max<int64_t>(bytes, 0);
  constexpr int64_t k_block = 512, k_unsplit = int64_t{1} << 20;
  const int64_t rounded = std::max(k_block, (bytes + k_block - 1) / k_block * k_block);
  return bytes > k_unsplit ? rounded + k_unsplit : rounded;
}

}  // namespace ferry::model
