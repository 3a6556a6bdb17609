// Tokenizers: the byte tokenizer on UTF-8, sentencepiece trained on the system licenses, token_id,
// and the errors for missing files and files that are not sentencepiece models. (HF tokenizer.json:
// test_hf_tokenizer.cpp.)
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>

#include "src/common/error.h"
#include "src/io/tokenizer.h"
#include "tests/io/io_test_util.h"
#include "tests/io/sp_test_model.h"

namespace ferry::io {
namespace {
using test::scratch_dir;

TEST(byte_tokenizer, utf8_round_trip) {
  auto tok = make_tokenizer("byte");
  EXPECT_EQ(tok->vocab_size(), 259);
  EXPECT_EQ(tok->bos_id(), 1);
  EXPECT_EQ(tok->eos_id(), 2);
  EXPECT_EQ(tok->name(), "byte");
  const std::string text = "Grüße, 世界! 🚂\n\t\x01\xff";
  auto ids = tok->encode(text);
  ASSERT_EQ(ids.size(), text.size());
  for (size_t i = 0; i < ids.size(); ++i) EXPECT_EQ(ids[i], 3 + static_cast<unsigned char>(text[i]));
  EXPECT_EQ(tok->decode(ids), text);
  ids.insert(ids.begin(), 1);
  ids.push_back(2);
  ids.push_back(0);
  EXPECT_EQ(tok->decode(ids), text);  // specials are skipped
  EXPECT_TRUE(tok->encode("").empty());
  EXPECT_EQ(tok->token_id("<unk>"), 0);
  EXPECT_EQ(tok->token_id("<s>"), 1);
  EXPECT_EQ(tok->token_id("</s>"), 2);
  EXPECT_EQ(tok->token_id("<|im_start|>"), -1);
  EXPECT_EQ(tok->token_id("a"), 3 + int('a'));  // a byte is the entry spelled by that one byte
}

TEST(tokenizer, spec_errors) {
  scratch_dir dir;
  EXPECT_ERROR_HAS(make_tokenizer(dir / "missing.model"), "missing.model", "not found");
  EXPECT_ERROR_HAS(make_tokenizer(dir.path()), "holds no tokenizer.json or tokenizer.model");
  test::write_bytes(dir / "bad.model", "this is not a protobuf \xff\xfe");
  EXPECT_ERROR_HAS(make_tokenizer(dir / "bad.model"), "bad.model", "is not a sentencepiece model");
}

// --init DIR / --model DIR: the directory's own tokenizer unless the key names one, which must then
// have the model's vocabulary size (or be the directory's own file).
TEST(tokenizer, run_tokenizer_of_a_checkpoint) {
  scratch_dir ckpt, other;
  const std::string two = R"({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": []}})";
  EXPECT_EQ(checkpoint_tokenizer_file(ckpt.path()), "");
  EXPECT_EQ(checkpoint_tokenizer_file(""), "");
  EXPECT_EQ(resolve_run_tokenizer("byte", false, ckpt.path(), 300), "byte");  // nothing there: the default
  EXPECT_EQ(resolve_run_tokenizer("byte", false, "", 300), "byte");
  test::write_bytes(ckpt / "tokenizer.model", "x");
  EXPECT_EQ(resolve_run_tokenizer("byte", false, ckpt.path(), 300), ckpt / "tokenizer.model");
  test::write_bytes(ckpt / "tokenizer.json", two);
  EXPECT_EQ(checkpoint_tokenizer_file(ckpt.path()), ckpt / "tokenizer.json");  // tokenizer.json first
  EXPECT_EQ(resolve_run_tokenizer("byte", false, ckpt.path(), 300), ckpt / "tokenizer.json");
  // Named: kept as named; another size than the model's is one line naming the key and both sizes.
  EXPECT_ERROR_HAS(resolve_run_tokenizer("byte", true, ckpt.path(), 300), "tokenizer=byte has 259 ids",
                   "vocab_size 300", ckpt / "tokenizer.json");
  EXPECT_EQ(resolve_run_tokenizer("byte", true, ckpt.path(), 259), "byte");
  EXPECT_EQ(resolve_run_tokenizer("byte", true, "", 300), "byte");  // no checkpoint: no size to match
  // The checkpoint's own file (or its directory) keeps a model vocabulary padded beyond it.
  EXPECT_EQ(resolve_run_tokenizer(ckpt / "tokenizer.json", true, ckpt.path(), 300), ckpt / "tokenizer.json");
  EXPECT_EQ(resolve_run_tokenizer(ckpt.path(), true, ckpt.path(), 300), ckpt.path());
  test::write_bytes(other / "tokenizer.json", two);
  EXPECT_ERROR_HAS(resolve_run_tokenizer(other / "tokenizer.json", true, ckpt.path(), 300), "has 2 ids",
                   "vocab_size 300");
  EXPECT_EQ(resolve_run_tokenizer(other / "tokenizer.json", true, ckpt.path(), 2), other / "tokenizer.json");
  EXPECT_ERROR_HAS(resolve_run_tokenizer(other / "missing.json", true, ckpt.path(), 300), "tokenizer=",
                   "does not exist");
  EXPECT_THROW(resolve_run_tokenizer("byte", true, ckpt.path(), 300), ferry::config_error);
}

