// ferry-bench-adamw: a kernel lab, not a test. Measures cpu_optim::adamw (fp16 gradients in,
// fp16 copy out) per ISA target, thread count and size, next to the machine's STREAM-style copy
// and triad bandwidth (same thread count, same oneTBB arena style) and PyTorch's fused CPU AdamW
// (at::_fused_adamw_, fp32 gradients, no half copy). Only the default variant is the product;
// the others show what non-temporal stores and the gradient pre-scan cost or buy.
//
//   ferry-bench-adamw [--sizes 1M,16M,64M,256M] [--threads 1,15] [--targets AVX3,AVX2]
//                     [--blocks 16384] [--reps 5] [--json FILE]
//   ferry-bench-adamw --nvme DIR [--nvme-bytes 2G] [--nvme-depths 1,2,4,8,16,32]
//                     [--nvme-buffers 2,3,4,6] [--nvme-units 8] [--sizes 16M] [--threads 0] [--reps 3]
//                     (the disk under the optimizer state tier: bench_nvme.h; nothing else runs)
// Sizes take K/M/G suffixes (powers of two).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>
#include <tbb/partitioner.h>
#include <tbb/task_arena.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "cpu_optim/adamw.h"
#include "cpu_optim/bench/bench_nvme.h"

namespace co = ferry::cpu_optim;

namespace {

struct row {
  std::string kind, target, variant;
  int threads;
  size_t n;
  double seconds, bytes_per_elem;
  double gparam_s() const { return n / seconds / 1e9; }
  double gb_s() const { return n * bytes_per_elem / seconds / 1e9; }
};

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string t; std::getline(ss, t, ',');)
    if (!t.empty()) out.push_back(t);
  return out;
}

size_t parse_size(const std::string& s) {
  size_t mult = 1;
  const char c = static_cast<char>(std::toupper(s.back()));
  if (c == 'K') mult = size_t(1) << 10;
  if (c == 'M') mult = size_t(1) << 20;
  if (c == 'G') mult = size_t(1) << 30;
  return std::stoull(mult == 1 ? s : s.substr(0, s.size() - 1)) * mult;
}

template <class T>
T* alloc(size_t n) {
  const size_t bytes = (n * sizeof(T) + 4095) / 4096 * 4096;
  return static_cast<T*>(std::aligned_alloc(4096, bytes));
}

