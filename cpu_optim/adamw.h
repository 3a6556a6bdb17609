#pragma once
// Host AdamW over raw contiguous arrays: fp32 master weights and moments, fp32/fp16/bf16
// gradients, an optional fp16/bf16 copy of the updated weights written in the same pass.
// No libtorch here (ARCHITECTURE.md: cpu_optim knows nothing of tensors).
//
// Front (this header, adamw.cc): argument checks, bias-correction scalars, the split into
// fixed-size blocks over the optimizer's own oneTBB arena. ISA kernels (kernels.cc) are compiled
// for AVX3 (AVX-512), AVX2 (+F16C, FMA) and EMU128 (portable fallback) and chosen at run time.
//
// Determinism: the block split depends only on n and block_size, never on the thread count, and
// per-block statistics are summed in block order, so every result is bit-identical for any thread
// count on a given ISA target. Different targets may differ in the last ulp (vector widths change
// the order of the in-block double sums; EMU128 has no fused multiply-add).
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace ferry::cpu_optim {

enum class dtype { dtype_f32, dtype_f16, dtype_bf16 };

size_t dtype_size(dtype t);
const char* dtype_name(dtype t);

struct adamw_hparams {
  float lr = 1e-3f;
  float beta1 = 0.9f;
  float beta2 = 0.999f;
  float eps = 1e-8f;
  float weight_decay = 0.0f;
};

// Statistics of g = grad * grad_mult: sum of fp32 squares accumulated in double within a block,
// blocks summed in block order; nonfinite counts elements of g that are inf or NaN.
struct grad_stats {
  double sum_sq = 0;
  int64_t nonfinite = 0;
};

// The form of the AdamW moments m (exp_avg) and v (exp_avg_sq) of a chunk (README.md "Compact
// moments"). The fp32 master weights are fp32 in every kind.
enum class moments_kind {
  f32,   // float m[n], v[n]: 8 B/param
  bf16,  // uint16_t m[n], v[n] (bf16 bits), stochastically rounded on write: 4 B/param
  int8,  // int8_t m[n], uint8_t v[n] codes with a float scale per k_quant_block elements for each
         // (m_scale, v_scale, quant_blocks(n) entries): 2 B/param + 8 B per block
};

// Elements per quantization block of the int8 moments (blocks start at multiples of it).
constexpr size_t k_quant_block = 2048;
size_t quant_blocks(size_t n);
// Bytes of both moments of n elements in this kind (int8: codes and scales).
size_t moments_bytes(moments_kind k, size_t n);
const char* moments_kind_name(moments_kind k);

// One contiguous chunk (e.g. one layer): param fp32 and the moments m, v (in `moments` form) of n
// elements, updated in place; grad of n elements in grad_dtype (read only); half_out of n elements
// in half_dtype (f16 or bf16), or nullptr for no copy. half_out is written with non-temporal
// stores when it is 64-byte aligned.
//
// grad_acc (optional): the fp32 sum of earlier micro-batches' gradients. The gradient is then
// grad_acc[i] + grad[i], added in fp32 with one rounding in the same pass that reads it (the last
// micro-batch fused into the update): bit-identical to accumulate(grad, ..., grad_acc) followed by
// the same call on the fp32 sum, without writing the sum. grad_acc is only read.
//
// Compact moments (moments != f32): the step updates m and v in fp32 from their stored values,
// stores them in the compact form, and computes the weight update from the values it stored, so
// undo() inverts the weight update exactly as for f32 and the moments to within one rounding of
// their form (bf16: about 2^-8 relative; int8: one code step). seed (bf16) selects this chunk's
// stochastic-rounding stream; the step count is mixed in, so each step draws fresh bits, and redo
// draws the same bits as the step it replaces.
struct chunk_ref {
  float* param;
  void* m;
  void* v;
  const void* grad;
  dtype grad_dtype;
  void* half_out;
  dtype half_dtype;
  size_t n;
  const float* grad_acc = nullptr;
  moments_kind moments = moments_kind::f32;
  float* m_scale = nullptr;  // int8 only
  float* v_scale = nullptr;  // int8 only
  uint64_t seed = 0;         // bf16 only
};

// The moments of n elements alone, for conversions (checkpoints, resuming with another kind).
struct moments_ref {
  moments_kind kind = moments_kind::f32;
  void* m = nullptr;
  void* v = nullptr;
  float* m_scale = nullptr;
  float* v_scale = nullptr;
  size_t n = 0;
};
// The stored values as fp32 (exact: every bf16 and int8-code value is an fp32 value), on the
// caller's oneTBB arena.
void decode_moments(const moments_ref& src, float* m, float* v);
// fp32 moments into `dst`'s form: bf16 rounded to nearest even; int8 with each block's scales
// taken from its largest |m| and v. f32 copies.
void encode_moments(const float* m, const float* v, const moments_ref& dst);

// What undo() cannot recover from the new moments alone. Inverting m' = b1 m + (1-b1) g and
// v' = b2 v + (1-b2) g^2 loses only the final roundings, about one ulp *of the new value*: a
// large relative error where this step's term dominates the old moment (v ≪ (1-b2) g^2), which
// later steps divide by. step() given a log records the exact old m and v of those elements
// (v != 0 and v' > k_undo_log_ratio v, or v == 0 with m != 0); the elements whose old m and v were
// both zero are recognised by undo() and restored to exact zeros. With the log, undo restores m
// and v exactly there and within (k_undo_log_ratio / b2 + 3)·2^-24 |v| elsewhere (README.md).
struct undo_entry {
  uint32_t offset;  // within its block
  float m, v;       // the values before the step
};

constexpr float k_undo_log_ratio = 256.0f;
// Compact moments (bf16, int8) log at a lower ratio: their undo is exact only to within a
// rounding of their form *of the new value*, so growth past 4x is logged (README.md "Compact
// moments"). An int8 log also keeps each quantization block's scales before the step.
constexpr float k_undo_log_ratio_compact = 4.0f;

class undo_log {
 public:
  size_t entries() const;
  size_t bytes() const;
  // Frees the entries (a log's size follows the step that wrote it, not the largest one seen).
  void clear();

 private:
  friend class adamw;
  size_t n_ = 0, block_size_ = 0;                // the chunk layout of the step that wrote it
  std::vector<std::vector<undo_entry>> blocks_;  // one list per block, in block order
  std::vector<std::vector<float>> scales_;       // int8: per block, (m, v) scale pairs before the step
};

// Kernel-lab knobs for the benchmark; the defaults are what the product uses.
struct adamw_tuning {
  size_t block_size = 16384;  // elements per work item; a multiple of 64
  bool stream_half = true;    // non-temporal stores for half_out (no read-for-ownership)
  bool fast_roots = false;    // int8 moments: the codes' fourth roots from the hardware's
                              // reciprocal-square-root estimate + a Newton step (README.md; not
                              // faster on the H100 host's Xeon, 2026-11-27)
};

class adamw {
 public:
  // num_threads 0: all cores but one (at least 1), leaving one for the CUDA copy/driver thread.
  explicit adamw(int num_threads = 0, adamw_tuning tuning = {});
  ~adamw();
  adamw(const adamw&) = delete;
  adamw& operator=(const adamw&) = delete;

  int num_threads() const;
  const adamw_tuning& tuning() const { return tuning_; }

  // Statistics of (grad_acc + grad) * grad_mult (grad_acc optional, as in chunk_ref).
  grad_stats stats(const void* grad, dtype grad_dtype, size_t n, float grad_mult = 1.0f,
                   const float* grad_acc = nullptr);

  // One AdamW step on one chunk, in place; `step` is 1-based (bias correction 1 - beta^step).
  // g = grad * grad_mult. PyTorch AdamW semantics:
  //   p *= 1 - lr*wd; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
  //   p -= (lr/bc1) * m / (sqrt(v)/sqrt(bc2) + eps).
  // Returns the stats of g. When any g is non-finite nothing is written (p, m, v, half_out keep
  // their bits) and stats.nonfinite > 0. Costs a max-|grad| pre-scan (2 B/param for half
  // grads, at read bandwidth) plus one fused pass that also sums the squares.
  // With `log` (a step that may be undone), also records in it what undo() needs to restore the
  // moments exactly (undo_log); the log is cleared first.
  // finite_known: the caller has established that every grad * grad_mult is finite (e.g. stats()
  // of the same gradient with a multiplier at least as large reported no non-finite element), so
  // the pre-scan is skipped (2 B/param of a half gradient's 30). Wrongly set, non-finite values
  // reach the state.
  grad_stats step(const chunk_ref& c, const adamw_hparams& h, int64_t step, float grad_mult,
                  undo_log* log = nullptr, bool finite_known = false);

  // step() on the elements of `ranges` alone ([begin, end) pairs within [0, n), ascending and
  // disjoint), leaving every other element of the chunk (param, m, v, half_out) as it is:
  // bit-identical there to step(c, ...) with finite_known, so a chunk updated range by range over
  // a partition of [0, n) ends as one step() leaves it. For updating first the part of a chunk
  // that is needed first (the embedding rows the next forward gathers). No pre-scan, no undo log,
  // no statistics: the caller knows every grad * grad_mult is finite and that the step stands.
  // int8 moments: every begin, and every end short of n, a multiple of k_quant_block.
  void step_ranges(const chunk_ref& c, const adamw_hparams& h, int64_t step, float grad_mult,
                   const std::vector<std::pair<size_t, size_t>>& ranges);

  // step() with finite_known, in `parts` calls, for a caller that wants to run something else
  // between them: part p updates the elements part_range(c.n, p, parts), the p-th of `parts`
  // contiguous runs of the chunk's blocks, and writes those blocks of `log` (optional). Parts
  // 0, 1, ..., parts - 1 in that order (part 0 clears the log) leave the chunk and the log as one
  // step() with finite_known does, bit for bit, so undo() and redo() take the log as they would
  // that step's. No statistics: the caller has them.
  void step_part(const chunk_ref& c, const adamw_hparams& h, int64_t step, float grad_mult, undo_log* log,
                 size_t part, size_t parts);
  // The elements [begin, end) of a chunk of n elements that step_part(part, parts) updates; empty
  // for parts beyond the chunk's blocks.
  std::pair<size_t, size_t> part_range(size_t n, size_t part, size_t parts) const;

  // Undoes a step() made with the same (h, step, grad_mult) and the same gradient still in the
  // buffer: restores p, m, v (README.md "Precision and rollback tolerance" gives the bounds,
  // with and without the step's log) and rewrites half_out from the restored p. A no-op when
  // that step was refused for non-finite gradients.
  void undo(const chunk_ref& c, const adamw_hparams& h, int64_t step, float grad_mult,
            const undo_log* log = nullptr);

  // undo(old_mult, log) then step(new_mult) in one pass; bit-identical to calling the two in
  // turn. Returns the stats of grad * new_mult.
  grad_stats redo(const chunk_ref& c, const adamw_hparams& h, int64_t step, float old_mult,
                  float new_mult, const undo_log* log = nullptr);

 private:
  float max_abs(const chunk_ref& c);
  // Over the chunk's blocks [first_block, end_block) (all of them by default).
  grad_stats run(int o, const chunk_ref& c, const adamw_hparams& h, int64_t step, float mult,
                 float new_mult, undo_log* record, const undo_log* restore, size_t first_block = 0,
                 size_t end_block = SIZE_MAX);

  struct impl;
  std::unique_ptr<impl> impl_;
  adamw_tuning tuning_;
};

// Parallel precision conversion on the caller's oneTBB arena: f32->f16, f32->bf16 (round to
// nearest even, NaN stays NaN, subnormals kept), f16->f32, bf16->f32 (exact), same-type copy.
void convert(const void* src, dtype src_dtype, void* dst, dtype dst_dtype, size_t n);

// Gradient accumulation over micro-batches on the caller's oneTBB arena: acc = grad (overwrite,
// the first micro-batch) or acc += grad, in fp32 with one rounding per element; grad f32, f16 or
// bf16. Bit-identical to ATen's copy_ / add_ of the same arrays.
void accumulate(const void* grad, dtype grad_dtype, float* acc, size_t n, bool overwrite);

// Rows added into a table on the caller's oneTBB arena: table row index[r] += rows row r, for r in
// [0, count), each `width` elements (rows f32, f16 or bf16; the table fp32, table_rows rows). Rows
// with the same index are added in r order, so the result is bit-identical to ATen's
// table.index_add_(0, index, rows.to(kFloat)); distinct indices run in parallel. The embedding's
// gradient from its input gradient, which index_add_ runs one row at a time.
void scatter_add_rows(const void* rows, dtype rows_dtype, const int64_t* index, size_t count, size_t width,
                      float* table, size_t table_rows);

// Rows gathered from a table on the caller's oneTBB arena: out row r = table row index[r], for r
// in [0, count), each row_bytes bytes (the table table_rows rows). What index_select(0, index)
// gives, in parallel over rows: the embedding's forward, from its host copy.
void gather_rows(const void* table, size_t row_bytes, size_t table_rows, const int64_t* index, size_t count,
                 void* out);

// ISA targets compiled into the binary (e.g. "AVX3", "AVX2", "EMU128"), best first.
std::vector<std::string> compiled_targets();
// The target the kernels dispatch to now.
std::string active_target();
// Test/benchmark hook, process-wide: dispatch to `name` from now on ("auto" restores the best
// supported one). Returns false when the target is not compiled in or this CPU lacks it.
bool force_target(const std::string& name);

}  // namespace ferry::cpu_optim
