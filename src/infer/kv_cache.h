#pragma once
// The generation KV cache and the batched decode step for rows at different positions.
//
// model::block_forward_cached takes one position for the whole batch. Prompts of different
// lengths are kept unpadded (row b's token t sits at position t, as with a batch of one, so the
// result does not depend on what else is in the batch): the prefill runs
// block_forward_cached row by row inside the same streamed layer pass, and the decode step,
// where every row is at its own position, is block_forward_rows below. Rows of equal length
// (the benchmark's case) use block_forward_cached for both.
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "src/model/layout.h"
#include "src/model/llama_config.h"
#include "src/model/rope.h"

namespace ferry::infer {

// One (k, v) pair per layer, each (B, Hkv, Tmax, D) in the compute dtype on the device, zeroed
// (positions a row has not written must stay finite: the masked probabilities multiply them).
struct kv_cache {
  std::vector<at::Tensor> k, v;
  int64_t capacity() const { return k.empty() ? 0 : k[0].size(2); }
  int64_t bytes() const;
};

kv_cache make_kv_cache(const model::llama_config& cfg, int64_t batch, int64_t max_pos, at::ScalarType dtype,
                       at::Device device);

// Bytes make_kv_cache allocates (for planning and the benchmark table).
int64_t kv_cache_bytes(const model::llama_config& cfg, int64_t batch, int64_t max_pos, int64_t elem_size);

// One new token per row: x (B, 1, h); positions (B) int64 on x's device, row b's token at
// positions[b] (its keys and values are written there); max_pos >= max(positions) (host value,
// bounds the attended range). Row b attends to cache positions [0, positions[b]]. The same ops
// as model::block_forward_cached (rmsnorm, RoPE, GEMMs, SwiGLU) with a per-row length mask on
// the attention scores, computed in fp32. Returns y (B, 1, h).
at::Tensor block_forward_rows(const at::Tensor& x, const model::block_weights& w, const model::llama_config& cfg,
                              const model::rope_cache& rope, const at::Tensor& positions, int64_t max_pos,
                              at::Tensor& k_cache, at::Tensor& v_cache);

}  // namespace ferry::infer
