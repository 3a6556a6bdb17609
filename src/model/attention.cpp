#include "src/model/attention.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <limits>

#include "src/common/error.h"
#include "src/model/ops_common.h"
#if FERRY_WITH_CUDA
#include "gpu/ops.h"
#endif

namespace ferry::model {
namespace {

void check_shapes(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  FERRY_ASSERT(q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes(), "attention: q, k, v must be 4-D, k and v alike");
  FERRY_ASSERT(q.size(0) == k.size(0) && q.size(3) == k.size(3) && k.size(1) > 0 && q.size(1) % k.size(1) == 0,
               "attention: q (B,Hq,T,D) and k (B,Hkv,T,D) disagree or Hq is not a multiple of Hkv");
}

std::atomic<int64_t> g_score_budget{int64_t{1} << 26};

// Query rows per block so one block's scores stay within the budget.
int64_t rows_per_block(int64_t B, int64_t Hq, int64_t Tq, int64_t Tk) {
  const int64_t budget = g_score_budget.load();
  return std::clamp<int64_t>(budget / std::max<int64_t>(1, B * Hq * Tk), 1, Tq);
}

// Masked, scaled scores of query rows [t0, t0+n) against all keys: (B, Hkv, G*n, Tk), rows ordered
// (g, t). qg is q viewed (B, Hkv, G, Tq, D); kf (B, Hkv, Tk, D) in the accumulation dtype.
// positions (B, Tq) or undefined: packed runs, see attention.h.
at::Tensor block_scores(const at::Tensor& qg, const at::Tensor& kf, int64_t t0, int64_t n, double scale,
                        int64_t q_offset, at::Tensor* q_block, const at::Tensor& positions) {
  const int64_t B = qg.size(0), Hkv = qg.size(1), G = qg.size(2), D = qg.size(4), Tk = kf.size(2);
  at::Tensor qc = qg.narrow(3, t0, n).to(kf.scalar_type()).reshape({B, Hkv, G * n, D});
  at::Tensor s = at::matmul(qc, kf.transpose(-1, -2)).mul_(scale);
  auto lopt = at::TensorOptions().dtype(at::kLong).device(qg.device());
  at::Tensor qpos = at::arange(q_offset + t0, q_offset + t0 + n, lopt).unsqueeze(1);   // (n, 1)
  at::Tensor kpos = at::arange(Tk, lopt).unsqueeze(0);                                 // (1, Tk)
  at::Tensor mask;
  if (positions.defined()) {
    // A query's run starts at its column minus its position; keys before that are another run's.
    at::Tensor start = (qpos.squeeze(1) - positions.narrow(1, t0, n)).unsqueeze(2);     // (B, n, 1)
    mask = ((kpos > qpos).unsqueeze(0) | (kpos.unsqueeze(0) < start)).repeat({1, G, 1}).unsqueeze(1);  // (B, 1, G*n, Tk)
  } else {
    mask = (kpos > qpos).repeat({G, 1});                                                // (G*n, Tk)
  }
  s.masked_fill_(mask, -std::numeric_limits<double>::infinity());
  if (q_block) *q_block = qc;
  return s;
}

}  // namespace

attention_path attention_path_for(const llama_config& cfg, at::ScalarType dtype, bool cuda) {
  if (!cuda) return attention_path::attention_aten;
  if (cfg.head_dim > 256) return attention_path::attention_large_head;
  return dtype == at::kHalf || dtype == at::kBFloat16 ? attention_path::attention_flash
                                                      : attention_path::attention_efficient;
}

int64_t attention_score_budget() { return g_score_budget.load(); }

int64_t attention_set_score_budget(int64_t elements) {
  FERRY_ASSERT(elements > 0, "attention score budget must be positive");
  return g_score_budget.exchange(elements);
}

std::tuple<at::Tensor, at::Tensor> attention_forward_aten(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, double scale, int64_t q_offset,
                                                          const at::Tensor& positions) {
  check_shapes(q, k, v);
  const int64_t B = q.size(0), Hq = q.size(1), Tq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), G = Hq / Hkv, Tk = k.size(2);
  FERRY_ASSERT(q_offset >= 0 && q_offset + Tq <= Tk, "attention: queries past the last key");
  const auto acc = detail::acc_dtype(q);
  at::Tensor qg = q.reshape({B, Hkv, G, Tq, D});
  at::Tensor kf = k.to(acc), vf = v.to(acc);
  at::Tensor out = at::empty({B, Hkv, G, Tq, D}, q.options());
  at::Tensor lse = at::empty({B, Hkv, G, Tq}, q.options().dtype(acc));
  const int64_t step = rows_per_block(B, Hq, Tq, Tk);
  for (int64_t t0 = 0; t0 < Tq; t0 += step) {
    const int64_t n = std::min(step, Tq - t0);
    at::Tensor s = block_scores(qg, kf, t0, n, scale, q_offset, nullptr, positions);
    at::Tensor l = at::logsumexp(s, -1, /*keepdim=*/true);          // (B, Hkv, G*n, 1)
    at::Tensor o = at::matmul(s.sub_(l).exp_(), vf);                // (B, Hkv, G*n, D)
    out.narrow(3, t0, n).copy_(o.view({B, Hkv, G, n, D}));
    lse.narrow(3, t0, n).copy_(l.view({B, Hkv, G, n}));
  }
  return {out.view({B, Hq, Tq, D}), lse.view({B, Hq, Tq})};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_aten(const at::Tensor& dout, const at::Tensor& q,
                                                                       const at::Tensor& k, const at::Tensor& v,
                                                                       const at::Tensor& out, const at::Tensor& lse,
                                                                       double scale, const at::Tensor& positions) {
  check_shapes(q, k, v);
  const int64_t B = q.size(0), Hq = q.size(1), T = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), G = Hq / Hkv;
  const auto acc = detail::acc_dtype(q);
  at::Tensor qg = q.reshape({B, Hkv, G, T, D});
  at::Tensor dog = dout.reshape({B, Hkv, G, T, D});
  at::Tensor og = out.reshape({B, Hkv, G, T, D});
  at::Tensor lg = lse.reshape({B, Hkv, G, T});
  at::Tensor kf = k.to(acc), vf = v.to(acc);
  at::Tensor dq = at::empty({B, Hkv, G, T, D}, q.options());
  at::Tensor dk = at::zeros({B, Hkv, T, D}, q.options().dtype(acc));
  at::Tensor dv = at::zeros({B, Hkv, T, D}, q.options().dtype(acc));
  const int64_t step = rows_per_block(B, Hq, T, T);
  for (int64_t t0 = 0; t0 < T; t0 += step) {
    const int64_t n = std::min(step, T - t0);
    at::Tensor qc;
    at::Tensor s = block_scores(qg, kf, t0, n, scale, 0, &qc, positions);
    at::Tensor l = lg.narrow(3, t0, n).to(acc).reshape({B, Hkv, G * n, 1});
    at::Tensor p = s.sub_(l).exp_();                                                   // (B, Hkv, G*n, T)
    at::Tensor doc = dog.narrow(3, t0, n).to(acc).reshape({B, Hkv, G * n, D});
    at::Tensor oc = og.narrow(3, t0, n).to(acc).reshape({B, Hkv, G * n, D});
    at::Tensor drow = (doc * oc).sum(-1, /*keepdim=*/true);                            // (B, Hkv, G*n, 1)
    at::Tensor ds = at::matmul(doc, vf.transpose(-1, -2)).sub_(drow).mul_(p);          // dS = P (dP - D)
    dv.add_(at::matmul(p.transpose(-1, -2), doc));                                     // sums the G group rows
    dk.add_(at::matmul(ds.transpose(-1, -2), qc), scale);
    dq.narrow(3, t0, n).copy_(at::matmul(ds, kf).mul_(scale).view({B, Hkv, G, n, D}));
  }
  return {dq.view({B, Hq, T, D}), dk.to(k.scalar_type()), dv.to(v.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     double scale, const packing* packed) {
  check_shapes(q, k, v);
  FERRY_ASSERT(q.size(2) == k.size(2), "attention_forward: training attention needs as many queries as keys");
  if (packed) {
    FERRY_ASSERT(packed->positions.dim() == 2 && packed->positions.size(0) == q.size(0) &&
                     packed->positions.size(1) == q.size(2),
                 "attention_forward: packing for ", packed->positions.sizes(), " but q is ", q.sizes());
#if FERRY_WITH_CUDA
    if (gpu::attention_varlen_supported(q))
      return gpu::attention_forward_varlen(q, k, v, packed->cu_seqlens, packed->max_run, scale);
#endif
    return attention_forward_aten(q, k, v, scale, 0, packed->positions);
  }
#if FERRY_WITH_CUDA
  if (q.is_cuda()) return gpu::attention_forward(q.contiguous(), k.contiguous(), v.contiguous(), scale);
#endif
  return attention_forward_aten(q, k, v, scale, 0);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(const at::Tensor& dout, const at::Tensor& q,
                                                                  const at::Tensor& k, const at::Tensor& v,
                                                                  const at::Tensor& out, const at::Tensor& lse,
                                                                  double scale, const packing* packed) {
  check_shapes(q, k, v);
  if (packed) {
#if FERRY_WITH_CUDA
    if (gpu::attention_varlen_supported(q))
      return gpu::attention_backward_varlen(dout, q, k, v, out, lse, packed->cu_seqlens, packed->max_run, scale);
#endif
    return attention_backward_aten(dout, q, k, v, out, lse, scale, packed->positions);
  }
#if FERRY_WITH_CUDA
  if (q.is_cuda()) {
    return gpu::attention_backward(dout.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous(),
                                   lse.contiguous(), scale);
  }
#endif
  return attention_backward_aten(dout, q, k, v, out, lse, scale);
}

at::Tensor attention_forward_offset(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                                    int64_t q_offset) {
  check_shapes(q, k, v);
#if FERRY_WITH_CUDA
  if (q.is_cuda() && q_offset == 0 && q.size(2) == k.size(2)) {
    return std::get<0>(gpu::attention_forward(q.contiguous(), k.contiguous(), v.contiguous(), scale));
  }
  // The queries are the last positions of the keys (a chunk of new tokens against a cache ending
  // with their own keys): the fused kernels, reading k and v in place.
  if (q.is_cuda() && q_offset + q.size(2) == k.size(2)) return gpu::attention_forward_offset(q, k, v, scale);
#endif
  return std::get<0>(attention_forward_aten(q, k, v, scale, q_offset));
}

}  // namespace ferry::model
