#pragma once
// ferry-infer's body once the command line is resolved: tokenizer, engine, weights, then the
// evaluate and/or generate job, printing results and throughput to stdout (and, with
// --metrics-json, the same figures as JSON for scripts).
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "src/engine/options.h"
#include "src/io/chat_template.h"
#include "src/io/dataset.h"
#include "src/io/run_config.h"
#include "src/io/tokenizer.h"
#include "src/model/llama_config.h"

namespace ferry::infer {

// The tokenizer for a run: io::resolve_run_tokenizer with the model directory (--model, else a
// --model-config directory) as the checkpoint: an explicit tokenizer key wins, and must then match
// the checkpoint model's vocabulary; otherwise the directory's tokenizer.json, else its
// tokenizer.model, when present; otherwise "byte". Throws config_error when the tokenizer file is
// missing or its vocabulary exceeds the model's (ferry::error for a file make_tokenizer cannot
// read). Returns the spec make_tokenizer took.
std::string resolve_tokenizer(const io::run_config& cfg, const model::llama_config& mc);

// cfg.chat: the chat template prompts are rendered with (chat_template, auto: the format of the model
// directory's tokenizer_config.json; config_error when it names none ferry renders); nullopt without chat.
std::optional<io::chat_format> prompt_chat_format(const io::run_config& cfg);

// Prompts from cfg.prompt, cfg.prompt_file (one per non-empty line) or the built-in default,
// encoded as BOS + tokens (tokens alone when the tokenizer has no BOS), or, with a chat format, as
// the tokens of io::render_generation_prompt of [system (cfg.system_prompt, when set), user (the
// prompt)]. Throws config_error for a prompt longer than cfg.max_length, or one with no tokens at
// all (ferry::error for a template token the tokenizer lacks).
std::vector<std::vector<int64_t>> load_prompts(const io::run_config& cfg, const io::tokenizer& tok,
                                               std::vector<std::string>* texts,
                                               std::optional<io::chat_format> chat = std::nullopt);

// data may be null when the job does not evaluate. The engine is built forward_only (an inference
// engine) whatever eo says. metrics_json: "" or a file that receives one JSON object once the jobs
// are done (written to a temporary name, then renamed): model, params, offload, dtype, device,
// job, batch_size, and per job that ran
//   "evaluate": sequences, seq_len, tokens (targets), loss, perplexity, ms, tokens_per_s, gpu_alloc_peak,
//               from_train_split;
//   "generate": prompts, max_new_tokens (asked per prompt), prompt_tokens, new_tokens (summed over rows,
//               each up to its EOS), steps, prefill_ms, decode_ms, tokens_per_s, kv_cache_bytes, gpu_alloc_peak
// (gpu_alloc_peak is 0 on the host backend). Returns the process exit code.
int run_inference(const io::run_config& cfg, const model::llama_config& mc, const engine::engine_options& eo,
                  const io::data_options* data, const std::string& metrics_json);

}  // namespace ferry::infer
