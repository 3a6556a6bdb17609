// HF tokenizer.json files against HF tokenizers itself: tests/io/hf_tokenizer_ref.py trains
// tokenizers in the Llama 3, GPT-2, Llama 2 and Mistral layouts (and variants) on the embedded
// corpus and records tokenizers' answers on >= 10,000 texts; these tests require ferry's to be
// identical. Skipped (never passed) where the Python or its tokenizers package is missing. The
// error tests and the directory rules need no Python.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <sstream>

#include "src/common/error.h"
#include "src/io/hf_regex.h"
#include "src/io/hf_text.h"
#include "src/io/tokenizer.h"
#include "tests/io/io_test_util.h"
#include "tests/io/sp_test_model.h"

namespace ferry::io {
namespace {
namespace fs = std::filesystem;
using json = nlohmann::json;
using test::scratch_dir;

// The reference directory, made (or reused) by hf_tokenizer_ref.py once per process. *skip says
// why there is none when the script exits 77; any other failure fails the calling test.
std::string reference_dir(std::string* skip) {
  static std::string dir, skip_reason, failure;
  static bool done = false;
  if (!done) {
    done = true;
    const std::string log = std::string(FERRY_HF_REF_DIR) + ".log";
    const std::string cmd = std::string(FERRY_PYTHON) + " " + FERRY_HF_REF_SCRIPT + " " + FERRY_HF_REF_DIR + " >" +
                            log + " 2>&1";
    const int rc = std::string(FERRY_PYTHON).empty() ? 77 << 8 : std::system(cmd.c_str());
    const int code = WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
    if (code == 0) dir = FERRY_HF_REF_DIR;
    else if (code == 77) skip_reason = "no Python with tokenizers (" + test::read_bytes(log) + ")";
    else failure = "hf_tokenizer_ref.py failed (exit " + std::to_string(code) + "): " + test::read_bytes(log);
  }
  if (!failure.empty()) ADD_FAILURE() << failure;
  *skip = skip_reason;
  return dir;
}

#define REQUIRE_REFERENCE(dir)                   \
  std::string skip_;                             \
  const std::string dir = reference_dir(&skip_); \
  if (!skip_.empty()) GTEST_SKIP() << skip_;     \
  ASSERT_FALSE(dir.empty())

json load_json(const std::string& path) { return json::parse(test::read_bytes(path)); }

std::vector<std::string> variants(const std::string& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir))
    if (fs::exists(e.path() / "tokenizer.json")) out.push_back(e.path().filename().string());
  std::sort(out.begin(), out.end());
  return out;
}

// Printable form of a test text for failure messages.
std::string shown(const std::string& s) {
  std::string out;
  for (unsigned char c : s.substr(0, 160)) {
    char buf[8];
    if (c == '\n') {
      out += "\\n";
    } else if (c < 0x20 || c == 0x7F) {
      std::snprintf(buf, sizeof(buf), "\\x%02x", c);
      out += buf;
    } else {
      out.push_back(static_cast<char>(c));
    }
  }
  return out + (s.size() > 160 ? "..." : "");
}

template <typename T>
std::string shown(const std::vector<T>& v) {
  std::ostringstream os;
  for (size_t i = 0; i < v.size() && i < 40; ++i) os << (i ? " " : "") << v[i];
  if (v.size() > 40) os << " ... (" << v.size() << ")";
  return os.str();
}

// The directory for even variants, the tokenizer.json path for odd ones: both specs are in use.
std::unique_ptr<tokenizer> open_variant(const std::string& dir, const std::string& name, size_t index) {
  const std::string d = dir + "/" + name;
  return make_tokenizer(index % 2 ? d + "/tokenizer.json" : d);
}

TEST(hf_tokenizer, encode_equals_tokenizers_on_every_text) {
  REQUIRE_REFERENCE(dir);
  const json texts_file = load_json(dir + "/texts.json");
  const auto texts = texts_file["texts"].get<std::vector<std::string>>();
  const size_t first_doc = texts_file["corpus_lines"].get<size_t>(), docs = texts_file["documents"].get<size_t>();
  ASSERT_GE(texts.size(), 10000u);
  const auto names = variants(dir);
  ASSERT_EQ(names.size(), 9u);
  for (size_t v = 0; v < names.size(); ++v) {
    auto tok = open_variant(dir, names[v], v);
    const json ref = load_json(dir + "/" + names[v] + "/expected.json");
    size_t bad = 0;
    for (size_t i = 0; i < texts.size(); ++i) {
      const auto want = ref["ids"][i].get<std::vector<int32_t>>();
      const auto got = tok->encode(texts[i]);
      if (got != want && ++bad <= 3)
        ADD_FAILURE() << names[v] << " text " << i << " '" << shown(texts[i]) << "'\n  tokenizers: " << shown(want)
                      << "\n  ferry:      " << shown(got);
    }
    EXPECT_EQ(bad, 0u) << names[v] << ": " << bad << " of " << texts.size() << " texts encode differently";

    // Throughput on the corpus documents, one thread; no assertion.
    size_t bytes = 0;
    const auto t0 = std::chrono::steady_clock::now();
    for (size_t i = first_doc; i < first_doc + docs; ++i) bytes += (tok->encode(texts[i]), texts[i].size());
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("%-12s %zu texts identical; encode %.2f MB/s (tokenizers %.2f MB/s), one thread\n", names[v].c_str(),
                texts.size() - bad, bytes / 1e6 / s, ref["tokenizers_mb_per_s"].get<double>());
  }
}

