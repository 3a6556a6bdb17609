// ferry-model-check: loads an HF LlamaForCausalLM checkpoint into ferry's flat per-unit buffers,
// runs ferry's forward and backward on given tokens, and writes the logits and the mean loss (fp32)
// and every weight gradient (HF names, in the compute dtype: lossless, and half the bytes of fp32 for
// fp16/bf16, which matters at the 1B shapes) to a safetensors file, for hf_parity.py to compare with
// transformers. --write DIR also saves the loaded weights back as an HF checkpoint from ferry's
// buffers (the other direction of the parity check).
//
//   ferry-model-check --model DIR --tokens FILE --out OUT.safetensors
//                     [--dtype f32|f16|bf16] [--device cpu|cuda] [--chunk ROWS] [--write DIR]
// FILE holds one sequence per line (B lines, T whitespace-separated token ids each). Labels are
// the tokens shifted left (the last position has none), as transformers does for labels=input_ids;
// the loss is their mean and the gradients are those of the mean.
#include <ATen/ATen.h>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "src/common/error.h"
#include "src/io/hf_checkpoint.h"
#include "src/io/safetensors.h"
#include "src/model/block.h"
#include "src/model/embed_head.h"
#include "src/model/layout.h"
#include "src/model/rope.h"

namespace {

using namespace ferry;
using namespace ferry::model;

struct options {
  std::string model, tokens, out, write_dir, dtype = "f32", device = "cpu";
  int64_t chunk = 64;
};

options parse(int argc, char** argv) {
  options o;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      std::cout << "usage: ferry-model-check --model DIR --tokens FILE --out OUT.safetensors [--dtype f32|f16|bf16] "
                   "[--device cpu|cuda] [--chunk ROWS] [--write DIR]\n";
      std::exit(0);
    }
    FERRY_CONFIG_CHECK(i + 1 < argc, "option ", a, " needs a value; see --help");
    std::string v = argv[++i];
    if (a == "--model") o.model = v;
    else if (a == "--tokens") o.tokens = v;
    else if (a == "--out") o.out = v;
    else if (a == "--write") o.write_dir = v;
    else if (a == "--dtype") o.dtype = v;
    else if (a == "--device") o.device = v;
    else if (a == "--chunk") o.chunk = std::stoll(v);
    else FERRY_CONFIG_CHECK(false, "unknown option ", a, "; see --help");
  }
  FERRY_CONFIG_CHECK(!o.model.empty() && !o.tokens.empty() && !o.out.empty(), "--model, --tokens and --out are required");
  FERRY_CONFIG_CHECK(o.dtype == "f32" || o.dtype == "f16" || o.dtype == "bf16", "--dtype must be f32, f16 or bf16");
  FERRY_CONFIG_CHECK(o.device == "cpu" || o.device == "cuda", "--device must be cpu or cuda");
  return o;
}

at::Tensor read_tokens(const std::string& path) {
  std::ifstream in(path);
  FERRY_CHECK(in, "cannot open token file ", path);
  std::vector<std::vector<int64_t>> rows;
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream ls(line);
    std::vector<int64_t> r;
    for (int64_t t; ls >> t;) r.push_back(t);
    if (!r.empty()) rows.push_back(std::move(r));
  }
  FERRY_CHECK(!rows.empty(), "token file ", path, " holds no tokens");
  at::Tensor t = at::empty({int64_t(rows.size()), int64_t(rows[0].size())}, at::kLong);
  for (size_t b = 0; b < rows.size(); ++b) {
    FERRY_CHECK(rows[b].size() == rows[0].size(), "token file ", path, ": every line needs the same length");
    for (size_t j = 0; j < rows[b].size(); ++j) t[b][j] = rows[b][j];
  }
  return t;
}

// One unit's flat fp32 buffer filled from the checkpoint. prefix: "model.layers.<i>." for blocks.
at::Tensor load_unit(const io::hf_checkpoint_reader& r, const std::vector<tensor_slot>& slots, const std::string& prefix) {
  int64_t n = 0;
  for (const auto& s : slots) n += s.numel;
  at::Tensor flat = at::empty({n}, at::kFloat);
  for (const auto& s : slots) r.read_f32(prefix + s.name, s.shape, flat.data_ptr<float>() + s.offset);
  return flat;
}

struct named_out {
  std::string name;
  at::Tensor t;   // CPU contiguous, fp32 / fp16 / bf16
};

void add_unit(std::vector<named_out>& out, const at::Tensor& flat, const std::vector<tensor_slot>& slots,
              const std::string& prefix) {
  at::Tensor f = flat.to(at::kCPU).contiguous();
  for (const auto& s : slots) out.push_back({prefix + s.name, slot_view(f, s).contiguous()});
}

const char* st_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "F32";
    case at::kHalf: return "F16";
    case at::kBFloat16: return "BF16";
    default: FERRY_ASSERT(false, "ferry-model-check writes only fp32, fp16 and bf16 tensors");
  }
  return "";
}

