// Device bytes of the inference forwards (block_forward_chunked, block_forward_whole), for
// the planner: every tensor the functions in block.cpp, attention.cpp and the ops they call
// allocate, phase by phase, each charged as the allocator charges it (device_bytes.h). The peak
// of a phase is the sum of what is alive in it; a function's peak is the largest phase. Tests
// (model_test: inference_bytes_bound_the_measured_peak) compare these with the allocator's own
// peak on the CPU and on CUDA.
#include <ATen/ATen.h>

#include <algorithm>

#include "gpu/attention_rule.h"
#include "src/model/attention.h"
#include "src/model/block.h"
#include "src/model/device_bytes.h"

namespace ferry::model {
namespace {

// Bytes of the small tensors ATen makes inside one op on the CPU (0-dim wrapped scalars, index
// vectors of a few elements); measured at most 64 per op in the attention block's ops.
constexpr int64_t k_aten_small = 256;
// Small tensors a CUDA attention call allocates beyond those counted (see sizes::attention).
constexpr int64_t k_cuda_aux = 4;
// One more where cuDNN's attention may run (sizes::attention): at GQA 4/1, batch 2 and 4 queries in
// fp16/bf16 its call peaked one 512-byte block above flash attention's count (H200, 2026-11-28).
constexpr int64_t k_cudnn_aux = 1;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t m) { return ceil_div(a, m) * m; }

struct sizes {
  const llama_config& cfg;
  int64_t e;      // compute dtype bytes
  int64_t a;      // accumulation dtype bytes (fp32; fp64 for fp64)
  bool cuda;
  attention_path path;

  int64_t c(int64_t bytes) const { return device_charge(bytes, cuda); }

  int64_t norm(int64_t rows) const { return rmsnorm_forward_bytes(rows, cfg.hidden_size, e, cuda); }
  // RoPE on the q and k heads of `rows` rows, in place on CUDA; the ATen composition's copies.
  int64_t rope(int64_t rows, int64_t positions) const {
    if (cuda) return 0;
    const int64_t qk = cfg.q_dim() + cfg.kv_dim();
    return 5 * c(rows * qk * a) + 2 * c(positions * cfg.head_dim * a);
  }
  // The MLP half on `rows` rows beside its input x_mid: norm output + gate_up, then gate_up + the
  // SwiGLU product (the ATen composition's fp32 copies on the CPU), then the product + the output
  // (counted only when `with_output`: the whole pass's output is its caller's).
  int64_t mlp(int64_t rows, bool with_output) const {
    const int64_t h = cfg.hidden_size, i = cfg.intermediate_size;
    const int64_t gate_up = c(rows * 2 * i * e), act = c(rows * i * e);
    const int64_t swiglu = cuda ? act : c(rows * 2 * i * a) + 3 * c(rows * i * a) + act;
    return std::max({norm(rows), c(rows * h * e) + gate_up, gate_up + swiglu,
                     act + (with_output ? c(rows * h * e) : 0)});
  }

