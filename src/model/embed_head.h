#pragma once
// The two ends of the model: the token embedding, and the final RMSNorm + lm_head + cross-entropy.
#include <ATen/core/Tensor.h>

#include <cstdint>

#include "src/model/llama_config.h"

namespace ferry::model {

// tokens int64 (B,T), emb (V,h). Returns (B,T,h) in emb's dtype.
at::Tensor embed_forward(const at::Tensor& tokens, const at::Tensor& emb);
// dx (B,T,h); grad_emb (V,h) overwritten (rows of absent tokens become 0) or added to. Deterministic
// on every device (sort-based accumulation, no atomics races).
void embed_backward(const at::Tensor& dx, const at::Tensor& tokens, at::Tensor& grad_emb, bool accumulate);

struct head_result {
  double loss_sum = 0;     // sum of per-token cross-entropy over target tokens (fp32 accumulation)
  int64_t n_targets = 0;   // number of labels != -100
};

// Final RMSNorm + lm_head + cross-entropy over rows of x (B,T,h) in chunks of chunk_rows rows, so
// at most (chunk_rows, V) logits exist at once. labels (B,T) int64 are already aligned (labels[b,t]
// is the target of position t; -100 ignored). When dx != nullptr also back-propagates
// grad_scale * loss_sum: *dx (B,T,h) is written (allocated when undefined), g_norm (h) and
// g_lm_head (V,h) are written, or added to when accumulate. Syncs once (to read the loss).
head_result head_forward_backward(const at::Tensor& x, const at::Tensor& norm_w, const at::Tensor& lm_head_w,
                                  const at::Tensor& labels, const llama_config& cfg, int64_t chunk_rows,
                                  double grad_scale, at::Tensor* dx, at::Tensor* g_norm, at::Tensor* g_lm_head,
                                  bool accumulate);

// Full logits (B,T,V) in fp32 (fp64 for fp64 x), for evaluation and generation.
at::Tensor head_logits(const at::Tensor& x, const at::Tensor& norm_w, const at::Tensor& lm_head_w,
                       const llama_config& cfg);

// One chunk's cross-entropy: loss_sum (a scalar) is added the summed loss of logits (N,V) against
// labels (N); when dlogits is non-null it is overwritten with grad_scale * (softmax - onehot), zero
// for ignored rows (it may alias logits). CUDA tensors use ferry::gpu's fused kernel.
void cross_entropy_forward_backward(const at::Tensor& logits, const at::Tensor& labels, double grad_scale,
                                    at::Tensor& loss_sum, at::Tensor* dlogits);
void cross_entropy_forward_backward_aten(const at::Tensor& logits, const at::Tensor& labels, double grad_scale,
                                         at::Tensor& loss_sum, at::Tensor* dlogits);

}  // namespace ferry::model