// Median of `reps` timed runs after one warm-up.
double median_seconds(int reps, const std::function<void()>& f) {
  f();
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    const auto a = std::chrono::steady_clock::now();
    f();
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// STREAM-style kernels over the arena with a static partition, as the optimizer runs.
void for_range(tbb::task_arena& arena, size_t n, const std::function<void(size_t, size_t)>& f) {
  arena.execute([&] {
    tbb::parallel_for(tbb::blocked_range<size_t>(0, n, 16384),
                      [&](const tbb::blocked_range<size_t>& r) { f(r.begin(), r.end()); },
                      tbb::static_partitioner());
  });
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<size_t> sizes = {1u << 20, 16u << 20, 64u << 20, 256u << 20};
  std::vector<int> threads = {0};
  std::vector<std::string> targets = co::compiled_targets();
  std::vector<size_t> blocks = {co::adamw_tuning{}.block_size};
  int reps = 5;
  std::string json_path;
  ferry::bench::nvme_bench_args nv;
  bool reps_given = false, sizes_given = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const std::string v = i + 1 < argc ? argv[i + 1] : "";
    if (a == "--help" || a == "-h") {
      std::printf("ferry-bench-adamw [--sizes 1M,16M,64M,256M] [--threads 0,1,...] [--targets AVX3,AVX2,...]\n"
                  "                  [--blocks 16384] [--reps 5] [--json FILE]\n"
                  "ferry-bench-adamw --nvme DIR [--nvme-bytes 2G] [--nvme-depths 1,2,4,8,16,32] [--nvme-buffers 2,3,4,6]\n"
                  "                  [--nvme-units 8] [--sizes 16M (params per unit)] [--threads 0] [--reps 3]\n"
                  "  the disk under optimizer_state_on=nvme: sequential write/read GB/s through the tier's I/O path\n"
                  "  per queue depth, then AdamW through the tier per state kind and buffer count\n"
                  "threads 0 = all cores but one; compiled targets:");
      for (const auto& t : co::compiled_targets()) std::printf(" %s", t.c_str());
      std::printf("\n");
      return 0;
    }
    if (v.empty()) {
      std::fprintf(stderr, "%s needs a value; see --help\n", a.c_str());
      return 2;
    }
    ++i;
    if (a == "--sizes") { sizes.clear(); for (auto& s : split(v)) sizes.push_back(parse_size(s)); sizes_given = true; }
    else if (a == "--nvme") nv.path = v;
    else if (a == "--nvme-bytes") nv.file_bytes = parse_size(v);
    else if (a == "--nvme-depths") { nv.depths.clear(); for (auto& s : split(v)) nv.depths.push_back(std::stoi(s)); }
    else if (a == "--nvme-buffers") { nv.buffers.clear(); for (auto& s : split(v)) nv.buffers.push_back(std::stoi(s)); }
    else if (a == "--nvme-units") nv.units = std::stoi(v);
    else if (a == "--threads") { threads.clear(); for (auto& s : split(v)) threads.push_back(std::stoi(s)); }
    else if (a == "--targets") targets = split(v);
    else if (a == "--blocks") { blocks.clear(); for (auto& s : split(v)) blocks.push_back(std::stoull(s)); }
    else if (a == "--reps") { reps = std::stoi(v); reps_given = true; }
    else if (a == "--json") json_path = v;
    else { std::fprintf(stderr, "unknown flag %s; see --help\n", a.c_str()); return 2; }
  }

  if (!nv.path.empty()) {
    if (sizes_given) nv.unit_params = sizes.front();
    nv.threads = threads.front();
    if (reps_given) nv.reps = reps;
    return ferry::bench::bench_nvme(nv);
  }

  std::vector<row> rows;
  auto report = [&](row r) {
    std::printf("%-8s %-24s %-7s thr %3d n %11zu  %7.3f Gparam/s  %7.2f GB/s  (%.4f s)\n", r.kind.c_str(),
                r.variant.c_str(), r.target.c_str(), r.threads, r.n, r.gparam_s(), r.gb_s(), r.seconds);
    std::fflush(stdout);
    rows.push_back(std::move(r));
  };
  const co::adamw_hparams h{1e-4f, 0.9f, 0.999f, 1e-8f, 0.01f};

  for (size_t n : sizes) {
    float* p = alloc<float>(n);
    float* m = alloc<float>(n);
    float* v = alloc<float>(n);
    uint16_t* grad = alloc<uint16_t>(n);
    uint16_t* half = alloc<uint16_t>(n);
    float* acc = alloc<float>(n);   // the earlier micro-batches' fp32 sum (the fused step's grad_acc)
    // Compact moments: bf16 (2 + 2 B) and int8 codes (1 + 1 B) with a scale per 2048 elements.
    uint16_t* m16 = alloc<uint16_t>(n);
    uint16_t* v16 = alloc<uint16_t>(n);
    int8_t* mq = alloc<int8_t>(n);
    uint8_t* vq = alloc<uint8_t>(n);
    float* ms = alloc<float>(co::quant_blocks(n));
    float* vs = alloc<float>(co::quant_blocks(n));
    for (int t0 : threads) {
      const int nt = co::adamw(t0).num_threads();
      tbb::task_arena arena(nt);
      for_range(arena, n, [&](size_t b, size_t e) {  // first touch by the threads that use it
        for (size_t i = b; i < e; ++i) {
          p[i] = 0.01f * float(i % 97);
          m[i] = 0.0f;
          v[i] = 0.0f;
          grad[i] = 0x3C00 ^ (i & 0x8000);  // fp16 +-1
          half[i] = 0;
          acc[i] = 0.5f;
          m16[i] = v16[i] = 0;
          mq[i] = 0;
          vq[i] = 0;
        }
      });
      std::fill(ms, ms + co::quant_blocks(n), 0.0f);
      std::fill(vs, vs + co::quant_blocks(n), 0.0f);
      const double copy_s = median_seconds(reps, [&] { for_range(arena, n, [&](size_t b, size_t e) { for (size_t i = b; i < e; ++i) m[i] = p[i]; }); });
      report({"stream", "-", "copy (8 B/elem)", nt, n, copy_s, 8});
      const double triad_s = median_seconds(reps, [&] { for_range(arena, n, [&](size_t b, size_t e) { for (size_t i = b; i < e; ++i) v[i] = p[i] + 3.0f * m[i]; }); });
      report({"stream", "-", "triad (12 B/elem)", nt, n, triad_s, 12});
      std::fill(m, m + n, 0.0f);  // parallel first-touch kept; values reset for the optimizer
      std::fill(v, v + n, 0.0f);

      for (const std::string& tgt : targets) {
        if (!co::force_target(tgt)) {
          std::printf("skip %s: not supported on this CPU\n", tgt.c_str());
          continue;
        }
        for (size_t blk : blocks) {
          for (bool stream : {true, false}) {
            co::adamw opt(nt, co::adamw_tuning{blk, stream});
            const co::chunk_ref c{p, m, v, grad, co::dtype::dtype_f16, half, co::dtype::dtype_f16, n};
            int64_t step = 0;
            const double s = median_seconds(reps, [&] { opt.step(c, h, ++step, 1.0f); });
            std::string var = std::string("f16->f16 ") + (stream ? "NT" : "store");
            if (blocks.size() > 1) var += " b" + std::to_string(blk);
            report({"adamw", tgt, var, nt, n, s, 28});
          }
        }
        {  // the engine's non-speculative step: the gradient's statistics already showed it finite
          co::adamw opt(nt);
          const co::chunk_ref c{p, m, v, grad, co::dtype::dtype_f16, half, co::dtype::dtype_f16, n};
          int64_t step = 0;
          const double s = median_seconds(reps, [&] { opt.step(c, h, ++step, 1.0f, nullptr, true); });
          report({"adamw", tgt, "f16->f16 NT finite known", nt, n, s, 28});
        }
        {  // a speculative step: the same pass plus the undo log's check (nothing to log here)
          co::adamw opt(nt);
          const co::chunk_ref c{p, m, v, grad, co::dtype::dtype_f16, half, co::dtype::dtype_f16, n};
          co::undo_log log;
          int64_t step = 0;
          const double s = median_seconds(reps, [&] { opt.step(c, h, ++step, 1.0f, &log); });
          report({"adamw", tgt, "f16->f16 NT +undo log", nt, n, s, 28});
        }
        for (int variant = 0; variant < 3; ++variant) {  // compact moments (int8 with fast roots too)
          const co::moments_kind k = variant == 0 ? co::moments_kind::bf16 : co::moments_kind::int8;
          co::adamw_tuning tune;
          tune.fast_roots = variant == 2;
          co::adamw opt(nt, tune);
          const bool b16 = k == co::moments_kind::bf16;
          co::chunk_ref c{p, b16 ? static_cast<void*>(m16) : mq, b16 ? static_cast<void*>(v16) : vq, grad,
                          co::dtype::dtype_f16, half, co::dtype::dtype_f16, n};
          c.moments = k;
          c.m_scale = ms;
          c.v_scale = vs;
          c.seed = 1;
          int64_t step = 0;
          const double s = median_seconds(reps, [&] { opt.step(c, h, ++step, 1.0f); });
          // p 8, grad 2, half 2, plus the moments read and written
          const double bytes = 12.0 + 2.0 * double(co::moments_bytes(k, n)) / double(n);
          report({"adamw", tgt, std::string(co::moments_kind_name(k)) + " moments f16->f16 NT" + (variant == 2 ? " fast roots" : ""),
                  nt, n, s, bytes});
        }
        {  // the last micro-batch fused into the step: g = acc (fp32) + grad (f16), 32 B/param
          co::adamw opt(nt);
          co::chunk_ref c{p, m, v, grad, co::dtype::dtype_f16, half, co::dtype::dtype_f16, n};
          c.grad_acc = acc;
          int64_t step = 0;
          const double s = median_seconds(reps, [&] { opt.step(c, h, ++step, 1.0f); });
          report({"adamw", tgt, "acc+f16->f16 NT (fused)", nt, n, s, 32});
        }
        co::adamw opt(nt);
        const double s = median_seconds(reps, [&] { opt.stats(grad, co::dtype::dtype_f16, n, 1.0f); });
        report({"stats", tgt, "stats() f16 (2 B/elem)", nt, n, s, 2});
        // gradient accumulation of one more micro-batch: read the f16 gradient and the fp32
        // accumulator, write the accumulator (10 B/elem); v stands in for the accumulator
        const double sa = median_seconds(reps, [&] {
          arena.execute([&] { co::accumulate(grad, co::dtype::dtype_f16, v, n, /*overwrite=*/false); });
        });
        report({"accum", tgt, "accumulate f16->f32 (10 B)", nt, n, sa, 10});
      }
      co::force_target("auto");
      {  // the same accumulation through ATen (mixed-dtype add_, what the engine used before)
        at::set_num_threads(nt);
        const int64_t ni = static_cast<int64_t>(n);
        at::Tensor acc = at::from_blob(v, {ni}, at::kFloat);
        at::Tensor g16 = at::from_blob(grad, {ni}, at::kHalf);
        const double sa = median_seconds(reps, [&] { acc.add_(g16); });
        report({"torch", "ATen", "add_ f16 into f32 (10 B)", nt, n, sa, 10});
      }
      if (n >= 2048) {  // the embedding's gradient from its input gradient: 16384 rows of 2048 (the
                        // debug shape's 4 x 4096 tokens) added by token into a table (v), against
                        // ATen's index_add_ of the rows in fp32 (what the engine used before)
        const int64_t width = 2048, table_rows = static_cast<int64_t>(n) / width;
        const int64_t count = std::min<int64_t>(16384, table_rows);
        const at::Tensor index = at::randint(table_rows, {count}, at::kLong);
        const size_t moved = size_t(count * width);
        const double sr = median_seconds(reps, [&] {
          arena.execute([&] {
            co::scatter_add_rows(grad, co::dtype::dtype_f16, index.data_ptr<int64_t>(), size_t(count), size_t(width),
                                 v, size_t(table_rows));
          });
        });
        report({"scatter", "auto", "scatter_add_rows f16 x2048 (10 B)", nt, moved, sr, 10});
        at::set_num_threads(nt);
        at::Tensor table = at::from_blob(v, {table_rows, width}, at::kFloat);
        at::Tensor rows = at::from_blob(grad, {count, width}, at::kHalf);
        const double ti = median_seconds(reps, [&] { table.index_add_(0, index, rows.to(at::kFloat)); });
        report({"torch", "ATen", "index_add_ rows x2048 (10 B)", nt, moved, ti, 10});
        // The embedding's forward: one micro-batch's 4096 rows of 2048 f16 gathered from the table
        // (grad as f16 rows) into pinned-sized staging (v), against ATen's index_select.
        const int64_t g_count = std::min<int64_t>(4096, table_rows);
        const at::Tensor g_index = at::randint(table_rows, {g_count}, at::kLong);
        const size_t g_moved = size_t(g_count * width);
        const double sg = median_seconds(reps, [&] {
          arena.execute([&] {
            co::gather_rows(grad, size_t(width) * 2, size_t(table_rows), g_index.data_ptr<int64_t>(), size_t(g_count),
                            v);
          });
        });
        report({"gather", "auto", "gather_rows f16 x2048 (4 B)", nt, g_moved, sg, 4});
        at::Tensor h_table = at::from_blob(grad, {table_rows, width}, at::kHalf);
        at::Tensor h_out = at::from_blob(v, {g_count, width}, at::kHalf);
        const double tg = median_seconds(reps, [&] { at::index_select_out(h_out, h_table, 0, g_index); });
        report({"torch", "ATen", "index_select rows x2048 (4 B)", nt, g_moved, tg, 4});
      }
      std::fill(v, v + n, 0.0f);

      // PyTorch's fused CPU AdamW on the same arrays with fp32 gradients (28 B/param).
      at::set_num_threads(nt);
      const int64_t ni = static_cast<int64_t>(n);
      at::Tensor tp = at::from_blob(p, {ni}, at::kFloat), tm = at::from_blob(m, {ni}, at::kFloat);
      at::Tensor tv = at::from_blob(v, {ni}, at::kFloat);
      at::Tensor tg = at::full({ni}, 1e-3f, at::kFloat);
      at::Tensor steps = at::ones({}, at::kFloat);
      const double ts = median_seconds(reps, [&] {
        at::_fused_adamw_({tp}, {tg}, {tm}, {tv}, {}, {steps}, h.lr, h.beta1, h.beta2, h.weight_decay, h.eps,
                          false, false);
      });
      report({"torch", "ATen", "_fused_adamw_ f32 grad", nt, n, ts, 28});
    }
    std::free(p), std::free(m), std::free(v), std::free(grad), std::free(half), std::free(acc);
    std::free(m16), std::free(v16), std::free(mq), std::free(vq), std::free(ms), std::free(vs);
  }

  // Compact table: per (n, threads) the best product variant against PyTorch and the triad.
  std::printf("\n%11s %4s %-7s %-26s %10s %8s %10s %8s %9s %9s\n", "n", "thr", "target", "variant", "Gparam/s",
              "GB/s", "torch G/s", "ratio", "triad GB/s", "of triad");
  for (const row& r : rows) {
    if (r.kind != "adamw" || r.variant.rfind("f16->f16 NT", 0) != 0) continue;
    double torch = 0, triad = 0;
    for (const row& o : rows) {
      if (o.n != r.n || o.threads != r.threads) continue;
      if (o.kind == "torch" && o.variant.rfind("_fused_adamw_", 0) == 0) torch = o.gparam_s();
      if (o.kind == "stream" && o.variant.rfind("triad", 0) == 0) triad = o.gb_s();
    }
    std::printf("%11zu %4d %-7s %-26s %10.3f %8.2f %10.3f %8.2f %9.2f %8.0f%%\n", r.n, r.threads, r.target.c_str(),
                r.variant.c_str(), r.gparam_s(), r.gb_s(), torch, r.gparam_s() / torch, triad, 100 * r.gb_s() / triad);
  }
  // Per optimizer-state kind: bytes per parameter moved and the fraction of the measured copy
  // bandwidth (the memory-bound ceiling for those bytes).
  std::printf("\n%11s %4s %-7s %-18s %8s %10s %8s %9s %9s\n", "n", "thr", "target", "state", "B/param", "Gparam/s",
              "GB/s", "copy GB/s", "of copy");
  for (const row& r : rows) {
    if (r.kind != "adamw") continue;
    std::string kind;
    if (r.variant == "f16->f16 NT") kind = "fp32";
    else if (r.variant == "bf16 moments f16->f16 NT") kind = "bf16";
    else if (r.variant == "int8 moments f16->f16 NT") kind = "int8";
    else if (r.variant == "int8 moments f16->f16 NT fast roots") kind = "int8 (fast roots)";
    else continue;
    double copy = 0;
    for (const row& o : rows)
      if (o.n == r.n && o.threads == r.threads && o.kind == "stream" && o.variant.rfind("copy", 0) == 0) copy = o.gb_s();
    std::printf("%11zu %4d %-7s %-18s %8.2f %10.3f %8.2f %9.2f %8.0f%%\n", r.n, r.threads, r.target.c_str(), kind.c_str(),
                r.bytes_per_elem, r.gparam_s(), r.gb_s(), copy, 100 * r.gb_s() / copy);
  }
  if (!json_path.empty()) {
    nlohmann::json j = nlohmann::json::array();
    for (const row& r : rows) {
      j.push_back({{"kind", r.kind}, {"target", r.target}, {"variant", r.variant}, {"threads", r.threads},
                   {"n", r.n}, {"seconds", r.seconds}, {"bytes_per_param", r.bytes_per_elem}, {"gparam_s", r.gparam_s()}, {"gb_s", r.gb_s()}});
    }
    std::ofstream(json_path) << j.dump(2) << "\n";
  }
  return 0;
}