  // attention_forward (tq == tk, from position 0) or attention_forward_offset (tq queries at the
  // end of tk keys) for a batch of B: everything it allocates, its output included. On CUDA also
  // k_cuda_aux small tensors beside the counted ones (the fused kernels' rng seed and offset, the
  // GEMM path's grouped views): measured up to three 512-byte blocks more than counted.
  int64_t attention(int64_t B, int64_t tq, int64_t tk) const {
    const int64_t D = cfg.head_dim;
    const bool cudnn = path == attention_path::attention_flash && tq == tk && gpu::cudnn_attention_head_dim(D);
    return attention_tensors(B, tq, tk) + (cuda ? (k_cuda_aux + (cudnn ? k_cudnn_aux : 0)) * c(1) : 0);
  }
  int64_t attention_tensors(int64_t B, int64_t tq, int64_t tk) const {
    const int64_t Hq = cfg.num_attention_heads, Hkv = cfg.num_key_value_heads, D = cfg.head_dim;
    const int64_t G = Hq / Hkv, Dp = round_up(D, 8);
    const bool padded = Dp != D, full = tq == tk;
    const int64_t out = c(B * tq * Hq * D * e);
    switch (path) {
      case attention_path::attention_flash: {
        // cuDNN's kernel, which runs instead where it applies (D % 8 == 0, D <= 128, all keys;
        // gpu/attention.cpp), allocates the output, lse and small tensors (k_cudnn_aux): what this
        // charges for flash attention at D % 8 == 0 without splits.
        // pad_head_dim copies q, k, v when D % 8 != 0; the kernel's output (padded) and lse;
        // split-KV accumulators (fp32, per split) when too few query blocks fill the GPU:
        // splits <= key blocks of 256/128/64 keys for D <= 64/128/larger, taken only when
        // B*Hq*ceil(tq/64) < 0.8 * 2 * SMs (at most 160 SMs counted here).
        const int64_t pads = padded ? c(B * tq * Hq * Dp * e) + 2 * c(B * tk * Hkv * Dp * e) : 0;
        const int64_t block_n = D <= 64 ? 256 : D <= 128 ? 128 : 64;
        constexpr int64_t k_max_sms = 160;
        const bool split = B * Hq * ceil_div(tq, 64) * 10 < 8 * 2 * k_max_sms;
        const int64_t splits = split ? std::min<int64_t>(ceil_div(tk, block_n), 128) : 1;
        const int64_t Dr = round_up(D, D <= 128 ? 32 : 64);
        const int64_t accum = splits > 1 ? c(splits * B * Hq * tq * Dr * 4) + c(splits * B * Hq * tq * 4) : 0;
        return pads + c(B * tq * Hq * Dp * e) + c(B * Hq * tq * 4) + accum + (padded ? out : 0);
      }
      case attention_path::attention_efficient:
        if (full) {
          // k and v expanded to the query heads, the pads, the output, lse with its time axis
          // padded to 32 and its exact-size copy, the unpadded output.
          const int64_t expand = G > 1 ? 2 * c(B * Hq * tk * D * e) : 0;
          const int64_t pads = padded ? c(B * tq * Hq * Dp * e) + 2 * c(B * Hq * tk * Dp * e) : 0;
          return expand + pads + c(B * tq * Hq * Dp * e) + c(B * Hq * round_up(tq, 32) * 4) + c(B * Hq * tq * 4) +
                 (padded ? out : 0);
        }
        [[fallthrough]];   // fp32 queries at an offset take the GEMM path (gpu::attention_forward_offset)
      case attention_path::attention_large_head:
        // raw scores (B*Hkv, G*tq, tk) in the compute dtype, lse, the output
        return c(B * Hq * tq * tk * e) + c(B * Hq * tq * 4) + out;
      case attention_path::attention_aten: {
        // fp32 copies of k and v (for half inputs), the output and lse, and the largest phase of one
        // block of n query rows: building its scores (the rows' fp32 copy, positions, mask and its
        // repeat per group); logsumexp (amax, then exp(s - max) as two temporaries of the scores'
        // size, and row vectors); the probabilities' product with v. Plus ATen's bookkeeping
        // tensors of a few bytes each (wrapped scalars, repeat's index vectors): k_aten_small.
        const int64_t kv_copy = e == a ? 0 : 2 * c(B * Hkv * tk * D * a);
        const int64_t n = std::clamp<int64_t>(attention_score_budget() / std::max<int64_t>(1, B * Hq * tk), 1, tq);
        const int64_t scores = c(B * Hq * n * tk * a), row = c(B * Hq * n * a), rows_d = c(B * Hq * n * D * a);
        const int64_t block = std::max({rows_d + scores + c(n * 8) + c(tk * 8) + c(n * tk) + c(G * n * tk),
                                        3 * scores + 4 * row, scores + row + rows_d}) + k_aten_small;
        return kv_copy + out + c(B * Hq * tq * a) + block;
      }
    }
    return 0;
  }
};

sizes make_sizes(const llama_config& cfg, int64_t elem_size, attention_path path) {
  return sizes{cfg, elem_size, elem_size == 8 ? 8 : 4, path != attention_path::attention_aten, path};
}

}  // namespace

