#pragma once
// ferry-bench-adamw --nvme PATH: the disk under the optimizer state tier (src/engine/nvme_state.h).
//   sequential write and read of a scratch file in PATH through the tier's I/O path (uring_io:
//   O_DIRECT, 1 MiB requests, unit-sized operations, four in flight), per queue depth;
//   the AdamW update through the tier (prefetch, acquire, step, release with write-behind) over
//   `units` units of n parameters, per state kind and buffer count, in Gparam/s and GB/s moved,
//   against the same update in host memory and the disk's bound (bytes read / read GB/s + bytes
//   written / write GB/s, the best sequential figures; "x bound" is the pass's time over it).
#include <cstddef>
#include <string>
#include <vector>

namespace ferry::bench {

struct nvme_bench_args {
  std::string path;                         // the directory (its filesystem is what is measured)
  size_t file_bytes = size_t(2) << 30;      // sequential read/write size
  std::vector<int> depths = {1, 2, 4, 8, 16, 32};
  std::vector<int> buffers = {2, 3, 4, 6};
  size_t unit_params = size_t(16) << 20;    // parameters per unit of the update pass
  int units = 8;
  int threads = 0;                          // AdamW threads (0: all cores but one)
  int reps = 3;
};

// Prints the tables; returns the process exit code.
int bench_nvme(const nvme_bench_args& a);

}  // namespace ferry::bench
