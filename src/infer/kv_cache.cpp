#include "src/infer/kv_cache.h"

#include <ATen/ATen.h>

#include <cmath>
#include <limits>

#include "src/common/error.h"
#include "src/model/norm.h"
#include "src/model/swiglu.h"

namespace ferry::infer {

int64_t kv_cache::bytes() const {
  int64_t n = 0;
  for (size_t i = 0; i < k.size(); ++i) n += (k[i].numel() + v[i].numel()) * int64_t(k[i].element_size());
  return n;
}

int64_t kv_cache_bytes(const model::llama_config& cfg, int64_t batch, int64_t max_pos, int64_t elem_size) {
  return 2 * cfg.num_hidden_layers * batch * cfg.kv_dim() * max_pos * elem_size;
}

kv_cache make_kv_cache(const model::llama_config& cfg, int64_t batch, int64_t max_pos, at::ScalarType dtype,
                       at::Device device) {
  kv_cache c;
  auto opts = at::TensorOptions().dtype(dtype).device(device);
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) {
    c.k.push_back(at::zeros({batch, cfg.num_key_value_heads, max_pos, cfg.head_dim}, opts));
    c.v.push_back(at::zeros({batch, cfg.num_key_value_heads, max_pos, cfg.head_dim}, opts));
  }
  return c;
}

at::Tensor block_forward_rows(const at::Tensor& x, const model::block_weights& w, const model::llama_config& cfg,
                              const model::rope_cache& rope, const at::Tensor& positions, int64_t max_pos,
                              at::Tensor& k_cache, at::Tensor& v_cache) {
  using namespace at::indexing;
  const int64_t B = x.size(0), h = cfg.hidden_size;
  const int64_t Hq = cfg.num_attention_heads, Hkv = cfg.num_key_value_heads, D = cfg.head_dim, G = Hq / Hkv;
  FERRY_ASSERT(x.dim() == 3 && x.size(1) == 1 && x.size(2) == h, "block_forward_rows: x must be (B, 1, hidden)");
  FERRY_ASSERT(positions.numel() == B && k_cache.size(0) == B && v_cache.sizes() == k_cache.sizes(),
               "block_forward_rows: positions and caches must have one row per sequence");
  FERRY_CHECK(max_pos < k_cache.size(2) && max_pos < rope.cos.size(0), "generation reached position ", max_pos,
              " but the KV cache holds ", k_cache.size(2), " and the rotary table ", rope.cos.size(0),
              " positions; lower max_new_tokens");

  at::Tensor x2 = x.reshape({B, h});
  at::Tensor xn = model::rmsnorm_forward(x2, w.attn_norm, cfg.rms_norm_eps, nullptr);
  // (1, B, heads, D): the batch takes the place of the time axis so RoPE gets one row per sequence.
  at::Tensor qkv = at::mm(xn, w.wqkv.t()).view({1, B, Hq + 2 * Hkv, D});
  at::Tensor qk = qkv.narrow(2, 0, Hq + Hkv);
  model::rope_apply_(qk, rope.cos.index_select(0, positions), rope.sin.index_select(0, positions), /*inverse=*/false);
  at::Tensor rows = at::arange(B, positions.options());
  // k_cache[b, :, positions[b], :] = k_new[b]  (advanced indices around a slice: value is (B, Hkv, D))
  k_cache.index_put_({rows, Slice(), positions}, qkv[0].narrow(1, Hq, Hkv));
  v_cache.index_put_({rows, Slice(), positions}, qkv[0].narrow(1, Hq + Hkv, Hkv));

  const int64_t Tk = max_pos + 1;
  at::Tensor q = qkv[0].narrow(1, 0, Hq).reshape({B, Hkv, G, D});   // head hq reads kv head hq / G
  at::Tensor kk = k_cache.narrow(2, 0, Tk), vv = v_cache.narrow(2, 0, Tk);
  at::Tensor scores = at::matmul(q, kk.transpose(2, 3)).to(at::kFloat).mul_(1.0 / std::sqrt(double(D)));
  at::Tensor beyond = at::arange(Tk, positions.options()).view({1, Tk}) > positions.view({B, 1});
  scores.masked_fill_(beyond.view({B, 1, 1, Tk}), -std::numeric_limits<float>::infinity());
  at::Tensor probs = at::softmax(scores, -1).to(x.scalar_type());
  at::Tensor out = at::matmul(probs, vv).reshape({B, Hq * D});          // (B, Hkv, G, D) -> (B, q_dim)

  at::Tensor x_mid = at::addmm(x2, out, w.wo.t());
  at::Tensor xn2 = model::rmsnorm_forward(x_mid, w.mlp_norm, cfg.rms_norm_eps, nullptr);
  at::Tensor a = model::swiglu_forward(at::mm(xn2, w.w_gate_up.t()));
  return at::addmm(x_mid, a, w.w_down.t()).view({B, 1, h});
}

}  // namespace ferry::infer
