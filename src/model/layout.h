#pragma once
// Where each HF tensor lives inside the flat per-unit buffers the engine streams.
//
// A decoder block's weights are ONE flat 1-D buffer so that a single copy moves a layer. Order
// (HF suffixes, shapes as torch Linear weights [out, in]):
//   input_layernorm [h]; q_proj [q,h]; k_proj [kv,h]; v_proj [kv,h]; o_proj [h,q];
//   post_attention_layernorm [h]; gate_proj [i,h]; up_proj [i,h]; down_proj [h,i].
// q/k/v are adjacent, so one GEMM on the [q+2kv, h] view computes all three; gate/up likewise.
// Gradient buffers use the same layout, so block_views works on both.
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "src/model/llama_config.h"

namespace ferry::model {

struct tensor_slot {
  std::string name;             // HF name suffix, e.g. "self_attn.q_proj.weight" (block) or full name (embed/head)
  int64_t offset = 0;           // in elements from the start of the flat buffer
  std::vector<int64_t> shape;
  int64_t numel = 0;
};

// Block slots; names are relative to "model.layers.<i>.". Sum of numel == cfg.block_params().
std::vector<tensor_slot> block_layout(const llama_config& cfg);
// {"model.embed_tokens.weight" [V,h]}.
std::vector<tensor_slot> embed_layout(const llama_config& cfg);
// {"model.norm.weight" [h], "lm_head.weight" [V,h]}; with tied embeddings only the norm (the head
// reads model.embed_tokens.weight, and its gradient is added to the embedding's).
std::vector<tensor_slot> head_layout(const llama_config& cfg);

// The head's weights (or gradients) as the loss takes them: norm (h) and lm_head (V, h).
struct head_weights {
  at::Tensor norm;
  at::Tensor lm_head;
};
// Views into a head slot buffer: 1-D, contiguous, cfg.head_slot_params() elements, the norm then
// the lm_head matrix, whether or not the model ties it to the embedding.
head_weights head_slot_views(const at::Tensor& flat, const llama_config& cfg);

// Views into one block's flat buffer (weights or gradients).
struct block_weights {
  at::Tensor attn_norm;   // (h)
  at::Tensor wqkv;        // (q + 2kv, h): rows [0,q) q_proj, [q,q+kv) k_proj, [q+kv,q+2kv) v_proj
  at::Tensor wo;          // (h, q)
  at::Tensor mlp_norm;    // (h)
  at::Tensor w_gate_up;   // (2i, h): rows [0,i) gate_proj, [i,2i) up_proj
  at::Tensor w_down;      // (h, i)
};

// flat: 1-D, contiguous, numel == cfg.block_params(). The views alias flat.
block_weights block_views(const at::Tensor& flat, const llama_config& cfg);

// The view of one slot inside a flat buffer (any of the three layouts).
at::Tensor slot_view(const at::Tensor& flat, const tensor_slot& slot);

}  // namespace ferry::model
