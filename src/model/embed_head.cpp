#include "src/model/embed_head.h"

#include <ATen/ATen.h>

#include <algorithm>

#include "src/common/error.h"
#include "src/model/norm.h"
#include "src/model/ops_common.h"
#if FERRY_WITH_CUDA
#include "gpu/ops.h"
#endif

namespace ferry::model {

constexpr int64_t k_ignore_index = -100;

at::Tensor embed_forward(const at::Tensor& tokens, const at::Tensor& emb) {
  FERRY_ASSERT(tokens.dim() == 2 && tokens.scalar_type() == at::kLong, "embed_forward: tokens must be int64 (B, T)");
  at::Tensor flat = tokens.reshape({-1});
  return emb.index_select(0, flat).view({tokens.size(0), tokens.size(1), emb.size(1)});
}

void embed_backward(const at::Tensor& dx, const at::Tensor& tokens, at::Tensor& grad_emb, bool accumulate) {
  const int64_t h = grad_emb.size(1);
  if (!accumulate) grad_emb.zero_();
  // index_put_ with accumulate sums duplicate indices in a fixed order on CPU and through its
  // sort-based kernel on CUDA, unlike index_add_'s atomics.
  grad_emb.index_put_({tokens.reshape({-1})}, dx.reshape({-1, h}).to(grad_emb.scalar_type()), /*accumulate=*/true);
}

void cross_entropy_forward_backward_aten(const at::Tensor& logits, const at::Tensor& labels, double grad_scale,
                                         at::Tensor& loss_sum, at::Tensor* dlogits) {
  const auto acc = detail::acc_dtype(logits);
  at::Tensor lf = logits.to(acc);
  at::Tensor valid = labels.ne(k_ignore_index);
  at::Tensor safe = at::where(valid, labels, at::zeros_like(labels)).unsqueeze(1);   // (N, 1)
  at::Tensor lse = at::logsumexp(lf, 1, /*keepdim=*/true);                          // (N, 1)
  at::Tensor picked = lf.gather(1, safe);
  at::Tensor vf = valid.unsqueeze(1).to(acc);
  loss_sum.add_(((lse - picked) * vf).sum().to(loss_sum.scalar_type()));
  if (dlogits) {
    at::Tensor p = (lf - lse).exp_();
    p.scatter_add_(1, safe, at::full_like(picked, -1.0));
    p.mul_(vf * grad_scale);
    dlogits->copy_(p);
  }
}

void cross_entropy_forward_backward(const at::Tensor& logits, const at::Tensor& labels, double grad_scale,
                                    at::Tensor& loss_sum, at::Tensor* dlogits) {
  FERRY_ASSERT(logits.dim() == 2 && labels.dim() == 1 && labels.size(0) == logits.size(0),
               "cross_entropy: logits (N, V) and labels (N) disagree");
#if FERRY_WITH_CUDA
  if (logits.is_cuda()) {
    gpu::cross_entropy_forward_backward(logits, labels, grad_scale, loss_sum, dlogits);
    return;
  }
#endif
  cross_entropy_forward_backward_aten(logits, labels, grad_scale, loss_sum, dlogits);
}

head_result head_forward_backward(const at::Tensor& x, const at::Tensor& norm_w, const at::Tensor& lm_head_w,
                                  const at::Tensor& labels, const llama_config& cfg, int64_t chunk_rows,
                                  double grad_scale, at::Tensor* dx, at::Tensor* g_norm, at::Tensor* g_lm_head,
                                  bool accumulate) {
  FERRY_ASSERT(x.dim() == 3 && x.size(2) == cfg.hidden_size, "head: x must be (B, T, hidden_size)");
  FERRY_ASSERT(labels.dim() == 2 && labels.size(0) == x.size(0) && labels.size(1) == x.size(1) &&
                   labels.scalar_type() == at::kLong,
               "head: labels must be int64 (B, T) like x");
  FERRY_ASSERT(chunk_rows > 0, "head: chunk_rows must be positive");
  const bool backward = dx != nullptr;
  FERRY_ASSERT(!backward || (g_norm && g_lm_head && g_norm->defined() && g_lm_head->defined()),
               "head backward needs g_norm and g_lm_head buffers");
  const int64_t h = cfg.hidden_size, N = x.size(0) * x.size(1);
  at::Tensor x2 = x.reshape({N, h});
  at::Tensor lab = labels.reshape({N});
  if (backward && !dx->defined()) *dx = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor dx2 = backward ? dx->view({N, h}) : at::Tensor();
  at::Tensor loss_sum = at::zeros({}, x.options().dtype(x.is_cuda() ? at::kFloat : detail::acc_dtype(x)));
  for (int64_t r0 = 0; r0 < N; r0 += chunk_rows) {
    const int64_t n = std::min(chunk_rows, N - r0);
    const bool acc = accumulate || r0 > 0;
    at::Tensor xc = x2.narrow(0, r0, n);
    at::Tensor rstd;
    at::Tensor xn = rmsnorm_forward(xc, norm_w, cfg.rms_norm_eps, backward ? &rstd : nullptr);
    at::Tensor logits = at::mm(xn, lm_head_w.t());   // (n, V), compute dtype
    cross_entropy_forward_backward(logits, lab.narrow(0, r0, n), grad_scale, loss_sum, backward ? &logits : nullptr);
    if (!backward) continue;
    detail::grad_mm(*g_lm_head, logits, xn, acc);
    at::Tensor dxn = at::mm(logits, lm_head_w);
    at::Tensor dxc = dx2.narrow(0, r0, n);
    rmsnorm_backward(dxn, xc, norm_w, rstd, dxc, *g_norm, acc);
  }
  head_result r;
  r.n_targets = lab.ne(k_ignore_index).sum().item<int64_t>();
  r.loss_sum = loss_sum.item<double>();
  return r;
}

at::Tensor head_logits(const at::Tensor& x, const at::Tensor& norm_w, const at::Tensor& lm_head_w,
                       const llama_config& cfg) {
  at::Tensor xn = rmsnorm_forward(x, norm_w, cfg.rms_norm_eps, nullptr);
  return at::matmul(xn, lm_head_w.t()).to(detail::acc_dtype(x));
}

}  // namespace ferry::model
