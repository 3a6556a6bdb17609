#pragma once
// The autograd reference model: plain ATen ops on fp64 tensors that require grad, written
// independently of src/model (HF LlamaForCausalLM's math, term by term).
#include <ATen/ATen.h>

#include <cmath>
#include <limits>

#include "src/model/llama_config.h"

namespace ferry::model::test::ref {

inline at::Tensor rmsnorm(const at::Tensor& x, const at::Tensor& w, double eps) {
  return w * (x * at::rsqrt(x.pow(2).mean(-1, true) + eps));
}

inline at::Tensor rotate_half(const at::Tensor& x) {
  const int64_t half = x.size(-1) / 2;
  return at::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
}

// x (B,T,H,D); positions pos0.. pos0+T-1; cos/sin recomputed here in fp32 as HF does.
inline at::Tensor rope(const at::Tensor& x, double theta, int64_t pos0) {
  const int64_t T = x.size(1), D = x.size(3);
  auto f = at::TensorOptions().dtype(at::kFloat);
  at::Tensor inv = 1.0 / at::pow(at::Scalar(theta), at::arange(0, D, 2, f.dtype(at::kLong)).to(at::kFloat) / double(D));
  at::Tensor freqs = at::arange(pos0, pos0 + T, f.dtype(at::kLong)).to(at::kFloat).unsqueeze(1) * inv.unsqueeze(0);
  at::Tensor emb = at::cat({freqs, freqs}, 1);
  at::Tensor c = emb.cos().to(x.scalar_type()).view({1, T, 1, D});
  at::Tensor s = emb.sin().to(x.scalar_type()).view({1, T, 1, D});
  return x * c + rotate_half(x) * s;
}

// q (B,Hq,T,D), k/v (B,Hkv,T,D), causal, repeat_kv like HF.
inline at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  const int64_t G = q.size(1) / k.size(1), T = q.size(2);
  at::Tensor kk = k.repeat_interleave(G, 1), vv = v.repeat_interleave(G, 1);
  at::Tensor s = at::matmul(q, kk.transpose(-1, -2)) * scale;
  at::Tensor mask = at::ones({T, T}, at::TensorOptions().dtype(at::kBool)).triu(1);
  s = s.masked_fill(mask, -std::numeric_limits<double>::infinity());
  return at::matmul(at::softmax(s, -1), vv);
}

inline at::Tensor swiglu(const at::Tensor& gate, const at::Tensor& up) { return at::silu(gate) * up; }

struct block_params {
  at::Tensor attn_norm, wq, wk, wv, wo, mlp_norm, wg, wu, wd;
  std::vector<at::Tensor> all() const { return {attn_norm, wq, wk, wv, wo, mlp_norm, wg, wu, wd}; }
};

inline at::Tensor block(const at::Tensor& x, const block_params& p, const llama_config& c) {
  const int64_t B = x.size(0), T = x.size(1), D = c.head_dim;
  at::Tensor xn = rmsnorm(x, p.attn_norm, c.rms_norm_eps);
  at::Tensor q = rope(at::matmul(xn, p.wq.t()).view({B, T, -1, D}), c.rope_theta, 0).transpose(1, 2);
  at::Tensor k = rope(at::matmul(xn, p.wk.t()).view({B, T, -1, D}), c.rope_theta, 0).transpose(1, 2);
  at::Tensor v = at::matmul(xn, p.wv.t()).view({B, T, -1, D}).transpose(1, 2);
  at::Tensor a = attention(q, k, v, 1.0 / std::sqrt(double(D))).transpose(1, 2).reshape({B, T, -1});
  at::Tensor h = x + at::matmul(a, p.wo.t());
  at::Tensor hn = rmsnorm(h, p.mlp_norm, c.rms_norm_eps);
  return h + at::matmul(swiglu(at::matmul(hn, p.wg.t()), at::matmul(hn, p.wu.t())), p.wd.t());
}

// Sum of token cross-entropies over labels != -100; logits in fp64.
inline at::Tensor ce_sum(const at::Tensor& logits, const at::Tensor& labels) {
  at::Tensor l2 = logits.reshape({-1, logits.size(-1)});
  at::Tensor lab = labels.reshape({-1});
  return at::nll_loss(at::log_softmax(l2, -1), lab, {}, at::Reduction::Sum, -100);
}

}  // namespace ferry::model::test::ref
