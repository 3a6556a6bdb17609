#include "src/io/tokenizer.h"

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <filesystem>
#include <fstream>
#include <thread>

#include "src/common/error.h"
#include "src/io/atomic_file.h"

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
  std::string name() const override { return "byte"; }
  int32_t token_id(const std::string& piece) const override {
    return piece == "<unk>" ? 0 : piece == "<s>" ? 1 : piece == "</s>" ? 2 : -1;
  }
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
  std::string name() const override { return "sentencepiece:" + path_; }
  int32_t token_id(const std::string& piece) const override {
    const int id = sp_.PieceToId(piece);  // unknown pieces map to the unk id
    return id == sp_.unk_id() && piece != sp_.IdToPiece(id) ? -1 : id;
  }

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
  if (fs::is_directory(path)) {
    path = (fs::path(spec) / "tokenizer.model").string();
    FERRY_CHECK(fs::exists(path), "tokenizer directory ", spec,
                " holds no tokenizer.model; pass a sentencepiece model file or --tokenizer byte");
  }
  FERRY_CHECK(fs::exists(path), "tokenizer '", spec,
              "' not found; pass 'byte' or the path of a sentencepiece tokenizer.model");
  return std::make_unique<sp_tokenizer>(path);
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
