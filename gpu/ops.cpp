// Tensor wrappers of ferry's elementwise and row kernels (gpu/ops.h): argument checks, output
// allocation on the caching allocator, dtype dispatch, and the current stream of the device.
#include "gpu/ops.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cmath>

#include "gpu/adamw.cuh"
#include "gpu/cross_entropy.cuh"
#include "gpu/dispatch.h"
#include "gpu/grad_stats.cuh"
#include "gpu/rmsnorm.cuh"
#include "gpu/rope.cuh"
#include "gpu/swiglu.cuh"

namespace ferry::gpu {
namespace {

using detail::ptr;

void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  FERRY_CHECK(t.defined() && t.is_cuda(), op, ": ", name, " must be a defined CUDA tensor");
}
void check_contiguous(const at::Tensor& t, const char* op, const char* name) {
  check_cuda(t, op, name);
  FERRY_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (got strides ", t.strides(), ")");
}
void check_same_dtype(const at::Tensor& a, const at::Tensor& b, const char* op, const char* name) {
  FERRY_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", name, " has dtype ", b.scalar_type(), ", expected ",
              a.scalar_type());
}
// Reuses out when it already has the right shape, dtype and layout; else allocates it.
void ensure_like(at::Tensor& out, const at::Tensor& like, const char* op, const char* name) {
  if (!out.defined()) {
    out = at::empty_like(like, at::MemoryFormat::Contiguous);
    return;
  }
  check_contiguous(out, op, name);
  FERRY_CHECK(out.sizes() == like.sizes(), op, ": ", name, " has shape ", out.sizes(), ", expected ", like.sizes());
  check_same_dtype(like, out, op, name);
}

cudaStream_t stream_of(const at::Tensor& t) { return at::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

}  // namespace

bool device_available() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky "no device" error
    return false;
  }
  return n > 0;
}

at::Tensor rmsnorm_forward(const at::Tensor& x, const at::Tensor& w, double eps, at::Tensor* rstd) {
  constexpr const char* op = "ferry::gpu::rmsnorm_forward";
  check_contiguous(x, op, "x");
  check_contiguous(w, op, "w");
  check_same_dtype(x, w, op, "w");
  FERRY_CHECK(x.dim() >= 1 && w.dim() == 1 && w.size(0) == x.size(-1), op, ": w ", w.sizes(),
              " must be (h) for x ", x.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t h = x.size(-1), n = h == 0 ? 0 : x.numel() / h;
  at::Tensor y = at::empty_like(x);
  float* rstd_ptr = nullptr;
  if (rstd != nullptr) {
    if (!rstd->defined() || rstd->numel() != n || rstd->scalar_type() != at::kFloat || !rstd->is_contiguous()) {
      *rstd = at::empty({n}, x.options().dtype(at::kFloat));
    }
    rstd_ptr = rstd->data_ptr<float>();
  }
  detail::dispatch_float(x.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    rmsnorm_forward_launch<T>(ptr<T>(y), rstd_ptr, ptr<T>(x), ptr<T>(w), n, h, static_cast<float>(eps),
                              stream_of(x));
  });
  return y;
}

void rmsnorm_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w, const at::Tensor& rstd,
                      at::Tensor& dx, at::Tensor& dw, bool accumulate) {
  constexpr const char* op = "ferry::gpu::rmsnorm_backward";
  check_contiguous(dy, op, "dy");
  check_contiguous(x, op, "x");
  check_contiguous(w, op, "w");
  check_contiguous(rstd, op, "rstd");
  check_same_dtype(x, dy, op, "dy");
  check_same_dtype(x, w, op, "w");
  FERRY_CHECK(dy.sizes() == x.sizes(), op, ": dy ", dy.sizes(), " must match x ", x.sizes());
  const int64_t h = x.size(-1), n = h == 0 ? 0 : x.numel() / h;
  FERRY_CHECK(w.dim() == 1 && w.size(0) == h, op, ": w ", w.sizes(), " must be (", h, ")");
  FERRY_CHECK(rstd.scalar_type() == at::kFloat && rstd.numel() == n, op, ": rstd must be fp32 (", n, ")");
  FERRY_CHECK(dw.defined() || !accumulate, op, ": accumulate needs a defined dw");
  const c10::cuda::CUDAGuard guard(x.device());
  ensure_like(dx, x, op, "dx");
  ensure_like(dw, w, op, "dw");
  at::Tensor scratch = at::empty({rmsnorm_backward_scratch_rows(n), h}, x.options().dtype(at::kFloat));
  detail::dispatch_float(x.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    rmsnorm_backward_launch<T>(ptr<T>(dx), ptr<T>(dw), accumulate, scratch.data_ptr<float>(), ptr<T>(dy), ptr<T>(x),
                               ptr<T>(w), rstd.data_ptr<float>(), n, h, stream_of(x));
  });
}