int64_t rmsnorm_forward_bytes(int64_t rows, int64_t hidden, int64_t elem_size, bool cuda) {
  const int64_t a = elem_size == 8 ? 8 : 4;
  auto c = [&](int64_t bytes) { return device_charge(bytes, cuda); };
  if (cuda) return c(rows * hidden * elem_size);
  return 2 * c(rows * hidden * a) + 2 * c(rows * hidden * elem_size) + 2 * c(rows * a);
}

int64_t block_forward_whole_bytes(const llama_config& cfg, int64_t batch, int64_t seq, int64_t elem_size,
                                  attention_path path) {
  const sizes s = make_sizes(cfg, elem_size, path);
  const int64_t N = batch * seq, e = elem_size, h = cfg.hidden_size, q = cfg.q_dim(), kv = cfg.kv_dim();
  const int64_t qkv = s.c(N * (q + 2 * kv) * e), qc = s.c(N * q * e), kvc = s.c(N * kv * e);
  return std::max({
      s.norm(N),                                               // attention norm
      s.c(N * h * e) + qkv + s.rope(N, seq),                   // norm output, projections, RoPE
      qkv + qc + 2 * kvc,                                      // q, k, v made contiguous
      qc + 2 * kvc + s.attention(batch, seq, seq),             // attention
      qc + qc + s.c(N * h * e),                                // output, its (N, q) layout, x_mid
      s.c(N * h * e) + s.mlp(N, /*with_output=*/false),        // MLP beside x_mid
  });
}

int64_t block_forward_inference_bytes(const llama_config& cfg, int64_t batch, int64_t seq, int64_t elem_size,
                                      attention_path path, int64_t chunk_rows) {
  const sizes s = make_sizes(cfg, elem_size, path);
  const int64_t e = elem_size, h = cfg.hidden_size, q = cfg.q_dim(), kv = cfg.kv_dim();
  if (chunk_rows <= 0) chunk_rows = block_forward_chunk_rows();
  const int64_t step = std::clamp<int64_t>(chunk_rows / batch, 1, std::max<int64_t>(seq, 1));
  const bool one_chunk = step >= seq;
  const int64_t rows = batch * step;
  // The layer's keys and values, for every chunk; the chunk's input rows (a copy when the batch
  // has several rows: their time steps are not contiguous); its projections and queries.
  const int64_t kv_buf = 2 * s.c(batch * seq * kv * e);
  const int64_t x2 = s.c(rows * h * e), qkv = s.c(rows * (q + 2 * kv) * e), qc = s.c(rows * q * e);
  // Attention peaks in the chunk with the most queries and keys: a full one that ends at seq, or
  // the last, partial one; with one chunk it is the training forward's.
  const int64_t last = seq - (seq - 1) / step * step;
  // (The first chunk's queries are all its keys, which takes attention_forward's path.)
  const int64_t attn = one_chunk ? s.attention(batch, seq, seq)
                                 : std::max({s.attention(batch, step, step), s.attention(batch, step, seq),
                                             s.attention(batch, last, seq)});
  return kv_buf + x2 +
         std::max({
             s.norm(rows),
             s.c(rows * h * e) + qkv + s.rope(rows, seq),
             qkv + qc,
             qc + attn,
             qc + qc + s.c(rows * h * e),
             // the chunk's output is a copy into the block's output unless there is one chunk
             s.c(rows * h * e) + s.mlp(rows, /*with_output=*/!one_chunk),
         });
}

}  // namespace ferry::model
