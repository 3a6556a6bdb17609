#include "src/cli/wiring.h"

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "src/common/error.h"
#include "src/engine/memory_plan.h"
#include "src/engine/nvme_state.h"
#include "src/io/hf_config.h"
#include "src/io/token_stream.h"
#include "src/io/tokenizer.h"

#include <nlohmann/json.hpp>

namespace ferry::cli {

std::string default_corpus() { return "/usr/share/common-licenses"; }

// tokenizer=spm:N: a sentencepiece BPE model of N pieces trained on the embedded default corpus on
// first use and kept in $XDG_CACHE_HOME/ferry (else ~/.cache/ferry); later runs reuse it.
std::string default_subword_tokenizer(const std::string& spec) {
  int vocab = 0;
  try {
    vocab = std::stoi(spec.substr(4));
  } catch (const std::exception&) {
  }
  FERRY_CONFIG_CHECK(vocab >= 400 && vocab <= 8000, "tokenizer=", spec,
                     ": the embedded corpus supports spm:N with N in [400, 8000] (e.g. spm:2000)");
  const char* xdg = std::getenv("XDG_CACHE_HOME");
  const char* home = std::getenv("HOME");
  std::filesystem::path dir = xdg && *xdg ? std::filesystem::path(xdg) / "ferry"
                                          : std::filesystem::path(home && *home ? home : "/tmp") / ".cache" / "ferry";
  std::string prefix = (dir / ("common-licenses-spm" + std::to_string(vocab))).string();
  std::error_code ec;
  if (!std::filesystem::is_regular_file(prefix + ".model", ec)) {
    std::filesystem::create_directories(dir, ec);
    FERRY_CHECK(!ec, "cannot create the tokenizer cache ", dir.string(), ": ", ec.message());
    std::vector<std::string> files;
    for (const auto& f : io::list_inputs({default_corpus()})) files.push_back(f.path);
    std::fprintf(stderr, "training a %d-piece sentencepiece model on %s (once) -> %s.model\n", vocab,
                 default_corpus().c_str(), prefix.c_str());
    io::train_sentencepiece(files, prefix, vocab);
  }
  return prefix + ".model";
}

model::llama_config resolve_model(const io::run_config& cfg) {
  if (!cfg.init.empty() && !cfg.is_explicit("model")) return io::load_hf_config(cfg.init);
  return io::load_hf_config(cfg.model);
}

namespace {
engine::engine_options options_of(const io::run_config& cfg) {
  engine::engine_options o;
  o.mode = engine::parse_offload_mode(cfg.offload);
  o.dtype = engine::parse_compute_dtype(cfg.dtype);
  o.cuda = cfg.device == "cuda";
  o.prefetch = cfg.prefetch;
  o.cpu_threads = int(cfg.cpu_threads);
  o.speculate = engine::parse_speculate_mode(cfg.speculate);
  o.recompute = engine::parse_recompute_mode(cfg.activation_checkpointing);
  o.reduce_on_device = cfg.dist_reduce == "device";
  o.shadows = engine::parse_shadow_mode(cfg.dist_weights);
  o.state = engine::parse_state_kind(cfg.optimizer_state);
  o.state_on = engine::parse_state_place(cfg.optimizer_state_on);
  o.nvme.path = cfg.nvme_path;
  o.nvme.buffers = cfg.nvme_buffers;
  o.nvme.queue_depth = cfg.nvme_queue_depth;
  o.beta1 = cfg.beta1;
  o.beta2 = cfg.beta2;
  o.eps = cfg.eps;
  o.weight_decay = cfg.weight_decay;
  o.clip_grad = cfg.clip_grad;
  o.loss_scale = cfg.loss_scale;
  o.scale_window = cfg.loss_scale_window;
  o.ce_chunk = cfg.ce_chunk;
  o.max_batch = cfg.batch_size;
  o.max_seq = cfg.max_length;
  o.grad_accum = cfg.grad_accum;
  o.micro_group = cfg.micro_batch_group;
  o.resident_blocks = cfg.resident_blocks;
  o.embed_grad = engine::parse_embed_grad_place(cfg.embed_grad);
  o.gpu_mem_limit_gib = cfg.gpu_mem_limit_gib;
  o.host_mem_limit_gib = cfg.host_mem_limit_gib;
  o.nvtx = cfg.nvtx;
  o.seed = cfg.seed;
  return o;
}
}  // namespace

engine::engine_options engine_options_for(const io::run_config& cfg, const model::llama_config& mc) {
  engine::engine_options o = options_of(cfg);
  engine::check_options(o);
  engine::check_resident_blocks(o, mc.num_hidden_layers, mc.name);
  // embed_grad=device where it cannot apply is refused here; auto is resolved by the engine and
  // the plans, once the ranks are attached.
  (void)engine::resolve_embed_grad(o, mc.tie_word_embeddings, mc.embed_params());
  return o;
}

engine::engine_options inference_options_for(const io::run_config& cfg, const model::llama_config&) {
  engine::engine_options o = options_of(cfg);
  o.forward_only = true;
  o.max_positions = cfg.max_length;
  if (!cfg.is_explicit("ce_chunk")) o.ce_chunk = kInferCeChunk;
  return o;
}

io::data_options data_options_for(const io::run_config& cfg, const model::llama_config& mc) {
  io::data_options d;
  std::string spec = cfg.data.empty() ? default_corpus() : cfg.data;
  std::stringstream ss(spec);
  for (std::string item; std::getline(ss, item, ',');)
    if (!item.empty()) d.paths.push_back(item);
  if (cfg.data.empty()) {
    std::error_code ec;
    FERRY_CONFIG_CHECK(std::filesystem::is_directory(default_corpus(), ec), "no data given and the default corpus ",
                       default_corpus(), " is missing; pass --data FILE|DIR");
  }
  // --init DIR: DIR's own tokenizer unless the tokenizer key names one (which must then fit DIR's model).
  d.tokenizer = io::resolve_run_tokenizer(
      cfg.tokenizer.rfind("spm:", 0) == 0 ? default_subword_tokenizer(cfg.tokenizer) : cfg.tokenizer,
      cfg.is_explicit("tokenizer"), cfg.init, mc.vocab_size);
  d.seq_len = cfg.max_length;
  d.seed = cfg.seed;
  d.eval_fraction = cfg.eval_fraction;
  d.vocab_limit = mc.vocab_size;
  d.chat_template = cfg.chat_template;
  std::error_code ec;
  d.template_dir = !cfg.init.empty()                                   ? cfg.init
                   : std::filesystem::is_directory(d.tokenizer, ec)    ? d.tokenizer
                   : std::filesystem::is_regular_file(d.tokenizer, ec) ? std::filesystem::path(d.tokenizer).parent_path().string()
                                                                       : "";
  d.packing = cfg.packing;
  d.long_examples = cfg.long_examples;
  d.skip_invalid_examples = cfg.skip_invalid_examples;
  return d;
}

namespace {
// The disk the nvme tier's file needs against the free space of nvme_path (-1: unknown, not judged).
std::string disk_misfit(const engine::memory_plan& p, const engine::engine_options& eo, int64_t free_bytes) {
  if (!p.state_on_disk || free_bytes < 0 || p.disk_state <= free_bytes) return "";
  return "the optimizer state needs " + std::to_string(p.disk_state >> 20) + " MiB on disk but nvme_path " + eo.nvme.path +
         " has " + std::to_string(free_bytes >> 20) + " MiB free; free space there or point nvme_path at a larger disk";
}
}  // namespace

void print_dry_run(const io::run_config& cfg, const model::llama_config& mc, const engine::engine_options& eo) {
  std::printf("%s\n", io::to_json(cfg).c_str());
  std::printf("model %s: %.3f B parameters (%lld layers, hidden %lld, heads %lld/%lld, head_dim %lld, vocab %lld%s)\n",
              mc.name.c_str(), double(mc.total_params()) / 1e9, (long long)mc.num_hidden_layers,
              (long long)mc.hidden_size, (long long)mc.num_attention_heads, (long long)mc.num_key_value_heads,
              (long long)mc.head_dim, (long long)mc.vocab_size, mc.tie_word_embeddings ? ", tied embeddings" : "");
  engine::memory_plan p = engine::plan_memory(mc, eo, cfg.batch_size, cfg.max_length, cfg.grad_accum);
  std::printf("memory plan (offload %s, %s, batch %lld x %lld tokens%s):\n%s\n", cfg.offload.c_str(), cfg.dtype.c_str(),
              (long long)cfg.batch_size, (long long)cfg.max_length, eo.forward_only ? ", inference" : "",
              p.describe().c_str());
  const std::string resident = std::to_string(p.resident_blocks) +
                               " resident blocks updated on the GPU, their host copy for checkpoints; the rest by the CPU AdamW";
  if (!eo.forward_only && !p.state_on_disk)
    std::printf("optimizer state %s: %.4f B/param on the host (fp32 master + moments; %s)\n",
                engine::state_kind_name(p.state), engine::state_bytes_per_param(p.state, true),
                eo.mode == engine::offload_mode::offload_none ? "offload none: fp32 on the GPU, the host copy for checkpoints"
                : p.resident_blocks > 0                       ? resident.c_str()
                                                              : "updated by the CPU AdamW");
  const int64_t disk_free = p.state_on_disk ? engine::nvme_free_bytes(eo.nvme.path) : -1;
  if (p.state_on_disk)
    std::printf("optimizer state %s: %.4f B/param on disk in %s (%.2f GiB; %s free there), streamed through %lld "
                "host buffers of %.2f GiB (updated by the CPU AdamW)\n",
                engine::state_kind_name(p.state), engine::state_bytes_per_param(p.state, true), eo.nvme.path.c_str(),
                double(p.disk_state) / double(1ull << 30),
                disk_free >= 0 ? (std::to_string(disk_free >> 20) + " MiB").c_str() : "unknown",
                (long long)eo.nvme.buffers, double(p.host_state_buffers) / double(eo.nvme.buffers) / double(1ull << 30));
  // The limits given in the config (the card itself is not probed by a dry run).
  std::string misfit = engine::plan_misfit(p, mc, eo, engine::gib_bytes(eo.gpu_mem_limit_gib));
  if (misfit.empty()) misfit = disk_misfit(p, eo, disk_free);
  if (!misfit.empty()) std::printf("does not fit: %s\n", misfit.c_str());
  else if (eo.gpu_mem_limit_gib > 0 || eo.host_mem_limit_gib > 0 || p.state_on_disk) std::printf("fits the limits given\n");
}

void write_plan_json(const std::string& path, const io::run_config& cfg, const model::llama_config& mc,
                     const engine::engine_options& eo) {
  engine::memory_plan p = engine::plan_memory(mc, eo, cfg.batch_size, cfg.max_length, cfg.grad_accum);
  nlohmann::json j;
  j["model"] = {{"name", mc.name},
                {"params", mc.total_params()},
                {"layers", mc.num_hidden_layers},
                {"hidden", mc.hidden_size},
                {"heads", mc.num_attention_heads},
                {"kv_heads", mc.num_key_value_heads},
                {"intermediate", mc.intermediate_size},
                {"vocab", mc.vocab_size},
                {"tie_word_embeddings", mc.tie_word_embeddings}};   // params count a tied matrix once
  j["run"] = {{"offload", cfg.offload}, {"dtype", cfg.dtype},           {"device", cfg.device},
              {"batch", cfg.batch_size}, {"seq", cfg.max_length},       {"grad_accum", cfg.grad_accum},
              {"prefetch", cfg.prefetch}, {"gpu_mem_limit_gib", cfg.gpu_mem_limit_gib}, {"host_mem_limit_gib", cfg.host_mem_limit_gib},
              {"forward_only", eo.forward_only}, {"recompute_blocks", p.recompute_blocks},
              {"micro_batch_group", p.micro_group},
              {"resident_blocks", p.resident_blocks},
              {"embed_grad", p.embed_grad_device ? "device" : "host"},
              {"optimizer_state", engine::state_kind_name(p.state)},
              {"optimizer_state_on", p.state_on_disk ? "nvme" : "host"}};
  auto device_of = [](const engine::memory_plan& q) {
    return nlohmann::json{{"weight_slots", q.weight_slots}, {"grad_slots", q.grad_slots}, {"optimizer", q.optimizer},
                          {"activations", q.activations},   {"workspace", q.workspace},   {"total", q.device_total}};
  };
  auto host_of = [&eo](const engine::memory_plan& q) {
    return nlohmann::json{{"master", q.host_master},
                          {"moments", q.host_moments},
                          {"state_buffers", q.host_state_buffers},
                          {"pinned", q.host_pinned},
                          {"other", q.host_other},
                          {"total", q.host_total},
                          {"optimizer_state", engine::state_kind_name(q.state)},
                          {"state_bytes_per_param", engine::state_bytes_per_param(q.state, !eo.forward_only)}};
  };
  // disk: the nvme tier's file (0 with the state in host memory) and what nvme_path has free (-1:
  // no nvme_path, or unknown).
  const int64_t disk_free = eo.nvme.path.empty() ? -1 : engine::nvme_free_bytes(eo.nvme.path);
  auto disk_of = [&](const engine::memory_plan& q) {
    return nlohmann::json{{"state", q.disk_state}, {"path", eo.nvme.path}, {"free", disk_free}};
  };
  j["device"] = device_of(p);
  j["host"] = host_of(p);
  j["disk"] = disk_of(p);
  std::string misfit = engine::plan_misfit(p, mc, eo, engine::gib_bytes(eo.gpu_mem_limit_gib));
  if (misfit.empty()) misfit = disk_misfit(p, eo, disk_free);
  j["fits_limits"] = misfit.empty();
  if (!misfit.empty()) j["misfit"] = misfit;
  // The same plan with another option (the finder's what-if rows): activation checkpointing, one
  // row per optimizer_state kind the mode can run in host memory ("optimizer_state KIND"; offload
  // none: fp32 only),
  // for the offloaded modes each kind with the state on disk ("optimizer_state_on nvme,
  // optimizer_state KIND": nvme_buffers host buffers and the file's disk bytes), and checkpointing
  // combined with each of those.
  if (!eo.forward_only) {
    std::vector<std::pair<std::string, engine::plan_what_if>> variants(1);
    variants[0].first = "activation checkpointing";
    variants[0].second.recompute_blocks = mc.num_hidden_layers;
    const auto kinds = {engine::state_kind::state_fp32, engine::state_kind::state_bf16, engine::state_kind::state_int8};
    for (auto k : kinds) {
      if (eo.mode == engine::offload_mode::offload_none && k != engine::state_kind::state_fp32) continue;
      engine::plan_what_if w;
      w.state = k;
      w.state_on_disk = false;   // in host memory even where the run puts its state on disk
      variants.push_back({std::string("optimizer_state ") + engine::state_kind_name(k), w});
    }
    for (auto k : kinds) {
      if (eo.mode == engine::offload_mode::offload_none) continue;
      engine::plan_what_if w;
      w.state = k;
      w.state_on_disk = true;
      variants.push_back({std::string("optimizer_state_on nvme, optimizer_state ") + engine::state_kind_name(k), w});
    }
    // Checkpointing combined with each kind, in memory and (offloaded) on disk: the finder's
    // combination rows ("activation checkpointing, optimizer_state KIND", "activation
    // checkpointing, optimizer_state_on nvme, optimizer_state KIND").
    const size_t singles = variants.size();
    for (size_t i = 1; i < singles; ++i) {
      engine::plan_what_if w = variants[i].second;
      w.recompute_blocks = mc.num_hidden_layers;
      variants.push_back({"activation checkpointing, " + variants[i].first, w});
    }
    for (const auto& [name, w] : variants) {
      engine::memory_plan q = engine::plan_memory(mc, eo, cfg.batch_size, cfg.max_length, cfg.grad_accum, w);
      j["what_if"][name] = {{"device", device_of(q)}, {"host", host_of(q)}, {"disk", disk_of(q)}};
    }
  }
  std::ofstream out(path);
  FERRY_CONFIG_CHECK(out.good(), "cannot write --plan-json ", path, "; check that its directory exists");
  out << j.dump(2) << "\n";
  FERRY_CONFIG_CHECK(out.good(), "writing --plan-json ", path, " failed; check free disk space");
}

}  // namespace ferry::cli
