// ferry-bench-kernels: each fused kernel of gpu/ against the ATen composition it replaces, at the
// request's debug shape and the 1b shape, timed with CUDA events (warm-up, then the median of the
// timed iterations). "fwd+bwd" rows time both directions: ferry's kernels vs ATen's forward plus
// its autograd backward; "attention: flash vs cudnn" times ferry's own attention with flash
// attention (first column) and with cuDNN's (second), where cuDNN's applies. Not a test; results
// go into gpu/README.md and BENCHMARKS.md.
//
// usage: ferry-bench-kernels [fp16|bf16] [iters]
#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "gpu/ops.h"
#include "gpu/runtime.h"

namespace {

using ferry::gpu::event;

int g_iters = 20;

// Median milliseconds of fn on the current stream (the legacy default stream in this binary).
double time_ms(const std::function<void()>& fn) {
  for (int i = 0; i < 3; ++i) fn();
  std::vector<double> ms;
  event start(true), end(true);
  for (int i = 0; i < g_iters; ++i) {
    start.record(nullptr);
    fn();
    end.record(nullptr);
    end.synchronize();
    ms.push_back(event::elapsed_ms(start, end));
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

struct shape {
  const char* name;
  int64_t t, h, i, v, heads, kv_heads, head_dim;
};

void row(const char* op, const shape& s, double aten_ms, double ferry_ms) {
  std::printf("| %-26s | %-5s | %9.3f | %9.3f | %6.2fx |\n", op, s.name, aten_ms, ferry_ms, aten_ms / ferry_ms);
}

at::Tensor rand(at::IntArrayRef sizes, at::ScalarType dt) {
  return at::randn(sizes, at::TensorOptions().device(at::kCUDA).dtype(dt));
}

at::Tensor aten_rmsnorm(const at::Tensor& x, const at::Tensor& w, double eps) {
  const at::Tensor xf = x.to(at::kFloat);
  const at::Tensor r = at::rsqrt(xf.pow(2).mean(-1, true) + eps);
  return w * (xf * r).to(x.scalar_type());
}

at::Tensor rotate_half(const at::Tensor& x) {
  const int64_t d = x.size(-1);
  return at::cat({-x.narrow(-1, d / 2, d / 2), x.narrow(-1, 0, d / 2)}, -1);
}

void bench_shape(const shape& s, at::ScalarType dt) {
  const double eps = 1e-5;
  const int64_t n = s.t;
  // RMSNorm
  {
    at::Tensor x = rand({n, s.h}, dt), w = rand({s.h}, dt), dy = rand({n, s.h}, dt);
    double a, f;
    {
      c10::NoGradGuard ng;
      a = time_ms([&] { aten_rmsnorm(x, w, eps); });
      f = time_ms([&] { ferry::gpu::rmsnorm_forward(x, w, eps, nullptr); });
    }
    row("rmsnorm fwd", s, a, f);
    at::Tensor xg = x.detach().requires_grad_(true), wg = w.detach().requires_grad_(true);
    a = time_ms([&] { aten_rmsnorm(xg, wg, eps).backward(dy); });
    c10::NoGradGuard ng;
    at::Tensor rstd, dx, dw;
    f = time_ms([&] {
      ferry::gpu::rmsnorm_forward(x, w, eps, &rstd);
      ferry::gpu::rmsnorm_backward(dy, x, w, rstd, dx, dw, false);
    });
    row("rmsnorm fwd+bwd", s, a, f);
  }
  // SwiGLU
  {
    at::Tensor gu = rand({n, 2 * s.i}, dt), dy = rand({n, s.i}, dt);
    double a, f;
    {
      c10::NoGradGuard ng;
      a = time_ms([&] { at::silu(gu.narrow(1, 0, s.i)) * gu.narrow(1, s.i, s.i); });
      f = time_ms([&] { ferry::gpu::swiglu_forward(gu); });
    }
    row("swiglu fwd", s, a, f);
    at::Tensor gug = gu.detach().requires_grad_(true);
    a = time_ms([&] { (at::silu(gug.narrow(1, 0, s.i)) * gug.narrow(1, s.i, s.i)).backward(dy); });
    c10::NoGradGuard ng;
    at::Tensor dgu;
    f = time_ms([&] {
      at::Tensor y = ferry::gpu::swiglu_forward(gu);
      ferry::gpu::swiglu_backward(dy, gu, dgu);
    });
    row("swiglu fwd+bwd", s, a, f);
  }
  // RoPE on q, HF style (cos/sin cast to the activation dtype, then two products and a sum).
  {
    c10::NoGradGuard ng;
    at::Tensor q = rand({1, s.t, s.heads, s.head_dim}, dt);
    at::Tensor cos = at::rand({s.t, s.head_dim}, q.options().dtype(at::kFloat));
    at::Tensor sin = at::rand({s.t, s.head_dim}, q.options().dtype(at::kFloat));
    at::Tensor cos_h = cos.to(dt).view({1, s.t, 1, s.head_dim}), sin_h = sin.to(dt).view({1, s.t, 1, s.head_dim});
    const double a = time_ms([&] { q * cos_h + rotate_half(q) * sin_h; });
    const double f = time_ms([&] { ferry::gpu::rope_apply_(q, cos, sin, false); });
    row("rope q fwd (in place)", s, a, f);
  }
  // Cross-entropy over the whole sequence (one chunk), loss + dlogits.
  {
    at::Tensor logits = rand({n, s.v}, dt);
    at::Tensor labels = at::randint(0, s.v, {n}, logits.options().dtype(at::kLong));
    at::Tensor lg = logits.detach().requires_grad_(true);
    const double a = time_ms([&] { at::cross_entropy_loss(lg.to(at::kFloat), labels).backward(); });
    c10::NoGradGuard ng;
    at::Tensor loss = at::zeros({1}, logits.options().dtype(at::kFloat)), dl = at::empty_like(logits);
    const double f = time_ms([&] {
      ferry::gpu::cross_entropy_forward_backward(logits, labels, 1.0 / static_cast<double>(n), loss, &dl);
    });
    row("cross-entropy fwd+bwd", s, a, f);
  }
  // Gradient statistics and AdamW over one layer's parameters.
  {
    c10::NoGradGuard ng;
    const int64_t q_out = s.heads * s.head_dim, kv_out = s.kv_heads * s.head_dim;
    const int64_t layer = s.h * (q_out + 2 * kv_out) + q_out * s.h + 3 * s.h * s.i + 2 * s.h;
    at::Tensor g = rand({layer}, dt);
    at::Tensor acc = at::zeros({2}, g.options().dtype(at::kFloat));
    double a = time_ms([&] {
      acc += at::stack({g.to(at::kFloat).square().sum(), at::logical_not(at::isfinite(g)).sum().to(at::kFloat)});
    });
    double f = time_ms([&] { ferry::gpu::grad_stats_accumulate(g, acc); });
    row("grad stats (1 layer)", s, a, f);

    at::Tensor p = rand({layer}, at::kFloat), m = at::zeros_like(p), v = at::zeros_like(p);
    at::Tensor half_out = at::empty({layer}, g.options());
    at::Tensor step = at::ones({}, p.options());
    a = time_ms([&] {
      at::Tensor gf = g.to(at::kFloat);
      at::_fused_adamw_({p}, {gf}, {m}, {v}, {}, {step}, 1e-4, 0.9, 0.95, 0.1, 1e-8, false, false);
      half_out.copy_(p);
    });
    f = time_ms([&] { ferry::gpu::adamw_step(p, m, v, g, half_out, 1e-4, 0.9, 0.95, 1e-8, 0.1, 1, 1.0); });
    row("adamw (1 layer, +half copy)", s, a, f);
  }
  // Attention forward + backward: ferry vs the math SDPA backend (and the default SDPA for reference).
  {
    at::Tensor q = rand({1, s.heads, s.t, s.head_dim}, dt), k = rand({1, s.kv_heads, s.t, s.head_dim}, dt),
               v = rand({1, s.kv_heads, s.t, s.head_dim}, dt), dout = rand({1, s.heads, s.t, s.head_dim}, dt);
    const double scale = 1.0 / std::sqrt(static_cast<double>(s.head_dim));
    at::Tensor qg = q.detach().requires_grad_(true), kg = k.detach().requires_grad_(true),
               vg = v.detach().requires_grad_(true);
    const bool gqa = s.heads != s.kv_heads;
    const double a = time_ms([&] {
      std::get<0>(at::_scaled_dot_product_attention_math(qg, kg, vg, {}, 0.0, true, {}, scale, gqa)).backward(dout);
    });
    const double sd = time_ms([&] {
      at::scaled_dot_product_attention(qg, kg, vg, {}, 0.0, true, scale, gqa).backward(dout);
    });
    c10::NoGradGuard ng;
    auto ferry_attention = [&] {
      auto [out, lse] = ferry::gpu::attention_forward(q, k, v, scale);
      ferry::gpu::attention_backward(dout, q, k, v, out, lse, scale);
    };
    const double f = time_ms(ferry_attention);
    row("attention fwd+bwd vs math", s, a, f);
    row("attention fwd+bwd vs sdpa", s, sd, f);
    if (ferry::gpu::attention_uses_cudnn(q)) {   // ferry's flash attention path against its cuDNN one
      const bool was = ferry::gpu::set_attention_cudnn(false);
      const double fl = time_ms(ferry_attention);
      ferry::gpu::set_attention_cudnn(was);
      row("attention: flash vs cudnn", s, fl, f);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (!ferry::gpu::device_available()) {
    std::fprintf(stderr, "ferry-bench-kernels: no CUDA device; run it on the GPU machine\n");
    return 1;
  }
  const std::string dts = argc > 1 ? argv[1] : "fp16";
  if (argc > 2) g_iters = std::max(1, std::atoi(argv[2]));
  const at::ScalarType dt = dts == "bf16" ? at::kBFloat16 : at::kHalf;
  at::manual_seed(0);
  const shape shapes[] = {
      {"debug", 4096, 2048, 4096, 32000, 2, 2, 1024},
      {"1b", 4096, 2048, 5632, 32000, 32, 4, 64},
  };
  std::printf("ferry-bench-kernels: %s, batch 1, seq 4096, median of %d after 3 warm-up\n", dts.c_str(), g_iters);
  std::printf("| %-26s | %-5s | %9s | %9s | %7s |\n", "op", "shape", "ATen ms", "ferry ms", "speedup");
  std::printf("|%s|%s|%s|%s|%s|\n", std::string(28, '-').c_str(), std::string(7, '-').c_str(),
              std::string(11, '-').c_str(), std::string(11, '-').c_str(), std::string(9, '-').c_str());
  for (const shape& s : shapes) bench_shape(s, dt);
  return 0;
}
