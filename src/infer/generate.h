#pragma once
// Batched text generation on the engine's streamed weights. Every step (the prefill, then one
// step per new token) is one engine::forward_blocks pass: each layer's weights cross PCIe once
// per step for the whole batch, so throughput grows with the number of rows decoded together.
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "src/engine/engine.h"
#include "src/infer/sampling.h"

namespace ferry::infer {

struct generate_options {
  int64_t max_new_tokens = 64;
  int64_t eos_id = 2;            // a row stops after producing it; < 0: never
  std::vector<int64_t> stop_ids; // a row also stops after producing any of these (a chat template's end of turn)
  sampling_options sampling;
  bool keep_logits = false;      // tests: keep each step's (B, V) fp32 logits on the host
};

struct generate_result {
  std::vector<std::vector<int64_t>> tokens;  // per row: the new tokens (EOS included when produced)
  std::vector<at::Tensor> logits;            // keep_logits: per step (B, V) fp32 on the CPU
  int64_t prompt_tokens = 0, new_tokens = 0; // new_tokens: summed over rows, up to each row's stop
  int64_t steps = 0;                         // decode passes after the prefill
  double prefill_ms = 0, decode_ms = 0;
  int64_t kv_cache_bytes = 0;
  int64_t gpu_alloc_peak = 0;                // device bytes at the peak (0 on the host backend)
  double tokens_per_s() const { return decode_ms > 0 ? double(new_tokens) / ((prefill_ms + decode_ms) / 1e3) : 0; }
};

// prompts: token ids (BOS included when wanted), one row each, all decoded as one batch; each
// row needs length + max_new_tokens <= the engine's rotary table (engine max_seq or the model's
// max_position_embeddings). The engine's planned tokens (max_batch x max_seq) must hold rows x the
// longest prompt (the prefill's embedding staging).
generate_result generate(engine::engine& e, const std::vector<std::vector<int64_t>>& prompts,
                         const generate_options& opt);

// The reference the tests use: logits (B, T, V) fp32 of full-sequence forwards of tokens (B, T),
// through the same streamed blocks with block_forward (no cache).
at::Tensor full_forward_logits(engine::engine& e, const at::Tensor& tokens);

}  // namespace ferry::infer
