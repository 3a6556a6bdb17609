#pragma once
// The training loop around the engine: data, learning-rate schedule, gradient accumulation,
// logging (stdout line, metrics.jsonl, TensorBoard), evaluation, checkpoints, resume, signals.
#include <string>

#include "src/engine/options.h"
#include "src/io/dataset.h"
#include "src/io/run_config.h"
#include "src/model/llama_config.h"

namespace ferry::train {

// Runs training. Returns the process exit code: 0, or 130 / 143 after SIGINT / SIGTERM (the
// current step finished and a checkpoint written).
int run_training(const io::run_config& cfg, const model::llama_config& model_cfg, const engine::engine_options& eo,
                 const io::data_options& data);

// Model FLOPs per token for forward + backward (6 N + 12 L h T, non-embedding N), for MFU.
double flops_per_token(const model::llama_config& cfg, int64_t seq);
// Dense fp16/bf16 tensor-core peak of a named card in FLOP/s, 0 when unknown.
double peak_flops(const std::string& device_name, bool half);

}  // namespace ferry::train
