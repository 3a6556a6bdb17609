#pragma once
// Evaluation: mean cross-entropy and perplexity over held-out sequences of a token dataset (the
// training data formats), in batches, each batch one engine::evaluate pass (the forward half of
// the training step: streamed blocks, then the chunked head loss; no (B, T, V) logits).
#include <cstdint>

#include "src/engine/engine.h"
#include "src/io/dataset.h"

namespace ferry::infer {

struct eval_result {
  double loss = 0;          // mean over target tokens
  double perplexity = 0;    // exp(loss)
  int64_t sequences = 0, tokens = 0;
  double ms = 0;
  bool from_train_split = false;  // the dataset had no evaluation sequences
  int64_t gpu_alloc_peak = 0;
  double tokens_per_s() const { return ms > 0 ? double(tokens) / (ms / 1e3) : 0; }
};

// Up to batches x batch_size evaluation sequences (all of them when fewer), or training
// sequences in order when the dataset holds out none.
eval_result evaluate(engine::engine& e, const io::token_dataset& data, int64_t batches, int64_t batch_size);

}  // namespace ferry::infer
