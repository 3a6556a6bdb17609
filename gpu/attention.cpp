// Causal grouped-query attention on CUDA (gpu/ops.h).
//  - head_dim <= 256: libtorch's fused SDPA kernels. fp16/bf16 use cuDNN's fused attention where it
//    applies (sm 9.x, head_dim a multiple of 8 up to 128; 1.59x flash attention's forward +
//    backward on the 1b shape, GQA 32/4, on an H200: BENCHMARKS.md "Kernels"), else flash attention.
//    Ampere and Ada cards (the RTX 4090) keep flash attention until cuDNN's is measured on them.
//    Both handle GQA natively (dk, dv come back with Hkv heads) and return the same log-sum-exp, so
//    either backward takes either forward's lse; a cuDNN error (an unsupported card or shape)
//    switches the process to flash attention for good, with one warning. fp32 uses the
//    memory-efficient kernel, which does not handle GQA, so k/v are expanded and their gradients
//    summed back over each group. head_dim is zero-padded to a multiple of 8 (e.g. 100 -> 104), as
//    aten's scaled_dot_product_attention does: zero columns leave q.k and the first d columns of the
//    output unchanged.
//  - head_dim > 256 (the debug shape: 1024): cuBLAS batched GEMMs with fp32 accumulation plus ferry's
//    fused causal softmax (gpu/attention_softmax.cuh). The forward keeps only out and lse; the
//    backward recomputes the scores and P from lse. GQA is free: q viewed as (b*hkv, g*t, d) shares
//    one k/v per group, and the dk/dv GEMMs sum over the group in their reduction dimension.
//    Memory: two (b*hq, t, t) score buffers in the input dtype during the backward.
//  - packed rows (several sequences per row, each attending only to itself), fp16/bf16 with
//    head_dim <= 256: flash attention's variable-length kernels (at::_flash_attention_forward with
//    cu_seqlens) over the rows' tokens laid end to end. Other packed cases take the model's ATen
//    composition with a block-diagonal mask (src/model/attention.cpp).
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "gpu/attention_rule.h"
#include "gpu/attention_softmax.cuh"
#include "gpu/dispatch.h"
#include "gpu/ops.h"

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace ferry::gpu {
namespace {

using detail::ptr;

constexpr int64_t k_sdpa_max_head_dim = 256;

struct attn_shape {
  int64_t b, hq, hkv, t, d;
  int64_t group() const { return hq / hkv; }
};

attn_shape check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* op) {
  for (const at::Tensor* x : {&q, &k, &v}) {
    FERRY_CHECK(x->defined() && x->is_cuda() && x->dim() == 4, op, ": q, k, v must be 4-D CUDA tensors (b, h, t, d)");
    FERRY_CHECK(x->scalar_type() == q.scalar_type(), op, ": q, k, v must share a dtype");
  }
  attn_shape s{q.size(0), q.size(1), k.size(1), q.size(2), q.size(3)};
  FERRY_CHECK(k.sizes() == v.sizes() && k.size(0) == s.b && k.size(2) == s.t && k.size(3) == s.d, op, ": k ",
              k.sizes(), " and v ", v.sizes(), " must be (", s.b, ", hkv, ", s.t, ", ", s.d, ") for q ", q.sizes());
  FERRY_CHECK(s.hkv > 0 && s.hq % s.hkv == 0, op, ": query heads ", s.hq, " must be a multiple of kv heads ", s.hkv);
  return s;
}

at::Tensor pad_head_dim(const at::Tensor& x) {
  const int64_t d = x.size(-1), pad = (8 - d % 8) % 8;
  if (pad == 0) return x.stride(-1) == 1 ? x : x.contiguous();  // the fused kernels take any outer strides
  return at::constant_pad_nd(x, {0, pad});
}
at::Tensor unpad_head_dim(const at::Tensor& x, int64_t d) {
  return x.size(-1) == d ? x : x.narrow(-1, 0, d).contiguous();
}

bool use_flash(const at::Tensor& q) { return q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16; }

// set_attention_cudnn; FERRY_CUDNN_ATTENTION=0 in the environment starts the process with flash
// attention.
bool prefer_cudnn_from_env() {
  const char* e = std::getenv("FERRY_CUDNN_ATTENTION");
  return !(e && std::string(e) == "0");
}
std::atomic<bool> g_prefer_cudnn{prefer_cudnn_from_env()};
std::atomic<bool> g_cudnn_failed{false};  // a cuDNN call threw: flash attention from then on

// Whether the dense causal path runs cuDNN's fused attention for q (see the file's comment).
bool cudnn_applies(const at::Tensor& q) {
  if (!use_flash(q) || !g_prefer_cudnn.load() || g_cudnn_failed.load()) return false;
  const int64_t d = q.size(-1);
  if (!cudnn_attention_head_dim(d) || !at::globalContext().userEnabledCuDNN() || !at::globalContext().hasCuDNN() ||
      at::globalContext().versionRuntimeCuDNN() < 90000)
    return false;
  const cudaDeviceProp* p = at::cuda::getDeviceProperties(q.device().index());
  return p->major == 9;
}

void cudnn_failed(const c10::Error& e) {
  if (!g_cudnn_failed.exchange(true))
    std::fprintf(stderr, "ferry: cuDNN attention failed (%s); using flash attention from now on\n",
                 e.what_without_backtrace());
}

at::Tensor cuda_scalar_long(const at::Tensor& like) { return at::empty({}, like.options().dtype(at::kLong)); }

// (b, hkv, t, d) -> (b, hq, t, d), each kv head repeated for its group (HF repeat_kv order).
at::Tensor expand_kv(const at::Tensor& x, int64_t group) {
  return group == 1 ? x : x.repeat_interleave(group, 1);
}
// The gradient of expand_kv: (b, hq, t, d) -> (b, hkv, t, d).
at::Tensor reduce_kv(const at::Tensor& dx, int64_t group) {
  if (group == 1) return dx;
  return dx.view({dx.size(0), dx.size(1) / group, group, dx.size(2), dx.size(3)}).sum(2);
}

std::tuple<at::Tensor, at::Tensor> sdpa_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                const attn_shape& s, double scale) {
  if (cudnn_applies(q)) {
    try {
      auto r = at::_scaled_dot_product_cudnn_attention(pad_head_dim(q), pad_head_dim(k), pad_head_dim(v),
                                                       std::nullopt, /*compute_log_sumexp=*/true, 0.0,
                                                       /*is_causal=*/true, /*return_debug_mask=*/false, scale);
      // lse comes as (b, hq, t, 1).
      return {std::get<0>(r), std::get<1>(r).view({s.b, s.hq, s.t})};
    } catch (const c10::Error& e) {
      cudnn_failed(e);
    }
  }
  if (use_flash(q)) {
    auto r = at::_scaled_dot_product_flash_attention(pad_head_dim(q), pad_head_dim(k), pad_head_dim(v), 0.0,
                                                     /*is_causal=*/true, /*return_debug_mask=*/false, scale);
    return {unpad_head_dim(std::get<0>(r), s.d), std::get<1>(r)};
  }
  auto r = at::_scaled_dot_product_efficient_attention(pad_head_dim(q), pad_head_dim(expand_kv(k, s.group())),
                                                       pad_head_dim(expand_kv(v, s.group())), std::nullopt,
                                                       /*compute_log_sumexp=*/true, 0.0, /*is_causal=*/true, scale);
  // The kernel pads lse's time axis to a multiple of 32; hand back exactly (b, hq, t).
  return {unpad_head_dim(std::get<0>(r), s.d), std::get<1>(r).narrow(2, 0, s.t).contiguous()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sdpa_backward(const at::Tensor& dout, const at::Tensor& q,
                                                             const at::Tensor& k, const at::Tensor& v,
                                                             const at::Tensor& out, const at::Tensor& lse,
                                                             const attn_shape& s, double scale) {
  if (cudnn_applies(q)) {
    try {
      // No dropout: the seed and offset are never read, but the op wants defined tensors.
      auto r = at::_scaled_dot_product_cudnn_attention_backward(
          pad_head_dim(dout), pad_head_dim(q), pad_head_dim(k), pad_head_dim(v), pad_head_dim(out),
          lse.contiguous().view({s.b, s.hq, s.t, 1}), cuda_scalar_long(q), cuda_scalar_long(q), at::Tensor(),
          at::Tensor(), at::Tensor(), s.t, s.t, 0.0, /*is_causal=*/true, scale);
      return {std::get<0>(r), std::get<1>(r), std::get<2>(r)};
    } catch (const c10::Error& e) {
      cudnn_failed(e);
    }
  }
  if (use_flash(q)) {
    // No dropout: the rng state is never read, but the op wants defined tensors.
    const at::Tensor seed = at::zeros({2}, q.options().dtype(at::kUInt64));
    const at::Tensor offset = at::empty({0}, q.options().dtype(at::kUInt64));
    auto r = at::_scaled_dot_product_flash_attention_backward(
        pad_head_dim(dout), pad_head_dim(q), pad_head_dim(k), pad_head_dim(v), pad_head_dim(out), lse.contiguous(),
        at::Tensor(), at::Tensor(), s.t, s.t, 0.0, /*is_causal=*/true, seed, offset, scale);
    return {unpad_head_dim(std::get<0>(r), s.d), unpad_head_dim(std::get<1>(r), s.d),
            unpad_head_dim(std::get<2>(r), s.d)};
  }
  const int64_t t_pad = (s.t + 31) / 32 * 32;
  const at::Tensor lse_pad = at::constant_pad_nd(lse.contiguous(), {0, t_pad - s.t});
  const at::Tensor seed = at::empty({}, at::dtype(at::kLong));
  const at::Tensor offset = at::empty({}, at::dtype(at::kLong));
  auto r = at::_scaled_dot_product_efficient_attention_backward(
      pad_head_dim(dout), pad_head_dim(q), pad_head_dim(expand_kv(k, s.group())),
      pad_head_dim(expand_kv(v, s.group())), at::Tensor(), pad_head_dim(out), lse_pad, seed, offset, 0.0,
      {true, true, true, false}, /*is_causal=*/true, scale);
  return {unpad_head_dim(std::get<0>(r), s.d), reduce_kv(unpad_head_dim(std::get<1>(r), s.d), s.group()),
          reduce_kv(unpad_head_dim(std::get<2>(r), s.d), s.group())};
}

// q as (b*hkv, g*t, d): the g query heads of one kv head stacked along time.
at::Tensor grouped_q(const at::Tensor& x, const attn_shape& s) {
  return x.contiguous().view({s.b * s.hkv, s.group() * s.t, s.d});
}
at::Tensor grouped_kv(const at::Tensor& x, const attn_shape& s) { return x.contiguous().view({s.b * s.hkv, s.t, s.d}); }

std::tuple<at::Tensor, at::Tensor> large_head_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const attn_shape& s, double scale) {
  const at::Tensor qg = grouped_q(q, s), kg = grouped_kv(k, s), vg = grouped_kv(v, s);
  at::Tensor scores = at::bmm(qg, kg.transpose(1, 2));  // (b*hkv, g*t, t), raw (unscaled)
  at::Tensor lse = at::empty({s.b, s.hq, s.t}, q.options().dtype(at::kFloat));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(q.device().index()).stream();
  detail::dispatch_float(q.scalar_type(), "ferry::gpu::attention_forward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    attention_softmax_forward_launch<T>(ptr<T>(scores), lse.data_ptr<float>(), ptr<T>(scores), s.b * s.hq * s.t, s.t,
                                        s.t, 0, static_cast<float>(scale), stream);
  });
  at::Tensor out = at::bmm(scores, vg).view({s.b, s.hq, s.t, s.d});
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> large_head_backward(const at::Tensor& dout, const at::Tensor& q,
                                                                   const at::Tensor& k, const at::Tensor& v,
                                                                   const at::Tensor& out, const at::Tensor& lse,
                                                                   const attn_shape& s, double scale) {
  const at::Tensor qg = grouped_q(q, s), kg = grouped_kv(k, s), vg = grouped_kv(v, s);
  const at::Tensor dog = grouped_q(dout, s), og = grouped_q(out, s);
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor p = at::bmm(qg, kg.transpose(1, 2));     // raw scores, overwritten with P
  at::Tensor ds = at::bmm(dog, vg.transpose(1, 2));   // dP, overwritten with d(raw scores)
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(q.device().index()).stream();
  detail::dispatch_float(q.scalar_type(), "ferry::gpu::attention_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    attention_softmax_backward_launch<T>(ptr<T>(p), ptr<T>(ds), ptr<T>(p), ptr<T>(ds), ptr<T>(og), ptr<T>(dog),
                                         lse_c.data_ptr<float>(), s.b * s.hq * s.t, s.t, s.d,
                                         static_cast<float>(scale), stream);
  });
  at::Tensor dv = at::bmm(p.transpose(1, 2), dog).view({s.b, s.hkv, s.t, s.d});
  at::Tensor dq = at::bmm(ds, kg).view({s.b, s.hq, s.t, s.d});
  at::Tensor dk = at::bmm(ds.transpose(1, 2), qg).view({s.b, s.hkv, s.t, s.d});
  return {dq, dk, dv};
}

