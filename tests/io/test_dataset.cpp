// Datasets: each input format, packing, seeded shuffling, the eval split, short and empty corpora,
// vocabulary overflow, JSONL errors, and the ferry-tokenize tool.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <set>

#include "src/io/dataset.h"
#include "tests/io/io_test_util.h"
#include "tests/io/sp_test_model.h"

namespace ferry::io {
namespace {
namespace fs = std::filesystem;
using test::scratch_dir;

// The byte tokenizer's stream for documents: bytes + 3, EOS (2) after each.
std::vector<int64_t> byte_stream(const std::vector<std::string>& docs) {
  std::vector<int64_t> s;
  for (const auto& d : docs) {
    for (unsigned char c : d) s.push_back(3 + c);
    s.push_back(2);
  }
  return s;
}

std::string llmc_file(const std::vector<uint32_t>& tokens, int version, int64_t declared = -1) {
  int32_t h[256] = {};
  h[0] = 20240520;
  h[1] = version;
  h[2] = static_cast<int32_t>(declared < 0 ? static_cast<int64_t>(tokens.size()) : declared);
  std::string s(reinterpret_cast<const char*>(h), sizeof h);
  for (uint32_t t : tokens) s.append(reinterpret_cast<const char*>(&t), version == 1 ? 2 : 4);
  return s;
}

std::string u16_file(const std::vector<uint16_t>& tokens) {
  return std::string(reinterpret_cast<const char*>(tokens.data()), tokens.size() * 2);
}

// The stream reconstructed from sequences indexed by their stream position.
void expect_tiles_stream(const token_dataset& d, const std::vector<int64_t>& stream) {
  const int64_t t = d.seq_len();
  const int64_t n = d.num_train() + d.num_eval();
  ASSERT_EQ(n, (static_cast<int64_t>(stream.size()) - 1) / t);
  std::set<int64_t> seen;
  for (int64_t c = 0; c < d.num_train(); ++c) {
    int64_t s = d.train_sequence_at(c);
    EXPECT_TRUE(seen.insert(s).second) << "sequence " << s << " twice in one epoch";
    std::vector<int64_t> row(static_cast<size_t>(t + 1));
    d.train_batch(c, 1, row.data());
    for (int64_t k = 0; k <= t; ++k) ASSERT_EQ(row[k], stream[s * t + k]) << "seq " << s << " token " << k;
  }
  EXPECT_EQ(static_cast<int64_t>(seen.size()), d.num_train());
}

TEST(dataset, text_file_packing) {
  scratch_dir dir;
  test::write_bytes(dir / "a.txt", "hello world, this is ferry.");
  data_options o;
  o.paths = {dir / "a.txt"};
  o.seq_len = 5;
  o.eval_fraction = 0;
  auto d = token_dataset::open(o);
  auto stream = byte_stream({"hello world, this is ferry."});
  EXPECT_EQ(d.num_tokens(), static_cast<int64_t>(stream.size()));
  EXPECT_EQ(d.num_train(), (static_cast<int64_t>(stream.size()) - 1) / 5);
  EXPECT_EQ(d.num_eval(), 0);
  expect_tiles_stream(d, stream);
}

TEST(dataset, folder_recursive_sorted_skips_hidden) {
  scratch_dir dir;
  test::write_bytes(dir / "data/b.txt", "bbb");
  test::write_bytes(dir / "data/a/c.txt", "cc");
  test::write_bytes(dir / "data/.hidden", "xxxxxxxx");
  test::write_bytes(dir / "data/.git/objects", "yyyyyyyy");
  data_options o;
  o.paths = {dir / "data"};
  o.seq_len = 2;
  o.eval_fraction = 0;
  auto d = token_dataset::open(o);
  auto stream = byte_stream({"cc", "bbb"});  // data/a/c.txt sorts before data/b.txt
  EXPECT_EQ(d.num_tokens(), 7);
  expect_tiles_stream(d, stream);
}

TEST(dataset, jsonl) {
  scratch_dir dir;
  test::write_bytes(dir / "d.jsonl", "{\"text\": \"ab\", \"id\": 1}\n\n{\"text\": \"\\u00e9x\"}\r\n{\"text\": \"\"}\n");
  data_options o;
  o.paths = {dir / "d.jsonl"};
  o.seq_len = 2;
  o.eval_fraction = 0;
  auto d = token_dataset::open(o);
  expect_tiles_stream(d, byte_stream({"ab", "\xc3\xa9x"}));
}

TEST(dataset, jsonl_errors_name_file_and_line) {
  scratch_dir dir;
  test::write_bytes(dir / "bad.jsonl", "{\"text\": \"ok\"}\n\n{\"text\": \"unterminated}\n");
  data_options o;
  o.paths = {dir / "bad.jsonl"};
  EXPECT_ERROR_HAS(token_dataset::open(o), (dir / "bad.jsonl:3").c_str(), "not valid JSON");
  test::write_bytes(dir / "nofield.jsonl", "{\"text\": \"ok\"}\n{\"body\": \"x\"}\n");
  o.paths = {dir / "nofield.jsonl"};
  EXPECT_ERROR_HAS(token_dataset::open(o), (dir / "nofield.jsonl:2").c_str(), "no \"text\" field");
  test::write_bytes(dir / "num.jsonl", "{\"text\": 5}\n");
  o.paths = {dir / "num.jsonl"};
  EXPECT_ERROR_HAS(token_dataset::open(o), "num.jsonl:1", "not a string");
}

TEST(dataset, llmc_token_files) {
  scratch_dir dir;
  std::vector<uint32_t> toks;
  for (uint32_t i = 0; i < 50; ++i) toks.push_back((i * 37) % 1000);
  test::write_bytes(dir / "v1.bin", llmc_file(toks, 1));
  std::vector<uint32_t> big = {70000, 5, 100000, 7};
  test::write_bytes(dir / "v2.tok", llmc_file(big, 2));  // recognised by magic, whatever the extension
  data_options o;
  o.paths = {dir / "v1.bin", dir / "v2.tok"};
  o.seq_len = 8;
  o.eval_fraction = 0;
  o.tokenizer = "/nonexistent";  // never loaded: no text input
  auto d = token_dataset::open(o);
  std::vector<int64_t> stream(toks.begin(), toks.end());
  stream.insert(stream.end(), big.begin(), big.end());
  EXPECT_EQ(d.tok(), nullptr);
  expect_tiles_stream(d, stream);

  test::write_bytes(dir / "cut.bin", llmc_file(toks, 1, 60));
  o.paths = {dir / "cut.bin"};
  EXPECT_ERROR_HAS(token_dataset::open(o), "cut.bin", "announces 60 tokens", "truncated");
  test::write_bytes(dir / "ver.bin", llmc_file(toks, 3));
  o.paths = {dir / "ver.bin"};
  EXPECT_ERROR_HAS(token_dataset::open(o), "ver.bin", "version 3");
}

TEST(dataset, nanogpt_uint16_bin) {
  scratch_dir dir;
  std::vector<uint16_t> toks;
  for (uint16_t i = 0; i < 33; ++i) toks.push_back(static_cast<uint16_t>(50000 + i));
  test::write_bytes(dir / "train.bin", u16_file(toks));
  data_options o;
  o.paths = {dir / "train.bin"};
  o.seq_len = 4;
  o.eval_fraction = 0;
  auto d = token_dataset::open(o);
  expect_tiles_stream(d, std::vector<int64_t>(toks.begin(), toks.end()));
  test::write_bytes(dir / "odd.bin", "abc");
  o.paths = {dir / "odd.bin"};
  EXPECT_ERROR_HAS(token_dataset::open(o), "odd.bin", "even size");
}

TEST(dataset, mixed_inputs_in_order) {
  scratch_dir dir;
  test::write_bytes(dir / "a.txt", "xy");
  test::write_bytes(dir / "b.bin", u16_file({7, 8, 9}));
  test::write_bytes(dir / "c.jsonl", "{\"text\": \"z\"}\n");
  data_options o;
  o.paths = {dir / "a.txt", dir / "b.bin", dir / "c.jsonl"};
  o.seq_len = 1;
  o.eval_fraction = 0;
  auto d = token_dataset::open(o);
  expect_tiles_stream(d, {3 + 'x', 3 + 'y', 2, 7, 8, 9, 3 + 'z', 2});
}

TEST(dataset, shuffle_is_seeded_and_per_epoch) {
  scratch_dir dir;
  std::vector<uint16_t> toks(4001);
  for (size_t i = 0; i < toks.size(); ++i) toks[i] = static_cast<uint16_t>(i % 60000);
  test::write_bytes(dir / "t.bin", u16_file(toks));
  data_options o;
  o.paths = {dir / "t.bin"};
  o.seq_len = 10;
  o.eval_fraction = 0.05;
  o.seed = 42;
  auto a = token_dataset::open(o), b = token_dataset::open(o);
  o.seed = 43;
  auto c = token_dataset::open(o);
  const int64_t n = a.num_train();
  EXPECT_EQ(n + a.num_eval(), 400);
  EXPECT_EQ(a.num_eval(), 20);
  std::vector<int64_t> ea, ea2, eb, ec;
  for (int64_t i = 0; i < n; ++i) {
    ea.push_back(a.train_sequence_at(i));
    ea2.push_back(a.train_sequence_at(n + i));
    eb.push_back(b.train_sequence_at(i));
    ec.push_back(c.train_sequence_at(i));
  }
  EXPECT_EQ(ea, eb);
  EXPECT_NE(ea, ec);
  EXPECT_NE(ea, ea2);
  EXPECT_EQ(std::set<int64_t>(ea.begin(), ea.end()), std::set<int64_t>(ea2.begin(), ea2.end()));
  int64_t in_place = 0;
  for (int64_t i = 0; i < n; ++i) in_place += ea[i] == i;
  EXPECT_LT(in_place, 20) << "order barely shuffled";
  // Seed s, epoch 1 uses key s + 1: the same order as seed s + 1, epoch 0.
  EXPECT_EQ(ea2, ec);

  // A batch crossing the epoch boundary, and the same batch read twice.
  const int64_t t1 = 11;
  std::vector<int64_t> x(4 * t1), y(4 * t1);
  a.train_batch(n - 2, 4, x.data());
  b.train_batch(n - 2, 4, y.data());
  EXPECT_EQ(x, y);
  std::vector<int64_t> row(t1);
  a.train_batch(n + 1, 1, row.data());
  EXPECT_TRUE(std::equal(row.begin(), row.end(), x.begin() + 3 * t1));
}

TEST(dataset, eval_split_disjoint_and_seed_independent) {
  scratch_dir dir;
  std::vector<uint16_t> toks(1001);
  for (size_t i = 0; i < toks.size(); ++i) toks[i] = static_cast<uint16_t>(i);
  test::write_bytes(dir / "t.bin", u16_file(toks));
  data_options o;
  o.paths = {dir / "t.bin"};
  o.seq_len = 10;
  o.eval_fraction = 0.1;
  auto d = token_dataset::open(o);
  ASSERT_EQ(d.num_eval(), 10);
  ASSERT_EQ(d.num_train(), 90);
  std::set<int64_t> train_starts, eval_starts;
  std::vector<int64_t> row(11);
  for (int64_t i = 0; i < d.num_train(); ++i) {
    d.train_batch(i, 1, row.data());
    train_starts.insert(row[0]);
  }
  for (int64_t i = 0; i < d.num_eval(); ++i) {
    d.eval_sequence(i, row.data());
    eval_starts.insert(row[0]);
    EXPECT_EQ(row[0] % 10, 0);
  }
  EXPECT_EQ(train_starts.size(), 90u);
  EXPECT_EQ(eval_starts.size(), 10u);
  for (int64_t s : eval_starts) EXPECT_EQ(train_starts.count(s), 0u);
  EXPECT_GT(*eval_starts.rbegin() - *eval_starts.begin(), 800) << "eval spread through the data";
  o.seed = 7;
  auto e = token_dataset::open(o);
  for (int64_t i = 0; i < e.num_eval(); ++i) {
    e.eval_sequence(i, row.data());
    EXPECT_EQ(eval_starts.count(row[0]), 1u);
  }
}

TEST(dataset, short_corpus_repeats) {
  scratch_dir dir;
  test::write_bytes(dir / "s.txt", "abcd");
  data_options o;
  o.paths = {dir / "s.txt"};
  o.seq_len = 12;
  auto d = token_dataset::open(o);
  EXPECT_EQ(d.num_train(), 1);
  EXPECT_EQ(d.num_eval(), 0);
  auto stream = byte_stream({"abcd"});
  std::vector<int64_t> rows(3 * 13);
  d.train_batch(0, 3, rows.data());
  for (size_t i = 0; i < rows.size(); ++i) EXPECT_EQ(rows[i], stream[(i % 13) % stream.size()]) << i;
}

TEST(dataset, empty_and_missing_inputs) {
  scratch_dir dir;
  test::write_bytes(dir / "empty.txt", "");
  test::write_bytes(dir / "empty.jsonl", "\n\n");
  data_options o;
  o.paths = {dir / "empty.txt", dir / "empty.jsonl"};
  EXPECT_ERROR_HAS(token_dataset::open(o), "dataset is empty", "empty.txt");
  fs::create_directories(dir / "void/sub");
  o.paths = {dir / "void"};
  EXPECT_ERROR_HAS(token_dataset::open(o), "void", "holds no files");
  o.paths = {dir / "nope.txt"};
  EXPECT_ERROR_HAS(token_dataset::open(o), "nope.txt", "does not exist");
  o.paths = {};
  EXPECT_ERROR_HAS(token_dataset::open(o), "no training data");
}

TEST(dataset, vocab_overflow) {
  scratch_dir dir;
  test::write_bytes(dir / "a.txt", "some text");
  data_options o;
  o.paths = {dir / "a.txt"};
  o.vocab_limit = 200;
  EXPECT_ERROR_HAS(token_dataset::open(o), "tokenizer byte has 259 tokens", "only 200");
  o.vocab_limit = 259;
  EXPECT_NO_THROW(token_dataset::open(o));
  test::write_bytes(dir / "big.bin", llmc_file({1, 2, 70000, 3}, 2));
  o.paths = {dir / "big.bin"};
  o.vocab_limit = 32000;
  EXPECT_ERROR_HAS(token_dataset::open(o), "big.bin", "token id 70000", "only 32000");
}

TEST(dataset, long_document_split_for_parallel_encoding) {
  scratch_dir dir;
  std::string text;
  while (text.size() < (size_t(5) << 20)) text += "line " + std::to_string(text.size()) + "\n";
  text += "no newline at the end";
  test::write_bytes(dir / "long.txt", text);
  data_options o;
  o.paths = {dir / "long.txt"};
  o.seq_len = 4096;
  o.eval_fraction = 0;
  auto d = token_dataset::open(o);
  ASSERT_EQ(d.num_tokens(), static_cast<int64_t>(text.size()) + 1);
  std::vector<int64_t> row(4097);
  int64_t last = d.num_train() - 1;
  for (int64_t c = 0; c < d.num_train(); ++c)
    if (d.train_sequence_at(c) == last) d.train_batch(c, 1, row.data());
  for (int64_t k = 0; k <= 4096; ++k) {
    size_t pos = static_cast<size_t>(last * 4096 + k);
    ASSERT_EQ(row[k], pos < text.size() ? 3 + static_cast<unsigned char>(text[pos]) : 2) << pos;
  }
}

TEST(dataset, sentencepiece_text) {
  const std::string& sp = test::sp_model_dir();
  if (sp.empty()) GTEST_SKIP() << "/usr/share/common-licenses is absent";
  data_options o;
  o.paths = {"/usr/share/common-licenses/Apache-2.0"};
  o.tokenizer = sp;
  o.seq_len = 64;
  o.vocab_limit = 1000;
  auto d = token_dataset::open(o);
  auto tok = make_tokenizer(sp);
  auto ids = tok->encode(test::read_bytes("/usr/share/common-licenses/Apache-2.0"));
  EXPECT_EQ(d.num_tokens(), static_cast<int64_t>(ids.size()) + 1);
  o.vocab_limit = 500;
  EXPECT_ERROR_HAS(token_dataset::open(o), "800 tokens", "only 500");
}

TEST(ferry_tokenize, writes_llmc_file_matching_direct_load) {
  scratch_dir dir;
  test::write_bytes(dir / "in/a.txt", "first document");
  test::write_bytes(dir / "in/b.jsonl", "{\"text\": \"second\"}\n{\"text\": \"third\"}\n");
  const std::string cmd = std::string(FERRY_TOKENIZE_BIN) + " --out " + (dir / "out.bin") + " " + (dir / "in") +
                          " 2>" + (dir / "log");
  ASSERT_EQ(std::system(cmd.c_str()), 0) << test::read_bytes(dir / "log");
  EXPECT_NE(test::read_bytes(dir / "log").find("wrote 28 tokens"), std::string::npos) << test::read_bytes(dir / "log");
  data_options o;
  o.paths = {dir / "out.bin"};
  o.seq_len = 3;
  o.eval_fraction = 0;
  auto d = token_dataset::open(o);
  expect_tiles_stream(d, byte_stream({"first document", "second", "third"}));
  const std::string bad = std::string(FERRY_TOKENIZE_BIN) + " --out " + (dir / "x.bin") + " " + (dir / "none") +
                          " 2>" + (dir / "log2");
  EXPECT_EQ(WEXITSTATUS(std::system(bad.c_str())), 1);
  EXPECT_NE(test::read_bytes(dir / "log2").find("does not exist"), std::string::npos);
  EXPECT_FALSE(fs::exists(dir / "x.bin"));
}

TEST(permute_index, is_a_bijection) {
  for (int64_t n : {1, 2, 3, 7, 64, 65, 1000, 4097}) {
    std::vector<char> hit(static_cast<size_t>(n), 0);
    for (int64_t i = 0; i < n; ++i) {
      int64_t p = permute_index(i, n, 123);
      ASSERT_GE(p, 0);
      ASSERT_LT(p, n);
      ASSERT_FALSE(hit[static_cast<size_t>(p)]) << n;
      hit[static_cast<size_t>(p)] = 1;
    }
  }
}

}  // namespace
}  // namespace ferry::io