TEST(hf_tokenizer, decode_equals_tokenizers) {
  REQUIRE_REFERENCE(dir);
  const auto names = variants(dir);
  for (size_t v = 0; v < names.size(); ++v) {
    auto tok = open_variant(dir, names[v], v);
    const json ref = load_json(dir + "/" + names[v] + "/expected.json");
    size_t bad = 0, n = 0;
    const auto check = [&](const json& ids, const json& want) {
      ++n;
      const std::string got = tok->decode(ids.get<std::vector<int32_t>>());
      if (got != want.get<std::string>() && ++bad <= 3)
        ADD_FAILURE() << names[v] << " decode " << ids.dump() << "\n  tokenizers: '" << shown(want.get<std::string>())
                      << "'\n  ferry:      '" << shown(got) << "'";
    };
    // decode(encode(x)) on every text, then random id sequences (split byte sequences included).
    for (size_t i = 0; i < ref["ids"].size(); ++i) check(ref["ids"][i], ref["decoded"][i]);
    for (size_t i = 0; i < ref["decode_cases"].size(); ++i) check(ref["decode_cases"][i], ref["decode_expected"][i]);
    EXPECT_EQ(bad, 0u) << names[v] << ": " << bad << " of " << n << " decodes differ";
    EXPECT_ERROR_HAS(tok->decode({0, static_cast<int32_t>(tok->vocab_size())}), "outside the vocabulary");
  }
}

TEST(hf_tokenizer, token_id_vocab_size_bos_eos_equal_tokenizers) {
  REQUIRE_REFERENCE(dir);
  const auto names = variants(dir);
  for (size_t v = 0; v < names.size(); ++v) {
    auto tok = open_variant(dir, names[v], v);
    const json ref = load_json(dir + "/" + names[v] + "/expected.json");
    EXPECT_EQ(tok->vocab_size(), ref["vocab_size"].get<int64_t>()) << names[v];
    EXPECT_EQ(tok->bos_id(), ref["bos"].get<int32_t>()) << names[v];
    EXPECT_EQ(tok->eos_id(), ref["eos"].get<int32_t>()) << names[v];
    for (const auto& [piece, id] : ref["probes"].items())
      EXPECT_EQ(tok->token_id(piece), id.get<int32_t>()) << names[v] << " '" << piece << "'";
    EXPECT_NE(tok->name().find(names[v] + "/tokenizer.json"), std::string::npos) << tok->name();
  }
}

// The texts must reach what each layout is about, or the parity above proves little: with
// ignore_merges off, or with special tokens not split out, tokenizers itself encodes some texts
// differently.
TEST(hf_tokenizer, reference_texts_exercise_ignore_merges_and_special_tokens) {
  REQUIRE_REFERENCE(dir);
  EXPECT_GT(load_json(dir + "/llama3/expected.json")["sensitivity"]["ignore_merges"].get<int>(), 0);
  for (const char* v : {"llama3", "gpt2", "llama2", "mistral", "words"})
    EXPECT_GT(load_json(dir + "/" + v + "/expected.json")["sensitivity"]["special_tokens_in_text"].get<int>(), 0) << v;
}

