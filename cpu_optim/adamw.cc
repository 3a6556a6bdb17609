// The front of the host AdamW: argument checks, per-step scalars, and the split of a chunk into
// fixed-size blocks run on the optimizer's oneTBB arena. The ISA kernels are in kernels.cc.
#include "cpu_optim/adamw.h"

#include <tbb/blocked_range.h>
#include <tbb/info.h>
#include <tbb/parallel_for.h>
#include <tbb/partitioner.h>
#include <tbb/task_arena.h>

#include <cstring>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu_optim/half.h"
#include "cpu_optim/kernels.h"
#include "cpu_optim/moment_codes.h"
#include "src/common/error.h"

namespace ferry::cpu_optim {

size_t dtype_size(dtype t) { return t == dtype::dtype_f32 ? 4 : 2; }

const char* dtype_name(dtype t) {
  switch (t) {
    case dtype::dtype_f32: return "f32";
    case dtype::dtype_f16: return "f16";
    case dtype::dtype_bf16: return "bf16";
  }
  return "?";
}

namespace {

// Runs f(begin, end) for each block of `block` elements of [0, n) and returns the per-block
// results in block order. Static partitioning: each thread streams one contiguous run of blocks.
// Callers reduce in block order, so no result depends on the thread count.
// first_block, end_block: only those blocks (results for them alone, in order).
template <class F>
auto run_blocks(tbb::task_arena* arena, int threads, size_t n, size_t block, F&& f, size_t first_block = 0,
                size_t end_block = SIZE_MAX) {
  end_block = std::min(end_block, (n + block - 1) / block);
  const size_t nb = end_block > first_block ? end_block - first_block : 0;
  std::vector<decltype(f(size_t(0), size_t(0)))> per_block(nb);
  auto run = [&](size_t b0, size_t b1) {
    for (size_t b = b0; b < b1; ++b) {
      const size_t i = first_block + b;
      per_block[b] = f(i * block, std::min(n, (i + 1) * block));
    }
  };
  if (nb <= 1 || threads <= 1 || arena == nullptr) {
    run(0, nb);
  } else {
    arena->execute([&] {
      tbb::parallel_for(
          tbb::blocked_range<size_t>(0, nb, 1),
          [&](const tbb::blocked_range<size_t>& r) { run(r.begin(), r.end()); },
          tbb::static_partitioner());
    });
  }
  return per_block;
}

grad_stats sum_stats(const std::vector<grad_stats>& per_block) {
  grad_stats total;
  for (const grad_stats& s : per_block) {
    total.sum_sq += s.sum_sq;
    total.nonfinite += s.nonfinite;
  }
  return total;
}

// True when every grad*mult is finite, given max |grad| (see kernel_table::max_abs).
bool all_finite(float max_abs, float mult) { return std::isfinite(max_abs * std::fabs(mult)); }

void check_chunk(const chunk_ref& c) {
  FERRY_ASSERT(c.n == 0 || (c.param && c.m && c.v && c.grad), "adamw chunk with null array");
  FERRY_ASSERT(c.moments != moments_kind::int8 || c.n == 0 || (c.m_scale && c.v_scale),
               "adamw chunk with int8 moments but no scales");
  FERRY_ASSERT(c.half_out == nullptr || c.half_dtype != dtype::dtype_f32,
               "adamw half copy must be f16 or bf16");
}

void check_hparams(const adamw_hparams& h, int64_t step) {
  FERRY_CONFIG_CHECK(h.lr >= 0 && std::isfinite(h.lr), "AdamW lr must be finite and >= 0, got ", h.lr);
  FERRY_CONFIG_CHECK(h.beta1 >= 0 && h.beta1 < 1 && h.beta2 >= 0 && h.beta2 < 1,
                     "AdamW betas must lie in [0, 1), got ", h.beta1, ", ", h.beta2);
  FERRY_CONFIG_CHECK(h.eps > 0, "AdamW eps must be > 0, got ", h.eps);
  FERRY_CONFIG_CHECK(h.weight_decay >= 0 && h.lr * h.weight_decay < 1,
                     "AdamW weight_decay must be >= 0 with lr * weight_decay < 1, got ",
                     h.weight_decay);
  FERRY_ASSERT(step >= 1, "adamw step count is 1-based, got ", step);
}

// Scalars in double, rounded once to float (as PyTorch's tensor ops round double scalars).
detail::step_scalars make_scalars(const adamw_hparams& h, int64_t step, float mult,
                                  const chunk_ref& c, const adamw_tuning& t) {
  detail::step_scalars s{};
  const double b1 = h.beta1, b2 = h.beta2;
  const double bc1 = 1.0 - std::pow(b1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(b2, static_cast<double>(step));
  s.beta1 = h.beta1;
  s.one_minus_beta1 = static_cast<float>(1.0 - b1);
  s.beta2 = h.beta2;
  s.one_minus_beta2 = static_cast<float>(1.0 - b2);
  s.decay = static_cast<float>(1.0 - static_cast<double>(h.lr) * h.weight_decay);
  s.step_size = static_cast<float>(h.lr / bc1);
  s.inv_sqrt_bc2 = static_cast<float>(1.0 / std::sqrt(bc2));
  s.eps = h.eps;
  s.mult = mult;
  s.new_mult = mult;
  // Blocks start at multiples of block_size (a multiple of 64 elements), so a 64-byte aligned
  // base keeps every vector store of the half copy aligned.
  s.stream_half = t.stream_half && (reinterpret_cast<uintptr_t>(c.half_out) % 64 == 0);
  s.sr_key = codes::sr_key(c.seed, step);
  s.fast_roots = t.fast_roots;
  return s;
}

}  // namespace

size_t undo_log::entries() const {
  size_t n = 0;
  for (const auto& b : blocks_) n += b.size();
  return n;
}

size_t undo_log::bytes() const {
  size_t n = entries() * sizeof(undo_entry);
  for (const auto& b : scales_) n += b.size() * sizeof(float);
  return n;
}

void undo_log::clear() {
  blocks_.clear();
  blocks_.shrink_to_fit();
  scales_.clear();
  scales_.shrink_to_fit();
  n_ = block_size_ = 0;
}

struct adamw::impl {
  int threads;
  tbb::task_arena arena;
  explicit impl(int n) : threads(n), arena(n) {}
};

adamw::adamw(int num_threads, adamw_tuning tuning) : tuning_(tuning) {
  FERRY_CONFIG_CHECK(num_threads >= 0, "adamw thread count must be >= 0 (0: all cores but one), got ",
                     num_threads);
  FERRY_CONFIG_CHECK(tuning.block_size >= 64 && tuning.block_size % 64 == 0,
                     "adamw block size must be a positive multiple of 64, got ", tuning.block_size);
  if (num_threads == 0) num_threads = std::max(1, tbb::info::default_concurrency() - 1);
  impl_ = std::make_unique<impl>(num_threads);
}

adamw::~adamw() = default;

int adamw::num_threads() const { return impl_->threads; }

grad_stats adamw::stats(const void* grad, dtype grad_dtype, size_t n, float grad_mult, const float* grad_acc) {
  FERRY_ASSERT(n == 0 || grad, "adamw stats of a null gradient");
  const detail::kernel_table k = detail::kernels();
  return sum_stats(run_blocks(&impl_->arena, impl_->threads, n, tuning_.block_size, [&](size_t b, size_t e) {
    return k.stats(grad, grad_dtype, grad_acc, b, e, grad_mult);
  }));
}

float adamw::max_abs(const chunk_ref& c) {
  const detail::kernel_table k = detail::kernels();
  float mx = 0;
  for (float x : run_blocks(&impl_->arena, impl_->threads, c.n, tuning_.block_size,
                            [&](size_t b, size_t e) { return k.max_abs(c.grad, c.grad_dtype, c.grad_acc, b, e); })) {
    mx = std::isnan(x) || std::isnan(mx) ? x + mx : std::max(mx, x);
  }
  return mx;
}

// `record`: the step's undo log, filled block by block. `restore`: the log of the step being
// undone; its blocks with entries are patched after the inversion, so a redo there runs as
// undo, patch, step on the block (bit-identical to the fused pass everywhere else).
grad_stats adamw::run(int o, const chunk_ref& c, const adamw_hparams& h, int64_t step, float mult,
                      float new_mult, undo_log* record, const undo_log* restore, size_t first_block,
                      size_t end_block) {
  detail::step_scalars s = make_scalars(h, step, mult, c, tuning_);
  s.new_mult = new_mult;
  const size_t block = tuning_.block_size, nb = (c.n + block - 1) / block;
  const bool compact = c.moments != moments_kind::f32, int8 = c.moments == moments_kind::int8;
  const float ratio = compact ? k_undo_log_ratio_compact : k_undo_log_ratio;
  FERRY_ASSERT(!int8 || block % k_quant_block == 0, "adamw block size ", block,
               " is not a multiple of the int8 quantization block (", k_quant_block, ")");
  if (record) {  // step() cleared it (step_part: its part 0)
    FERRY_ASSERT(first_block == 0 || (record->n_ == c.n && record->block_size_ == block && record->blocks_.size() == nb),
                 "adamw::step_part: a later part with a log that its part 0 did not write");
    record->n_ = c.n;
    record->block_size_ = block;
    record->blocks_.resize(nb);
    if (int8) record->scales_.resize(nb);
    s.log_ratio = ratio;
  }
  if (restore) {
    FERRY_ASSERT(restore->n_ == c.n && restore->block_size_ == block && (!int8 || restore->scales_.size() == nb),
                 "undo log written for another chunk (", restore->n_, " elements in blocks of ",
                 restore->block_size_, ") than this one (", c.n, " in blocks of ", block, ")");
    // int8 restores the old scales instead (a zero-state element then re-encodes near zero).
    s.zero_ratio = int8 ? 0.0f : 0.5f / ratio;
  }
  const detail::kernel_table k = detail::kernels();
  const auto op = static_cast<detail::op>(o);
  // Patches a block's logged elements with their exact old moments.
  auto patch = [&](size_t b, size_t bi) {
    const std::vector<undo_entry>& entries = restore->blocks_[bi];
    for (const undo_entry& x : entries) {
      const size_t i = b + x.offset;
      if (c.moments == moments_kind::f32) {
        static_cast<float*>(c.m)[i] = x.m;
        static_cast<float*>(c.v)[i] = x.v;
      } else if (c.moments == moments_kind::bf16) {  // x holds bf16 values: exact
        static_cast<uint16_t*>(c.m)[i] = half::f32_to_bf16(x.m);
        static_cast<uint16_t*>(c.v)[i] = half::f32_to_bf16(x.v);
      } else {  // x holds code values of the old scales: re-encoding them gives the old codes
        const float* sc = restore->scales_[bi].data() + 2 * ((i - b) / k_quant_block);
        static_cast<int8_t*>(c.m)[i] = codes::encode_m(x.m, codes::inv_scale(sc[0]));
        static_cast<uint8_t*>(c.v)[i] = codes::encode_v(x.v, codes::inv_scale(sc[1]));
      }
    }
  };
  return sum_stats(run_blocks(&impl_->arena, impl_->threads, c.n, block, [&](size_t b, size_t e) {
    const size_t bi = b / block;
    std::vector<undo_entry>* rec_log = record ? &record->blocks_[bi] : nullptr;
    if (int8) {
      if (record) {
        std::vector<float>& sc = record->scales_[bi];
        sc.clear();
        for (size_t q = b / k_quant_block; q < quant_blocks(e); ++q) {
          sc.push_back(c.m_scale[q]);
          sc.push_back(c.v_scale[q]);
        }
      }
      if (op == detail::op::op_step) return k.update(op, c, s, b, e, rec_log);
      // Undo (redo: then step; re-encoding needs the whole quantization block, so not fused).
      detail::step_scalars u = s;
      u.old_scales = restore ? restore->scales_[bi].data() : nullptr;
      k.update(detail::op::op_undo, c, u, b, e, nullptr);
      if (restore) patch(b, bi);
      if (op == detail::op::op_undo) return grad_stats{};
      detail::step_scalars again = s;
      again.mult = new_mult;
      return k.update(detail::op::op_step, c, again, b, e, nullptr);
    }
    if (restore == nullptr || restore->blocks_[bi].empty()) return k.update(op, c, s, b, e, rec_log);
    const bool redo = op == detail::op::op_redo;
    k.update(detail::op::op_undo, c, s, b, e, nullptr);
    patch(b, bi);
    if (!redo) return grad_stats{};
    detail::step_scalars again = s;
    again.mult = new_mult;
    again.zero_ratio = 0;
    return k.update(detail::op::op_step, c, again, b, e, nullptr);
  }, first_block, end_block));
}

// Pre-scan design: "non-finite: nothing written" must hold for the whole chunk before the first
// write, so a separate pass over the gradient is unavoidable; it only takes max |grad| (one
// integer max per vector, at read bandwidth) and the sum of squares rides in the update pass.
grad_stats adamw::step(const chunk_ref& c, const adamw_hparams& h, int64_t step, float grad_mult,
                       undo_log* log, bool finite_known) {
  check_chunk(c);
  check_hparams(h, step);
  if (log) log->clear();
  if (!finite_known && !all_finite(max_abs(c), grad_mult))
    return stats(c.grad, c.grad_dtype, c.n, grad_mult, c.grad_acc);
  return run(static_cast<int>(detail::op::op_step), c, h, step, grad_mult, grad_mult, log, nullptr);
}

namespace {
// The blocks [first, end) of part `part` of `parts` over a chunk of nb blocks.
std::pair<size_t, size_t> part_blocks(size_t nb, size_t part, size_t parts) {
  return {nb * part / parts, nb * (part + 1) / parts};
}
}  // namespace

std::pair<size_t, size_t> adamw::part_range(size_t n, size_t part, size_t parts) const {
  const size_t block = tuning_.block_size;
  const auto [b0, b1] = part_blocks((n + block - 1) / block, part, parts);
  return {std::min(n, b0 * block), std::min(n, b1 * block)};
}

void adamw::step_part(const chunk_ref& c, const adamw_hparams& h, int64_t step, float grad_mult, undo_log* log,
                      size_t part, size_t parts) {
  check_chunk(c);
  check_hparams(h, step);
  FERRY_ASSERT(parts > 0 && part < parts, "adamw::step_part: part ", part, " of ", parts);
  if (log && part == 0) log->clear();
  const auto [b0, b1] = part_blocks((c.n + tuning_.block_size - 1) / tuning_.block_size, part, parts);
  run(static_cast<int>(detail::op::op_step), c, h, step, grad_mult, grad_mult, log, nullptr, b0, b1);
}

void adamw::step_ranges(const chunk_ref& c, const adamw_hparams& h, int64_t step, float grad_mult,
                        const std::vector<std::pair<size_t, size_t>>& ranges) {
  check_chunk(c);
  check_hparams(h, step);
  const bool int8 = c.moments == moments_kind::int8;
  const size_t block = tuning_.block_size;
  FERRY_ASSERT(!int8 || block % k_quant_block == 0, "adamw block size ", block,
               " is not a multiple of the int8 quantization block (", k_quant_block, ")");
  // Work items of at most one block each; the kernel is elementwise (bf16's rounding stream follows
  // the element's index in the chunk), so the split changes no bit.
  std::vector<std::pair<size_t, size_t>> items;
  bool aligned = true;
  size_t last_end = 0;
  for (const auto& [b, e] : ranges) {
    FERRY_ASSERT(b >= last_end && b <= e && e <= c.n, "adamw::step_ranges: range [", b, ", ", e,
                 ") is not ascending, disjoint and within the chunk's ", c.n, " elements");
    FERRY_ASSERT(!int8 || (b % k_quant_block == 0 && (e % k_quant_block == 0 || e == c.n)),
                 "adamw::step_ranges: int8 range [", b, ", ", e, ") does not start and end at quantization blocks of ",
                 k_quant_block);
    last_end = e;
    aligned = aligned && b % 64 == 0;
    for (size_t i = b; i < e; i += block) items.emplace_back(i, std::min(e, i + block));
  }
  if (items.empty()) return;
  detail::step_scalars s = make_scalars(h, step, grad_mult, c, tuning_);
  // Non-temporal stores need each vector of the half copy aligned: ranges that start at multiples
  // of 64 elements of an aligned copy keep it so.
  s.stream_half = s.stream_half && aligned;
  const detail::kernel_table k = detail::kernels();
  auto run = [&](size_t i0, size_t i1) {
    for (size_t i = i0; i < i1; ++i) k.update(detail::op::op_step, c, s, items[i].first, items[i].second, nullptr);
  };
  if (items.size() <= 1 || impl_->threads <= 1) {
    run(0, items.size());
    return;
  }
  impl_->arena.execute([&] {
    tbb::parallel_for(tbb::blocked_range<size_t>(0, items.size(), 1),
                      [&](const tbb::blocked_range<size_t>& r) { run(r.begin(), r.end()); });
  });
}

void adamw::undo(const chunk_ref& c, const adamw_hparams& h, int64_t step, float grad_mult,
                 const undo_log* log) {
  check_chunk(c);
  check_hparams(h, step);
  if (!all_finite(max_abs(c), grad_mult)) return;  // that step was refused
  run(static_cast<int>(detail::op::op_undo), c, h, step, grad_mult, grad_mult, nullptr, log);
}

grad_stats adamw::redo(const chunk_ref& c, const adamw_hparams& h, int64_t step, float old_mult,
                       float new_mult, const undo_log* log) {
  check_chunk(c);
  check_hparams(h, step);
  const float mx = max_abs(c);
  if (!all_finite(mx, old_mult)) return this->step(c, h, step, new_mult);  // the first was refused
  if (!all_finite(mx, new_mult)) {
    run(static_cast<int>(detail::op::op_undo), c, h, step, old_mult, old_mult, nullptr, log);
    return stats(c.grad, c.grad_dtype, c.n, new_mult, c.grad_acc);
  }
  return run(static_cast<int>(detail::op::op_redo), c, h, step, old_mult, new_mult, nullptr, log);
}

namespace {
// f(begin, end) over [0, n) in blocks of 16384 elements on the caller's arena (elementwise work:
// the split changes no result).
template <class F>
void for_blocks(size_t n, F&& f) {
  constexpr size_t block = 16384;
  const size_t nb = (n + block - 1) / block;
  tbb::parallel_for(
      tbb::blocked_range<size_t>(0, nb, 1),
      [&](const tbb::blocked_range<size_t>& r) {
        for (size_t b = r.begin(); b < r.end(); ++b) f(b * block, std::min(n, (b + 1) * block));
      },
      tbb::static_partitioner());
}
}  // namespace

void convert(const void* src, dtype src_dtype, void* dst, dtype dst_dtype, size_t n) {
  FERRY_ASSERT(n == 0 || (src && dst), "convert with a null array");
  const detail::kernel_table k = detail::kernels();
  for_blocks(n, [&](size_t b, size_t e) { k.convert(src, src_dtype, dst, dst_dtype, b, e); });
}

void accumulate(const void* grad, dtype grad_dtype, float* acc, size_t n, bool overwrite) {
  if (overwrite) return convert(grad, grad_dtype, acc, dtype::dtype_f32, n);
  FERRY_ASSERT(n == 0 || (grad && acc), "accumulate with a null array");
  const detail::kernel_table k = detail::kernels();
  for_blocks(n, [&](size_t b, size_t e) { k.accumulate(grad, grad_dtype, acc, b, e); });
}

void scatter_add_rows(const void* rows, dtype rows_dtype, const int64_t* index, size_t count, size_t width,
                      float* table, size_t table_rows) {
  if (count == 0 || width == 0) return;
  FERRY_ASSERT(rows && index && table, "scatter_add_rows with a null array");
  std::vector<uint32_t> order(count);
  for (size_t r = 0; r < count; ++r) {
    FERRY_ASSERT(index[r] >= 0 && size_t(index[r]) < table_rows, "scatter_add_rows: index ", index[r],
                 " outside the table's ", table_rows, " rows");
    order[r] = uint32_t(r);
  }
  std::stable_sort(order.begin(), order.end(), [&](uint32_t a, uint32_t b) { return index[a] < index[b]; });
  std::vector<size_t> runs;   // starts of the runs of equal index in `order`, then count
  for (size_t k = 0; k < count; ++k)
    if (k == 0 || index[order[k]] != index[order[k - 1]]) runs.push_back(k);
  runs.push_back(count);
  const detail::kernel_table kt = detail::kernels();
  const size_t esize = dtype_size(rows_dtype);
  tbb::parallel_for(tbb::blocked_range<size_t>(0, runs.size() - 1, 16), [&](const tbb::blocked_range<size_t>& br) {
    for (size_t j = br.begin(); j < br.end(); ++j) {
      float* dst = table + size_t(index[order[runs[j]]]) * width;
      for (size_t k = runs[j]; k < runs[j + 1]; ++k)
        kt.accumulate(static_cast<const char*>(rows) + size_t(order[k]) * width * esize, rows_dtype, dst, 0, width);
    }
  });
}

void gather_rows(const void* table, size_t row_bytes, size_t table_rows, const int64_t* index, size_t count,
                 void* out) {
  if (count == 0 || row_bytes == 0) return;
  FERRY_ASSERT(table && index && out, "gather_rows with a null array");
  for (size_t r = 0; r < count; ++r)
    FERRY_ASSERT(index[r] >= 0 && size_t(index[r]) < table_rows, "gather_rows: index ", index[r],
                 " outside the table's ", table_rows, " rows");
  tbb::parallel_for(tbb::blocked_range<size_t>(0, count, 64), [&](const tbb::blocked_range<size_t>& br) {
    for (size_t r = br.begin(); r < br.end(); ++r)
      std::memcpy(static_cast<char*>(out) + r * row_bytes,
                  static_cast<const char*>(table) + size_t(index[r]) * row_bytes, row_bytes);
  });
}

}  // namespace ferry::cpu_optim