at::Tensor swiglu_forward(const at::Tensor& gate_up) {
  constexpr const char* op = "ferry::gpu::swiglu_forward";
  check_contiguous(gate_up, op, "gate_up");
  FERRY_CHECK(gate_up.dim() >= 1 && gate_up.size(-1) % 2 == 0, op, ": gate_up ", gate_up.sizes(),
              " must have an even last dimension (gate | up)");
  const c10::cuda::CUDAGuard guard(gate_up.device());
  const int64_t i = gate_up.size(-1) / 2, n = i == 0 ? 0 : gate_up.numel() / (2 * i);
  std::vector<int64_t> shape = gate_up.sizes().vec();
  shape.back() = i;
  at::Tensor y = at::empty(shape, gate_up.options());
  detail::dispatch_float(gate_up.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    swiglu_forward_launch<T>(ptr<T>(y), ptr<T>(gate_up), n, i, stream_of(gate_up));
  });
  return y;
}

void swiglu_backward(const at::Tensor& dy, const at::Tensor& gate_up, at::Tensor& d_gate_up) {
  constexpr const char* op = "ferry::gpu::swiglu_backward";
  check_contiguous(gate_up, op, "gate_up");
  check_contiguous(dy, op, "dy");
  check_same_dtype(gate_up, dy, op, "dy");
  const int64_t i = gate_up.size(-1) / 2, n = i == 0 ? 0 : gate_up.numel() / (2 * i);
  FERRY_CHECK(dy.numel() == n * i && dy.size(-1) == i, op, ": dy ", dy.sizes(), " does not match gate_up ",
              gate_up.sizes());
  const c10::cuda::CUDAGuard guard(gate_up.device());
  ensure_like(d_gate_up, gate_up, op, "d_gate_up");
  detail::dispatch_float(gate_up.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    swiglu_backward_launch<T>(ptr<T>(d_gate_up), ptr<T>(dy), ptr<T>(gate_up), n, i, stream_of(gate_up));
  });
}

void rope_apply_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool inverse) {
  constexpr const char* op = "ferry::gpu::rope_apply_";
  check_cuda(x, op, "x");
  check_contiguous(cos, op, "cos");
  check_contiguous(sin, op, "sin");
  FERRY_CHECK(x.dim() == 4 && x.stride(3) == 1, op, ": x must be (b, t, h, d) with a contiguous last dim, got ",
              x.sizes(), " strides ", x.strides());
  const int64_t b = x.size(0), t = x.size(1), h = x.size(2), d = x.size(3);
  FERRY_CHECK(d % 2 == 0, op, ": head dim ", d, " must be even");
  FERRY_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat, op, ": cos and sin must be fp32");
  FERRY_CHECK(cos.dim() == 2 && cos.size(0) == t && cos.size(1) == d && sin.sizes() == cos.sizes(), op,
              ": cos and sin must be (", t, ", ", d, "), got ", cos.sizes(), " and ", sin.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  detail::dispatch_float(x.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    rope_launch<T>(ptr<T>(x), cos.data_ptr<float>(), sin.data_ptr<float>(), b, t, h, d, x.stride(0), x.stride(1),
                   x.stride(2), inverse, stream_of(x));
  });
}

