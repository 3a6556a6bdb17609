#pragma once
// One LLaMA decoder block as an explicit forward/backward pair. The engine owns the weights
// (views into one flat buffer per layer, see layout.h) and may stream a different copy of the
// same values in for backward; nothing here keeps a weight alive or records autograd.
//
//   x_mid = x + o_proj(attn(rope(q,k), v))        with q,k,v = qkv_proj(rmsnorm(x))
//   y     = x_mid + down_proj(silu(gate) * up)    with gate,up = gate_up_proj(rmsnorm(x_mid))
#include <ATen/core/Tensor.h>

#include <cstdint>

#include "src/model/attention.h"
#include "src/model/layout.h"
#include "src/model/llama_config.h"
#include "src/model/rope.h"

namespace ferry::model {

// What block_forward keeps for block_backward. The norm outputs and the SwiGLU product are
// recomputed in backward (one elementwise pass each) rather than stored. N = B*T tokens, e the
// compute dtype's bytes, a the accumulation dtype's bytes (4; 8 for fp64 compute):
//   x        (B,T,h)     e*N*h     the block input (a reference to the caller's tensor, not a copy:
//                                  do not overwrite it before backward)
//   attn_rstd (N)        a*N
//   q        (B,Hq,T,D)  e*N*q     after RoPE
//   k, v     (B,Hkv,T,D) 2e*N*kv   k after RoPE
//   attn_out (B,Hq,T,D)  e*N*q
//   lse      (B,Hq,T)    a*N*Hq
//   x_mid    (N,h)       e*N*h
//   mlp_rstd (N)         a*N
//   gate_up  (N,2i)      2e*N*i
// total = N * (e*(2h + 2q + 2kv + 2i) + a*(Hq + 2)); see block_saved_bytes.
struct block_saved {
  at::Tensor x, attn_rstd, q, k, v, attn_out, lse, x_mid, mlp_rstd, gate_up;
  packing packed;  // packed rows (defined positions): shared by every block of the micro-batch, not counted

  int64_t bytes() const;   // bytes of the defined tensors above
  void clear();
};

// Exact bytes block_forward keeps in block_saved for a (batch, seq) input of elem_size-byte
// compute dtype (8 means fp64, whose statistics are fp64 too).
int64_t block_saved_bytes(const llama_config& cfg, int64_t batch, int64_t seq, int64_t elem_size);

// The training forward: x (B,T,h) in the compute dtype, the weights' dtype. Positions are 0..T-1
// (T <= rope rows), or packed runs (packing.h: positions restart per sequence and attention stays
// within each). Fills saved for block_backward. Returns y (B,T,h).
at::Tensor block_forward(const at::Tensor& x, const block_weights& w, const llama_config& cfg, const rope_cache& rope,
                         block_saved& saved, const packing* packed = nullptr);

// The inference forward of streamed weights: the block runs in chunks of about
// block_forward_chunk_rows() tokens (time steps x batch): each chunk's keys and values go to a
// (B,Hkv,T,D) buffer, then its queries attend to the positions so far, so neither (T,T) scores nor
// the (B*T, 2i) MLP activation exist at once; block_forward_inference_bytes gives the peak. The
// result equals the training forward's up to the rounding of differently shaped GEMMs and
// reductions.
at::Tensor block_forward_chunked(const at::Tensor& x, const block_weights& w, const llama_config& cfg,
                                 const rope_cache& rope);

// The inference forward in one pass over the whole sequence: the training forward without saving,
// bit for bit. For resident weights (offload none), where memory is not the constraint and the
// chunks' extra launches and narrower GEMMs cost time; its peak is block_forward_whole_bytes.
at::Tensor block_forward_whole(const at::Tensor& x, const block_weights& w, const llama_config& cfg,
                               const rope_cache& rope, const packing* packed = nullptr);

// Rows per chunk of the inference forward (default 1024; block_forward_cached chunks the same way).
// Tests lower it to exercise the chunking; returns the previous value.
int64_t block_set_forward_chunk_rows(int64_t rows);
int64_t block_forward_chunk_rows();

// Device bytes block_forward_chunked allocates beyond its input and output, at its peak: the
// layer's keys and values plus one chunk's transients, each tensor charged as the allocator
// charges it (device_bytes.h). path: attention_path_for(cfg, dtype, device is CUDA). chunk_rows:
// tokens per chunk, 0 = block_forward_chunk_rows(). (block_bytes.cpp)
int64_t block_forward_inference_bytes(const llama_config& cfg, int64_t batch, int64_t seq, int64_t elem_size,
                                      attention_path path, int64_t chunk_rows = 0);

// The same for block_forward_whole: the whole sequence's projections, attention and MLP
// activations, released as soon as the next op has read them.
int64_t block_forward_whole_bytes(const llama_config& cfg, int64_t batch, int64_t seq, int64_t elem_size,
                                  attention_path path);

// Device bytes of rmsnorm_forward over `rows` rows without rstd, its output included: the output on
// CUDA; on the CPU also the ATen composition's fp32 copy, square, statistics and normalised rows.
int64_t rmsnorm_forward_bytes(int64_t rows, int64_t hidden, int64_t elem_size, bool cuda);

// dy (B,T,h). Writes the weight gradients into g (views of a flat gradient buffer: overwritten, or
// added to when accumulate) and returns dx (B,T,h). Releases saved's tensors as it goes (saved is
// empty on return).
at::Tensor block_backward(const at::Tensor& dy, const block_weights& w, const llama_config& cfg,
                          const rope_cache& rope, block_saved& saved, const block_weights& g, bool accumulate);

// Inference with a KV cache: x (B,Tnew,h) at positions [pos, pos+Tnew); k_cache, v_cache
// (B, Hkv, Tmax, D) in the compute dtype get this step's keys/values at [pos, pos+Tnew); queries
// attend causally to every cached position. Returns y (B,Tnew,h). Chunked like block_forward_chunked
// inference path (a long prefill holds one chunk's transients).
at::Tensor block_forward_cached(const at::Tensor& x, const block_weights& w, const llama_config& cfg,
                                const rope_cache& rope, int64_t pos, at::Tensor& k_cache, at::Tensor& v_cache);

}  // namespace ferry::model
