#include "src/infer/generate.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>
#include <utility>

#include "src/common/error.h"
#include "src/infer/kv_cache.h"
#include "src/model/embed_head.h"

namespace ferry::infer {
namespace {
using clock_type = std::chrono::steady_clock;
double ms_since(clock_type::time_point t0) {
  return std::chrono::duration<double, std::milli>(clock_type::now() - t0).count();
}

// Final norm + lm_head on the last position of each row: x (B, T, h), last (B) host indices.
at::Tensor last_logits(engine::engine& e, const at::Tensor& x, const std::vector<int64_t>& last) {
  const int64_t B = x.size(0), T = x.size(1), h = x.size(2);
  std::vector<int64_t> flat(last.size());
  for (size_t b = 0; b < last.size(); ++b) flat[b] = int64_t(b) * T + last[b];
  at::Tensor idx = at::tensor(flat, at::kLong).to(x.device());
  at::Tensor xl = x.reshape({B * T, h}).index_select(0, idx).view({B, 1, h});
  auto [norm_w, lm_w] = e.head_weights();
  at::Tensor logits = model::head_logits(xl, norm_w, lm_w, e.config()).view({B, -1});
  e.release_head();
  return logits;
}
}  // namespace

generate_result generate(engine::engine& e, const std::vector<std::vector<int64_t>>& prompts,
                         const generate_options& opt) {
  const auto& cfg = e.config();
  const int64_t B = int64_t(prompts.size());
  FERRY_ASSERT(B > 0, "generate: no prompts");
  std::vector<int64_t> len(static_cast<size_t>(B), 0);
  for (int64_t b = 0; b < B; ++b) {
    len[b] = int64_t(prompts[b].size());
    FERRY_CHECK(len[b] > 0, "prompt ", b, " is empty (no tokens); give at least one token or keep the BOS token");
  }
  const int64_t P = *std::max_element(len.begin(), len.end());
  const bool aligned = std::all_of(len.begin(), len.end(), [&](int64_t n) { return n == P; });
  const int64_t capacity = P + opt.max_new_tokens;
  FERRY_CHECK(capacity <= e.rope().cos.size(0), "a prompt of ", P, " tokens plus ", opt.max_new_tokens,
              " new tokens needs ", capacity, " positions but the model supports ", e.rope().cos.size(0),
              "; shorten the prompt or lower max_new_tokens");
  FERRY_CHECK(B * P <= e.options().max_batch * e.options().max_seq, "the prefill of ", B, " prompts padded to ", P,
              " tokens exceeds the engine's planned batch ", e.options().max_batch, " x ", e.options().max_seq,
              " tokens; lower batch_size or shorten the prompts");

  auto guard = e.device().enter_compute();
  const at::Device dev = e.device().device();
  e.device().reset_memory_peak();
  generate_result r;
  r.tokens.resize(size_t(B));
  sampler pick(opt.sampling);
  kv_cache cache = make_kv_cache(cfg, B, capacity, e.options().dtype, dev);
  r.kv_cache_bytes = cache.bytes();

  // Prefill: right-padded (pad id 0, never attended: each row runs at its own length).
  auto t0 = clock_type::now();
  std::vector<int64_t> tok(size_t(B * P), 0);
  for (int64_t b = 0; b < B; ++b) std::copy(prompts[b].begin(), prompts[b].end(), tok.begin() + b * P);
  for (int64_t b = 0; b < B; ++b) r.prompt_tokens += len[b];
  at::Tensor x = e.embed(at::from_blob(tok.data(), {B, P}, at::kLong));
  x = e.forward_blocks(std::move(x), [&](int64_t l, const model::block_weights& w, const at::Tensor& in) {
    if (aligned) return model::block_forward_cached(in, w, cfg, e.rope(), 0, cache.k[l], cache.v[l]);
    at::Tensor out = at::zeros_like(in);
    for (int64_t b = 0; b < B; ++b) {
      at::Tensor kb = cache.k[l].narrow(0, b, 1), vb = cache.v[l].narrow(0, b, 1);
      at::Tensor y = model::block_forward_cached(in.narrow(0, b, 1).narrow(1, 0, len[b]), w, cfg, e.rope(), 0, kb, vb);
      out.narrow(0, b, 1).narrow(1, 0, len[b]).copy_(y);
    }
    return out;
  });
  std::vector<int64_t> last(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) last[b] = len[b] - 1;
  at::Tensor logits = last_logits(e, x, last);
  x.reset();

  std::vector<bool> done(static_cast<size_t>(B), false);
  std::vector<int64_t> next_host(static_cast<size_t>(B));
  auto t_decode = clock_type::now();
  for (int64_t s = 0; s < opt.max_new_tokens; ++s) {
    if (opt.keep_logits) r.logits.push_back(logits.to(at::kCPU));
    at::Tensor next = pick.next(logits).to(at::kCPU);
    if (s == 0) {
      r.prefill_ms = ms_since(t0);
      t_decode = clock_type::now();
    }
    const int64_t* np = next.data_ptr<int64_t>();
    bool all_done = true;
    for (int64_t b = 0; b < B; ++b) {
      next_host[b] = np[b];
      if (done[b]) continue;
      r.tokens[b].push_back(np[b]);
      ++r.new_tokens;
      if (np[b] == opt.eos_id || int64_t(r.tokens[b].size()) == opt.max_new_tokens ||
          std::find(opt.stop_ids.begin(), opt.stop_ids.end(), np[b]) != opt.stop_ids.end())
        done[b] = true;
      all_done = all_done && done[b];
    }
    if (all_done) break;

    // Row b's new token sits at position len[b] + s (finished rows keep decoding, unread).
    ++r.steps;
    at::Tensor xt = e.embed(at::from_blob(next_host.data(), {B, 1}, at::kLong));
    if (aligned) {
      xt = e.forward_blocks(std::move(xt), [&](int64_t l, const model::block_weights& w, const at::Tensor& in) {
        return model::block_forward_cached(in, w, cfg, e.rope(), P + s, cache.k[l], cache.v[l]);
      });
    } else {
      std::vector<int64_t> pos(static_cast<size_t>(B));
      for (int64_t b = 0; b < B; ++b) pos[b] = len[b] + s;
      at::Tensor pos_dev = at::tensor(pos, at::kLong).to(dev);
      const int64_t max_pos = P + s;
      xt = e.forward_blocks(std::move(xt), [&](int64_t l, const model::block_weights& w, const at::Tensor& in) {
        return block_forward_rows(in, w, cfg, e.rope(), pos_dev, max_pos, cache.k[l], cache.v[l]);
      });
    }
    logits = last_logits(e, xt, std::vector<int64_t>(size_t(B), 0));
  }
  e.device().synchronize();
  r.decode_ms = ms_since(t_decode);
  r.gpu_alloc_peak = e.device().memory_stats().allocated_peak;
  return r;
}

at::Tensor full_forward_logits(engine::engine& e, const at::Tensor& tokens) {
  auto guard = e.device().enter_compute();
  at::Tensor x = e.embed(tokens);
  x = e.forward_blocks(std::move(x), [&](int64_t, const model::block_weights& w, const at::Tensor& in) {
    return model::block_forward_chunked(in, w, e.config(), e.rope());
  });
  auto [norm_w, lm_w] = e.head_weights();
  at::Tensor logits = model::head_logits(x, norm_w, lm_w, e.config());
  e.release_head();
  return logits.to(at::kCPU);
}

}  // namespace ferry::infer
