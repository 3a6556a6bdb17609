#pragma once
// Turns a resolved run config into what the layers below take: the model shape, the engine's
// options, the data options. The only place that knows all three.
#include <string>

#include "src/engine/options.h"
#include "src/io/dataset.h"
#include "src/io/run_config.h"
#include "src/model/llama_config.h"

namespace ferry::cli {

// The model shape: from `init` (a checkpoint dir) when model was not set explicitly, else from
// the model key (NAME, config.json or directory).
model::llama_config resolve_model(const io::run_config& cfg);
engine::engine_options engine_options_for(const io::run_config& cfg, const model::llama_config& mc);
// ferry-infer's engine: engine_options_for plus forward_only (no gradients or optimizer state), a
// rotary table of max_length positions (the longest evaluated sequence or prompt + new tokens),
// and, unless ce_chunk was set, kInferCeChunk logit rows per loss chunk.
constexpr int64_t kInferCeChunk = 512;
engine::engine_options inference_options_for(const io::run_config& cfg, const model::llama_config& mc);
// data "" is the embedded default corpus: the licence texts every Debian/Ubuntu system carries.
io::data_options data_options_for(const io::run_config& cfg, const model::llama_config& mc);
std::string default_corpus();
// tokenizer=spm:N: the path of a sentencepiece model of N pieces trained on the default corpus
// (trained and cached on first use).
std::string default_subword_tokenizer(const std::string& spec);

// --dry-run: the resolved config and the memory plan, printed to stdout.
void print_dry_run(const io::run_config& cfg, const model::llama_config& mc, const engine::engine_options& eo);
// --plan-json FILE: the same plan as print_dry_run, every figure in bytes, plus the model shape and
// the run's offload/dtype/batch/seq, as one JSON object (read by scripts/find_largest_model.sh).
void write_plan_json(const std::string& path, const io::run_config& cfg, const model::llama_config& mc,
                     const engine::engine_options& eo);

}  // namespace ferry::cli
