#include "src/io/dataset.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "src/common/error.h"

namespace ferry::io {
namespace {

uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

}  // namespace

int64_t permute_index(int64_t i, int64_t n, uint64_t key) {
  FERRY_ASSERT(i >= 0 && i < n, "permute_index(", i, ", ", n, ")");
  if (n == 1) return 0;
  int half_bits = 1;
  while ((uint64_t(1) << (2 * half_bits)) < static_cast<uint64_t>(n)) ++half_bits;
  const uint64_t mask = (uint64_t(1) << half_bits) - 1;
  const uint64_t k = splitmix64(key);
  uint64_t x = static_cast<uint64_t>(i);
  do {  // cycle walking: the domain is < 4n, so this loops fewer than 4 times on average
    uint64_t l = x >> half_bits, r = x & mask;
    for (uint64_t round = 0; round < 6; ++round) {
      uint64_t f = splitmix64(k ^ (round << 56) ^ r) & mask;
      uint64_t t = r;
      r = l ^ f;
      l = t;
    }
    x = (l << half_bits) | r;
  } while (x >= static_cast<uint64_t>(n));
  return static_cast<int64_t>(x);
}

namespace {

// Evenly spaced held-out indices of [0, n): round(n * fraction) of them (at least 1 when fraction
// > 0 and n >= 2, never all), at floor((2j + 1) n / (2 n_eval)), strictly increasing.
std::vector<char> held_out(int64_t n, double fraction) {
  int64_t n_eval = 0;
  if (fraction > 0 && n >= 2) {
    n_eval = std::llround(static_cast<double>(n) * fraction);
    n_eval = std::min(std::max<int64_t>(n_eval, 1), n - 1);
  }
  std::vector<char> is_eval(static_cast<size_t>(n), 0);
  for (int64_t j = 0; j < n_eval; ++j)
    is_eval[static_cast<size_t>((static_cast<unsigned __int128>(2 * j + 1) * n) / (2 * n_eval))] = 1;
  return is_eval;
}

}  // namespace

token_dataset token_dataset::open(const data_options& opt) {
  FERRY_CONFIG_CHECK(opt.seq_len >= 1, "sequence length must be at least 1, got ", opt.seq_len);
  FERRY_CONFIG_CHECK(opt.eval_fraction >= 0 && opt.eval_fraction < 1, "eval fraction must be in [0, 1), got ",
                     opt.eval_fraction);
  token_dataset d;
  d.seq_len_ = opt.seq_len;
  d.seed_ = opt.seed;
  std::vector<input_file> inputs = list_inputs(opt.paths);
  std::vector<std::string> example_files;
  std::string other;
  bool needs_tokenizer = false;
  for (const auto& in : inputs) {
    if (in.kind == input_kind::input_jsonl && jsonl_holds_examples(in.path)) example_files.push_back(in.path);
    else if (other.empty()) other = in.path;
    needs_tokenizer |= in.kind == input_kind::input_text || in.kind == input_kind::input_jsonl;
  }
  if (!example_files.empty()) {
    FERRY_CONFIG_CHECK(other.empty(), "the data mixes instruction/chat examples (", example_files.front(),
                       ") with plain text or tokens (", other, "); train on one kind at a time");
    d.open_examples(opt, example_files);
    return d;
  }
  if (needs_tokenizer) d.tok_ = make_tokenizer(opt.tokenizer);
  d.stream_ = std::make_unique<token_stream>(token_stream::build(inputs, d.tok_.get(), opt.vocab_limit));

  const int64_t len = d.stream_->size();
  std::string listed = opt.paths.front() + (opt.paths.size() > 1 ? " and the other inputs" : "");
  FERRY_CHECK(len > 0, "the dataset is empty: ", listed, " hold no text or tokens; check the data paths");
  const int64_t t = opt.seq_len;
  int64_t n = (len - 1) / t;
  if (n == 0) {
    std::fprintf(stderr,
                 "warning: the data (%lld tokens) is shorter than one sequence of %lld + 1 tokens; it is repeated "
                 "to fill one sequence. Use a shorter max_length or more data.\n",
                 static_cast<long long>(len), static_cast<long long>(t));
    n = 1;
  }
  const std::vector<char> is_eval = held_out(n, opt.eval_fraction);
  for (int64_t s = 0; s < n; ++s) (is_eval[size_t(s)] ? d.eval_ids_ : d.train_ids_).push_back(s);
  return d;
}

void token_dataset::open_examples(const data_options& opt, const std::vector<std::string>& files) {
  FERRY_CONFIG_CHECK(opt.seq_len >= 2, "instruction/chat examples need max_length >= 2, got ", opt.seq_len);
  tok_ = make_tokenizer(opt.tokenizer);
  FERRY_CONFIG_CHECK(opt.vocab_limit <= 0 || tok_->vocab_size() <= opt.vocab_limit, "tokenizer ", tok_->name(),
                     " has ", tok_->vocab_size(), " tokens but the model's vocabulary has only ", opt.vocab_limit,
                     "; use a model with vocab_size >= ", tok_->vocab_size(), " or a smaller tokenizer");
  example_options eo;
  eo.chat_template = opt.chat_template;
  eo.template_dir = opt.template_dir;
  eo.max_length = opt.seq_len;
  eo.long_examples = parse_long_example_policy(opt.long_examples);
  eo.skip_invalid = opt.skip_invalid_examples;
  examples_ = std::make_unique<example_set>(example_set::load(files, *tok_, eo));
  packed_ = opt.packing;
  pad_id_ = tok_->eos_id() >= 0 ? tok_->eos_id() : 0;

  // Examples are held out whole; each split is grouped into sequences on its own.
  const int64_t n = examples_->size();
  const std::vector<char> is_eval = held_out(n, opt.eval_fraction);
  std::vector<int64_t> split[2];
  for (int64_t i = 0; i < n; ++i) split[is_eval[size_t(i)] ? 1 : 0].push_back(i);
  seq_offsets_ = {0};
  for (int part = 0; part < 2; ++part) {
    std::vector<std::vector<int64_t>> groups;
    if (packed_) {
      std::vector<int64_t> lengths;
      for (int64_t e : split[part]) lengths.push_back(examples_->length(e));
      groups = pack_best_fit(lengths, opt.seq_len);
      for (auto& g : groups)
        for (int64_t& k : g) k = split[part][size_t(k)];
    } else {
      for (int64_t e : split[part]) groups.push_back({e});
    }
    for (const auto& g : groups) {
      (part == 0 ? train_ids_ : eval_ids_).push_back(static_cast<int64_t>(seq_offsets_.size()) - 1);
      members_.insert(members_.end(), g.begin(), g.end());
      seq_offsets_.push_back(static_cast<int64_t>(members_.size()));
    }
  }
}

int64_t token_dataset::train_sequence_at(int64_t cursor) const {
  FERRY_ASSERT(cursor >= 0, "negative data cursor ", cursor);
  const int64_t n = num_train();
  const int64_t epoch = cursor / n;
  return train_ids_[static_cast<size_t>(permute_index(cursor % n, n, seed_ + static_cast<uint64_t>(epoch)))];
}

void token_dataset::train_batch(int64_t cursor, int64_t batch, int64_t* out) const {
  FERRY_ASSERT(stream_, "train_batch reads a text stream; examples are read with train_rows");
  const int64_t t1 = seq_len_ + 1;
  for (int64_t b = 0; b < batch; ++b) stream_->read(train_sequence_at(cursor + b) * seq_len_, t1, out + b * t1);
}

void token_dataset::eval_sequence(int64_t i, int64_t* out) const {
  FERRY_ASSERT(stream_, "eval_sequence reads a text stream; examples are read with eval_rows");
  FERRY_ASSERT(i >= 0 && i < num_eval(), "eval sequence ", i, " of ", num_eval());
  stream_->read(eval_ids_[static_cast<size_t>(i)] * seq_len_, seq_len_ + 1, out);
}

void token_dataset::write_row(int64_t sequence, int64_t row, const batch_rows& out, int64_t& used) const {
  const int64_t T = seq_len_;
  int64_t* in = out.inputs + row * T;
  int64_t* lab = out.labels + row * T;
  int64_t* pos = out.positions + row * T;
  if (stream_) {
    std::vector<int64_t> tokens(size_t(T + 1));
    stream_->read(sequence * T, T + 1, tokens.data());
    std::copy(tokens.begin(), tokens.end() - 1, in);
    std::copy(tokens.begin() + 1, tokens.end(), lab);
    for (int64_t t = 0; t < T; ++t) pos[t] = t;
    used = T;
    return;
  }
  int64_t at = 0;
  for (int64_t m = seq_offsets_[size_t(sequence)]; m < seq_offsets_[size_t(sequence) + 1]; ++m) {
    const int64_t e = members_[size_t(m)], len = examples_->length(e);
    const int32_t* ids = examples_->ids(e);
    const uint8_t* trained = examples_->trained(e);
    FERRY_ASSERT(at + len <= T, "sequence ", sequence, " holds more than ", T, " tokens");
    for (int64_t j = 0; j < len; ++j) {
      in[at + j] = ids[j];
      lab[at + j] = j + 1 < len && trained[j + 1] ? ids[j + 1] : -100;
      pos[at + j] = j;
    }
    at += len;
  }
  used = std::max(used, at);
  for (int64_t t = at; t < T; ++t) {  // padding: never a target; its own run of positions when packed
    in[t] = pad_id_;
    lab[t] = -100;
    pos[t] = t - at;
  }
}

namespace {
int64_t columns_to_keep(int64_t used, int64_t seq_len) { return std::min(seq_len, (used + 7) / 8 * 8); }
}  // namespace

int64_t token_dataset::train_rows(int64_t cursor, int64_t batch, const batch_rows& out) const {
  int64_t used = 0;
  for (int64_t b = 0; b < batch; ++b) write_row(train_sequence_at(cursor + b), b, out, used);
  return columns_to_keep(used, seq_len_);
}

int64_t token_dataset::eval_rows(int64_t first, int64_t count, const batch_rows& out) const {
  FERRY_ASSERT(first >= 0 && first + count <= num_eval(), "eval sequences [", first, ", ", first + count, ") of ",
               num_eval());
  int64_t used = 0;
  for (int64_t b = 0; b < count; ++b) write_row(eval_ids_[size_t(first + b)], b, out, used);
  return columns_to_keep(used, seq_len_);
}

}  // namespace ferry::io
