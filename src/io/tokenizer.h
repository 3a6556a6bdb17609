#pragma once
// Tokenizers: a built-in byte-level one (the default) and sentencepiece models (LLaMA-1/2's
// tokenizer.model). encode() adds no BOS/EOS; the dataset puts EOS between documents.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace ferry::io {

class tokenizer {
 public:
  virtual ~tokenizer() = default;
  virtual std::vector<int32_t> encode(const std::string& text) const = 0;  // thread-safe
  virtual std::string decode(const std::vector<int32_t>& ids) const = 0;
  virtual int64_t vocab_size() const = 0;
  virtual int32_t bos_id() const = 0;
  virtual int32_t eos_id() const = 0;
  virtual std::string name() const = 0;
  // Id of the vocabulary entry spelled exactly `piece` (added and special tokens included), or -1.
  virtual int32_t token_id(const std::string& piece) const = 0;
};

// "byte": ids 0..2 are <unk>/<s>/</s> as in LLaMA, byte b is id 3 + b, vocabulary 259; decode
// skips the special ids. Anything else is a path to a sentencepiece tokenizer.model, or to a
// directory holding one. Throws ferry::error for a missing or unreadable file or one that is not
// a sentencepiece model.
std::unique_ptr<tokenizer> make_tokenizer(const std::string& spec);

// Trains a sentencepiece BPE model (LLaMA-style: byte fallback, digits split, <unk>=0 <s>=1
// </s>=2) on the lines of text_files and writes model_prefix + ".model" atomically. Throws
// ferry::error when a file cannot be read or the text is too small for vocab_size.
void train_sentencepiece(const std::vector<std::string>& text_files, const std::string& model_prefix, int vocab_size);

}  // namespace ferry::io
