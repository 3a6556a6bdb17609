// The engine's forward-only surface: evaluation, and the pieces generation drives (embedding,
// streamed blocks, the head's weights). The training step is in engine.cpp.
#include <ATen/ATen.h>

#include "src/common/error.h"
#include "src/engine/engine.h"

namespace ferry::engine {

at::Tensor engine::embed(const at::Tensor& tokens) {
  check_token_ids(tokens);
  return pool_->embed(tokens);
}

at::Tensor engine::forward_blocks(at::Tensor x, const block_fn& fn) {
  auto guard = dev_->enter_compute();
  const std::vector<int64_t> uses = schedule(false);
  for (int64_t i = 0; i < cfg_.num_hidden_layers; ++i) {
    const int64_t u = store_->block_unit(i);
    x = fn(i, model::block_views(pool_->acquire(u, uses, size_t(i)), cfg_), x);
    pool_->release(u);
  }
  return x;
}

std::pair<at::Tensor, at::Tensor> engine::head_weights() {
  const int64_t hu = store_->head_unit();
  const model::head_weights w = pool_->head_views(pool_->acquire(hu, {hu}, 0));
  return {w.norm, w.lm_head};
}

void engine::release_head() { pool_->release(store_->head_unit()); }

model::head_result engine::evaluate(const at::Tensor& tokens) { return evaluate(micro_batch::from_tokens(tokens)); }

model::head_result engine::evaluate(const micro_batch& batch) {
  check_batch(batch, false);
  auto guard = dev_->enter_compute();
  at::Tensor inputs = batch.inputs.to(at::kLong).contiguous();
  at::Tensor labels = batch.labels.to(at::kLong).contiguous().to(dev_->device());
  // Resident weights leave memory to spare: one pass per block (block_forward_whole). Streamed
  // ones run each block in chunks of tokens. Packed rows run in one pass too (the chunked forward
  // has no packed attention; the training plan covers a whole pass). The embedding output is
  // freed once the first block has read it.
  model::packing pk;
  if (batch.positions.defined()) pk = model::make_packing(batch.positions, rope_);
  const model::packing* packed = pk.positions.defined() ? &pk : nullptr;
  const bool whole = opt_.mode == offload_mode::offload_none || packed;
  at::Tensor x = forward_blocks(pool_->embed(inputs), [&](int64_t, const model::block_weights& w, const at::Tensor& in) {
    return whole ? model::block_forward_whole(in, w, cfg_, rope_, packed)
                 : model::block_forward_chunked(in, w, cfg_, rope_);
  });
  auto [norm_w, lm_w] = head_weights();
  auto hr = model::head_forward_backward(x, norm_w, lm_w, labels, cfg_, opt_.ce_chunk, 1.0, nullptr, nullptr, nullptr, false);
  release_head();
  return hr;
}

}  // namespace ferry::engine