namespace ferry::io {
namespace {
// Data-parallel ranks (rank_cursor, as the trainer reads them): N ranks with batch b see, at every
// step and micro-batch, exactly the sequences one rank with batch N*b sees, rank r the r-th block
// of b of them. Checked for world sizes 1, 2, 3 and 1 or 2 micro-batches across an epoch boundary.
TEST(dataset, ranks_share_the_one_rank_global_batch) {
  scratch_dir dir;
  std::string text;
  for (int i = 0; i < 400; ++i) text += char('a' + (i * 7) % 26);
  test::write_bytes(dir / "a.txt", text);
  data_options o;
  o.paths = {dir / "a.txt"};
  o.seq_len = 7;
  o.eval_fraction = 0;
  o.seed = 5;
  auto d = token_dataset::open(o);
  const int64_t global = 6, steps = 15;  // 90+ sequences read per accumulation: more than one epoch (57)
  for (int64_t accum : {1, 2}) {
    // One rank, batch 6: the sequences of each step, micro-batch by micro-batch.
    std::vector<std::vector<int64_t>> want;
    int64_t cursor = 0;
    for (int64_t s = 0; s < steps; ++s) {
      std::vector<int64_t> seqs;
      for (int64_t a = 0; a < accum; ++a, cursor += global)
        for (int64_t i = 0; i < global; ++i) seqs.push_back(d.train_sequence_at(rank_cursor(cursor, global, 0) + i));
      want.push_back(seqs);
    }
    for (int world : {1, 2, 3}) {
      const int64_t b = global / world;
      std::vector<std::vector<int64_t>> got(static_cast<size_t>(steps));
      std::vector<int64_t> rank_cursors(static_cast<size_t>(world), 0);  // each rank's own data_cursor
      for (int64_t s = 0; s < steps; ++s)
        for (int64_t a = 0; a < accum; ++a)
          for (int r = 0; r < world; ++r) {
            int64_t& c = rank_cursors[size_t(r)];
            for (int64_t i = 0; i < b; ++i) got[size_t(s)].push_back(d.train_sequence_at(rank_cursor(c, b, r) + i));
            c += b * world;
          }
      for (int r = 1; r < world; ++r) EXPECT_EQ(rank_cursors[size_t(r)], rank_cursors[0]);
      EXPECT_EQ(got, want) << "world " << world << ", grad_accum " << accum;
    }
  }
}
}  // namespace
}  // namespace ferry::io
