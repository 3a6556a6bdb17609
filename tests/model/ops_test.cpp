// Each op of src/model (forward and explicit backward) against libtorch autograd in fp64.
#include <cmath>
#include <tuple>

#include "src/common/error.h"
#include "src/model/attention.h"
#include "src/model/norm.h"
#include "src/model/rope.h"
#include "src/model/swiglu.h"
#include "tests/model/model_test_ref.h"
#include "tests/model/model_test_util.h"

namespace ferry::model::test {
namespace {

TEST(MODEL_SUITE(model_ops), rmsnorm_matches_autograd) {
  FERRY_REQUIRE_DEVICE();
  for (auto t : test_dtypes()) {
    for (int64_t H : {3, 7, 64, 131}) {
      SCOPED_TRACE(dtype_name(t) + " H=" + std::to_string(H));
      at::Tensor x = rnd({3, 5, H}, t, 2.0), w = rnd({H}, t), dy = rnd({3, 5, H}, t);
      for (bool accumulate : {false, true}) {
        at::Tensor rstd;
        at::Tensor y = rmsnorm_forward(dev(x, t), dev(w, t), 1e-5, &rstd);
        at::Tensor dx = at::empty_like(y);
        at::Tensor dw = dev(at::ones({H}, at::kDouble), t);
        rmsnorm_backward(dev(dy, t), dev(x, t), dev(w, t), rstd, dx, dw, accumulate);

        at::Tensor xl = leaf(x), wl = leaf(w);
        at::Tensor yr = ref::rmsnorm(xl, wl, 1e-5);
        (yr * dy).sum().backward();
        FERRY_EXPECT_CLOSE(y, yr, tolerance(t), "y");
        FERRY_EXPECT_CLOSE(dx, xl.grad(), tolerance(t), "dx");
        FERRY_EXPECT_CLOSE(dw, accumulate ? wl.grad() + 1 : wl.grad(), tolerance(t), "dw");
      }
    }
  }
}

TEST(MODEL_SUITE(model_ops), swiglu_matches_autograd) {
  FERRY_REQUIRE_DEVICE();
  for (auto t : test_dtypes()) {
    for (int64_t I : {1, 13, 96}) {
      SCOPED_TRACE(dtype_name(t) + " I=" + std::to_string(I));
      at::Tensor gu = rnd({4, 3, 2 * I}, t, 3.0), dy = rnd({4, 3, I}, t);
      at::Tensor y = swiglu_forward(dev(gu, t));
      at::Tensor dgu = at::empty_like(dev(gu, t));
      swiglu_backward(dev(dy, t), dev(gu, t), dgu);

      at::Tensor gl = leaf(gu);
      at::Tensor yr = ref::swiglu(gl.narrow(-1, 0, I), gl.narrow(-1, I, I));
      (yr * dy).sum().backward();
      FERRY_EXPECT_CLOSE(y, yr, tolerance(t), "y");
      FERRY_EXPECT_CLOSE(dgu, gl.grad(), tolerance(t), "d_gate_up");
    }
  }
}

TEST(MODEL_SUITE(model_ops), rope_matches_hf_formula_and_inverse_is_backward) {
  FERRY_REQUIRE_DEVICE();
  for (auto t : test_dtypes()) {
    for (int64_t D : {2, 6, 10, 64}) {
      SCOPED_TRACE(dtype_name(t) + " D=" + std::to_string(D));
      llama_config c = tiny_config(2, 2, D);
      c.rope_theta = D == 10 ? 500000.0 : 10000.0;
      const int64_t B = 2, T = 11, H = 3;
      rope_cache rc = make_rope(c, 40, test_device());
      ASSERT_EQ(rc.cos.scalar_type(), at::kFloat);
      at::Tensor x = rnd({B, T, H, D}, t), dy = rnd({B, T, H, D}, t);
      at::Tensor y = dev(x, t);
      rope_apply_(y, rc.cos.narrow(0, 0, T), rc.sin.narrow(0, 0, T), false);
      at::Tensor dx = dev(dy, t);
      rope_apply_(dx, rc.cos.narrow(0, 0, T), rc.sin.narrow(0, 0, T), true);

      at::Tensor xl = leaf(x);
      at::Tensor yr = ref::rope(xl, c.rope_theta, 0);
      (yr * dy).sum().backward();
      // fp32 angles: the reference's cos/sin are fp32 too, so fp64 agrees to rounding of x*cos.
      const double tol = t == at::kDouble ? 1e-12 : tolerance(t);
      FERRY_EXPECT_CLOSE(y, yr, tol, "y");
      FERRY_EXPECT_CLOSE(dx, xl.grad(), tol, "dx");
    }
  }
}

TEST(MODEL_SUITE(model_ops), rope_strided_input_in_place) {
  FERRY_REQUIRE_DEVICE();
  llama_config c = tiny_config(2, 2, 8);
  rope_cache rc = make_rope(c, 16, test_device());
  at::Tensor buf = rnd({2, 5, 7, 8}, at::kFloat);   // heads [1, 4) rotated, the rest untouched
  at::Tensor d = dev(buf, at::kFloat);
  at::Tensor view = d.narrow(2, 1, 3);
  rope_apply_(view, rc.cos.narrow(0, 0, 5), rc.sin.narrow(0, 0, 5), false);
  FERRY_EXPECT_CLOSE(view, ref::rope(buf.narrow(2, 1, 3), c.rope_theta, 0), 1e-6, "rotated heads");
  FERRY_EXPECT_CLOSE(d.narrow(2, 0, 1), buf.narrow(2, 0, 1), 0.0, "head 0 untouched");
  FERRY_EXPECT_CLOSE(d.narrow(2, 4, 3), buf.narrow(2, 4, 3), 1e-7, "heads 4.. untouched");
}

TEST(MODEL_SUITE(model_ops), make_rope_rejects_odd_head_dim) {
  llama_config c = tiny_config(2, 2, 7);
  EXPECT_THROW(make_rope(c, 8, at::kCPU), ferry::config_error);
}

struct attn_shape {
  int64_t B, Hq, Hkv, T, D;
};

void check_attention(at::ScalarType t, const attn_shape& s) {
  SCOPED_TRACE(dtype_name(t) + " B=" + std::to_string(s.B) + " Hq=" + std::to_string(s.Hq) +
               " Hkv=" + std::to_string(s.Hkv) + " T=" + std::to_string(s.T) + " D=" + std::to_string(s.D));
  const double scale = 1.0 / std::sqrt(double(s.D));
  at::Tensor q = rnd({s.B, s.Hq, s.T, s.D}, t), k = rnd({s.B, s.Hkv, s.T, s.D}, t);
  at::Tensor v = rnd({s.B, s.Hkv, s.T, s.D}, t), dout = rnd({s.B, s.Hq, s.T, s.D}, t);
  auto [out, lse] = attention_forward(dev(q, t), dev(k, t), dev(v, t), scale);
  ASSERT_EQ(lse.sizes(), (std::vector<int64_t>{s.B, s.Hq, s.T}));
  ASSERT_EQ(lse.scalar_type(), t == at::kDouble ? at::kDouble : at::kFloat);
  auto [dq, dk, dv] = attention_backward(dev(dout, t), dev(q, t), dev(k, t), dev(v, t), out, lse, scale);

  at::Tensor ql = leaf(q), kl = leaf(k), vl = leaf(v);
  at::Tensor outr = ref::attention(ql, kl, vl, scale);
  (outr * dout).sum().backward();
  // lse reference: logsumexp of the masked scaled scores.
  at::Tensor sc = at::matmul(q, k.repeat_interleave(s.Hq / s.Hkv, 1).transpose(-1, -2)) * scale;
  sc.masked_fill_(at::ones({s.T, s.T}, at::kBool).triu(1), -INFINITY);
  const double tol = tolerance(t, 2.0);
  FERRY_EXPECT_CLOSE(out, outr, tol, "out");
  FERRY_EXPECT_CLOSE(lse, at::logsumexp(sc, -1), tol, "lse");
  FERRY_EXPECT_CLOSE(dq, ql.grad(), tol, "dq");
  FERRY_EXPECT_CLOSE(dk, kl.grad(), tol, "dk");
  FERRY_EXPECT_CLOSE(dv, vl.grad(), tol, "dv");
}

TEST(MODEL_SUITE(model_ops), attention_matches_autograd_gqa_1_2_4) {
  FERRY_REQUIRE_DEVICE();
  const attn_shape shapes[] = {
      {2, 3, 3, 7, 6},    // MHA, odd T, head_dim not a power of two
      {1, 4, 2, 13, 10},  // GQA 2
      {2, 8, 2, 5, 12},   // GQA 4
      {1, 2, 1, 1, 4},    // a single position
      {1, 4, 1, 33, 24},  // GQA 4, longer sequence
  };
  for (auto t : test_dtypes())
    for (const auto& s : shapes) check_attention(t, s);
}

TEST(MODEL_SUITE(model_ops), attention_blocked_rows_match_unblocked) {
  FERRY_REQUIRE_DEVICE();
  // A budget of a few rows per block exercises the ATen path's blocking (CUDA uses gpu/ kernels,
  // where this only checks them once more).
  int64_t old = attention_set_score_budget(200);
  check_attention(at::kFloat, {2, 4, 2, 19, 6});
  check_attention(at::kFloat, {1, 2, 2, 23, 8});
  attention_set_score_budget(old);
}

TEST(MODEL_SUITE(model_ops), attention_offset_queries_match_full_causal) {
  FERRY_REQUIRE_DEVICE();
  // The last Tq rows of a causal attention equal queries at offset T-Tq against all T keys.
  const int64_t B = 2, Hq = 4, Hkv = 2, T = 12, D = 6;
  for (auto t : test_dtypes()) {
    at::Tensor q = dev(rnd({B, Hq, T, D}, t), t), k = dev(rnd({B, Hkv, T, D}, t), t), v = dev(rnd({B, Hkv, T, D}, t), t);
    at::Tensor full = std::get<0>(attention_forward(q, k, v, 0.3));
    for (int64_t off : {0, 5, 11}) {
      at::Tensor part = attention_forward_offset(q.narrow(2, off, T - off), k, v, 0.3, off);
      FERRY_EXPECT_CLOSE(part, full.narrow(2, off, T - off), tolerance(t), "offset " + std::to_string(off));
    }
  }
}

}  // namespace
}  // namespace ferry::model::test
