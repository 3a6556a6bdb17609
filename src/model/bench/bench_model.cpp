// ferry-bench-model: forward + backward of ferry's model functions with every weight resident, per
// decoder layer and for the whole model, for scripts/bench_model.sh to set beside HF
// LlamaForCausalLM (scripts/bench/model_hf.py). Not a test.
//   layer: block_forward (saving) then block_backward (weight gradients and dx) of one block on
//          random weights (one flat buffer, layout.h) and a random input;
//   model: embedding, L blocks, final norm + lm_head + cross-entropy in --chunk row chunks
//          (head_forward_backward), L block backwards, embedding backward: what the engine's `none`
//          mode runs per step, without the optimizer.
// Timed with CUDA events on the stream ATen and gpu/ kernels use (the host clock on the CPU):
// --warmup runs, then the median of the timed ones. Saved activations are block_saved::bytes() as
// block_forward filled it, beside block_saved_bytes (the planner's formula); peak memory is the
// caching allocator's peak of allocated bytes (layer: above what was allocated before the forward;
// model: in all, weights and gradients included). Prints one JSON object per line, then a table.
//
//   ferry-bench-model [--shapes debug,1b] [--seq 4096] [--batch 1] [--dtype fp16|bf16|fp32]
//                     [--device auto|cuda|cpu] [--levels layer,model] [--iters 20] [--model-iters 5]
//                     [--warmup 3] [--chunk 1024]
#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "src/common/error.h"
#include "src/io/hf_config.h"
#include "src/model/block.h"
#include "src/model/embed_head.h"
#include "src/model/layout.h"
#include "src/model/rope.h"
#if FERRY_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <cuda_runtime_api.h>

#include "gpu/cuda_check.h"
#include "gpu/runtime.h"
#endif

namespace {

using namespace ferry;
using namespace ferry::model;

struct args {
  std::string shapes = "debug,1b", dtype, device = "auto", levels = "layer,model";
  int64_t seq = 4096, batch = 1, iters = 20, model_iters = 5, warmup = 3, chunk = 1024;
};

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');)
    if (!item.empty()) out.push_back(item);
  return out;
}

args parse(int argc, char** argv) {
  args a;
  std::map<std::string, std::string*> str{{"--shapes", &a.shapes}, {"--dtype", &a.dtype}, {"--device", &a.device},
                                          {"--levels", &a.levels}};
  std::map<std::string, int64_t*> num{{"--seq", &a.seq},     {"--batch", &a.batch},   {"--iters", &a.iters},
                                      {"--model-iters", &a.model_iters}, {"--warmup", &a.warmup},
                                      {"--chunk", &a.chunk}};
  for (int i = 1; i < argc; ++i) {
    std::string k = argv[i];
    if (k == "--help" || k == "-h") {
      std::printf("usage: ferry-bench-model [--shapes debug,1b] [--seq 4096] [--batch 1] [--dtype fp16|bf16|fp32] "
                  "[--device auto|cuda|cpu] [--levels layer,model] [--iters 20] [--model-iters 5] [--warmup 3] "
                  "[--chunk 1024]\n");
      std::exit(0);
    }
    FERRY_CONFIG_CHECK(i + 1 < argc, k, " needs a value (see --help)");
    std::string v = argv[++i];
    if (str.count(k)) {
      *str[k] = v;
    } else if (num.count(k)) {
      try {
        *num[k] = std::stoll(v);
      } catch (const std::exception&) {
        FERRY_CONFIG_CHECK(false, k, " needs an integer, got '", v, "'");
      }
    } else {
      FERRY_CONFIG_CHECK(false, "unknown flag ", k, " (see --help)");
    }
  }
  FERRY_CONFIG_CHECK(a.device == "auto" || a.device == "cuda" || a.device == "cpu",
                     "--device must be auto, cuda or cpu, got '", a.device, "'");
  FERRY_CONFIG_CHECK(a.dtype.empty() || a.dtype == "fp16" || a.dtype == "bf16" || a.dtype == "fp32",
                     "--dtype must be fp16, bf16 or fp32, got '", a.dtype, "'");
  for (const auto& l : split(a.levels))
    FERRY_CONFIG_CHECK(l == "layer" || l == "model", "--levels takes layer and/or model, got '", l, "'");
  FERRY_CONFIG_CHECK(a.seq > 1 && a.batch > 0 && a.iters > 0 && a.model_iters > 0 && a.warmup >= 0 && a.chunk > 0,
                     "--seq must be > 1, --batch, --iters, --model-iters and --chunk > 0, --warmup >= 0");
  return a;
}

