#pragma once
// Training data: every input becomes one token stream (see token_stream.h for the accepted file
// kinds: text, JSONL with "text", llm.c token files, headerless uint16 nanoGPT .bin), cut into
// sequences of seq_len + 1 tokens where sequence i covers stream positions [i*T, i*T + T]
// (consecutive sequences share one token, so every token is a target exactly once).
//
// Split: round(n * eval_fraction) sequences (at least 1 when eval_fraction > 0 and n >= 2, never
// all) are held out for evaluation, evenly spaced through the stream and independent of the seed,
// so runs with different seeds evaluate on the same data. Training order is a keyed pseudo-random
// permutation of the remaining sequences, a different one each epoch (key seed + epoch); it is a
// pure function of (seed, epoch, position), so resuming at any cursor is exact and cheap.
//
// A corpus shorter than seq_len + 1 tokens gives one training sequence that wraps around the
// stream (repeat-packing), with a warning on stderr; an empty corpus is an error.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "src/io/token_stream.h"

namespace ferry::io {

struct data_options {
  std::vector<std::string> paths;
  std::string tokenizer = "byte";  // see make_tokenizer
  int64_t seq_len = 4096;
  uint64_t seed = 0;
  double eval_fraction = 0.01;
  int64_t vocab_limit = 0;  // the model's vocabulary: error if the tokenizer or a token file exceeds it; 0: no check
};

class token_dataset {
 public:
  static token_dataset open(const data_options& opt);

  int64_t num_train() const { return static_cast<int64_t>(train_ids_.size()); }
  int64_t num_eval() const { return static_cast<int64_t>(eval_ids_.size()); }
  int64_t seq_len() const { return seq_len_; }
  int64_t num_tokens() const { return stream_->size(); }
  const tokenizer* tok() const { return tok_.get(); }  // null when every input was a token file

  // Fills out[b*(T+1) + t] for b in [0, batch) with training sequences number cursor, cursor+1,
  // ... in the shuffled order; cursor counts sequences since the start of training and crosses
  // epochs (epoch = cursor / num_train()). Thread-safe.
  void train_batch(int64_t cursor, int64_t batch, int64_t* out) const;
  // Fills out[0..T] with evaluation sequence i in [0, num_eval()).
  void eval_sequence(int64_t i, int64_t* out) const;

  // Stream index of the sequence at training position `cursor` (exposed for tests).
  int64_t train_sequence_at(int64_t cursor) const;

 private:
  std::unique_ptr<tokenizer> tok_;
  std::unique_ptr<token_stream> stream_;
  int64_t seq_len_ = 0;
  uint64_t seed_ = 0;
  std::vector<int64_t> train_ids_, eval_ids_;
};

// A bijection of [0, n) keyed by `key` (a 6-round Feistel network with cycle walking): the
// epoch shuffle, without storing a permutation.
int64_t permute_index(int64_t i, int64_t n, uint64_t key);

}  // namespace ferry::io
