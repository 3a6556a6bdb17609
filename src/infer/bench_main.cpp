// ferry-bench-infer: the request's inference table. For each offload mode: one forward
// (engine::evaluate, loss head, no logits) of one sequence per --seqs length, with time and peak
// device memory, and greedy generation throughput per --batches size (prompt --prompt-len random
// tokens, --new-tokens new tokens, no EOS stop). Random weights of a configs/ shape unless --model.
// The engines are inference engines (forward_only); each row shows the memory plan's prediction
// next to the measured peak (generation: the plan of the prefill plus the KV cache).
//   ferry-bench-infer [--model-config debug] [--model DIR] [--dtype fp16] [--device auto|cuda|cpu]
//                     [--modes none,blocked,overlapped] [--seqs 512,4096] [--batches 1,8,64]
//                     [--prompt-len 128] [--new-tokens 64] [--reps 3] [--prefetch 2]
//                     [--ce-chunk 512] [--chunk-rows 1024] [--json FILE]
// --json FILE also writes the rows for scripts: {"device", "h2d_bytes_per_s", "forward": [{mode, seq,
// ms, peak, plan, error}], "generate": [{mode, batch, tokens_per_s, decode_tokens_per_s,
// bound_tokens_per_s, peak, plan, kv_cache_bytes, error}]} (bytes; error "" for a row that ran).
// scripts/bench.sh runs it on the GPU machine; BENCHMARKS.md records the table.
#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "src/common/error.h"
#include "src/engine/engine.h"
#include "src/infer/generate.h"
#include "src/infer/kv_cache.h"
#include "src/io/atomic_file.h"
#include "src/io/hf_config.h"
#include "src/model/block.h"
#include "src/checkpoint/checkpoint.h"

namespace {
using namespace ferry;

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');)
    if (!item.empty()) out.push_back(item);
  return out;
}
std::vector<int64_t> split_ints(const std::string& s) {
  std::vector<int64_t> out;
  for (const auto& x : split(s)) out.push_back(std::stoll(x));
  return out;
}
double gib(int64_t b) { return double(b) / double(1ull << 30); }

// Host -> device bandwidth of pinned copies of one block, in bytes/s (0 on the host backend).
double measure_h2d(engine::engine& e) {
  if (!e.device().is_cuda()) return 0;
  const size_t bytes = size_t(e.config().block_params()) * c10::elementSize(e.options().dtype);
  void* host = e.device().host_alloc(bytes);
  std::memset(host, 0, bytes);
  at::Tensor dst = at::empty({int64_t(bytes)}, at::TensorOptions().dtype(at::kByte).device(e.device().device()));
  e.device().copy_h2d(dst, host, bytes);
  e.device().synchronize();
  const int reps = 10;
  auto a = e.device().record(engine::queue::queue_h2d, true);
  for (int i = 0; i < reps; ++i) e.device().copy_h2d(dst, host, bytes);
  auto b = e.device().record(engine::queue::queue_h2d, true);
  e.device().synchronize();
  double ms = e.device().elapsed_ms(a, b);
  e.device().host_free(host);
  return ms > 0 ? double(bytes) * reps / (ms / 1e3) : 0;
}

struct args {
  std::string model = "debug", weights, dtype, device = "auto", modes = "none,blocked,overlapped", json;
  std::vector<int64_t> seqs{512, 4096}, batches{1, 8, 64};
  int64_t prompt_len = 128, new_tokens = 64, reps = 3, prefetch = 2;
  int64_t ce_chunk = 512;     // logit rows per loss chunk (ferry-infer's default)
  int64_t chunk_rows = 0;     // tokens per chunk of the inference block forward, 0 = the model's default
};

args parse(int argc, char** argv) {
  args a;
  std::map<std::string, std::string*> str{{"--model-config", &a.model}, {"--model", &a.weights}, {"--dtype", &a.dtype},
                                          {"--device", &a.device}, {"--modes", &a.modes}, {"--json", &a.json}};
  std::map<std::string, int64_t*> num{{"--prompt-len", &a.prompt_len}, {"--new-tokens", &a.new_tokens},
                                      {"--reps", &a.reps}, {"--prefetch", &a.prefetch},
                                      {"--ce-chunk", &a.ce_chunk}, {"--chunk-rows", &a.chunk_rows}};
  for (int i = 1; i < argc; ++i) {
    std::string k = argv[i];
    if (k == "--help" || k == "-h") {
      std::printf("usage: ferry-bench-infer [--model-config NAME] [--model DIR] [--dtype fp16|bf16|fp32] "
                  "[--device auto|cuda|cpu] [--modes none,blocked,overlapped] [--seqs 512,4096] [--batches 1,8,64] "
                  "[--prompt-len 128] [--new-tokens 64] [--reps 3] [--prefetch 2] [--ce-chunk 512] "
                  "[--chunk-rows 1024] [--json FILE]\n");
      std::exit(0);
    }
    FERRY_CONFIG_CHECK(i + 1 < argc, k, " needs a value (see --help)");
    std::string v = argv[++i];
    if (str.count(k)) *str[k] = v;
    else if (num.count(k)) *num[k] = std::stoll(v);
    else if (k == "--seqs") a.seqs = split_ints(v);
    else if (k == "--batches") a.batches = split_ints(v);
    else FERRY_CONFIG_CHECK(false, "unknown flag ", k, " (see --help)");
  }
  if (!a.json.empty()) io::check_output_path("--json", a.json);
  return a;
}