// Time points around consecutive phases of one run: CUDA events on the legacy default stream (the
// current ATen stream in this binary), or the host clock.
class stamps {
 public:
  stamps(bool cuda, size_t points) : cuda_(cuda), host_(points) {
#if FERRY_WITH_CUDA
    if (cuda_)
      for (size_t i = 0; i < points; ++i) events_.emplace_back(true);
#endif
  }
  void mark(size_t i) {
#if FERRY_WITH_CUDA
    if (cuda_) {
      events_[i].record(nullptr);
      return;
    }
#endif
    host_[i] = std::chrono::steady_clock::now();
  }
  // Milliseconds from point i to point j (waits for the GPU).
  double ms(size_t i, size_t j) const {
#if FERRY_WITH_CUDA
    if (cuda_) {
      events_[j].synchronize();
      return gpu::event::elapsed_ms(events_[i], events_[j]);
    }
#endif
    return std::chrono::duration<double, std::milli>(host_[j] - host_[i]).count();
  }

 private:
  bool cuda_;
  std::vector<std::chrono::steady_clock::time_point> host_;
#if FERRY_WITH_CUDA
  std::vector<gpu::event> events_;
#endif
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Allocated bytes now and at the peak since the last reset; -1 on the CPU (not tracked).
struct memory {
  bool cuda;
  int64_t allocated() const {
#if FERRY_WITH_CUDA
    if (cuda) return c10::cuda::CUDACachingAllocator::getDeviceStats(0).allocated_bytes[0].current;
#endif
    return -1;
  }
  int64_t peak() const {
#if FERRY_WITH_CUDA
    if (cuda) return c10::cuda::CUDACachingAllocator::getDeviceStats(0).allocated_bytes[0].peak;
#endif
    return -1;
  }
  void reset_peak() const {
#if FERRY_WITH_CUDA
    if (cuda) c10::cuda::CUDACachingAllocator::resetPeakStats(0);
#endif
  }
};

// One block's flat weights: N(0, std) matrices, norm weights 1 (as HF initialises them).
at::Tensor random_block(const llama_config& cfg, const at::TensorOptions& opt) {
  at::Tensor w = at::randn({cfg.block_params()}, opt.dtype(at::kFloat)).mul_(cfg.initializer_range).to(opt);
  block_weights v = block_views(w, cfg);
  v.attn_norm.fill_(1);
  v.mlp_norm.fill_(1);
  return w;
}

std::string json_num(int64_t v) { return v < 0 ? "null" : std::to_string(v); }

std::string json_str(const std::string& v) {
  std::string out = "\"";
  for (char c : v) {
    if (c == '"' || c == '\\') out += '\\', out += c;
    else if (static_cast<unsigned char>(c) >= 0x20) out += c;
  }
  return out + "\"";
}

struct row {
  std::string shape, level;
  double fwd_ms = 0, bwd_ms = 0, total_ms = 0;
  int64_t saved = 0, saved_formula = 0, peak = -1;   // peak -1: not tracked
  double loss = 0;
  std::string error;   // non-empty: the measurement failed (out of memory, say)
};

row bench_layer(const llama_config& cfg, const std::string& shape, const args& a, const at::TensorOptions& opt,
                const memory& mem) {
  at::Tensor w = random_block(cfg, opt), g = at::zeros_like(w);
  const block_weights wv = block_views(w, cfg), gv = block_views(g, cfg);
  const rope_cache rope = make_rope(cfg, a.seq, opt.device());
  at::Tensor x = at::randn({a.batch, a.seq, cfg.hidden_size}, opt);
  at::Tensor dy = at::randn({a.batch, a.seq, cfg.hidden_size}, opt);
  std::vector<double> fwd, bwd, total;
  int64_t saved_bytes = 0, peak = -1;
  stamps st(opt.device().is_cuda(), 3);
  block_saved saved;
  for (int64_t it = 0; it < a.warmup + a.iters; ++it) {
    const int64_t base = mem.allocated();
    mem.reset_peak();
    st.mark(0);
    at::Tensor y = block_forward(x, wv, cfg, rope, saved);
    st.mark(1);
    saved_bytes = saved.bytes();
    at::Tensor dx = block_backward(dy, wv, cfg, rope, saved, gv, false);
    st.mark(2);
    if (it < a.warmup) continue;
    fwd.push_back(st.ms(0, 1)), bwd.push_back(st.ms(1, 2)), total.push_back(st.ms(0, 2));
    if (base >= 0) peak = std::max(peak, mem.peak() - base);
  }
  const int64_t formula = block_saved_bytes(cfg, a.batch, a.seq, int64_t(opt.dtype().itemsize()));
  return {shape, "layer", median(fwd), median(bwd), median(total), saved_bytes, formula, peak, 0, ""};
}

row bench_model(const llama_config& cfg, const std::string& shape, const args& a, const at::TensorOptions& opt,
                const memory& mem) {
  const int64_t L = cfg.num_hidden_layers, h = cfg.hidden_size, V = cfg.vocab_size, B = a.batch, T = a.seq;
  const auto hl = head_layout(cfg);
  at::Tensor emb = at::randn({V, h}, opt.dtype(at::kFloat)).mul_(cfg.initializer_range).to(opt);
  at::Tensor head = at::randn({cfg.head_params()}, opt.dtype(at::kFloat)).mul_(cfg.initializer_range).to(opt);
  slot_view(head, hl[0]).fill_(1);
  std::vector<at::Tensor> blocks, grads;
  std::vector<block_weights> wv, gv;
  for (int64_t l = 0; l < L; ++l) {
    blocks.push_back(random_block(cfg, opt));
    grads.push_back(at::zeros_like(blocks.back()));
    wv.push_back(block_views(blocks.back(), cfg));
    gv.push_back(block_views(grads.back(), cfg));
  }
  at::Tensor g_emb = at::zeros_like(emb), g_head = at::zeros_like(head);
  at::Tensor norm_w = slot_view(head, hl[0]), lm_w = slot_view(head, hl[1]);
  at::Tensor g_norm = slot_view(g_head, hl[0]), g_lm = slot_view(g_head, hl[1]);
  const rope_cache rope = make_rope(cfg, T, opt.device());
  // Labels as transformers makes them from labels=input_ids: the next token, none for the last.
  at::Tensor tokens = at::randint(V, {B, T}, at::kLong);
  at::Tensor labels = at::full({B, T}, -100, at::kLong);
  labels.narrow(1, 0, T - 1).copy_(tokens.narrow(1, 1, T - 1));
  tokens = tokens.to(opt.device()), labels = labels.to(opt.device());
  const double grad_scale = 1.0 / double(B * (T - 1));

  std::vector<double> fwd, head_ms, total;
  int64_t saved_bytes = 0, peak = -1;
  double loss = 0;
  stamps st(opt.device().is_cuda(), 4);
  std::vector<block_saved> saved(static_cast<size_t>(L));
  for (int64_t it = 0; it < a.warmup + a.model_iters; ++it) {
    mem.reset_peak();
    st.mark(0);
    at::Tensor x = embed_forward(tokens, emb);
    for (int64_t l = 0; l < L; ++l) x = block_forward(x, wv[l], cfg, rope, saved[l]);
    st.mark(1);
    saved_bytes = 0;
    for (const auto& s : saved) saved_bytes += s.bytes();
    at::Tensor dx;
    head_result hr = head_forward_backward(x, norm_w, lm_w, labels, cfg, a.chunk, grad_scale, &dx, &g_norm, &g_lm,
                                           false);
    st.mark(2);
    x.reset();
    for (int64_t l = L - 1; l >= 0; --l) dx = block_backward(dx, wv[l], cfg, rope, saved[l], gv[l], false);
    embed_backward(dx, tokens, g_emb, false);
    st.mark(3);
    if (it < a.warmup) continue;
    fwd.push_back(st.ms(0, 1)), head_ms.push_back(st.ms(1, 2)), total.push_back(st.ms(0, 3));
    peak = std::max(peak, mem.peak());
    loss = hr.loss_sum / double(hr.n_targets);
  }
  // fwd_ms: embedding + blocks; bwd_ms: the rest (the head's forward and backward are one pass).
  const int64_t formula = L * block_saved_bytes(cfg, B, T, int64_t(opt.dtype().itemsize()));
  const double t = median(total), f = median(fwd);
  row r{shape, "model", f, t - f, t, saved_bytes, formula, peak, loss, ""};
  std::printf("# %s model: head (norm + lm_head + CE, fwd+bwd) %.2f ms of %.2f ms\n", shape.c_str(), median(head_ms), t);
  return r;
}

std::string device_name(bool cuda) {
#if FERRY_WITH_CUDA
  if (cuda) {
    cudaDeviceProp p{};
    FERRY_CUDA_CHECK(cudaGetDeviceProperties(&p, 0));
    return p.name;
  }
#endif
  return "cpu";
}

int bench_main(int argc, char** argv) {
  args a = parse(argc, argv);
  bool cuda = a.device == "cuda" || (a.device == "auto" && at::hasCUDA());
#if !FERRY_WITH_CUDA
  FERRY_CONFIG_CHECK(!cuda || a.device == "auto", "--device cuda: this build has no CUDA code (FERRY_WITH_CUDA off)");
  cuda = false;
#endif
  FERRY_CONFIG_CHECK(!cuda || at::hasCUDA(), "--device cuda but no CUDA device is available");
  if (a.dtype.empty()) a.dtype = cuda ? "fp16" : "fp32";
  const at::ScalarType dt = a.dtype == "fp16" ? at::kHalf : a.dtype == "bf16" ? at::kBFloat16 : at::kFloat;
  const at::TensorOptions opt = at::TensorOptions().dtype(dt).device(cuda ? at::Device(at::kCUDA, 0) : at::kCPU);
  const memory mem{cuda};
  const std::string dev = device_name(cuda);
  at::manual_seed(1234);

  std::vector<row> rows;
  for (const auto& shape : split(a.shapes)) {
    const llama_config cfg = io::load_hf_config(shape);
    for (const auto& level : split(a.levels)) {
      row r;
      r.shape = shape, r.level = level;
      try {
        r = level == "layer" ? bench_layer(cfg, shape, a, opt, mem) : bench_model(cfg, shape, a, opt, mem);
      } catch (const std::exception& e) {   // this row says why; the other shapes still run
        std::string msg = e.what();
        r.error = msg.substr(0, msg.find('\n'));
      }
      std::printf("{\"bench\": \"ferry-bench-model\", \"impl\": \"ferry\", \"shape\": %s, \"level\": \"%s\", "
                  "\"device\": %s, \"dtype\": \"%s\", \"batch\": %lld, \"seq\": %lld, \"layers\": %lld, ",
                  json_str(shape).c_str(), level.c_str(), json_str(dev).c_str(), a.dtype.c_str(), (long long)a.batch,
                  (long long)a.seq, (long long)cfg.num_hidden_layers);
      if (!r.error.empty()) {
        std::printf("\"ok\": false, \"error\": %s}\n", json_str(r.error).c_str());
      } else {
        std::printf("\"ok\": true, \"fwd_ms\": %.4f, \"bwd_ms\": %.4f, \"fwd_bwd_ms\": %.4f, \"saved_bytes\": %lld, "
                    "\"saved_bytes_formula\": %lld, \"peak_bytes\": %s, \"iters\": %lld%s}\n",
                    r.fwd_ms, r.bwd_ms, r.total_ms, (long long)r.saved, (long long)r.saved_formula,
                    json_num(r.peak).c_str(), (long long)(level == "layer" ? a.iters : a.model_iters),
                    level == "model" ? (", \"loss\": " + std::to_string(r.loss)).c_str() : "");
      }
      std::fflush(stdout);
      rows.push_back(r);
    }
  }
  std::printf("\nferry forward+backward, all weights resident (%s, %s, batch %lld x seq %lld; median of timed runs)\n"
              "| shape | level | fwd ms | bwd ms | fwd+bwd ms | saved MiB | formula MiB | peak MiB |\n"
              "|---|---|---|---|---|---|---|---|\n",
              dev.c_str(), a.dtype.c_str(), (long long)a.batch, (long long)a.seq);
  const double mib = double(1 << 20);
  for (const auto& r : rows) {
    if (!r.error.empty()) {
      std::printf("| %s | %s | n/a | | | | | %s |\n", r.shape.c_str(), r.level.c_str(), r.error.c_str());
      continue;
    }
    std::string peak = r.peak < 0 ? "n/a" : std::to_string(int64_t(double(r.peak) / mib + 0.5));
    std::printf("| %s | %s | %.2f | %.2f | %.2f | %.1f | %.1f | %s |\n", r.shape.c_str(), r.level.c_str(), r.fwd_ms,
                r.bwd_ms, r.total_ms, double(r.saved) / mib, double(r.saved_formula) / mib, peak.c_str());
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return ferry::run_tool("ferry-bench-model", [&] { return bench_main(argc, argv); });
}
