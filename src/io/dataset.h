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
//
// Instruction and chat examples (.jsonl files of prompt/completion or messages lines, examples.h)
// are not a stream: each example is held out or trained as a whole (the same evenly spaced split,
// over examples), and a sequence is one example padded to its end (packing off) or several packed
// by best-fit decreasing into seq_len tokens, once at load, training and evaluation examples
// apart (packing on). Labels are -100 except where a trained token is the target, and on padding;
// in packed rows the positions restart at 0 for each example (and for the padding after the last).
// Every input must be of one kind: text and examples are not mixed.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "src/io/examples.h"
#include "src/io/token_stream.h"

namespace ferry::io {

struct data_options {
  std::vector<std::string> paths;
  std::string tokenizer = "byte";  // see make_tokenizer
  int64_t seq_len = 4096;
  uint64_t seed = 0;
  double eval_fraction = 0.01;
  int64_t vocab_limit = 0;  // the model's vocabulary: error if the tokenizer or a token file exceeds it; 0: no check
  // Instruction and chat examples (examples.h); seq_len is their max_length.
  std::string chat_template = "auto";
  std::string template_dir;  // where chat_template=auto reads tokenizer_config.json
  bool packing = false;
  std::string long_examples = "truncate";  // truncate | drop | error
  bool skip_invalid_examples = false;
};

// The rows of a micro-batch as the dataset writes them: (rows, seq_len) int64 row-major buffers
// the caller owns.
struct batch_rows {
  int64_t* inputs;     // token ids (padding: EOS, or 0 without a tokenizer)
  int64_t* labels;     // the target of each input position, -100 where nothing is trained
  int64_t* positions;  // the rotary position of each token
};

class token_dataset {
 public:
  static token_dataset open(const data_options& opt);

  int64_t num_train() const { return static_cast<int64_t>(train_ids_.size()); }
  int64_t num_eval() const { return static_cast<int64_t>(eval_ids_.size()); }
  int64_t seq_len() const { return seq_len_; }
  int64_t num_tokens() const { return examples_ ? examples_->num_tokens() : stream_->size(); }
  const tokenizer* tok() const { return tok_.get(); }  // null when every input was a token file
  // Instruction/chat examples rather than a text stream; then packed() says whether rows are packed.
  bool has_examples() const { return examples_ != nullptr; }
  bool packed() const { return packed_; }
  const example_set* examples() const { return examples_.get(); }

  // Writes rows b in [0, batch) with training sequences number cursor, cursor+1, ... in the
  // shuffled order; cursor counts sequences since the start of training and crosses epochs
  // (epoch = cursor / num_train()). Returns how many leading columns to keep: the longest row
  // rounded up to a multiple of 8, at most seq_len (seq_len for a text stream); beyond them every
  // row is padding. Thread-safe.
  int64_t train_rows(int64_t cursor, int64_t batch, const batch_rows& out) const;
  // The same for evaluation sequences first, first+1, ... (< num_eval()).
  int64_t eval_rows(int64_t first, int64_t count, const batch_rows& out) const;

  // A text stream's sequences as T+1 tokens (inputs [:-1], labels [1:]): out[b*(T+1) + t] for b
  // in [0, batch), in the order of train_rows; and evaluation sequence i in out[0..T].
  void train_batch(int64_t cursor, int64_t batch, int64_t* out) const;
  void eval_sequence(int64_t i, int64_t* out) const;

  // Stream index of the sequence at training position `cursor` (exposed for tests).
  int64_t train_sequence_at(int64_t cursor) const;

 private:
  void open_examples(const data_options& opt, const std::vector<std::string>& files);
  // Writes sequence `sequence` into row `row` of out; raises used to the columns it fills.
  void write_row(int64_t sequence, int64_t row, const batch_rows& out, int64_t& used) const;

  std::unique_ptr<tokenizer> tok_;
  std::unique_ptr<token_stream> stream_;     // a text stream, or
  std::unique_ptr<example_set> examples_;    // examples, in sequences of
  std::vector<int64_t> seq_offsets_;         //   members_[seq_offsets_[s] .. seq_offsets_[s+1])
  std::vector<int64_t> members_;             //   example indices
  bool packed_ = false;
  int64_t pad_id_ = 0;
  int64_t seq_len_ = 0;
  uint64_t seed_ = 0;
  std::vector<int64_t> train_ids_, eval_ids_;
};

// Data-parallel ranks: the global batch of a micro-batch at `cursor` is the world * batch
// sequences cursor .. cursor + world*batch - 1 (what one rank with batch world*batch reads); rank
// r reads the batch of them starting here, and the cursor then moves by world * batch. So the
// sequences of a step depend only on the seed and the step, whatever the world size.
inline int64_t rank_cursor(int64_t cursor, int64_t batch, int rank) { return cursor + int64_t(rank) * batch; }

// A bijection of [0, n) keyed by `key` (a 6-round Feistel network with cycle walking): the
// epoch shuffle, without storing a permutation.
int64_t permute_index(int64_t i, int64_t n, uint64_t key);

}  // namespace ferry::io