int bench_main(int argc, char** argv) {
  args a = parse(argc, argv);
  const bool cuda = a.device == "cuda" || (a.device == "auto" && engine::cuda_usable());
  if (a.dtype.empty()) a.dtype = cuda ? "fp16" : "fp32";
  model::llama_config mc = io::load_hf_config(a.weights.empty() ? a.model : a.weights);
  const at::ScalarType dt = engine::parse_compute_dtype(a.dtype);
  const int64_t esz = int64_t(c10::elementSize(dt));
  FERRY_CONFIG_CHECK(!a.seqs.empty() && !a.batches.empty(), "--seqs and --batches need at least one value");
  FERRY_CONFIG_CHECK(a.ce_chunk > 0 && a.chunk_rows >= 0, "--ce-chunk must be > 0 and --chunk-rows >= 0");
  if (a.chunk_rows > 0) model::block_set_forward_chunk_rows(a.chunk_rows);
  const int64_t max_batch = *std::max_element(a.batches.begin(), a.batches.end());
  const int64_t gen_len = a.prompt_len + a.new_tokens;
  const int64_t longest = *std::max_element(a.seqs.begin(), a.seqs.end());
  // The engine's planned tokens bound the longest forward and the largest prefill (max_batch rows
  // of the prompt); its rotary table covers the longest sequence any row reaches.
  const int64_t max_seq = std::max(longest, max_batch * a.prompt_len);
  const int64_t max_positions = std::max(longest, gen_len);
  const double block_bytes = double(mc.num_hidden_layers * mc.block_params() * esz);
  std::printf("ferry-bench-infer: model %s, %.3f B params, %.2f GB of %s weights (%.2f GB in blocks)\n", mc.name.c_str(),
              double(mc.total_params()) / 1e9, double(mc.total_params() * esz) / 1e9, a.dtype.c_str(), block_bytes / 1e9);

  struct fwd_row { std::string mode; int64_t seq; double ms; int64_t peak, plan; std::string err; };
  struct gen_row {
    std::string mode;
    int64_t batch;
    double tok_s, decode_tok_s, bound;
    int64_t peak, plan, kv;
    std::string err;
  };
  std::vector<fwd_row> fwd;
  std::vector<gen_row> gen;
  double bw = 0;
  std::string device_name;
  // Device bytes held before each engine exists (cuBLAS keeps a workspace per stream, and each
  // engine computes on a new one) are not that engine's: peaks are reported beyond them.
  std::unique_ptr<engine::backend> probe = cuda ? engine::make_cuda_backend() : nullptr;
  for (const auto& mode_name : split(a.modes)) {
    int64_t held_before = 0;
    if (probe) {
      probe->reset_memory_peak();
      held_before = probe->memory_stats().allocated_peak;
    }
    engine::engine_options eo;
    eo.mode = engine::parse_offload_mode(mode_name);
    eo.dtype = dt;
    eo.cuda = cuda;
    eo.prefetch = a.prefetch;
    eo.forward_only = true;
    eo.ce_chunk = a.ce_chunk;
    // One engine serves both measurements.
    eo.max_batch = 1;
    eo.max_seq = max_seq;
    eo.max_positions = max_positions;
    std::unique_ptr<engine::engine> e;
    try {
      e = std::make_unique<engine::engine>(mc, eo);
    } catch (const std::exception& ex) {
      std::string msg = ex.what();
      msg = msg.substr(0, msg.find('\n'));
      for (int64_t s : a.seqs) fwd.push_back({mode_name, s, 0, 0, 0, msg});
      for (int64_t b : a.batches) gen.push_back({mode_name, b, 0, 0, 0, 0, 0, 0, msg});
      continue;
    }
    device_name = e->device().name();
    if (!a.weights.empty()) checkpoint::load_hf_weights(*e, a.weights);
    else e->params().init_random(1234, mc.initializer_range);
    e->params_changed();
    if (bw == 0) bw = measure_h2d(*e);

    for (int64_t s : a.seqs) {
      try {
        at::Tensor tok = at::randint(mc.vocab_size, {1, s + 1}, at::kLong);
        e->evaluate(tok);  // warm-up: allocator, cuBLAS handles, resident head
        std::vector<double> times;
        e->device().reset_memory_peak();
        for (int64_t r = 0; r < a.reps; ++r) {
          e->device().synchronize();
          auto t0 = std::chrono::steady_clock::now();
          e->evaluate(tok);
          e->device().synchronize();
          times.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
        }
        std::sort(times.begin(), times.end());
        fwd.push_back({mode_name, s, times[times.size() / 2], e->device().memory_stats().allocated_peak - held_before,
                       engine::plan_memory(mc, eo, 1, s, 1).device_total, ""});
      } catch (const std::exception& ex) {
        std::string msg = ex.what();
        fwd.push_back({mode_name, s, 0, 0, 0, msg.substr(0, msg.find('\n'))});
      }
    }
    for (int64_t B : a.batches) {
      try {
        at::Tensor rnd = at::randint(3, mc.vocab_size, {B, a.prompt_len}, at::kLong);
        std::vector<std::vector<int64_t>> prompts(static_cast<size_t>(B));
        for (int64_t b = 0; b < B; ++b) prompts[b].assign(rnd[b].data_ptr<int64_t>(), rnd[b].data_ptr<int64_t>() + a.prompt_len);
        infer::generate_options g;
        g.eos_id = -1;
        g.max_new_tokens = 2;
        infer::generate(*e, prompts, g);  // warm-up
        g.max_new_tokens = a.new_tokens;
        infer::generate_result r = infer::generate(*e, prompts, g);
        double decode_rate = r.decode_ms > 0 ? double(r.steps * B) / (r.decode_ms / 1e3) : 0;
        double bound = bw > 0 ? double(B) * bw / block_bytes : 0;
        const int64_t plan = engine::plan_memory(mc, eo, B, a.prompt_len, 1).device_total +
                             infer::kv_cache_bytes(mc, B, gen_len, esz);
        gen.push_back({mode_name, B, r.tokens_per_s(), decode_rate, bound, r.gpu_alloc_peak - held_before, plan,
                       r.kv_cache_bytes, ""});
      } catch (const std::exception& ex) {
        std::string msg = ex.what();
        gen.push_back({mode_name, B, 0, 0, 0, 0, 0, 0, msg.substr(0, msg.find('\n'))});
      }
    }
  }

  std::printf("device: %s; host->device %.1f GB/s; PCIe time for the block weights %.1f ms\n\n", device_name.c_str(),
              bw / 1e9, bw > 0 ? block_bytes / bw * 1e3 : 0.0);
  std::printf("one forward (batch 1, %s, loss chunk %lld rows, block chunk %lld rows; peak GB = 1e9 bytes)\n"
              "| mode | seq | ms | peak GPU GiB | peak GB | plan GB | x PCIe time |\n|---|---|---|---|---|---|---|\n",
              a.dtype.c_str(), (long long)a.ce_chunk, (long long)model::block_forward_chunk_rows());
  for (const auto& r : fwd) {
    if (!r.err.empty()) std::printf("| %s | %lld | n/a | n/a | | | %s |\n", r.mode.c_str(), (long long)r.seq, r.err.c_str());
    else
      std::printf("| %s | %lld | %.1f | %.3f | %.3f | %.3f | %.2f |\n", r.mode.c_str(), (long long)r.seq, r.ms,
                  gib(r.peak), double(r.peak) / 1e9, double(r.plan) / 1e9, bw > 0 ? r.ms / (block_bytes / bw * 1e3) : 0.0);
  }
  std::printf("\ngeneration (prompt %lld, %lld new tokens, greedy; bound = batch x PCIe rate / block bytes; plan = "
              "prefill plan + KV cache)\n"
              "| mode | batch | tok/s | decode tok/s | bound tok/s | peak GPU GiB | plan GiB | KV cache GiB |\n"
              "|---|---|---|---|---|---|---|---|\n",
              (long long)a.prompt_len, (long long)a.new_tokens);
  for (const auto& r : gen) {
    if (!r.err.empty()) std::printf("| %s | %lld | n/a | | | | | %s |\n", r.mode.c_str(), (long long)r.batch, r.err.c_str());
    else
      std::printf("| %s | %lld | %.1f | %.1f | %.1f | %.3f | %.3f | %.3f |\n", r.mode.c_str(), (long long)r.batch,
                  r.tok_s, r.decode_tok_s, r.bound, gib(r.peak), gib(r.plan), gib(r.kv));
  }
  if (!a.json.empty()) {
    nlohmann::json j = {{"device", device_name}, {"h2d_bytes_per_s", bw}, {"forward", nlohmann::json::array()},
                        {"generate", nlohmann::json::array()}};
    for (const auto& r : fwd)
      j["forward"].push_back({{"mode", r.mode}, {"seq", r.seq}, {"ms", r.ms}, {"peak", r.peak}, {"plan", r.plan},
                              {"error", r.err}});
    for (const auto& r : gen)
      j["generate"].push_back({{"mode", r.mode}, {"batch", r.batch}, {"tokens_per_s", r.tok_s},
                               {"decode_tokens_per_s", r.decode_tok_s}, {"bound_tokens_per_s", r.bound},
                               {"peak", r.peak}, {"plan", r.plan}, {"kv_cache_bytes", r.kv}, {"error", r.err}});
    io::write_file_atomic(a.json, j.dump(1) + "\n");
  }
  return 0;
}
}  // namespace

int main(int argc, char** argv) {
  return ferry::run_tool("ferry-bench-infer", [&] { return bench_main(argc, argv); });
}