// Queries at the end of the keys (inference). The large-head GEMMs read k and v through views, so a
// prefix of a longer cache (any batch strides) is not copied; q is small (one chunk of rows).
at::Tensor large_head_forward_offset(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t tk,
                                     const attn_shape& s, double scale) {
  const at::Tensor qg = grouped_q(q, s);
  const at::Tensor kg = k.reshape({s.b * s.hkv, tk, s.d}), vg = v.reshape({s.b * s.hkv, tk, s.d});
  at::Tensor scores = at::bmm(qg, kg.transpose(1, 2));  // (b*hkv, g*tq, tk), raw (unscaled)
  at::Tensor lse = at::empty({s.b * s.hq * s.t}, q.options().dtype(at::kFloat));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(q.device().index()).stream();
  detail::dispatch_float(q.scalar_type(), "ferry::gpu::attention_forward_offset", [&](auto tag) {
    using T = typename decltype(tag)::type;
    attention_softmax_forward_launch<T>(ptr<T>(scores), lse.data_ptr<float>(), ptr<T>(scores), s.b * s.hq * s.t, s.t,
                                        tk, tk - s.t, static_cast<float>(scale), stream);
  });
  return at::bmm(scores, vg).view({s.b, s.hq, s.t, s.d});
}

// (b, h, t, d) -> (b*t, h, d): the token-major layout of the variable-length kernels (a copy
// unless x is already a transposed view of that memory), head_dim padded to a multiple of 8.
at::Tensor tokens_major(const at::Tensor& x) {
  return pad_head_dim(x.transpose(1, 2).reshape({x.size(0) * x.size(2), x.size(1), x.size(3)}));
}
// (b*t, h, dp) -> (b, h, t, d), a view.
at::Tensor heads_major(const at::Tensor& x, int64_t b, int64_t t, int64_t d) {
  return unpad_head_dim(x, d).view({b, t, x.size(1), d}).transpose(1, 2);
}

