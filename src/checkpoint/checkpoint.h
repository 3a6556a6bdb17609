#pragma once
// Checkpoints, below both the training loop and inference: train saves and resumes them, infer
// and the tools read their weights. Layout of <output_dir>/checkpoint-<step>/:
//   config.json, model.safetensors       the model in HF form (loadable by transformers and ferry-infer)
//   optimizer.safetensors                fp32 master weights per HF name, and the AdamW moments in
//                                        the engine's optimizer_state kind:
//                                          fp32  <name>.exp_avg, <name>.exp_avg_sq (F32, the param's shape)
//                                          bf16  optimizer.unit<U>.exp_avg, .exp_avg_sq (BF16, [numel of unit U])
//                                          int8  optimizer.unit<U>.exp_avg (I8), .exp_avg_sq (U8), and
//                                                .exp_avg.scale, .exp_avg_sq.scale (F32, [quant blocks of U])
//                                        (units: param_store.h; compact moments are saved per unit, as
//                                        their int8 blocks span parameters)
//   trainer_state.json                   step, loss scaler, data cursor, seed, speculation history,
//                                        optimizer_state, the resolved run config
//   tokenizer.model                      when training used a sentencepiece tokenizer
//   tokenizer.json (+ tokenizer_config.json) when training used an HF tokenizer.json (and its config)
// A checkpoint is written into ".checkpoint-<step>.tmp" beside its target, every file fsynced,
// then renamed into place; only then is <output_dir>/latest (a one-line file naming it) replaced
// atomically and older checkpoints beyond keep_last removed. A half-written checkpoint is never
// named by latest and never matches the checkpoint-* pattern that resume searches.
//
// Ranks (engine_options::comm with world N > 1; output_dir shared by the ranks): the same directory
// and commit, with the optimizer state in one file per rank instead of optimizer.safetensors:
//   optimizer-rank<R>-of-<N>.safetensors rank R's shard of every unit (shard_layout), written by rank R:
//                                        unit<U>.master (F32), unit<U>.exp_avg, unit<U>.exp_avg_sq (F32,
//                                        BF16, or I8/U8 with unit<U>.exp_avg.scale, .exp_avg_sq.scale F32
//                                        over the shard's own quant blocks), each [elements of the shard];
//                                        a unit whose shard is empty has no tensors
//   shards.json                          the manifest (rank 0): format, world_size, optimizer_state,
//                                        unit_numel, and per rank its file and (begin, count) of each unit
//   config.json, model.safetensors       rank 0, from the masters all-gathered unit by unit (the same
//                                        bytes one rank would write)
//   trainer_state.json, tokenizer files  rank 0, as above
// Every rank writes its part into the temporary directory rank 0 made; then every rank says
// whether its part is complete (an all-reduce on the engine's channel) and rank 0 renames only when
// all are; a rank that failed or died leaves the previous checkpoint and latest untouched (the
// others stop with a line saying which). Any world loads any checkpoint: each rank reads the pieces
// of the saved shards (or of the one-rank file's parameters) that cover its own shards. fp32 and
// bf16 moments arrive bit for bit; int8 moments are decoded and encoded again when the world (so
// the quant blocks) changed.
#include <cstdint>
#include <string>
#include <vector>

#include "src/engine/engine.h"

namespace ferry::checkpoint {

// The trainer's own state; the engine's (engine::engine_state: AdamW's step count, the loss
// scaler, recent fix-ups) and its weights and moments are saved and restored whole from the engine.
struct trainer_state {
  int64_t step = 0;              // optimizer steps taken
  int64_t data_cursor = 0;       // training sequences consumed
  uint64_t seed = 0;
  std::string run_config_json;   // the resolved run config, for the record
  std::string model_name;
  // The optimizer_state kind of the checkpoint's moments (load: as saved, "fp32" for checkpoints that
  // predate the key; save writes the engine's kind whatever this says).
  std::string optimizer_state = "fp32";
};

// Saves engine state (with ranks: every rank calls it at the same step; collectives) (waits for pending updates and the tier's write-backs first; a failed one
// throws and nothing is saved). The tier's state is read unit by unit in each file's order, one unit
// leased at a time, so a tier on disk (optimizer_state_on=nvme) streams through its few buffers;
// the files are the same bytes whatever the tier. Returns the checkpoint directory. Training
// engines only (a forward_only engine has no optimizer state: error).
std::string save_checkpoint(engine::engine& e, const trainer_state& st, const std::string& output_dir,
                            int64_t keep_last, const std::string& tokenizer_model = "");  // "" or its file

// Resolves "latest" (or a directory) to a checkpoint directory; throws config_error when absent.
std::string resolve_checkpoint(const std::string& spec, const std::string& output_dir);

// Loads weights, moments and trainer state into e (which must have the checkpoint's shape), then
// refreshes the device copies. Streams tensors from the memory-mapped files straight into the
// parameter store, unit by unit (a tier on disk holds one unit at a time; any tier loads any
// checkpoint). Moments of the engine's kind are copied bit for bit; moments of another kind are
// decoded to fp32 and encoded into the engine's (cpu_optim::decode_moments / encode_moments), and
// the returned optimizer_state names the checkpoint's kind so the caller can say so. Throws
// ferry::error naming the file (and tensor) for a corrupt or mismatched checkpoint, and for a
// forward_only engine.
trainer_state load_checkpoint(engine::engine& e, const std::string& dir);

// Loads only model weights from an HF checkpoint directory (fine-tuning start); with ranks every
// rank reads the weights and keeps its shards.
void load_hf_weights(engine::engine& e, const std::string& dir);

}  // namespace ferry::checkpoint
