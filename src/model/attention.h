#pragma once
// Causal grouped-query attention with explicit forward and backward (no autograd).
// q (B, Hq, T, D), k and v (B, Hkv, T, D), Hq a multiple of Hkv; query head h reads kv head
// h / (Hq/Hkv) (HF repeat_kv). Same contract as ferry::gpu::attention_forward/backward, which CUDA
// tensors use when built with CUDA. The ATen path computes scores in fp32 (fp64 for fp64 inputs)
// in blocks of query rows and recomputes the probabilities from lse in backward: no (T, T)
// tensor outlives a call.
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

#include "src/model/llama_config.h"
#include "src/model/packing.h"

namespace ferry::model {

// Which implementation attention_forward runs, for the planner's byte counts. The rule is
// gpu/attention.cpp's: on CUDA, head_dim <= 256 takes libtorch's fused SDPA kernels (flash for
// fp16/bf16, memory-efficient for fp32, which needs k and v expanded to the query heads), larger
// heads cuBLAS GEMMs with a full (T, T) score matrix per head; everything else the ATen path.
enum class attention_path { attention_flash, attention_efficient, attention_large_head, attention_aten };
attention_path attention_path_for(const llama_config& cfg, at::ScalarType dtype, bool cuda);

// Returns out (B, Hq, T, D) in q's dtype and lse (B, Hq, T) fp32 (fp64 for fp64 q): the
// log-sum-exp of the scaled, masked scores of each query row.
// packed (packing.h): each token attends only within its run. CUDA fp16/bf16 with head_dim <= 256
// runs flash attention's variable-length kernels (out is then a transposed view and lse in the
// kernel's layout, (Hq, B*T), the same bytes); every other packed case (the CPU, fp32 on CUDA,
// head_dim > 256) runs the ATen composition with a block-diagonal mask, on the CUDA device too:
// correct, but slower than the fused paths, with query-row blocks of fp32 scores as on the CPU.
std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     double scale, const packing* packed = nullptr);
// Returns dq, dk, dv shaped and typed like q, k, v. packed: as given to the forward.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(const at::Tensor& dout, const at::Tensor& q,
                                                                  const at::Tensor& k, const at::Tensor& v,
                                                                  const at::Tensor& out, const at::Tensor& lse,
                                                                  double scale, const packing* packed = nullptr);

// For the KV cache: q (B, Hq, Tq, D) holds positions [q_offset, q_offset + Tq); k, v
// (B, Hkv, Tk, D) hold positions [0, Tk), Tk >= q_offset + Tq. Query at position p sees keys <= p.
// Inference only (no lse); any strides. CUDA tensors with Tk == q_offset + Tq (the queries are the
// last positions) use gpu::attention_forward_offset, which neither copies k and v nor holds more
// than one (Tq, Tk) score matrix per head; other cases use the ATen path.
at::Tensor attention_forward_offset(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                                    int64_t q_offset);

// The ATen path processes query rows in blocks whose fp32 scores hold about this many elements
// (default 64 Mi). Tests lower it to exercise the blocking; returns the previous value.
int64_t attention_set_score_budget(int64_t elements);
int64_t attention_score_budget();

// The ATen compositions (CPU path and test reference). q_offset as above; 0 for training.
// positions (B, T) on q's device (packing::positions) confines each query to its run.
std::tuple<at::Tensor, at::Tensor> attention_forward_aten(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, double scale, int64_t q_offset,
                                                          const at::Tensor& positions = at::Tensor());
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_aten(const at::Tensor& dout, const at::Tensor& q,
                                                                       const at::Tensor& k, const at::Tensor& v,
                                                                       const at::Tensor& out, const at::Tensor& lse,
                                                                       double scale,
                                                                       const at::Tensor& positions = at::Tensor());

}  // namespace ferry::model
