#pragma once
// Tensor-level entry points to ferry's CUDA kernels (STYLE.md rule 2: the kernels in the .cu files
// take raw pointers, sizes and a stream; these wrappers check tensors and dispatch on dtype).
// Everything here runs on the current CUDA stream of the tensors' device. Only compiled when
// FERRY_WITH_CUDA is defined; src/model calls these for CUDA tensors and keeps the ATen
// composition as the CPU path and the test reference.
//
// dtypes: float, half, bfloat16 for activations and weights; all reductions in fp32.
#include <ATen/core/Tensor.h>

#include <tuple>

namespace ferry::gpu {

// True when a CUDA device can be used (the library may be built on a machine without one).
bool device_available();

// RMSNorm as HF LlamaRMSNorm: y = w * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype).
// x (N, H) contiguous, w (H). Returns y (N, H) in x's dtype; writes rstd (N) fp32 when non-null.
at::Tensor rmsnorm_forward(const at::Tensor& x, const at::Tensor& w, double eps, at::Tensor* rstd);
// dx (N, H) is written (overwritten); dw (H) is overwritten or, with accumulate, added to.
// rstd is what rmsnorm_forward wrote; it may be recomputed by the caller with the same formula.
void rmsnorm_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w, const at::Tensor& rstd,
                      at::Tensor& dx, at::Tensor& dw, bool accumulate);

// SwiGLU: y = silu(gate) * up, computed in fp32, stored in the input dtype. gate_up (N, 2I):
// gate is columns [0, I), up is [I, 2I) (the fused gate/up projection's output). Returns y (N, I).
at::Tensor swiglu_forward(const at::Tensor& gate_up);
// d_gate_up (N, 2I) is overwritten with [dgate | dup].
void swiglu_backward(const at::Tensor& dy, const at::Tensor& gate_up, at::Tensor& d_gate_up);

// Rotary embedding, HF rotate_half convention, in place on x (B, T, H, D) (any strides with the
// last dim contiguous). cos, sin (T, D) fp32 for the positions of x's T axis.
// inverse=true applies the transpose rotation (the backward of the forward rotation).
void rope_apply_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool inverse);

// Cross-entropy over one chunk of rows. logits (N, V) any float dtype; labels (N) int64 with -100
// ignored. loss_sum (fp32 scalar on the device) is ADDED the sum of per-row losses; when dlogits is
// non-null it is overwritten with grad_scale * (softmax(logits) - onehot(label)) in its own dtype
// (zero for ignored rows). dlogits may alias logits.
void cross_entropy_forward_backward(const at::Tensor& logits, const at::Tensor& labels, double grad_scale,
                                    at::Tensor& loss_sum, at::Tensor* dlogits);

// Causal attention. q (B, Hq, T, D), k and v (B, Hkv, T, D), Hq a multiple of Hkv (GQA).
// Returns out (B, Hq, T, D) in q's dtype and lse (B, Hq, T) fp32 (log-sum-exp of scaled scores).
// Uses libtorch's fused kernels where they apply (head dim <= 256: cuDNN's or flash attention in
// fp16/bf16, the memory-efficient kernel in fp32), and ferry's own path (cuBLAS batched GEMMs with
// a fused causal softmax) otherwise.
std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     double scale);
// Whether attention_forward/attention_backward run cuDNN's fused attention for q (fp16/bf16, head
// dim a multiple of 8 up to 128, sm 9.x, cuDNN 9, and no cuDNN error so far in this process);
// otherwise flash attention. set_attention_cudnn(false) makes them take flash attention (tests,
// diagnosis); returns the previous setting.
bool attention_uses_cudnn(const at::Tensor& q);
bool set_attention_cudnn(bool prefer);
// Inference (no lse, no backward): q (B, Hq, Tq, D) holds the LAST Tq positions of the Tk >= Tq
// positions of k and v (B, Hkv, Tk, D), i.e. query row i is position Tk - Tq + i and sees keys
// [0, Tk - Tq + i]: a chunk of new tokens against a KV cache ending with their own keys. Any strides
// with a contiguous last dim (k, v may be a prefix of a longer cache; they are not copied).
// head_dim <= 256 in fp16/bf16: flash attention; otherwise the large-head GEMMs and softmax.
at::Tensor attention_forward_offset(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale);
// Returns dq, dk, dv shaped like q, k, v.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(const at::Tensor& dout, const at::Tensor& q,
                                                                  const at::Tensor& k, const at::Tensor& v,
                                                                  const at::Tensor& out, const at::Tensor& lse,
                                                                  double scale);

// Packed rows (block-diagonal causal attention) through flash attention's variable-length entry:
// q (B, Hq, T, D), k, v (B, Hkv, T, D) fp16/bf16 with D <= 256; cu_seqlens (runs + 1) int32 on the
// device: where each run of the B*T tokens (rows laid end to end) starts, then B*T; max_run the
// longest run. A token attends causally to the tokens of its own run. Returns out (B, Hq, T, D) (a
// transposed view of (B, T, Hq, D) memory) and lse, fp32 in the kernel's layout ((Hq, B*T) in
// flash attention 2), which only the backward reads.
bool attention_varlen_supported(const at::Tensor& q);
std::tuple<at::Tensor, at::Tensor> attention_forward_varlen(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, const at::Tensor& cu_seqlens,
                                                            int64_t max_run, double scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_varlen(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_seqlens, int64_t max_run, double scale);

// Adds to acc (fp32 (2) on the device) [sum of squares of flat in fp32, count of non-finite
// elements]. flat is a 1-D gradient buffer (half, bfloat16 or float).
void grad_stats_accumulate(const at::Tensor& flat, at::Tensor& acc);

// Fused AdamW for the "none" mode (everything resident on the GPU), PyTorch's AdamW semantics:
// p *= 1 - lr*wd; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; p -= lr/(1-b1^t) * m / (sqrt(v/(1-b2^t)) + eps)
// with g = grad * grad_mult. p, m, v fp32 (n); grad half/bf16/fp32 (n); half_out (n) half or bf16
// receives the rounded new p (round-to-nearest-even) when defined. All updated in place.
void adamw_step(at::Tensor& p, at::Tensor& m, at::Tensor& v, const at::Tensor& grad, at::Tensor& half_out,
                double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step,
                double grad_mult);

}  // namespace ferry::gpu
