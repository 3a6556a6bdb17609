#include "src/io/tokenizer.h"

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <filesystem>
#include <fstream>
#include <thread>

#include "src/common/error.h"
#include "src/io/atomic_file.h"
#include "src/io/hf_tokenizer.h"

namespace ferry::io {
namespace fs = std::filesystem;

namespace {

class byte_tokenizer final : public tokenizer {
 public:
  static constexpr int32_t k_offset = 3;
  std::vector<int32_t> encode(const std::string& text) const override {
    std::vector<int32_t> ids(text.size());
    for (size_t i = 0; i < text.size(); ++i) ids[i] = k_offset + static_cast<unsigned char>(text[i]);
    return ids;
  }
  std::string decode(const std::vector<int32_t>& ids) const override {
    std::string s;
    s.reserve(ids.size());
    for (int32_t id : ids)
      if (id >= k_offset && id < k_offset + 256) s.push_back(static_cast<char>(id - k_offset));
    return s;
  }
  int64_t vocab_size() const override { return k_offset + 256; }
  int32_t bos_id() const override { return 1; }
  int32_t eos_id() const override { return 2; }
  int32_t token_id(const std::string& piece) const override {
    if (piece == "<unk>") return 0;
    if (piece == "<s>") return 1;
    if (piece == "</s>") return 2;
    return piece.size() == 1 ? k_offset + static_cast<unsigned char>(piece[0]) : -1;
  }
  std::string name() const override { return "byte"; }
};

class sp_tokenizer final : public tokenizer {
 public:
  explicit sp_tokenizer(const std::string& path) : path_(path) {
    std::string bytes = read_file(path);
    auto st = sp_.LoadFromSerializedProto(bytes);
    FERRY_CHECK(st.ok(), path, " is not a sentencepiece model (", st.ToString(),
                "); pass a tokenizer.model file or --tokenizer byte");
    FERRY_CHECK(sp_.GetPieceSize() > 0, path, " is a sentencepiece model with an empty vocabulary");
  }
  std::vector<int32_t> encode(const std::string& text) const override {
    std::vector<int> ids;
    auto st = sp_.Encode(text, &ids);
    FERRY_CHECK(st.ok(), "sentencepiece ", path_, " cannot encode text: ", st.ToString());
    return std::vector<int32_t>(ids.begin(), ids.end());
  }
  std::string decode(const std::vector<int32_t>& ids) const override {
    const int n = sp_.GetPieceSize();
    std::vector<int> v;
    v.reserve(ids.size());
    for (int32_t id : ids) {
      FERRY_CHECK(id >= 0 && id < n, "token id ", id, " is outside the vocabulary of ", path_, " (", n, " pieces)");
      v.push_back(id);
    }
    std::string s;
    auto st = sp_.Decode(v, &s);
    FERRY_CHECK(st.ok(), "sentencepiece ", path_, " cannot decode ids: ", st.ToString());
    return s;
  }
  int64_t vocab_size() const override { return sp_.GetPieceSize(); }
  int32_t bos_id() const override { return sp_.bos_id(); }
  int32_t eos_id() const override { return sp_.eos_id(); }
  int32_t token_id(const std::string& piece) const override {
    // PieceToId answers unk_id() for a piece it does not know.
    const int id = sp_.PieceToId(piece);
    return id == sp_.unk_id() && sp_.IdToPiece(id) != piece ? -1 : id;
  }
  std::string name() const override { return "sentencepiece:" + path_; }

 private:
  std::string path_;
  sentencepiece::SentencePieceProcessor sp_;
};

// Feeds the trainer the non-empty lines of each file in turn.
class file_lines final : public sentencepiece::SentenceIterator {
 public:
  explicit file_lines(const std::vector<std::string>& files) : files_(files) { advance(); }
  bool done() const override { return done_; }
  void Next() override { advance(); }
  const std::string& value() const override { return line_; }
  sentencepiece::util::Status status() const override { return {}; }

