#include "src/io/dataset.h"

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

token_dataset token_dataset::open(const data_options& opt) {
  FERRY_CONFIG_CHECK(opt.seq_len >= 1, "sequence length must be at least 1, got ", opt.seq_len);
  FERRY_CONFIG_CHECK(opt.eval_fraction >= 0 && opt.eval_fraction < 1, "eval fraction must be in [0, 1), got ",
                     opt.eval_fraction);
  token_dataset d;
  d.seq_len_ = opt.seq_len;
  d.seed_ = opt.seed;
  std::vector<input_file> inputs = list_inputs(opt.paths);
  bool needs_tokenizer = false;
  for (const auto& in : inputs)
    needs_tokenizer |= in.kind == input_kind::input_text || in.kind == input_kind::input_jsonl;
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
  int64_t n_eval = 0;
  if (opt.eval_fraction > 0 && n >= 2) {
    n_eval = std::llround(static_cast<double>(n) * opt.eval_fraction);
    n_eval = std::min(std::max<int64_t>(n_eval, 1), n - 1);
  }
  // Evenly spaced held-out sequences: floor((2j + 1) n / (2 n_eval)), strictly increasing.
  std::vector<char> is_eval(static_cast<size_t>(n), 0);
  for (int64_t j = 0; j < n_eval; ++j) {
    int64_t s = static_cast<int64_t>((static_cast<unsigned __int128>(2 * j + 1) * n) / (2 * n_eval));
    is_eval[static_cast<size_t>(s)] = 1;
    d.eval_ids_.push_back(s);
  }
  d.train_ids_.reserve(static_cast<size_t>(n - n_eval));
  for (int64_t s = 0; s < n; ++s)
    if (!is_eval[static_cast<size_t>(s)]) d.train_ids_.push_back(s);
  return d;
}

int64_t token_dataset::train_sequence_at(int64_t cursor) const {
  FERRY_ASSERT(cursor >= 0, "negative data cursor ", cursor);
  const int64_t n = num_train();
  const int64_t epoch = cursor / n;
  return train_ids_[static_cast<size_t>(permute_index(cursor % n, n, seed_ + static_cast<uint64_t>(epoch)))];
}

void token_dataset::train_batch(int64_t cursor, int64_t batch, int64_t* out) const {
  const int64_t t1 = seq_len_ + 1;
  for (int64_t b = 0; b < batch; ++b) stream_->read(train_sequence_at(cursor + b) * seq_len_, t1, out + b * t1);
}

void token_dataset::eval_sequence(int64_t i, int64_t* out) const {
  FERRY_ASSERT(i >= 0 && i < num_eval(), "eval sequence ", i, " of ", num_eval());
  stream_->read(eval_ids_[static_cast<size_t>(i)] * seq_len_, seq_len_ + 1, out);
}

}  // namespace ferry::io