// The PCRE2 layer alone: the spans Oniguruma (through tokenizers' Split) finds for patterns that
// differ between the engines unless rewritten or run with UCP (\s, \w, \h, case folding of
// long s and the Kelvin sign, ^ and $, empty matches).
TEST(hf_regex, spans_equal_oniguruma) {
  REQUIRE_REFERENCE(dir);
  size_t bad = 0;
  const json cases = load_json(dir + "/regex_cases.json");
  for (const json& c : cases) {
    const std::string pattern = c["pattern"].get<std::string>(), text = c["text"].get<std::string>();
    hf::regex re(pattern, hf::regex_syntax::regex_onig, "test");
    json got = json::array();
    for (const hf::span& s : re.find_matches(text))
      if (s.end > s.begin) got.push_back({s.begin, s.end, s.match});
    if (got != c["spans"] && ++bad <= 5)
      ADD_FAILURE() << "pattern " << pattern << " on '" << shown(text) << "'\n  onig:  " << c["spans"].dump()
                    << "\n  ferry: " << got.dump() << "\n  pcre2 pattern: " << hf::onig_to_pcre2(pattern);
  }
  EXPECT_EQ(bad, 0u) << bad << " of " << cases.size() << " pattern/text pairs differ";
}

// Invalid UTF-8 is read as Python's bytes.decode(errors="replace") reads it.
TEST(hf_text, lossy_utf8_equals_python) {
  REQUIRE_REFERENCE(dir);
  const json cases = load_json(dir + "/texts.json")["lossy"];
  ASSERT_FALSE(cases.empty());
  for (const json& c : cases) {
    std::string raw;
    for (int b : c["bytes"].get<std::vector<int>>()) raw.push_back(static_cast<char>(b));
    EXPECT_EQ(hf::utf8_lossy(raw), c["text"].get<std::string>()) << c.dump();
    EXPECT_EQ(hf::utf8_valid(raw), c["valid"].get<bool>()) << c.dump();
  }
  auto tok = make_tokenizer(dir + "/llama3");
  for (const json& c : cases) {
    std::string raw;
    for (int b : c["bytes"].get<std::vector<int>>()) raw.push_back(static_cast<char>(b));
    EXPECT_EQ(tok->encode(raw), tok->encode(c["text"].get<std::string>())) << c.dump();
  }
}

// ferry-tokenize with a tokenizer.json: each document's ids then EOS, none where EOS is -1.
TEST(hf_tokenizer, ferry_tokenize_writes_ids_and_eos) {
  REQUIRE_REFERENCE(dir);
  scratch_dir tmp;
  const std::vector<std::string> docs = {"Hi<|eot_id|>there \xF0\x9F\x98\x80 it's 12345\n", "second document\n"};
  test::write_bytes(tmp / "in/a.txt", docs[0]);
  test::write_bytes(tmp / "in/b.txt", docs[1]);
  for (const char* v : {"llama3", "unk_dropped"}) {
    auto tok = make_tokenizer(dir + "/" + v);
    std::vector<int32_t> want;
    for (const auto& d : docs) {
      for (int32_t id : tok->encode(d)) want.push_back(id);
      if (tok->eos_id() >= 0) want.push_back(tok->eos_id());
    }
    const std::string out = tmp / (std::string(v) + ".bin");
    const std::string cmd = std::string(FERRY_TOKENIZE_BIN) + " --tokenizer " + dir + "/" + v + " --out " + out + " " +
                            (tmp / "in") + " 2>" + (tmp / "log");
    ASSERT_EQ(std::system(cmd.c_str()), 0) << test::read_bytes(tmp / "log");
    const std::string bytes = test::read_bytes(out);
    ASSERT_EQ(bytes.size(), 1024 + 2 * want.size()) << v;  // llm.c header, uint16 tokens
    std::vector<int32_t> got;
    for (size_t i = 1024; i + 1 < bytes.size(); i += 2)
      got.push_back(static_cast<unsigned char>(bytes[i]) | (static_cast<unsigned char>(bytes[i + 1]) << 8));
    EXPECT_EQ(got, want) << v;
  }
}

// ---- without Python ----

// A tokenizer.json small enough to write by hand: "ab" merges, no normalizer or decoder.
json tiny_json() {
  return json::parse(R"({"version": "1.0", "added_tokens": [], "normalizer": null, "pre_tokenizer": null,
    "post_processor": null, "decoder": null,
    "model": {"type": "BPE", "dropout": null, "unk_token": null, "vocab": {"a": 0, "b": 1, "ab": 2},
              "merges": [["a", "b"]]}})");
}

