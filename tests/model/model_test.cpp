// Layout, block, head, embedding and the whole tiny model against an autograd composition.
#include <cmath>
#include <functional>
#include <map>
#include <numeric>
#include <string>

#include "src/common/error.h"
#include "src/model/attention.h"
#include "src/model/block.h"
#include "src/model/device_bytes.h"
#include "src/model/embed_head.h"
#include "src/model/layout.h"
#include "src/model/packing.h"
#include "src/model/rope.h"
#include "tests/alloc_meter.h"
#include "tests/model/model_test_ref.h"
#include "tests/model/model_test_util.h"

namespace ferry::model::test {
namespace {

// Random fp64 weights for one unit's flat buffer: norms near 1, matrices ~ N(0, scale^2).
at::Tensor random_flat(const std::vector<tensor_slot>& slots, int64_t numel, at::ScalarType t) {
  at::Tensor flat = at::empty({numel}, at::kDouble);
  for (const auto& s : slots) {
    at::Tensor v = slot_view(flat, s);
    if (s.shape.size() == 1) {
      v.copy_(1.0 + 0.2 * at::randn(s.shape, at::kDouble));
    } else {
      v.copy_(at::randn(s.shape, at::kDouble) / std::sqrt(double(s.shape[1])));
    }
  }
  return flat.to(t).to(at::kDouble);
}

// Autograd leaves named by HF suffix, cloned from a flat fp64 buffer.
std::map<std::string, at::Tensor> leaves(const at::Tensor& flat, const std::vector<tensor_slot>& slots) {
  std::map<std::string, at::Tensor> m;
  for (const auto& s : slots) m[s.name] = leaf(slot_view(flat, s));
  return m;
}

ref::block_params ref_block(std::map<std::string, at::Tensor>& p) {
  return {p["input_layernorm.weight"],  p["self_attn.q_proj.weight"],         p["self_attn.k_proj.weight"],
          p["self_attn.v_proj.weight"], p["self_attn.o_proj.weight"],         p["post_attention_layernorm.weight"],
          p["mlp.gate_proj.weight"],    p["mlp.up_proj.weight"],              p["mlp.down_proj.weight"]};
}

TEST(MODEL_SUITE(model_layout), slots_tile_buffers_and_views_alias) {
  llama_config c = tiny_config(4, 2, 6);
  auto bl = block_layout(c);
  int64_t off = 0;
  for (const auto& s : bl) {
    EXPECT_EQ(s.offset, off) << s.name;
    off += s.numel;
  }
  EXPECT_EQ(off, c.block_params());
  EXPECT_EQ(bl[1].name, "self_attn.q_proj.weight");
  EXPECT_EQ(bl[2].offset, bl[1].offset + c.q_dim() * c.hidden_size);
  at::Tensor flat = at::arange(c.block_params(), at::kDouble);
  block_weights w = block_views(flat, c);
  EXPECT_EQ(w.wqkv.sizes(), (std::vector<int64_t>{c.q_dim() + 2 * c.kv_dim(), c.hidden_size}));
  EXPECT_EQ(w.w_gate_up.sizes(), (std::vector<int64_t>{2 * c.intermediate_size, c.hidden_size}));
  EXPECT_TRUE(w.wqkv.narrow(0, c.q_dim(), c.kv_dim()).equal(slot_view(flat, bl[2])));
  EXPECT_TRUE(w.w_gate_up.narrow(0, c.intermediate_size, c.intermediate_size).equal(slot_view(flat, bl[7])));
  EXPECT_TRUE(w.w_down.equal(slot_view(flat, bl[8])));
  EXPECT_EQ(w.w_down.data_ptr<double>() + w.w_down.numel(), flat.data_ptr<double>() + flat.numel());

  auto hl = head_layout(c);
  EXPECT_EQ(hl[0].numel + hl[1].numel, c.head_params());
  EXPECT_EQ(c.head_slot_params(), c.head_params());
  EXPECT_EQ(embed_layout(c)[0].numel, c.embed_params());
  // Tied: the head unit is the final norm only; the head slot still holds norm + lm_head.
  const int64_t untied_total = c.total_params();
  c.tie_word_embeddings = true;
  auto tied = head_layout(c);
  ASSERT_EQ(tied.size(), 1u);
  EXPECT_EQ(tied[0].name, "model.norm.weight");
  EXPECT_EQ(tied[0].numel, c.head_params());
  EXPECT_EQ(c.head_params(), c.hidden_size);
  EXPECT_EQ(c.total_params(), untied_total - c.embed_params());
  at::Tensor slot = at::arange(c.head_slot_params(), at::kDouble);
  head_weights hw = head_slot_views(slot, c);
  EXPECT_EQ(hw.norm.sizes(), (std::vector<int64_t>{c.hidden_size}));
  EXPECT_EQ(hw.lm_head.sizes(), (std::vector<int64_t>{c.vocab_size, c.hidden_size}));
  EXPECT_EQ(hw.lm_head.data_ptr<double>(), slot.data_ptr<double>() + c.hidden_size);
}

void check_block(at::ScalarType t, const llama_config& c, int64_t B, int64_t T) {
  SCOPED_TRACE(dtype_name(t) + " Hq=" + std::to_string(c.num_attention_heads) +
               " Hkv=" + std::to_string(c.num_key_value_heads) + " D=" + std::to_string(c.head_dim));
  auto slots = block_layout(c);
  at::Tensor wflat = random_flat(slots, c.block_params(), t);
  at::Tensor x = rnd({B, T, c.hidden_size}, t), dy = rnd({B, T, c.hidden_size}, t);
  rope_cache rc = make_rope(c, T + 3, test_device());

  at::Tensor wd = dev(wflat, t);
  block_weights w = block_views(wd, c);
  block_saved saved;
  at::Tensor y = block_forward(dev(x, t), w, c, rc, saved);
  const int64_t elem = int64_t(c10::elementSize(t));
  EXPECT_EQ(saved.bytes(), block_saved_bytes(c, B, T, elem));
  at::Tensor gflat = at::full({c.block_params()}, 7.0, wd.options());
  // A re-streamed copy of the same weights for backward.
  at::Tensor wd2 = wd.clone();
  at::Tensor dx = block_backward(dev(dy, t), block_views(wd2, c), c, rc, saved, block_views(gflat, c), false);
  EXPECT_EQ(saved.bytes(), 0);

  auto p = leaves(wflat, slots);
  at::Tensor xl = leaf(x);
  at::Tensor yr = ref::block(xl, ref_block(p), c);
  (yr * dy).sum().backward();
  const double tol = tolerance(t, 2.0);
  FERRY_EXPECT_CLOSE(y, yr, tol, "y");
  FERRY_EXPECT_CLOSE(dx, xl.grad(), tol, "dx");
  for (const auto& s : slots) FERRY_EXPECT_CLOSE(slot_view(gflat, s), p[s.name].grad(), tol, s.name);

  // accumulate adds onto what is there.
  block_saved saved2;
  block_forward(dev(x, t), w, c, rc, saved2);
  at::Tensor g_before = gflat.clone();
  block_backward(dev(dy, t), w, c, rc, saved2, block_views(gflat, c), true);
  FERRY_EXPECT_CLOSE(gflat, g_before * 2, tolerance(t), "accumulated gradient");
}

TEST(MODEL_SUITE(model_block), forward_backward_matches_autograd) {
  FERRY_REQUIRE_DEVICE();
  for (auto t : test_dtypes()) {
    check_block(t, tiny_config(2, 2, 6), 2, 9);    // MHA, q_dim 12 != hidden 22
    check_block(t, tiny_config(4, 2, 10), 1, 13);  // GQA 2
    check_block(t, tiny_config(4, 1, 6), 2, 5);    // GQA 4
  }
}

TEST(MODEL_SUITE(model_block), saved_bytes_formula) {
  llama_config c = tiny_config(4, 2, 6);
  // N * (e*(2h + 2q + 2kv + 2i) + a*(Hq + 2)) with h=22, q=24, kv=12, i=29, Hq=4.
  EXPECT_EQ(block_saved_bytes(c, 3, 5, 2), 15 * (2 * (44 + 48 + 24 + 58) + 4 * 6));
  EXPECT_EQ(block_saved_bytes(c, 1, 1, 8), 8 * (44 + 48 + 24 + 58) + 8 * 6);
}

// The inference forward (no saved) runs in chunks of time steps; any chunk size gives the training
// forward's result, and one chunk gives it bit for bit on the CPU (the same ops in the same order).
TEST(MODEL_SUITE(model_block), inference_chunks_equal_training_forward) {
  FERRY_REQUIRE_DEVICE();
  const int64_t old = block_forward_chunk_rows();
  for (auto t : test_dtypes()) {
    for (const auto& [c, B] : {std::pair<llama_config, int64_t>{tiny_config(2, 2, 6), 2}, {tiny_config(4, 2, 10), 1},
                               {tiny_config(4, 1, 6), 3}}) {
      SCOPED_TRACE(dtype_name(t) + " Hq=" + std::to_string(c.num_attention_heads) + " B=" + std::to_string(B));
      const int64_t T = 13;
      at::Tensor wd = dev(random_flat(block_layout(c), c.block_params(), t), t);
      at::Tensor x = dev(rnd({B, T, c.hidden_size}, t), t);
      rope_cache rc = make_rope(c, T, test_device());
      block_saved saved;
      at::Tensor y_train = block_forward(x, block_views(wd, c), c, rc, saved);
      // rows per chunk: one time step, a few (the last chunk partial), all but one, all at once
      for (int64_t rows : {int64_t(1), 2 * B, 5 * B, (T - 1) * B, T * B}) {
        block_set_forward_chunk_rows(rows);
        at::Tensor y = block_forward_chunked(x, block_views(wd, c), c, rc);
        FERRY_EXPECT_CLOSE(y, y_train, tolerance(t), "chunk of " + std::to_string(rows) + " rows");
        if (rows == T * B && !k_cuda_suite) {
          EXPECT_TRUE(y.equal(y_train)) << "one chunk: not bit-equal";
        }
      }
      block_set_forward_chunk_rows(old);
      // The resident-weights forward is the training forward without saving, bit for bit on every
      // device (the same kernels in the same order).
      EXPECT_TRUE(block_forward_whole(x, block_views(wd, c), c, rc).equal(y_train)) << "block_forward_whole";
    }
  }
}

// The planner's byte counts of the inference forwards are upper bounds of what the allocator
// really hands out, and not loose ones: block_forward (chunked: one row, several, all rows) and
// block_forward_whole on shapes that take every attention path of the device (GQA and MHA; head_dim
// a multiple of 8 and not; on CUDA fp32 takes the memory-efficient kernel, fp16/bf16 flash, and
// head_dim 264 the large-head GEMMs), batch 1 and 3.
TEST(MODEL_SUITE(model_block), inference_bytes_bound_the_measured_peak) {
  FERRY_REQUIRE_DEVICE();
  const int64_t old = block_forward_chunk_rows();
  struct shape { llama_config c; int64_t B, T; };
  std::vector<shape> shapes = {{tiny_config(4, 2, 6), 3, 13}, {tiny_config(2, 2, 16), 1, 40}, {tiny_config(4, 1, 8), 2, 9}};
  if (k_cuda_suite) shapes.push_back({tiny_config(2, 1, 264), 1, 24});
  // On the CPU fp32 only: half and bfloat16 matmuls on CPUs with AVX512-FP16/BF16 run through
  // oneDNN, whose reorder buffers come from the same allocator and depend on the CPU (150-250 KB
  // at these shapes on the H100 host's Xeon, none on CI's); the engine computes in fp32 there.
  const std::vector<at::ScalarType> dtypes = k_cuda_suite ? test_dtypes() : std::vector<at::ScalarType>{at::kFloat};
  for (auto t : dtypes) {
    const int64_t e = int64_t(c10::elementSize(t));
    for (const auto& [c, B, T] : shapes) {
      const attention_path path = attention_path_for(c, t, k_cuda_suite);
      at::Tensor wd = dev(random_flat(block_layout(c), c.block_params(), t), t);
      at::Tensor x = dev(rnd({B, T, c.hidden_size}, t), t);
      rope_cache rc = make_rope(c, T, test_device());
      // Every variant once first: cuBLAS's and cuBLASLt's workspaces come with the first GEMMs of
      // each kind (the plan counts them once per engine, in its fixed bytes).
      block_forward_whole(x, block_views(wd, c), c, rc);
      for (int64_t rows : {B, 4 * B, B * T}) {
        block_set_forward_chunk_rows(rows);
        block_forward_chunked(x, block_views(wd, c), c, rc);
      }
      auto check = [&](const std::string& what, int64_t planned, const std::function<at::Tensor()>& run) {
        SCOPED_TRACE(dtype_name(t) + " Hq=" + std::to_string(c.num_attention_heads) + " Hkv=" +
                     std::to_string(c.num_key_value_heads) + " D=" + std::to_string(c.head_dim) + " B=" +
                     std::to_string(B) + " " + what);
        ::ferry::test::alloc_meter meter(k_cuda_suite);
        at::Tensor y = run();
        // The plan leaves out the output (the caller's, like the input).
        const int64_t used = meter.peak() - int64_t(::ferry::model::device_charge(y.nbytes(), k_cuda_suite));
        EXPECT_LE(used, planned) << meter.report();
        // Not padded: within twice the measured peak plus a few small tensors' rounding.
        EXPECT_LE(planned, 2 * used + 8 * 1024) << "the plan is far above the measured peak " << used;
      };
      check("whole", block_forward_whole_bytes(c, B, T, e, path),
            [&] { return block_forward_whole(x, block_views(wd, c), c, rc); });
      for (int64_t rows : {B, 4 * B, B * T}) {
        block_set_forward_chunk_rows(rows);
        check("chunks of " + std::to_string(rows) + " rows", block_forward_inference_bytes(c, B, T, e, path),
              [&] { return block_forward_chunked(x, block_views(wd, c), c, rc); });
      }
      block_set_forward_chunk_rows(old);
    }
  }
}

TEST(MODEL_SUITE(model_block), kv_cache_forward_equals_full_forward) {
  FERRY_REQUIRE_DEVICE();
  for (auto t : test_dtypes()) {
    SCOPED_TRACE(dtype_name(t));
    llama_config c = tiny_config(4, 2, 6, 2);
    const int64_t B = 2, T = 11, Tmax = 16, prefill = 4;
    rope_cache rc = make_rope(c, Tmax, test_device());
    std::vector<at::Tensor> layers;
    for (int l = 0; l < 2; ++l) layers.push_back(dev(random_flat(block_layout(c), c.block_params(), t), t));
    at::Tensor x = dev(rnd({B, T, c.hidden_size}, t), t);
    at::Tensor full = x;
    for (auto& f : layers) full = block_forward_chunked(full, block_views(f, c), c, rc);

    auto opts = x.options();
    std::vector<at::Tensor> kc, vc;
    for (int l = 0; l < 2; ++l) {
      kc.push_back(at::zeros({B, c.num_key_value_heads, Tmax, c.head_dim}, opts));
      vc.push_back(at::zeros({B, c.num_key_value_heads, Tmax, c.head_dim}, opts));
    }
    // A chunk of 2 rows (one time step of the batch) splits the prefill and the 3-token step.
    for (int64_t rows : {int64_t(1024), int64_t(2)}) {
      const int64_t old = block_set_forward_chunk_rows(rows);
      std::vector<at::Tensor> outs;
      int64_t pos = 0;
      for (int64_t n : {prefill, int64_t(1), int64_t(3), int64_t(1), int64_t(1), int64_t(1)}) {
        at::Tensor h = x.narrow(1, pos, n);
        for (int l = 0; l < 2; ++l) h = block_forward_cached(h, block_views(layers[l], c), c, rc, pos, kc[l], vc[l]);
        outs.push_back(h);
        pos += n;
      }
      block_set_forward_chunk_rows(old);
      ASSERT_EQ(pos, T);
      FERRY_EXPECT_CLOSE(at::cat(outs, 1), full, tolerance(t), "cached vs full, chunks of " + std::to_string(rows));
    }
  }
}

TEST(MODEL_SUITE(model_head), chunked_equals_unchunked_and_logits) {
  FERRY_REQUIRE_DEVICE();
  for (auto t : test_dtypes()) {
    SCOPED_TRACE(dtype_name(t));
    llama_config c = tiny_config(2, 2, 6);
    const int64_t B = 3, T = 7, N = B * T, h = c.hidden_size, V = c.vocab_size;
    at::Tensor xr = rnd({B, T, h}, t), x = dev(xr, t);
    auto hs = head_layout(c);
    at::Tensor hr = random_flat(hs, c.head_params(), t), hflat = dev(hr, t);
    at::Tensor nw = slot_view(hflat, hs[0]), lw = slot_view(hflat, hs[1]);
    at::Tensor labels = at::randint(V, {B, T}, at::kLong);
    labels.index_put_({0, 3}, -100);
    labels.index_put_({2, 6}, -100);
    labels = labels.to(test_device());

    auto run = [&](int64_t chunk, at::Tensor& dx, at::Tensor& gn, at::Tensor& gl) {
      gn = at::zeros({h}, x.options());
      gl = at::zeros({V, h}, x.options());
      return head_forward_backward(x, nw, lw, labels, c, chunk, 0.5, &dx, &gn, &gl, false);
    };
    at::Tensor dx0, gn0, gl0;
    head_result r0 = run(N, dx0, gn0, gl0);
    EXPECT_EQ(r0.n_targets, N - 2);
    // Reference: the final norm, lm_head and cross-entropy in fp64 from the same rounded inputs.
    at::Tensor ref_logits = at::matmul(ref::rmsnorm(xr, slot_view(hr, hs[0]), c.rms_norm_eps), slot_view(hr, hs[1]).t());
    double ref_loss = ref::ce_sum(ref_logits, labels.cpu()).item<double>();
    EXPECT_NEAR(r0.loss_sum, ref_loss, std::abs(ref_loss) * tolerance(t));
    FERRY_EXPECT_CLOSE(head_logits(x, nw, lw, c), ref_logits, tolerance(t), "head_logits");
    for (int64_t chunk : {int64_t(1), int64_t(5), N - 1, N + 100}) {
      SCOPED_TRACE("chunk " + std::to_string(chunk));
      at::Tensor dx, gn, gl;
      head_result r = run(chunk, dx, gn, gl);
      EXPECT_EQ(r.n_targets, r0.n_targets);
      EXPECT_NEAR(r.loss_sum, r0.loss_sum, std::abs(r0.loss_sum) * tolerance(t));
      FERRY_EXPECT_CLOSE(dx, dx0, tolerance(t), "dx");
      FERRY_EXPECT_CLOSE(gn, gn0, tolerance(t, 2.0), "g_norm");
      FERRY_EXPECT_CLOSE(gl, gl0, tolerance(t, 2.0), "g_lm_head");
    }
    // Forward only.
    head_result rf = head_forward_backward(x, nw, lw, labels, c, 4, 1.0, nullptr, nullptr, nullptr, false);
    EXPECT_NEAR(rf.loss_sum, r0.loss_sum, std::abs(r0.loss_sum) * tolerance(t));
  }
}

TEST(MODEL_SUITE(model_embed), backward_sums_duplicates_deterministically) {
  FERRY_REQUIRE_DEVICE();
  for (auto t : test_dtypes()) {
    SCOPED_TRACE(dtype_name(t));
    const int64_t V = 9, h = 5;
    at::Tensor emb = rnd({V, h}, t);
    at::Tensor tokens = at::randint(4, {3, 40}, at::kLong);   // many duplicates, rows >= 4 unused
    at::Tensor dx = rnd({3, 40, h}, t);
    at::Tensor y = embed_forward(tokens.to(test_device()), dev(emb, t));
    FERRY_EXPECT_CLOSE(y, emb.index_select(0, tokens.reshape({-1})).view({3, 40, h}), 0.0, "forward");
    at::Tensor g1 = dev(at::full({V, h}, 3.0, at::kDouble), t), g2 = g1.clone();
    embed_backward(dev(dx, t), tokens.to(test_device()), g1, false);
    embed_backward(dev(dx, t), tokens.to(test_device()), g2, false);
    EXPECT_TRUE(g1.equal(g2));
    at::Tensor expect = at::zeros({V, h}, at::kDouble).index_add_(0, tokens.reshape({-1}), dx.reshape({-1, h}));
    FERRY_EXPECT_CLOSE(g1, expect, tolerance(t, 2.0), "overwrite");
    embed_backward(dev(dx, t), tokens.to(test_device()), g1, true);
    FERRY_EXPECT_CLOSE(g1, expect * 2, tolerance(t, 2.0), "accumulate");
  }
}

// The whole model: embedding, layers, final norm, lm_head, summed cross-entropy; every gradient.
// Tied embeddings (c.tie_word_embeddings): lm_head is the embedding's matrix; the head's backward
// writes its gradient into the embedding's and the embedding's backward adds to it, which must give
// autograd's gradient of the one shared leaf.
void check_model(at::ScalarType t, const llama_config& c, int64_t B, int64_t T) {
  SCOPED_TRACE(dtype_name(t) + " layers=" + std::to_string(c.num_hidden_layers) +
               " Hq=" + std::to_string(c.num_attention_heads) + " Hkv=" + std::to_string(c.num_key_value_heads) +
               " D=" + std::to_string(c.head_dim) + (c.tie_word_embeddings ? " tied" : ""));
  const bool tied = c.tie_word_embeddings;
  const int64_t L = c.num_hidden_layers;
  auto bl = block_layout(c), el = embed_layout(c), hl = head_layout(c);
  at::Tensor eflat = random_flat(el, c.embed_params(), t), hflat = random_flat(hl, c.head_params(), t);
  std::vector<at::Tensor> bflat;
  for (int64_t l = 0; l < L; ++l) bflat.push_back(random_flat(bl, c.block_params(), t));
  at::Tensor tokens = at::randint(c.vocab_size, {B, T}, at::kLong);
  at::Tensor labels = at::full({B, T}, -100, at::kLong);
  labels.narrow(1, 0, T - 1).copy_(tokens.narrow(1, 1, T - 1));
  labels.index_put_({0, 1}, -100);

  // ferry
  rope_cache rc = make_rope(c, T, test_device());
  at::Tensor ed = dev(eflat, t), hd = dev(hflat, t);
  std::vector<at::Tensor> bd, gd;
  for (auto& f : bflat) bd.push_back(dev(f, t)), gd.push_back(at::zeros_like(bd.back()));
  at::Tensor g_emb = at::zeros({c.vocab_size, c.hidden_size}, ed.options());
  at::Tensor g_head = at::zeros_like(hd);
  const at::Tensor emb = ed.view({c.vocab_size, c.hidden_size});
  at::Tensor g_norm = slot_view(g_head, hl[0]), g_lm = tied ? g_emb : slot_view(g_head, hl[1]);
  at::Tensor tok = tokens.to(test_device());
  at::Tensor x = embed_forward(tok, emb);
  std::vector<block_saved> saved(L);
  for (int64_t l = 0; l < L; ++l) x = block_forward(x, block_views(bd[l], c), c, rc, saved[l]);
  at::Tensor dx;
  head_result r = head_forward_backward(x, slot_view(hd, hl[0]), tied ? emb : slot_view(hd, hl[1]),
                                        labels.to(test_device()), c, 5, 1.0, &dx, &g_norm, &g_lm, false);
  for (int64_t l = L - 1; l >= 0; --l) {
    dx = block_backward(dx, block_views(bd[l], c), c, rc, saved[l], block_views(gd[l], c), false);
  }
  embed_backward(dx, tok, g_emb, /*accumulate=*/tied);

  // The autograd reference, in fp64 from the same rounded inputs (the accepted answer), and for
  // fp16/bf16 once more in the dtype under test (logits summed in fp32, as HF's loss does): how far
  // that precision itself lands from the answer on this draw.
  struct reference { double loss; std::map<std::string, at::Tensor> grad; };
  auto autograd = [&](at::ScalarType rt) {
    auto cast = [&](const at::Tensor& f) { return f.to(rt); };
    auto pe = leaves(cast(eflat), el);
    auto ph = leaves(cast(hflat), hl);
    std::vector<std::map<std::string, at::Tensor>> pb;
    for (auto& f : bflat) pb.push_back(leaves(cast(f), bl));
    at::Tensor xr = pe["model.embed_tokens.weight"].index_select(0, tokens.reshape({-1})).view({B, T, -1});
    for (int64_t l = 0; l < L; ++l) xr = ref::block(xr, ref_block(pb[l]), c);
    const at::Tensor& lm = tied ? pe["model.embed_tokens.weight"] : ph["lm_head.weight"];
    at::Tensor logits = at::matmul(ref::rmsnorm(xr, ph["model.norm.weight"], c.rms_norm_eps), lm.t());
    at::Tensor loss = ref::ce_sum(rt == at::kDouble ? logits : logits.to(at::kFloat), labels);
    loss.backward();
    reference r{loss.item<double>(), {}};
    r.grad["model.embed_tokens.weight"] = pe["model.embed_tokens.weight"].grad();
    r.grad["model.norm.weight"] = ph["model.norm.weight"].grad();
    if (!tied) r.grad["lm_head.weight"] = ph["lm_head.weight"].grad();
    for (int64_t l = 0; l < L; ++l)
      for (const auto& s : bl) r.grad["model.layers." + std::to_string(l) + "." + s.name] = pb[l][s.name].grad();
    return r;
  };
  const reference exact = autograd(at::kDouble);
  const bool half = t == at::kHalf || t == at::kBFloat16;
  const reference same = half ? autograd(t) : reference{};

  // fp32/fp64: every gradient within the dtype's tolerance, element-wise (rel_err). fp16/bf16: the
  // error is a draw's, since rounding through the layers amplifies by the weights drawn, and the
  // largest element's error is noisy; so the norm-wise error (fro_err), within the dtype's
  // tolerance or four times the largest norm-wise error autograd in the dtype made on this draw's
  // gradients, whichever is larger. On 750 draws of each half dtype (FERRY_TEST_SEED 1-150), ferry's
  // largest stayed within 2.8 times autograd's, and autograd's own bf16 error reached 0.18; seeds
  // 1-300 all pass. A wrong term fails: half of the SwiGLU gate derivative's second term gave fp16
  // errors of 0.06-0.12 against 0.03, an RMSNorm backward without its projection errors above 1.
  double lowp_err = 0;
  if (half)
    for (const auto& [name, g] : same.grad) lowp_err = std::max(lowp_err, fro_err(g, exact.grad.at(name)));
  const double tol = tolerance(t, 3.0), half_tol = std::max(tol, 4.0 * lowp_err);
  auto expect_grad = [&](const at::Tensor& g, const std::string& name) {
    const at::Tensor& want = exact.grad.at(name);
    if (!half) {
      FERRY_EXPECT_CLOSE(g, want, tol, name);
      return;
    }
    const double err = fro_err(g, want);
    EXPECT_LE(err, half_tol) << name << ": norm-wise relative error " << err << " > " << half_tol
                             << " (autograd in the dtype: " << fro_err(same.grad.at(name), want) << ")";
  };
  EXPECT_EQ(r.n_targets, B * (T - 1) - 1);
  EXPECT_NEAR(r.loss_sum, exact.loss, std::abs(exact.loss) * tol);
  expect_grad(g_emb, "model.embed_tokens.weight");
  expect_grad(g_norm, "model.norm.weight");
  if (!tied) expect_grad(g_lm, "lm_head.weight");
  for (int64_t l = 0; l < L; ++l)
    for (const auto& s : bl) expect_grad(slot_view(gd[l], s), "model.layers." + std::to_string(l) + "." + s.name);
}

// Packed rows: each row holds runs (the rest of the row is one more run, of padding), positions
// restart at 0 in each and attention stays within it. The loss, the logits and every gradient
// equal running each run on its own (gradients summed). On CUDA, fp16/bf16 run flash attention's
// variable-length kernels, fp32 the masked ATen composition.
void check_packed(at::ScalarType t, const llama_config& c, const std::vector<std::vector<int64_t>>& runs, int64_t T) {
  SCOPED_TRACE(dtype_name(t) + " Hq=" + std::to_string(c.num_attention_heads) +
               " Hkv=" + std::to_string(c.num_key_value_heads) + " D=" + std::to_string(c.head_dim));
  const int64_t L = c.num_hidden_layers, B = int64_t(runs.size()), V = c.vocab_size, h = c.hidden_size;
  auto bl = block_layout(c), el = embed_layout(c), hl = head_layout(c);
  at::Tensor eflat = random_flat(el, c.embed_params(), t), hflat = random_flat(hl, c.head_params(), t);
  std::vector<at::Tensor> bflat;
  for (int64_t l = 0; l < L; ++l) bflat.push_back(random_flat(bl, c.block_params(), t));
  at::Tensor tokens = at::randint(V, {B, T}, at::kLong);
  at::Tensor labels = at::full({B, T}, -100, at::kLong), positions = at::zeros({B, T}, at::kLong);
  struct span { int64_t row, start, len; };
  std::vector<span> spans;
  for (int64_t b = 0; b < B; ++b) {
    int64_t at = 0;
    for (int64_t len : runs[size_t(b)]) {
      labels[b].narrow(0, at, len - 1).copy_(tokens[b].narrow(0, at + 1, len - 1));
      positions[b].narrow(0, at, len).copy_(at::arange(len, at::kLong));
      spans.push_back({b, at, len});
      at += len;
    }
    positions[b].narrow(0, at, T - at).copy_(at::arange(T - at, at::kLong));
  }
  const at::Tensor ed = dev(eflat, t), hd = dev(hflat, t);
  const at::Tensor emb = ed.view({V, h}), norm_w = slot_view(hd, hl[0]), lm_w = slot_view(hd, hl[1]);
  std::vector<at::Tensor> bd;
  for (auto& f : bflat) bd.push_back(dev(f, t));
  const rope_cache rc = make_rope(c, T, test_device());

  // One forward and backward; gradients added into g_* (accumulate).
  struct grads { at::Tensor emb, head; std::vector<at::Tensor> blocks; };
  auto zero_grads = [&] {
    grads g{at::zeros_like(emb), at::zeros_like(hd), {}};
    for (auto& b : bd) g.blocks.push_back(at::zeros_like(b));
    return g;
  };
  auto run = [&](const at::Tensor& tok, const at::Tensor& lab, const packing* pk, grads& g, at::Tensor* logits) {
    const at::Tensor td = tok.to(test_device());
    at::Tensor x = embed_forward(td, emb);
    std::vector<block_saved> saved(static_cast<size_t>(L));
    for (int64_t l = 0; l < L; ++l) x = block_forward(x, block_views(bd[l], c), c, rc, saved[size_t(l)], pk);
    *logits = head_logits(x, norm_w, lm_w, c);
    at::Tensor g_norm = slot_view(g.head, hl[0]), g_lm = slot_view(g.head, hl[1]), dx;
    head_result r = head_forward_backward(x, norm_w, lm_w, lab.to(test_device()), c, 7, 1.0, &dx, &g_norm, &g_lm, true);
    for (int64_t l = L - 1; l >= 0; --l)
      dx = block_backward(dx, block_views(bd[l], c), c, rc, saved[size_t(l)], block_views(g.blocks[size_t(l)], c), true);
    embed_backward(dx, td, g.emb, true);
    return r;
  };

  const packing pk = make_packing(positions, rc);
  int64_t padded_rows = 0;
  for (const auto& r : runs) padded_rows += std::accumulate(r.begin(), r.end(), int64_t(0)) < T;
  EXPECT_EQ(pk.runs, int64_t(spans.size()) + padded_rows);
  grads gp = zero_grads(), g1 = zero_grads();
  at::Tensor logits_packed, logits_one;
  const head_result rp = run(tokens, labels, &pk, gp, &logits_packed);
  double loss_one = 0;
  int64_t targets_one = 0;
  const double tol = tolerance(t, 3.0);
  for (const span& s : spans) {
    const head_result r = run(tokens[s.row].narrow(0, s.start, s.len).unsqueeze(0),
                              labels[s.row].narrow(0, s.start, s.len).unsqueeze(0), nullptr, g1, &logits_one);
    loss_one += r.loss_sum;
    targets_one += r.n_targets;
    FERRY_EXPECT_CLOSE(logits_packed[s.row].narrow(0, s.start, s.len), logits_one[0], tol,
                       "logits of row " + std::to_string(s.row) + " from " + std::to_string(s.start));
  }
  EXPECT_EQ(rp.n_targets, targets_one);
  EXPECT_NEAR(rp.loss_sum, loss_one, std::abs(loss_one) * tol);
  FERRY_EXPECT_CLOSE(gp.emb, g1.emb, tol, "model.embed_tokens.weight");
  FERRY_EXPECT_CLOSE(gp.head, g1.head, tol, "model.norm.weight + lm_head.weight");
  for (int64_t l = 0; l < L; ++l)
    for (const auto& sl : bl)
      FERRY_EXPECT_CLOSE(slot_view(gp.blocks[size_t(l)], sl), slot_view(g1.blocks[size_t(l)], sl), tol,
                         "model.layers." + std::to_string(l) + "." + sl.name);
}

TEST(MODEL_SUITE(model_packed), equals_each_sequence_on_its_own) {
  FERRY_REQUIRE_DEVICE();
  for (auto t : test_dtypes()) {
    check_packed(t, tiny_config(4, 2, 8, 2), {{5, 3, 4}, {7, 2}}, 14);
    check_packed(t, tiny_config(2, 2, 6, 2), {{3, 3, 3, 3}, {12}}, 12);
  }
  // Positions that neither restart at 0 nor count up by one are refused.
  at::Tensor bad = at::tensor({0, 1, 2, 0, 2}, at::kLong).view({1, 5});
  const rope_cache rc = make_rope(tiny_config(2, 2, 6, 2), 8, test_device());
  try {
    make_packing(bad, rc);
    ADD_FAILURE() << "positions 0 1 2 0 2 accepted";
  } catch (const ferry::error& e) {
    EXPECT_NE(std::string(e.what()).find("row 0 has 2 at column 4 after 0"), std::string::npos) << e.what();
  }
  EXPECT_THROW(make_packing(at::zeros({1, 9}, at::kLong) + at::arange(9, at::kLong), rc), ferry::error);
}

TEST(MODEL_SUITE(model_tiny), loss_and_every_gradient_match_autograd) {
  FERRY_REQUIRE_DEVICE();
  for (auto t : test_dtypes()) {
    check_model(t, tiny_config(2, 2, 6, 2), 2, 9);
    check_model(t, tiny_config(4, 2, 10, 3), 1, 12);
    check_model(t, tiny_config(4, 1, 6, 2), 2, 6);
    check_model(t, tiny_config(8, 1, 4, 2), 2, 7);   // 8 query heads per kv head (Llama 3 70B's ratio)
  }
}

// Tied input and output embeddings (Llama 3.2 1B/3B): the embedding's gradient is the sum of its
// two uses. Four query heads per kv head and heads * head_dim (40) != hidden (22).
TEST(MODEL_SUITE(model_tiny), tied_embeddings_match_autograd) {
  FERRY_REQUIRE_DEVICE();
  for (auto t : test_dtypes()) {
    llama_config c = tiny_config(4, 1, 10, 2);
    c.tie_word_embeddings = true;
    check_model(t, c, 2, 9);
  }
}

}  // namespace
}  // namespace ferry::model::test