 private:
  void advance() {
    for (;;) {
      if (in_.is_open() && std::getline(in_, line_)) {
        if (!line_.empty()) return;
        continue;
      }
      if (in_.is_open()) in_.close();
      if (next_ == files_.size()) {
        done_ = true;
        return;
      }
      const std::string& f = files_[next_++];
      in_.open(f, std::ios::binary);
      FERRY_CHECK(in_.is_open(), "cannot read tokenizer training text ", f);
    }
  }
  const std::vector<std::string>& files_;
  size_t next_ = 0;
  std::ifstream in_;
  std::string line_;
  bool done_ = false;
};

}  // namespace

std::unique_ptr<tokenizer> make_tokenizer(const std::string& spec) {
  if (spec == "byte") return std::make_unique<byte_tokenizer>();
  std::string path = spec;
  std::error_code ec;
  if (fs::is_directory(path, ec)) {
    const fs::path json = fs::path(spec) / "tokenizer.json", model = fs::path(spec) / "tokenizer.model";
    FERRY_CHECK(fs::exists(json, ec) || fs::exists(model, ec), "tokenizer directory ", spec,
                " holds no tokenizer.json or tokenizer.model; pass a tokenizer file or --tokenizer byte");
    path = (fs::exists(json, ec) ? json : model).string();
  }
  FERRY_CHECK(fs::exists(path, ec), "tokenizer '", spec,
              "' not found; pass 'byte' or the path of a tokenizer.json or sentencepiece tokenizer.model");
  if (fs::path(path).extension() == ".json") return load_hf_tokenizer(path);
  return std::make_unique<sp_tokenizer>(path);
}

std::string checkpoint_tokenizer_file(const std::string& dir) {
  std::error_code ec;
  if (dir.empty() || !fs::is_directory(dir, ec)) return "";
  for (const char* file : {"tokenizer.json", "tokenizer.model"})
    if (fs::is_regular_file(fs::path(dir) / file, ec)) return (fs::path(dir) / file).string();
  return "";
}

std::string resolve_run_tokenizer(const std::string& spec, bool named, const std::string& checkpoint,
                                  int64_t vocab_size) {
  const std::string own = checkpoint_tokenizer_file(checkpoint);
  if (!named) return own.empty() ? spec : own;
  std::error_code ec;
  FERRY_CONFIG_CHECK(spec == "byte" || fs::exists(spec, ec), "tokenizer=", spec,
                     " does not exist; name a tokenizer.json or sentencepiece tokenizer.model (or a directory "
                     "holding one), or byte",
                     checkpoint.empty() ? std::string() : ", or leave tokenizer unset to use " + checkpoint + "'s own");
  if (checkpoint.empty()) return spec;
  // The checkpoint's own file named explicitly (itself or its directory) keeps its vocabulary even
  // where the model pads its embedding beyond it.
  const std::string named_file = spec != "byte" && fs::is_directory(spec, ec) ? checkpoint_tokenizer_file(spec) : spec;
  if (!own.empty() && !named_file.empty() && fs::equivalent(named_file, own, ec)) return spec;
  const int64_t n = make_tokenizer(spec)->vocab_size();
  FERRY_CONFIG_CHECK(n == vocab_size, "tokenizer=", spec, " has ", n, " ids but the model of checkpoint ", checkpoint,
                     " has vocab_size ", vocab_size, "; leave tokenizer unset to use the checkpoint's own tokenizer",
                     own.empty() ? std::string(" (it has none)") : " (" + own + ")", ", or name one with ", vocab_size,
                     " ids");
  return spec;
}

void train_sentencepiece(const std::vector<std::string>& text_files, const std::string& model_prefix, int vocab_size) {
  FERRY_CHECK(!text_files.empty(), "no text files to train a sentencepiece model ", model_prefix, " on");
  for (const auto& f : text_files) FERRY_CHECK(fs::is_regular_file(f), "tokenizer training text ", f, " not found");
  unsigned threads = std::max(1u, std::thread::hardware_concurrency());
  const std::string args = "--model_type=bpe --vocab_size=" + std::to_string(vocab_size) +
                           " --character_coverage=1.0 --byte_fallback=true --split_digits=true"
                           " --unk_id=0 --bos_id=1 --eos_id=2 --pad_id=-1 --minloglevel=1"
                           " --max_sentence_length=16384 --num_threads=" +
                           std::to_string(threads);
  file_lines lines(text_files);
  std::string proto;
  auto st = sentencepiece::SentencePieceTrainer::Train(args, &lines, &proto);
  FERRY_CHECK(st.ok(), "training a sentencepiece model (", model_prefix, ".model, vocabulary ", vocab_size,
              ") failed: ", st.ToString(), " (a vocabulary too large for the text is the usual cause)");
  write_file_atomic(model_prefix + ".model", proto);
}

}  // namespace ferry::io
