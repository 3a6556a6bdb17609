#include "src/infer/runner.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "src/common/error.h"
#include "src/engine/engine.h"
#include "src/infer/evaluate.h"
#include "src/infer/generate.h"
#include "src/checkpoint/checkpoint.h"
#include "src/io/atomic_file.h"

namespace ferry::infer {
namespace fs = std::filesystem;
namespace {

constexpr const char* kDefaultPrompt = "Permission is hereby granted";

double gib(int64_t b) { return double(b) / double(1ull << 30); }

std::string model_dir(const io::run_config& cfg) {
  std::error_code ec;
  if (!cfg.init.empty() && fs::is_directory(cfg.init, ec)) return cfg.init;
  if (fs::is_directory(cfg.model, ec)) return cfg.model;
  return "";
}

void print_eval(const eval_result& r, int64_t seq_len) {
  std::printf("evaluate: %lld sequences x %lld tokens%s: loss %.4f, perplexity %.3f, %.0f tok/s (%.2f s)",
              (long long)r.sequences, (long long)seq_len, r.from_train_split ? " (training split: no held-out data)" : "",
              r.loss, r.perplexity, r.tokens_per_s(), r.ms / 1e3);
  if (r.gpu_alloc_peak > 0) std::printf(", peak GPU %.2f GiB", gib(r.gpu_alloc_peak));
  std::printf("\n");
}

// The generate job summed over its batches (kv_cache_bytes and gpu_alloc_peak: the largest batch's).
struct generate_totals {
  int64_t prompts = 0, prompt_tokens = 0, new_tokens = 0, steps = 0;
  double prefill_ms = 0, decode_ms = 0;
  int64_t kv_cache_bytes = 0, gpu_alloc_peak = 0;
  double ms() const { return prefill_ms + decode_ms; }
  double tokens_per_s() const { return ms() > 0 ? double(new_tokens) / (ms() / 1e3) : 0.0; }
};

generate_totals run_generate(engine::engine& e, const io::run_config& cfg, const io::tokenizer& tok,
                             std::optional<io::chat_format> chat) {
  std::vector<std::string> texts;
  std::vector<std::vector<int64_t>> prompts = load_prompts(cfg, tok, &texts, chat);
  generate_options g;
  g.eos_id = e.config().eos_token_id;
  if (chat) {
    // The reply ends at the template's end of turn, or at the tokenizer's EOS (llama2, zephyr).
    if (tok.eos_id() >= 0) g.stop_ids.push_back(tok.eos_id());
    for (const std::string& t : io::chat_end_of_turn(*chat)) {
      const int32_t id = tok.token_id(t);
      FERRY_CONFIG_CHECK(id >= 0, "chat template ", io::chat_format_name(*chat), " ends a turn with ", t,
                         " but tokenizer ", tok.name(), " has no such token; pass --chat-template for this tokenizer");
      g.stop_ids.push_back(id);
    }
    std::printf("chat template %s: replies stop at", io::chat_format_name(*chat));
    for (int64_t id : g.stop_ids) std::printf(" %lld", (long long)id);
    std::printf(" or EOS %lld\n", (long long)g.eos_id);
  }
  g.sampling = {cfg.temperature, cfg.top_k, cfg.top_p, cfg.seed};
  const int64_t n = int64_t(prompts.size()), B = cfg.batch_size;
  generate_totals sum;
  sum.prompts = n;
  std::printf("generate: %lld prompt(s), batch %lld, %s, up to %lld new tokens\n", (long long)n, (long long)B,
              cfg.temperature > 0 ? "sampling" : "greedy", (long long)cfg.max_new_tokens);
  for (int64_t first = 0; first < n; first += B) {
    const int64_t rows = std::min(B, n - first);
    std::vector<std::vector<int64_t>> batch(prompts.begin() + first, prompts.begin() + first + rows);
    int64_t longest = 0;
    for (const auto& p : batch) longest = std::max<int64_t>(longest, int64_t(p.size()));
    g.max_new_tokens = std::min(cfg.max_new_tokens, cfg.max_length - longest);
    if (g.max_new_tokens < cfg.max_new_tokens)
      std::printf("note: the batch's longest prompt has %lld tokens, so at most %lld new tokens fit max_length %lld\n",
                  (long long)longest, (long long)g.max_new_tokens, (long long)cfg.max_length);
    generate_result r = generate(e, batch, g);
    for (int64_t b = 0; b < rows; ++b) {
      std::vector<int32_t> ids;
      std::string list;
      for (int64_t t : r.tokens[b]) {
        const bool stop = chat && std::find(g.stop_ids.begin(), g.stop_ids.end(), t) != g.stop_ids.end();
        if (t >= 0 && t < tok.vocab_size() && !stop) ids.push_back(int32_t(t));
        list += (list.empty() ? "" : " ") + std::to_string(t);
      }
      // A chat reply goes on its own line after the user's prompt; plain text continues the prompt.
      std::printf("--- %lld (%zu prompt tokens)\n%s%s%s\nids %lld: %s\n", (long long)(first + b),
                  batch[b].size(), texts[first + b].c_str(), chat ? "\n" : "", tok.decode(ids).c_str(),
                  (long long)(first + b), list.c_str());
    }
    std::printf("batch %lld: %lld new tokens, prefill %.1f ms, decode %.1f ms (%lld steps), %.1f tok/s, KV cache %.1f MiB",
                (long long)(first / B), (long long)r.new_tokens, r.prefill_ms, r.decode_ms, (long long)r.steps,
                r.tokens_per_s(), double(r.kv_cache_bytes) / double(1 << 20));
    if (r.gpu_alloc_peak > 0) std::printf(", peak GPU %.2f GiB", gib(r.gpu_alloc_peak));
    std::printf("\n");
    sum.prompt_tokens += r.prompt_tokens;
    sum.new_tokens += r.new_tokens;
    sum.steps += r.steps;
    sum.prefill_ms += r.prefill_ms;
    sum.decode_ms += r.decode_ms;
    sum.kv_cache_bytes = std::max(sum.kv_cache_bytes, r.kv_cache_bytes);
    sum.gpu_alloc_peak = std::max(sum.gpu_alloc_peak, r.gpu_alloc_peak);
  }
  std::printf("generate: %lld new tokens in %.2f s: %.1f tok/s\n", (long long)sum.new_tokens, sum.ms() / 1e3,
              sum.tokens_per_s());
  return sum;
}

// --metrics-json: one object with the run's figures, the counterpart of ferry-train's metrics.jsonl
// (same key names where they mean the same); "evaluate" / "generate" only for the jobs that ran.
void write_metrics_json(const std::string& path, const io::run_config& cfg, const model::llama_config& mc,
                        engine::engine& e, const eval_result* ev, int64_t eval_seq_len, const generate_totals* gen) {
  nlohmann::json j;
  j["model"] = mc.name;
  j["params"] = mc.total_params();
  j["offload"] = cfg.offload;
  j["dtype"] = cfg.dtype;
  j["device"] = e.device().name();
  j["job"] = cfg.job;
  j["batch_size"] = cfg.batch_size;
  if (ev) {
    j["evaluate"] = {{"sequences", ev->sequences},
                     {"seq_len", eval_seq_len},
                     {"tokens", ev->tokens},
                     {"loss", ev->loss},
                     {"perplexity", ev->perplexity},
                     {"ms", ev->ms},
                     {"tokens_per_s", ev->tokens_per_s()},
                     {"gpu_alloc_peak", ev->gpu_alloc_peak},
                     {"from_train_split", ev->from_train_split}};
  }
  if (gen) {
    j["generate"] = {{"prompts", gen->prompts},
                     {"max_new_tokens", cfg.max_new_tokens},
                     {"prompt_tokens", gen->prompt_tokens},
                     {"new_tokens", gen->new_tokens},
                     {"steps", gen->steps},
                     {"prefill_ms", gen->prefill_ms},
                     {"decode_ms", gen->decode_ms},
                     {"tokens_per_s", gen->tokens_per_s()},
                     {"kv_cache_bytes", gen->kv_cache_bytes},
                     {"gpu_alloc_peak", gen->gpu_alloc_peak}};
  }
  io::write_file_atomic(path, j.dump(1) + "\n");
}
}  // namespace

std::string resolve_tokenizer(const io::run_config& cfg, const model::llama_config& mc) {
  const std::string spec =
      io::resolve_run_tokenizer(cfg.tokenizer, cfg.is_explicit("tokenizer"), model_dir(cfg), mc.vocab_size);
  std::unique_ptr<io::tokenizer> tok = io::make_tokenizer(spec);
  FERRY_CONFIG_CHECK(tok->vocab_size() <= mc.vocab_size, "tokenizer ", tok->name(), " has ", tok->vocab_size(),
                     " ids but model ", mc.name, " only ", mc.vocab_size, "; use the model's own tokenizer");
  return spec;
}

std::optional<io::chat_format> prompt_chat_format(const io::run_config& cfg) {
  if (!cfg.chat) return std::nullopt;
  if (cfg.chat_template != "auto") return io::parse_chat_format(cfg.chat_template, "chat_template");
  return io::chat_format_from_checkpoint(model_dir(cfg));
}

std::vector<std::vector<int64_t>> load_prompts(const io::run_config& cfg, const io::tokenizer& tok,
                                               std::vector<std::string>* texts, std::optional<io::chat_format> chat) {
  std::vector<std::string> lines;
  if (!cfg.prompt_file.empty()) {
    std::ifstream in(cfg.prompt_file);
    FERRY_CONFIG_CHECK(in.good(), "cannot read prompt_file ", cfg.prompt_file, "; give a text file with one prompt per line");
    for (std::string line; std::getline(in, line);) {
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (!line.empty()) lines.push_back(line);
    }
    FERRY_CONFIG_CHECK(!lines.empty(), "prompt_file ", cfg.prompt_file, " has no prompts (one per non-empty line)");
  } else {
    lines.push_back(cfg.prompt.empty() ? kDefaultPrompt : cfg.prompt);
  }
  std::vector<std::vector<int64_t>> out;
  for (size_t i = 0; i < lines.size(); ++i) {
    std::vector<int64_t> ids;
    if (chat) {
      std::vector<io::chat_message> messages;
      if (!cfg.system_prompt.empty()) messages.push_back({"system", cfg.system_prompt, false});
      messages.push_back({"user", lines[i], false});
      for (int32_t t : io::encode_pieces(io::render_generation_prompt(*chat, messages), tok).ids) ids.push_back(t);
    } else {
      if (tok.bos_id() >= 0) ids.push_back(tok.bos_id());  // a tokenizer without BOS starts at the text
      for (int32_t t : tok.encode(lines[i])) ids.push_back(t);
    }
    FERRY_CONFIG_CHECK(!ids.empty(), "prompt ", i, " encodes to no tokens and tokenizer ", tok.name(),
                       " has no BOS to start from; give a non-empty prompt");
    FERRY_CONFIG_CHECK(int64_t(ids.size()) < cfg.max_length, "prompt ", i, " has ", ids.size(),
                       " tokens (with BOS) but the context is max_length ", cfg.max_length,
                       " and at least one new token must fit; shorten the prompt or raise --max-length");
    out.push_back(std::move(ids));
    if (texts) texts->push_back(lines[i]);
  }
  return out;
}

int run_inference(const io::run_config& cfg, const model::llama_config& mc, const engine::engine_options& eo,
                  const io::data_options* data, const std::string& metrics_json) {
  const bool do_eval = cfg.job == "evaluate" || cfg.job == "both";
  const bool do_gen = cfg.job == "generate" || cfg.job == "both";
  const std::string tok_spec = resolve_tokenizer(cfg, mc);
  std::unique_ptr<io::tokenizer> tok = io::make_tokenizer(tok_spec);

  // Validate prompts before the (possibly long) weight load.
  const std::optional<io::chat_format> chat = do_gen ? prompt_chat_format(cfg) : std::nullopt;
  if (do_gen) load_prompts(cfg, *tok, nullptr, chat);

  // An inference engine whatever the caller's options: no gradients or optimizer state.
  engine::engine_options inference = eo;
  inference.forward_only = true;
  engine::engine e(mc, inference);
  std::printf("model %s: %.3f B parameters, %lld layers; offload %s, %s on %s; tokenizer %s\n", mc.name.c_str(),
              double(mc.total_params()) / 1e9, (long long)mc.num_hidden_layers, engine::offload_mode_name(eo.mode),
              cfg.dtype.c_str(), e.device().name().c_str(), tok->name().c_str());
  if (!cfg.init.empty()) {
    checkpoint::load_hf_weights(e, cfg.init);
    std::printf("weights: %s\n", cfg.init.c_str());
  } else {
    e.params().init_random(cfg.seed, mc.initializer_range);
    std::printf("weights: random (seed %llu; pass --model DIR for a checkpoint)\n", (unsigned long long)cfg.seed);
  }
  e.params_changed();

  eval_result ev;
  int64_t eval_seq_len = 0;
  if (do_eval) {
    FERRY_ASSERT(data != nullptr, "evaluate job without data options");
    io::data_options d = *data;
    d.tokenizer = tok_spec;
    d.packing = false;  // the inference forward runs in chunks, which packed rows cannot; the loss is the same
    io::token_dataset ds = io::token_dataset::open(d);
    ev = evaluate(e, ds, cfg.eval_batches, cfg.batch_size);
    eval_seq_len = ds.seq_len();
    print_eval(ev, eval_seq_len);
  }
  generate_totals gen;
  if (do_gen) gen = run_generate(e, cfg, *tok, chat);
  if (!metrics_json.empty())
    write_metrics_json(metrics_json, cfg, mc, e, do_eval ? &ev : nullptr, eval_seq_len, do_gen ? &gen : nullptr);
  return 0;
}

}  // namespace ferry::infer