TEST(sentencepiece, train_encode_decode) {
  const std::string& d = test::sp_model_dir();
  if (d.empty()) GTEST_SKIP() << "/usr/share/common-licenses is absent";
  EXPECT_FALSE(std::filesystem::exists(d + "/tokenizer.vocab"));  // only the .model is written
  for (const std::string& spec : {d + "/tokenizer.model", d}) {
    auto tok = make_tokenizer(spec);
    EXPECT_EQ(tok->vocab_size(), test::k_sp_vocab);
    EXPECT_EQ(tok->bos_id(), 1);
    EXPECT_EQ(tok->eos_id(), 2);
    EXPECT_NE(tok->name().find("tokenizer.model"), std::string::npos);
    const std::string text = "This program is free software; you can redistribute it. Grüße 世界 2024";
    auto ids = tok->encode(text);
    EXPECT_LT(ids.size(), text.size() / 2) << "BPE should compress license English";
    for (int32_t id : ids) {
      EXPECT_GE(id, 0);
      EXPECT_LT(id, test::k_sp_vocab);
    }
    EXPECT_EQ(tok->decode(ids), text);  // byte fallback covers characters the corpus lacks
    EXPECT_ERROR_HAS(tok->decode({5, test::k_sp_vocab}), "outside the vocabulary");
    EXPECT_EQ(tok->token_id("<unk>"), 0);
    EXPECT_EQ(tok->token_id("<s>"), 1);
    EXPECT_EQ(tok->token_id("</s>"), 2);
    EXPECT_EQ(tok->token_id("<|eot_id|>"), -1);  // absent: not the unk id
    const std::vector<int32_t> cjk = tok->encode("世");  // not in the corpus: byte fallback E4 B8 96
    ASSERT_FALSE(cjk.empty());
    EXPECT_EQ(tok->token_id("<0x96>"), cjk.back());
  }
}

TEST(tokenizer, token_id_of_byte_and_sentencepiece) {
  auto byte = make_tokenizer("byte");
  EXPECT_EQ(byte->token_id("</s>"), byte->eos_id());
  EXPECT_EQ(byte->token_id("A"), byte->encode("A")[0]);
  EXPECT_EQ(byte->token_id("AB"), -1);
  const std::string& d = test::sp_model_dir();
  if (d.empty()) GTEST_SKIP() << "/usr/share/common-licenses is absent";
  auto sp = make_tokenizer(d);
  EXPECT_EQ(sp->token_id("<s>"), sp->bos_id());
  EXPECT_EQ(sp->token_id("<unk>"), 0);
  EXPECT_EQ(sp->token_id("certainly not a piece"), -1);
  // U+4E16 is not in the licences: byte fallback spells it with the pieces <0xE4> <0xB8> <0x96>.
  const auto ids = sp->encode("\xE4\xB8\x96");
  const int32_t e4 = sp->token_id("<0xE4>");
  EXPECT_GE(e4, 0);
  EXPECT_NE(std::find(ids.begin(), ids.end(), e4), ids.end());
}

TEST(sentencepiece, train_errors) {
  scratch_dir dir;
  EXPECT_ERROR_HAS(train_sentencepiece({dir / "none.txt"}, dir / "m", 300), "none.txt", "not found");
  test::write_bytes(dir / "small.txt", "a tiny corpus\n");
  EXPECT_ERROR_HAS(train_sentencepiece({dir / "small.txt"}, dir / "m", 5000), "vocabulary 5000");
  EXPECT_FALSE(std::filesystem::exists(dir / "m.model"));
}

}  // namespace
}  // namespace ferry::io
