#include "src/model/layout.h"

#include <ATen/ATen.h>

#include "src/common/error.h"

namespace ferry::model {
namespace {

void push(std::vector<tensor_slot>& out, int64_t& offset, std::string name, std::vector<int64_t> shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  out.push_back(tensor_slot{std::move(name), offset, std::move(shape), n});
  offset += n;
}

}  // namespace

std::vector<tensor_slot> block_layout(const llama_config& cfg) {
  const int64_t h = cfg.hidden_size, q = cfg.q_dim(), kv = cfg.kv_dim(), i = cfg.intermediate_size;
  std::vector<tensor_slot> s;
  int64_t off = 0;
  push(s, off, "input_layernorm.weight", {h});
  push(s, off, "self_attn.q_proj.weight", {q, h});
  push(s, off, "self_attn.k_proj.weight", {kv, h});
  push(s, off, "self_attn.v_proj.weight", {kv, h});
  push(s, off, "self_attn.o_proj.weight", {h, q});
  push(s, off, "post_attention_layernorm.weight", {h});
  push(s, off, "mlp.gate_proj.weight", {i, h});
  push(s, off, "mlp.up_proj.weight", {i, h});
  push(s, off, "mlp.down_proj.weight", {h, i});
  FERRY_ASSERT(off == cfg.block_params(), "block layout covers ", off, " elements, config says ", cfg.block_params());
  return s;
}

std::vector<tensor_slot> embed_layout(const llama_config& cfg) {
  std::vector<tensor_slot> s;
  int64_t off = 0;
  push(s, off, "model.embed_tokens.weight", {cfg.vocab_size, cfg.hidden_size});
  return s;
}

std::vector<tensor_slot> head_layout(const llama_config& cfg) {
  std::vector<tensor_slot> s;
  int64_t off = 0;
  push(s, off, "model.norm.weight", {cfg.hidden_size});
  if (!cfg.tie_word_embeddings) push(s, off, "lm_head.weight", {cfg.vocab_size, cfg.hidden_size});
  FERRY_ASSERT(off == cfg.head_params(), "head layout covers ", off, " elements, config says ", cfg.head_params());
  return s;
}

head_weights head_slot_views(const at::Tensor& flat, const llama_config& cfg) {
  const int64_t h = cfg.hidden_size, V = cfg.vocab_size;
  FERRY_ASSERT(flat.dim() == 1 && flat.is_contiguous() && flat.numel() == cfg.head_slot_params(),
               "head slot must be 1-D contiguous with ", cfg.head_slot_params(), " elements, got ", flat.numel());
  return {flat.narrow(0, 0, h), flat.narrow(0, h, V * h).view({V, h})};
}

at::Tensor slot_view(const at::Tensor& flat, const tensor_slot& slot) {
  FERRY_ASSERT(flat.dim() == 1 && flat.is_contiguous(), "flat buffers are 1-D and contiguous");
  FERRY_ASSERT(slot.offset + slot.numel <= flat.numel(), "slot ", slot.name, " runs past its buffer");
  return flat.narrow(0, slot.offset, slot.numel).view(slot.shape);
}

block_weights block_views(const at::Tensor& flat, const llama_config& cfg) {
  FERRY_ASSERT(flat.dim() == 1 && flat.is_contiguous() && flat.numel() == cfg.block_params(),
               "block buffer must be 1-D contiguous with ", cfg.block_params(), " elements, got ", flat.numel());
  const int64_t h = cfg.hidden_size, q = cfg.q_dim(), kv = cfg.kv_dim(), i = cfg.intermediate_size;
  block_weights w;
  int64_t off = 0;
  auto take = [&](std::vector<int64_t> shape) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    at::Tensor v = flat.narrow(0, off, n).view(shape);
    off += n;
    return v;
  };
  w.attn_norm = take({h});
  w.wqkv = take({q + 2 * kv, h});
  w.wo = take({h, q});
  w.mlp_norm = take({h});
  w.w_gate_up = take({2 * i, h});
  w.w_down = take({h, i});
  return w;
}

}  // namespace ferry::model