void cross_entropy_forward_backward(const at::Tensor& logits, const at::Tensor& labels, double grad_scale,
                                    at::Tensor& loss_sum, at::Tensor* dlogits) {
  constexpr const char* op = "ferry::gpu::cross_entropy_forward_backward";
  check_contiguous(logits, op, "logits");
  check_contiguous(labels, op, "labels");
  check_contiguous(loss_sum, op, "loss_sum");
  FERRY_CHECK(logits.dim() == 2, op, ": logits must be (n, v), got ", logits.sizes());
  const int64_t n = logits.size(0), v = logits.size(1);
  FERRY_CHECK(labels.scalar_type() == at::kLong && labels.numel() == n, op, ": labels must be int64 (", n, ")");
  FERRY_CHECK(loss_sum.scalar_type() == at::kFloat && loss_sum.numel() == 1, op, ": loss_sum must be one fp32");
  const c10::cuda::CUDAGuard guard(logits.device());
  void* dptr = nullptr;
  if (dlogits != nullptr) {
    ensure_like(*dlogits, logits, op, "dlogits");
    dptr = dlogits->data_ptr();
  }
  at::Tensor row_loss = at::empty({n}, logits.options().dtype(at::kFloat));
  detail::dispatch_float(logits.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    cross_entropy_launch<T>(loss_sum.data_ptr<float>(), row_loss.data_ptr<float>(), static_cast<T*>(dptr),
                            ptr<T>(logits), labels.data_ptr<int64_t>(), n, v, static_cast<float>(grad_scale),
                            stream_of(logits));
  });
}

void grad_stats_accumulate(const at::Tensor& flat, at::Tensor& acc) {
  constexpr const char* op = "ferry::gpu::grad_stats_accumulate";
  check_contiguous(flat, op, "flat");
  check_contiguous(acc, op, "acc");
  FERRY_CHECK(acc.scalar_type() == at::kFloat && acc.numel() == 2, op, ": acc must be fp32 (2)");
  const c10::cuda::CUDAGuard guard(flat.device());
  at::Tensor scratch = at::empty({grad_stats_scratch_floats()}, acc.options());
  detail::dispatch_float(flat.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    grad_stats_accumulate_launch<T>(acc.data_ptr<float>(), scratch.data_ptr<float>(), ptr<T>(flat), flat.numel(),
                                    stream_of(flat));
  });
}

void adamw_step(at::Tensor& p, at::Tensor& m, at::Tensor& v, const at::Tensor& grad, at::Tensor& half_out, double lr,
                double beta1, double beta2, double eps, double weight_decay, int64_t step, double grad_mult) {
  constexpr const char* op = "ferry::gpu::adamw_step";
  for (const at::Tensor* t : {&p, &m, &v}) {
    check_contiguous(*t, op, "p/m/v");
    FERRY_CHECK(t->scalar_type() == at::kFloat && t->numel() == p.numel(), op, ": p, m, v must be fp32 (",
                p.numel(), ")");
  }
  check_contiguous(grad, op, "grad");
  FERRY_CHECK(grad.numel() == p.numel(), op, ": grad has ", grad.numel(), " elements, p has ", p.numel());
  FERRY_CHECK(step >= 1, op, ": step counts from 1, got ", step);
  if (half_out.defined()) {
    check_contiguous(half_out, op, "half_out");
    FERRY_CHECK(half_out.numel() == p.numel() &&
                    (half_out.scalar_type() == at::kHalf || half_out.scalar_type() == at::kBFloat16),
                op, ": half_out must be float16 or bfloat16 (", p.numel(), ")");
  }
  adamw_scalars s{};
  s.lr = static_cast<float>(lr);
  s.beta1 = static_cast<float>(beta1);
  s.beta2 = static_cast<float>(beta2);
  s.eps = static_cast<float>(eps);
  s.decay = static_cast<float>(1.0 - lr * weight_decay);
  s.step_size = static_cast<float>(lr / (1.0 - std::pow(beta1, static_cast<double>(step))));
  s.bc2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, static_cast<double>(step))));
  s.grad_mult = static_cast<float>(grad_mult);
  const c10::cuda::CUDAGuard guard(p.device());
  const cudaStream_t stream = stream_of(p);
  const bool bf16_out = half_out.defined() && half_out.scalar_type() == at::kBFloat16;
  detail::dispatch_float(grad.scalar_type(), op, [&](auto tag) {
    using G = typename decltype(tag)::type;
    if (bf16_out) {
      adamw_step_launch<G, __nv_bfloat16>(ptr<float>(p), ptr<float>(m), ptr<float>(v), ptr<G>(grad),
                                          ptr<__nv_bfloat16>(half_out), p.numel(), s, stream);
    } else {
      adamw_step_launch<G, __half>(ptr<float>(p), ptr<float>(m), ptr<float>(v), ptr<G>(grad),
                                   half_out.defined() ? ptr<__half>(half_out) : nullptr, p.numel(), s, stream);
    }
  });
}

}  // namespace ferry::gpu