void check_varlen(const at::Tensor& q, const at::Tensor& cu_seqlens, int64_t max_run, const attn_shape& s,
                  const char* op) {
  FERRY_CHECK(use_flash(q) && s.d <= k_sdpa_max_head_dim, op, ": packed attention runs flash attention, which needs ",
              "fp16/bf16 and head_dim <= 256; got ", q.scalar_type(), " and head_dim ", s.d);
  FERRY_CHECK(cu_seqlens.is_cuda() && cu_seqlens.scalar_type() == at::kInt && cu_seqlens.dim() == 1 &&
                  cu_seqlens.size(0) >= 2,
              op, ": cu_seqlens must be int32 (runs + 1) on the device");
  FERRY_CHECK(max_run >= 1 && max_run <= s.t, op, ": max_run ", max_run, " outside [1, ", s.t, "]");
}

}  // namespace

bool attention_varlen_supported(const at::Tensor& q) {
  return q.is_cuda() && use_flash(q) && q.size(-1) <= k_sdpa_max_head_dim;
}

std::tuple<at::Tensor, at::Tensor> attention_forward_varlen(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, const at::Tensor& cu_seqlens,
                                                            int64_t max_run, double scale) {
  constexpr const char* op = "ferry::gpu::attention_forward_varlen";
  const attn_shape s = check_qkv(q, k, v, op);
  check_varlen(q, cu_seqlens, max_run, s, op);
  const c10::cuda::CUDAGuard guard(q.device());
  auto r = at::_flash_attention_forward(tokens_major(q), tokens_major(k), tokens_major(v), cu_seqlens, cu_seqlens,
                                        max_run, max_run, 0.0, /*is_causal=*/true, /*return_debug_mask=*/false, scale);
  return {heads_major(std::get<0>(r), s.b, s.t, s.d), std::get<1>(r)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_varlen(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_seqlens, int64_t max_run, double scale) {
  constexpr const char* op = "ferry::gpu::attention_backward_varlen";
  const attn_shape s = check_qkv(q, k, v, op);
  check_varlen(q, cu_seqlens, max_run, s, op);
  FERRY_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes(), op, ": dout and out must be shaped like q ",
              q.sizes());
  FERRY_CHECK(lse.defined() && lse.scalar_type() == at::kFloat, op, ": lse must be the fp32 tensor the forward returned");
  const c10::cuda::CUDAGuard guard(q.device());
  // No dropout: the rng state is never read, but the op wants defined tensors.
  const at::Tensor seed = at::zeros({2}, q.options().dtype(at::kUInt64));
  const at::Tensor offset = at::empty({0}, q.options().dtype(at::kUInt64));
  auto r = at::_flash_attention_backward(tokens_major(dout), tokens_major(q), tokens_major(k), tokens_major(v),
                                         tokens_major(out), lse.contiguous(), cu_seqlens, cu_seqlens, max_run, max_run,
                                         0.0, /*is_causal=*/true, seed, offset, scale);
  return {heads_major(std::get<0>(r), s.b, s.t, s.d), heads_major(std::get<1>(r), s.b, s.t, s.d),
          heads_major(std::get<2>(r), s.b, s.t, s.d)};
}

at::Tensor attention_forward_offset(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  constexpr const char* op = "ferry::gpu::attention_forward_offset";
  for (const at::Tensor* x : {&q, &k, &v}) {
    FERRY_CHECK(x->defined() && x->is_cuda() && x->dim() == 4 && x->stride(3) == 1, op,
                ": q, k, v must be 4-D CUDA tensors (b, h, t, d) with a contiguous last dim");
    FERRY_CHECK(x->scalar_type() == q.scalar_type(), op, ": q, k, v must share a dtype");
  }
  const attn_shape s{q.size(0), q.size(1), k.size(1), q.size(2), q.size(3)};
  const int64_t tk = k.size(2);
  FERRY_CHECK(k.sizes() == v.sizes() && k.size(0) == s.b && k.size(3) == s.d && tk >= s.t, op, ": k ", k.sizes(),
              " and v ", v.sizes(), " must be (", s.b, ", hkv, >= ", s.t, ", ", s.d, ") for q ", q.sizes());
  FERRY_CHECK(s.hkv > 0 && s.hq % s.hkv == 0, op, ": query heads ", s.hq, " must be a multiple of kv heads ", s.hkv);
  const c10::cuda::CUDAGuard guard(q.device());
  if (s.d <= k_sdpa_max_head_dim && use_flash(q)) {
    // Flash attention aligns the causal mask to the bottom right when there are fewer queries than
    // keys (the query at row i sees keys <= tk - tq + i), which is this function's contract; it
    // handles GQA and takes any outer strides.
    auto r = at::_scaled_dot_product_flash_attention(pad_head_dim(q), pad_head_dim(k), pad_head_dim(v), 0.0,
                                                     /*is_causal=*/true, /*return_debug_mask=*/false, scale);
    return unpad_head_dim(std::get<0>(r), s.d);
  }
  return large_head_forward_offset(q, k, v, tk, s, scale);
}

std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     double scale) {
  const attn_shape s = check_qkv(q, k, v, "ferry::gpu::attention_forward");
  const c10::cuda::CUDAGuard guard(q.device());
  if (s.d <= k_sdpa_max_head_dim) return sdpa_forward(q, k, v, s, scale);
  return large_head_forward(q, k, v, s, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(const at::Tensor& dout, const at::Tensor& q,
                                                                  const at::Tensor& k, const at::Tensor& v,
                                                                  const at::Tensor& out, const at::Tensor& lse,
                                                                  double scale) {
  constexpr const char* op = "ferry::gpu::attention_backward";
  const attn_shape s = check_qkv(q, k, v, op);
  FERRY_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes(), op, ": dout and out must be shaped like q ",
              q.sizes());
  FERRY_CHECK(dout.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(), op,
              ": dout and out must share q's dtype");
  FERRY_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 3 && lse.size(0) == s.b && lse.size(1) == s.hq &&
                  lse.size(2) == s.t,
              op, ": lse must be fp32 (", s.b, ", ", s.hq, ", ", s.t, "), got ", lse.sizes());
  const c10::cuda::CUDAGuard guard(q.device());
  if (s.d <= k_sdpa_max_head_dim) return sdpa_backward(dout, q, k, v, out, lse, s, scale);
  return large_head_backward(dout, q, k, v, out, lse, s, scale);
}

bool set_attention_cudnn(bool prefer) { return g_prefer_cudnn.exchange(prefer); }

bool attention_uses_cudnn(const at::Tensor& q) {
  return q.is_cuda() && q.dim() == 4 && cudnn_applies(q);   // cudnn_applies bounds head_dim at 128
}

}  // namespace ferry::gpu