TEST(hf_tokenizer, directory_prefers_tokenizer_json_and_file_paths_work) {
  scratch_dir tmp;
  test::write_bytes(tmp / "m/tokenizer.json", tiny_json().dump());
  auto tok = make_tokenizer(tmp / "m");
  EXPECT_NE(tok->name().find("tokenizer.json"), std::string::npos);
  EXPECT_EQ(tok->encode("abab"), (std::vector<int32_t>{2, 2}));
  EXPECT_EQ(tok->decode({2, 0}), "ab a");  // no decoder: tokens joined by spaces, as tokenizers does
  EXPECT_EQ(tok->bos_id(), -1);
  EXPECT_EQ(tok->eos_id(), -1);
  const std::string& sp = test::sp_model_dir();
  if (!sp.empty()) {
    fs::copy_file(sp + "/tokenizer.model", tmp / "m/tokenizer.model");
    EXPECT_NE(make_tokenizer(tmp / "m")->name().find("tokenizer.json"), std::string::npos);
    EXPECT_NE(make_tokenizer(tmp / "m/tokenizer.model")->name().find("sentencepiece"), std::string::npos);
    fs::remove(tmp / "m/tokenizer.json");
    EXPECT_NE(make_tokenizer(tmp / "m")->name().find("sentencepiece"), std::string::npos);
  }
}

TEST(hf_tokenizer, bos_eos_from_tokenizer_config) {
  scratch_dir tmp;
  json j = tiny_json();
  j["added_tokens"] = json::parse(R"([{"id": 3, "content": "<s>", "special": true, "normalized": false},
                                      {"id": 4, "content": "</s>", "special": true, "normalized": false}])");
  test::write_bytes(tmp / "tokenizer.json", j.dump());
  auto tok = make_tokenizer(tmp / "tokenizer.json");
  EXPECT_EQ(tok->bos_id(), tok->token_id("<s>"));  // the usual names, with no config
  EXPECT_EQ(tok->eos_id(), tok->token_id("</s>"));
  test::write_bytes(tmp / "tokenizer_config.json", R"({"bos_token": {"content": "ab"}, "eos_token": null})");
  tok = make_tokenizer(tmp / "tokenizer.json");
  EXPECT_EQ(tok->bos_id(), 2);
  EXPECT_EQ(tok->eos_id(), -1);  // null in the config means none
  test::write_bytes(tmp / "tokenizer_config.json", R"({"bos_token": "<nope>"})");
  EXPECT_ERROR_HAS(make_tokenizer(tmp / "tokenizer.json"), "tokenizer_config.json", "bos_token", "<nope>");
}

// Every malformed or unsupported file fails with one line naming the file and the component.
TEST(hf_tokenizer, errors_name_the_file_and_component) {
  scratch_dir tmp;
  const auto expect_error = [&](const std::string& body, std::vector<std::string> parts) {
    const std::string path = tmp / "tokenizer.json";
    test::write_bytes(path, body);
    parts.push_back(path);
    const std::string msg = test::error_of<ferry::error>([&] { make_tokenizer(path); });
    for (const auto& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "'" << p << "' not in: " << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
  };
  const auto with = [&](const char* key, const json& v) {
    json j = tiny_json();
    j[key] = v;
    return j.dump();
  };
  expect_error("{\"model\": ", {"not valid JSON"});
  expect_error("[1, 2]", {"not a tokenizer.json"});
  expect_error("{\"version\": \"1.0\"}", {"no \"model\""});
  expect_error(with("model", {{"type", "WordPiece"}, {"vocab", json::object()}}), {"WordPiece", "not supported"});
  expect_error(with("model", {{"type", "Unigram"}, {"vocab", json::array()}}), {"Unigram", "not supported"});
  expect_error(with("normalizer", {{"type", "NFC"}}), {"normalizer NFC", "not supported"});
  expect_error(with("pre_tokenizer", {{"type", "BertPreTokenizer"}}), {"pre_tokenizer BertPreTokenizer", "not supported"});
  expect_error(with("decoder", {{"type", "WordPiece"}, {"prefix", "##"}}), {"decoder WordPiece", "not supported"});
  expect_error(with("pre_tokenizer", {{"type", "Split"}, {"pattern", {{"Regex", "(unclosed"}}}, {"behavior", "Isolated"}}),
               {"pre_tokenizer Split", "(unclosed", "PCRE2"});
  expect_error(with("pre_tokenizer", {{"type", "Split"}, {"pattern", {{"Regex", "a"}}}, {"behavior", "Sideways"}}),
               {"pre_tokenizer Split", "Sideways"});
  json j = tiny_json();
  j["model"]["merges"] = {"a c"};
  expect_error(j.dump(), {"model.merges[0]", "'c'"});
  j = tiny_json();
  j["model"]["merges"] = {"a b c"};
  expect_error(j.dump(), {"model.merges[0]", "one space"});
  j = tiny_json();
  j["model"]["dropout"] = 0.1;
  expect_error(j.dump(), {"model.dropout"});
  j = tiny_json();
  j["added_tokens"] = {{{"id", 5}}};
  expect_error(j.dump(), {"added_tokens[0]", "content"});
}

}  // namespace
}  // namespace ferry::io
