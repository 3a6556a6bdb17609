#include "src/model/packing.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <vector>

#include "src/common/error.h"

namespace ferry::model {

void check_positions(const at::Tensor& positions, int64_t max_pos) {
  FERRY_CHECK(positions.dim() == 2 && at::isIntegralType(positions.scalar_type(), false) && !positions.is_cuda(),
              "packed positions must be (B, T) integers on the CPU; got ", positions.scalar_type(), " ",
              positions.sizes());
  const at::Tensor p = positions.to(at::kLong).contiguous();
  const int64_t B = p.size(0), T = p.size(1);
  const int64_t* d = p.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < T; ++t) {
      const int64_t v = d[b * T + t], prev = t == 0 ? -1 : d[b * T + t - 1];
      FERRY_CHECK(v == 0 || v == prev + 1, "packed positions must restart at 0 or count up by one; row ", b,
                  " has ", v, " at column ", t, " after ", prev);
      FERRY_CHECK(v < max_pos, "packed position ", v, " (row ", b, ", column ", t, ") is beyond the ", max_pos,
                  " rotary positions the engine was built for");
    }
  }
}

packing make_packing(const at::Tensor& positions, const rope_cache& rope) {
  check_positions(positions, rope.cos.size(0));
  const at::Tensor p = positions.to(at::kLong).contiguous();
  const int64_t n = p.numel();
  const int64_t* d = p.data_ptr<int64_t>();
  std::vector<int32_t> starts;
  int64_t max_run = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (d[i] == 0) starts.push_back(static_cast<int32_t>(i));
    max_run = std::max(max_run, d[i] + 1);
  }
  FERRY_CHECK(n <= INT32_MAX, "a packed micro-batch of ", n, " tokens exceeds flash attention's int32 offsets");
  starts.push_back(static_cast<int32_t>(n));
  const at::Device dev = rope.cos.device();
  packing pk;
  pk.positions = p.to(dev);
  const at::Tensor flat = pk.positions.reshape({n});
  pk.cos = rope.cos.index_select(0, flat);
  pk.sin = rope.sin.index_select(0, flat);
  pk.cu_seqlens = at::tensor(starts, at::TensorOptions().dtype(at::kInt)).to(dev);
  pk.runs = static_cast<int64_t>(starts.size()) - 1;
  pk.max_run = max_run;
  return pk;
}

}  // namespace ferry::model