int run(const options& o) {
  io::hf_checkpoint_reader reader(o.model);
  reader.validate_against_config();
  llama_config cfg = reader.config();
  const at::ScalarType dt = o.dtype == "f32" ? at::kFloat : o.dtype == "f16" ? at::kHalf : at::kBFloat16;
  const at::Device device = o.device == "cuda" ? at::Device(at::kCUDA) : at::Device(at::kCPU);
  FERRY_CHECK(device.is_cpu() || at::hasCUDA(), "--device cuda but no CUDA device is available");
  const int64_t L = cfg.num_hidden_layers, h = cfg.hidden_size, V = cfg.vocab_size;

  auto el = embed_layout(cfg), hl = head_layout(cfg), bl = block_layout(cfg);
  at::Tensor emb32 = load_unit(reader, el, ""), head32 = load_unit(reader, hl, "");
  std::vector<at::Tensor> blocks32;
  for (int64_t l = 0; l < L; ++l) blocks32.push_back(load_unit(reader, bl, "model.layers." + std::to_string(l) + "."));

  if (!o.write_dir.empty()) {
    std::vector<named_out> w;
    add_unit(w, emb32, el, "");
    for (int64_t l = 0; l < L; ++l) add_unit(w, blocks32[l], bl, "model.layers." + std::to_string(l) + ".");
    add_unit(w, head32, hl, "");
    std::vector<io::named_f32> named;
    for (auto& e : w) named.push_back({e.name, e.t.sizes().vec(), e.t.data_ptr<float>()});
    io::write_hf_checkpoint(o.write_dir, cfg, named, "F32");
  }

  at::Tensor tokens = read_tokens(o.tokens);
  const int64_t B = tokens.size(0), T = tokens.size(1);
  at::Tensor labels = at::full({B, T}, -100, at::kLong);
  if (T > 1) labels.narrow(1, 0, T - 1).copy_(tokens.narrow(1, 1, T - 1));
  tokens = tokens.to(device);
  labels = labels.to(device);

  auto to_dev = [&](const at::Tensor& t) { return t.to(device, dt).contiguous(); };
  at::Tensor emb = to_dev(emb32).view({V, h}), head = to_dev(head32);
  std::vector<at::Tensor> blocks, grads;
  for (auto& b : blocks32) blocks.push_back(to_dev(b)), grads.push_back(at::zeros_like(blocks.back()));
  at::Tensor g_emb = at::zeros_like(emb), g_head = at::zeros_like(head);
  // Tied embeddings: lm_head is the embedding's matrix, and its gradient the embedding's (the head
  // writes it, the embedding's backward adds to it).
  const bool tied = cfg.tie_word_embeddings;
  at::Tensor norm_w = slot_view(head, hl[0]), lm_w = tied ? emb : slot_view(head, hl[1]);
  at::Tensor g_norm = slot_view(g_head, hl[0]), g_lm = tied ? g_emb : slot_view(g_head, hl[1]);
  rope_cache rope = make_rope(cfg, T, device);

  at::Tensor x = embed_forward(tokens, emb);
  std::vector<block_saved> saved(L);
  for (int64_t l = 0; l < L; ++l) x = block_forward(x, block_views(blocks[l], cfg), cfg, rope, saved[l]);
  at::Tensor logits = head_logits(x, norm_w, lm_w, cfg).to(at::kCPU, at::kFloat).contiguous();
  const int64_t n_targets = labels.ne(-100).sum().item<int64_t>();
  FERRY_CHECK(n_targets > 0, "the token file has no targets (sequences of length 1)");
  at::Tensor dx;
  head_result hr = head_forward_backward(x, norm_w, lm_w, labels, cfg, o.chunk, 1.0 / double(n_targets), &dx, &g_norm,
                                         &g_lm, false);
  for (int64_t l = L - 1; l >= 0; --l)
    dx = block_backward(dx, block_views(blocks[l], cfg), cfg, rope, saved[l], block_views(grads[l], cfg), false);
  embed_backward(dx, tokens, g_emb, /*accumulate=*/tied);

  std::vector<named_out> out;
  out.push_back({"logits", logits});
  out.push_back({"loss", at::full({1}, hr.loss_sum / double(hr.n_targets), at::kFloat)});
  add_unit(out, g_emb.view({-1}), el, "grad.");
  for (int64_t l = 0; l < L; ++l) add_unit(out, grads[l], bl, "grad.model.layers." + std::to_string(l) + ".");
  add_unit(out, g_head, hl, "grad.");
  std::vector<io::st_write_entry> entries;
  for (auto& e : out)
    entries.push_back({e.name, st_dtype(e.t.scalar_type()), e.t.sizes().vec(), e.t.data_ptr(), size_t(e.t.nbytes())});
  io::write_safetensors(o.out, entries, {{"dtype", o.dtype}, {"device", o.device}});
  std::printf("ferry-model-check: %s, %lld layers, B=%lld T=%lld, %s on %s, loss %.6f over %lld targets\n",
              cfg.name.c_str(), (long long)L, (long long)B, (long long)T, o.dtype.c_str(), o.device.c_str(),
              hr.loss_sum / double(hr.n_targets), (long long)hr.n_targets);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse(argc, argv));
  } catch (const ferry::config_error& e) {
    std::fprintf(stderr, "ferry-model-check: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ferry-model-check: %s\n", e.what());
    return 1;
  }
}
