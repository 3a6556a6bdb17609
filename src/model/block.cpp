#include "src/model/block.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <cmath>

#include "src/common/error.h"
#include "src/model/attention.h"
#include "src/model/norm.h"
#include "src/model/ops_common.h"
#include "src/model/swiglu.h"

namespace ferry::model {
namespace {

double attn_scale(const llama_config& cfg) { return 1.0 / std::sqrt(static_cast<double>(cfg.head_dim)); }

void check_input(const at::Tensor& x, const block_weights& w, const llama_config& cfg, const rope_cache& rope,
                 int64_t end_pos, const packing* packed = nullptr) {
  FERRY_ASSERT(x.dim() == 3 && x.size(2) == cfg.hidden_size, "block: x must be (B, T, hidden_size)");
  FERRY_ASSERT(!packed || (packed->positions.size(0) == x.size(0) && packed->positions.size(1) == x.size(1)),
               "block: packing for ", packed->positions.sizes(), " but x is ", x.sizes());
  FERRY_ASSERT(x.scalar_type() == w.wqkv.scalar_type(), "block: activations and weights must share a dtype");
  FERRY_CHECK(end_pos <= rope.cos.size(0), "sequence reaches position ", end_pos, " but the rotary cache holds ",
              rope.cos.size(0), " positions; build it with make_rope(cfg, max_pos >= ", end_pos, ")");
}

// RoPE in place on the q and k heads qk (B, T, Hq+Hkv, D) of positions [pos, pos+T), or of each
// token's position in its packed run (the rows laid end to end as one sequence of B*T tokens,
// whose rotary rows packing gathered).
void rope_qk_(at::Tensor& qk, const rope_cache& rope, int64_t pos, const packing* packed, bool inverse) {
  if (packed) {
    at::Tensor flat = qk.view({1, qk.size(0) * qk.size(1), qk.size(2), qk.size(3)});
    rope_apply_(flat, packed->cos, packed->sin, inverse);
    return;
  }
  const int64_t T = qk.size(1);
  rope_apply_(qk, rope.cos.narrow(0, pos, T), rope.sin.narrow(0, pos, T), inverse);
}

// The attention input projections for positions [pos, pos+T) (or packed runs): returns qkv
// (B, T, Hq+2Hkv, D) with RoPE applied to the q and k heads.
at::Tensor project_qkv(const at::Tensor& xn, const block_weights& w, const llama_config& cfg, const rope_cache& rope,
                       int64_t pos, const packing* packed = nullptr) {
  const int64_t B = xn.size(0), T = xn.size(1), h = cfg.hidden_size;
  const int64_t Hq = cfg.num_attention_heads, Hkv = cfg.num_key_value_heads, D = cfg.head_dim;
  at::Tensor qkv = at::mm(xn.reshape({B * T, h}), w.wqkv.t()).view({B, T, Hq + 2 * Hkv, D});
  at::Tensor qk = qkv.narrow(2, 0, Hq + Hkv);
  rope_qk_(qk, rope, pos, packed, /*inverse=*/false);
  return qkv;
}

// (B, H, T, D) -> (B*T, H*D), the layout of the o_proj GEMM.
at::Tensor heads_to_rows(const at::Tensor& t) {
  return t.transpose(1, 2).reshape({t.size(0) * t.size(2), t.size(1) * t.size(3)});
}

// The MLP half: y = x_mid + down(swiglu(gate_up(norm(x_mid)))). Fills rstd/gate_up when asked.
// Each intermediate is released as soon as the next exists.
at::Tensor mlp_forward(const at::Tensor& x_mid, const block_weights& w, const llama_config& cfg, at::Tensor* rstd,
                       at::Tensor* gate_up_out) {
  at::Tensor xn = rmsnorm_forward(x_mid, w.mlp_norm, cfg.rms_norm_eps, rstd);
  at::Tensor gate_up = at::mm(xn, w.w_gate_up.t());
  xn.reset();
  at::Tensor a = swiglu_forward(gate_up);
  if (gate_up_out) *gate_up_out = gate_up;
  gate_up.reset();
  return at::addmm(x_mid, a, w.w_down.t());
}

std::atomic<int64_t> g_forward_chunk_rows{1024};

// The inference forward of x (B,T,h) at positions [pos, pos+T), in chunks of time steps of about
// forward_chunk_rows tokens over the batch. Each chunk writes its keys and values into k_buf, v_buf
// (B,Hkv,>=pos+T,D) at its positions, then its queries attend to the buffers' [0, end of chunk):
// the earlier positions are already there, so the chunks see exactly what one pass would. At most
// one chunk's scores, (B,Hq,chunk,pos+T), and MLP activations, (chunk*B, 2i), exist at once.
at::Tensor forward_chunked(const at::Tensor& x, const block_weights& w, const llama_config& cfg, const rope_cache& rope,
                           int64_t pos, at::Tensor& k_buf, at::Tensor& v_buf) {
  const int64_t B = x.size(0), T = x.size(1), h = cfg.hidden_size;
  const int64_t Hq = cfg.num_attention_heads, Hkv = cfg.num_key_value_heads;
  const int64_t step = std::clamp<int64_t>(g_forward_chunk_rows.load() / B, 1, std::max<int64_t>(T, 1));
  at::Tensor y = step >= T ? at::Tensor() : at::empty({B, T, h}, x.options());
  for (int64_t t0 = 0; t0 < T; t0 += step) {
    const int64_t n = std::min(step, T - t0), end = pos + t0 + n;
    at::Tensor x2 = x.narrow(1, t0, n).reshape({B * n, h});
    at::Tensor xn = rmsnorm_forward(x2, w.attn_norm, cfg.rms_norm_eps, nullptr);
    at::Tensor qkv = project_qkv(xn.view({B, n, h}), w, cfg, rope, pos + t0);
    xn.reset();
    k_buf.narrow(2, pos + t0, n).copy_(qkv.narrow(2, Hq, Hkv).transpose(1, 2));
    v_buf.narrow(2, pos + t0, n).copy_(qkv.narrow(2, Hq + Hkv, Hkv).transpose(1, 2));
    at::Tensor q = qkv.narrow(2, 0, Hq).transpose(1, 2).contiguous();
    qkv.reset();
    at::Tensor out = attention_forward_offset(q, k_buf.narrow(2, 0, end), v_buf.narrow(2, 0, end), attn_scale(cfg),
                                              pos + t0);
    q.reset();
    at::Tensor x_mid = at::addmm(x2, heads_to_rows(out), w.wo.t());
    out.reset();
    at::Tensor yc = mlp_forward(x_mid, w, cfg, nullptr, nullptr).view({B, n, h});
    if (!y.defined()) return yc;
    y.narrow(1, t0, n).copy_(yc);
  }
  return y;
}

}  // namespace

int64_t block_set_forward_chunk_rows(int64_t rows) {
  FERRY_ASSERT(rows > 0, "forward chunk rows must be positive");
  return g_forward_chunk_rows.exchange(rows);
}

int64_t block_forward_chunk_rows() { return g_forward_chunk_rows.load(); }

int64_t block_saved::bytes() const {
  int64_t n = 0;
  for (const at::Tensor* t : {&x, &attn_rstd, &q, &k, &v, &attn_out, &lse, &x_mid, &mlp_rstd, &gate_up}) {
    if (t->defined()) n += t->numel() * static_cast<int64_t>(t->element_size());
  }
  return n;
}

void block_saved::clear() { *this = block_saved{}; }

int64_t block_saved_bytes(const llama_config& cfg, int64_t batch, int64_t seq, int64_t elem_size) {
  const int64_t N = batch * seq, a = elem_size == 8 ? 8 : 4;
  const int64_t per_token_e = 2 * cfg.hidden_size + 2 * cfg.q_dim() + 2 * cfg.kv_dim() + 2 * cfg.intermediate_size;
  return N * (elem_size * per_token_e + a * (cfg.num_attention_heads + 2));
}

namespace {
// The whole sequence at once; saved == nullptr keeps nothing (block_forward_whole).
at::Tensor forward_one_pass(const at::Tensor& x, const block_weights& w, const llama_config& cfg,
                            const rope_cache& rope, block_saved* saved, const packing* packed) {
  const int64_t B = x.size(0), T = x.size(1), h = cfg.hidden_size;
  const int64_t Hq = cfg.num_attention_heads, Hkv = cfg.num_key_value_heads;
  at::Tensor x2 = x.reshape({B * T, h});
  at::Tensor attn_rstd;
  at::Tensor xn = rmsnorm_forward(x2, w.attn_norm, cfg.rms_norm_eps, saved ? &attn_rstd : nullptr);
  at::Tensor qkv = project_qkv(xn.view({B, T, h}), w, cfg, rope, 0, packed);
  xn.reset();
  at::Tensor q = qkv.narrow(2, 0, Hq).transpose(1, 2).contiguous();
  at::Tensor k = qkv.narrow(2, Hq, Hkv).transpose(1, 2).contiguous();
  at::Tensor v = qkv.narrow(2, Hq + Hkv, Hkv).transpose(1, 2).contiguous();
  qkv.reset();
  auto [out, lse] = attention_forward(q, k, v, attn_scale(cfg), packed);
  if (saved) {
    saved->clear();
    if (packed) saved->packed = *packed;
    saved->x = x;
    saved->attn_rstd = attn_rstd;
    saved->q = q;
    saved->k = k;
    saved->v = v;
    saved->attn_out = out;
    saved->lse = lse;
  }
  // Without saving, nothing before the output is needed again (block_forward_whole_bytes counts it so).
  q.reset();
  k.reset();
  v.reset();
  lse.reset();
  at::Tensor x_mid = at::addmm(x2, heads_to_rows(out), w.wo.t());   // (N, h)
  out.reset();
  at::Tensor mlp_rstd, gate_up;
  at::Tensor y = mlp_forward(x_mid, w, cfg, saved ? &mlp_rstd : nullptr, saved ? &gate_up : nullptr);
  if (saved) {
    saved->x_mid = x_mid;
    saved->mlp_rstd = mlp_rstd;
    saved->gate_up = gate_up;
  }
  return y.view({B, T, h});
}
}  // namespace

at::Tensor block_forward(const at::Tensor& x, const block_weights& w, const llama_config& cfg, const rope_cache& rope,
                         block_saved& saved, const packing* packed) {
  check_input(x, w, cfg, rope, x.size(1), packed);
  return forward_one_pass(x, w, cfg, rope, &saved, packed);
}

at::Tensor block_forward_chunked(const at::Tensor& x, const block_weights& w, const llama_config& cfg,
                                 const rope_cache& rope) {
  const int64_t B = x.size(0), T = x.size(1);
  check_input(x, w, cfg, rope, T);
  at::Tensor k = at::empty({B, cfg.num_key_value_heads, T, cfg.head_dim}, x.options()), v = at::empty_like(k);
  return forward_chunked(x, w, cfg, rope, 0, k, v);
}

at::Tensor block_forward_whole(const at::Tensor& x, const block_weights& w, const llama_config& cfg,
                               const rope_cache& rope, const packing* packed) {
  check_input(x, w, cfg, rope, x.size(1), packed);
  return forward_one_pass(x, w, cfg, rope, nullptr, packed);
}

at::Tensor block_backward(const at::Tensor& dy, const block_weights& w, const llama_config& cfg,
                          const rope_cache& rope, block_saved& s, const block_weights& g, bool accumulate) {
  FERRY_ASSERT(s.x.defined() && s.gate_up.defined(), "block_backward without a block_forward that saved");
  const int64_t B = s.x.size(0), T = s.x.size(1), h = cfg.hidden_size, N = B * T;
  const int64_t Hq = cfg.num_attention_heads, Hkv = cfg.num_key_value_heads, D = cfg.head_dim;
  FERRY_ASSERT(dy.sizes() == s.x.sizes(), "block_backward: dy must be shaped like the block input");
  at::Tensor dy2 = dy.reshape({N, h});

  // MLP: y = x_mid + a W_down^T with a = swiglu(gate_up), gate_up = norm(x_mid) W_gu^T.
  at::Tensor a = swiglu_forward(s.gate_up);
  detail::grad_mm(g.w_down, dy2, a, accumulate);
  a.reset();
  at::Tensor da = at::mm(dy2, w.w_down);
  at::Tensor dgu = at::empty_like(s.gate_up);
  swiglu_backward(da, s.gate_up, dgu);
  da.reset();
  s.gate_up.reset();
  at::Tensor xn2 = rmsnorm_forward(s.x_mid, w.mlp_norm, cfg.rms_norm_eps, nullptr);
  detail::grad_mm(g.w_gate_up, dgu, xn2, accumulate);
  xn2.reset();
  at::Tensor dxn2 = at::mm(dgu, w.w_gate_up);
  dgu.reset();
  at::Tensor dh = at::empty({N, h}, dy.options());
  at::Tensor g_mlp_norm = g.mlp_norm;
  rmsnorm_backward(dxn2, s.x_mid, w.mlp_norm, s.mlp_rstd, dh, g_mlp_norm, accumulate);
  dh.add_(dy2);
  dxn2.reset();
  s.x_mid.reset();
  s.mlp_rstd.reset();

  // Attention: x_mid = x + out W_o^T.
  detail::grad_mm(g.wo, dh, heads_to_rows(s.attn_out), accumulate);
  at::Tensor dout = at::mm(dh, w.wo).view({B, T, Hq, D}).transpose(1, 2);
  const packing* packed = s.packed.positions.defined() ? &s.packed : nullptr;
  auto [dq, dk, dv] = attention_backward(dout, s.q, s.k, s.v, s.attn_out, s.lse, attn_scale(cfg), packed);
  dout.reset();
  s.q.reset(), s.k.reset(), s.v.reset(), s.attn_out.reset(), s.lse.reset();
  at::Tensor dqkv = at::empty({B, T, Hq + 2 * Hkv, D}, dy.options());
  dqkv.narrow(2, 0, Hq).copy_(dq.transpose(1, 2));
  dqkv.narrow(2, Hq, Hkv).copy_(dk.transpose(1, 2));
  dqkv.narrow(2, Hq + Hkv, Hkv).copy_(dv.transpose(1, 2));
  dq.reset(), dk.reset(), dv.reset();
  at::Tensor dqk = dqkv.narrow(2, 0, Hq + Hkv);
  rope_qk_(dqk, rope, 0, packed, /*inverse=*/true);
  at::Tensor dqkv2 = dqkv.view({N, -1});
  at::Tensor x2 = s.x.reshape({N, h});
  at::Tensor xn1 = rmsnorm_forward(x2, w.attn_norm, cfg.rms_norm_eps, nullptr);
  detail::grad_mm(g.wqkv, dqkv2, xn1, accumulate);
  xn1.reset();
  at::Tensor dxn1 = at::mm(dqkv2, w.wqkv);
  dqkv.reset(), dqkv2.reset(), dqk.reset();
  at::Tensor dx = at::empty({N, h}, dy.options());
  at::Tensor g_attn_norm = g.attn_norm;
  rmsnorm_backward(dxn1, x2, w.attn_norm, s.attn_rstd, dx, g_attn_norm, accumulate);
  dx.add_(dh);
  s.clear();
  return dx.view({B, T, h});
}

at::Tensor block_forward_cached(const at::Tensor& x, const block_weights& w, const llama_config& cfg,
                                const rope_cache& rope, int64_t pos, at::Tensor& k_cache, at::Tensor& v_cache) {
  const int64_t B = x.size(0), T = x.size(1), Hkv = cfg.num_key_value_heads;
  check_input(x, w, cfg, rope, pos + T);
  FERRY_ASSERT(k_cache.dim() == 4 && k_cache.size(0) == B && k_cache.size(1) == Hkv &&
                   k_cache.size(3) == cfg.head_dim && v_cache.sizes() == k_cache.sizes(),
               "block_forward_cached: caches must be (B, Hkv, Tmax, D)");
  FERRY_CHECK(pos >= 0 && pos + T <= k_cache.size(2), "KV cache holds ", k_cache.size(2), " positions but the step ",
              "writes [", pos, ", ", pos + T, "); allocate a longer cache");
  return forward_chunked(x, w, cfg, rope, pos, k_cache, v_cache);
}

}  // namespace ferry::model
