#pragma once
// Internal: the per-ISA kernel table (kernels.cc) the front (adamw.cc) calls block by block.
// Each kernel works on elements [begin, end) of one chunk; end - begin is any length (the
// vector loop has a tail that reuses the vector body on a padded stack copy).
#include <cstddef>
#include <cstdint>
#include <vector>

#include "cpu_optim/adamw.h"

namespace ferry::cpu_optim::detail {

// The per-step scalars, computed once by the front in double and rounded to float.
struct step_scalars {
  float beta1, one_minus_beta1;
  float beta2, one_minus_beta2;
  float decay;              // 1 - lr * weight_decay
  float step_size;          // lr / (1 - beta1^step)
  float inv_sqrt_bc2;       // 1 / sqrt(1 - beta2^step)
  float eps;
  float mult;               // grad multiplier of the (forward) step
  float new_mult;           // redo only: multiplier of the step that replaces it
  bool stream_half;         // half_out is aligned for non-temporal stores
  float log_ratio;          // step: log elements with v' > log_ratio v (0: no log)
  float zero_ratio;         // undo/redo: restored v < zero_ratio v' means m = v = 0 was the
                            // old state (0: plain inversion, the step kept no log)
  uint32_t sr_key;          // bf16 moments: the stochastic-rounding stream (codes::sr_key)
  bool fast_roots;          // int8 moments: fourth roots from reciprocal-square-root estimates
  const float* old_scales;  // int8 undo with the step's log: this work block's (m, v) scales
                            // before the step, a pair per quantization block (else null)
};

enum class op { op_step, op_undo, op_redo };

struct kernel_table {
  const char* target;
  // Sum of squares and non-finite count of g*mult over [begin, end), g = acc + grad (acc may be
  // null: g = grad).
  grad_stats (*stats)(const void* grad, dtype grad_dtype, const float* acc, size_t begin, size_t end, float mult);
  // max |g| over [begin, end) (NaN when any element is NaN); g*mult is all finite iff
  // max_abs*|mult| is finite, since fp32 multiplication rounds monotonically.
  float (*max_abs)(const void* grad, dtype grad_dtype, const float* acc, size_t begin, size_t end);
  // One op over [begin, end) (with c.grad_acc, on g = grad_acc + grad), in c.moments' form
  // (int8: begin a multiple of k_quant_block, and op_redo is not fused: the front runs undo then
  // step); returns the sum of squares of the g it applied (step, redo: new g;
  // undo: 0), accumulated exactly as stats() does, nonfinite 0. A step with s.log_ratio > 0
  // appends to `log` the old m, v of the elements undo cannot invert well (adamw.h, undo_log),
  // offsets relative to begin.
  grad_stats (*update)(op o, const chunk_ref& c, const step_scalars& s, size_t begin, size_t end,
                       std::vector<undo_entry>* log);
  void (*convert)(const void* src, dtype src_dtype, void* dst, dtype dst_dtype, size_t begin,
                  size_t end);
  // acc[i] += grad[i] in fp32 over [begin, end) (one rounding per element, as ATen's add_).
  void (*accumulate)(const void* grad, dtype grad_dtype, float* acc, size_t begin, size_t end);
};

// The table of the target chosen now (best supported, or the one force_target picked).
kernel_table kernels();

}  // namespace ferry::cpu_optim::detail
