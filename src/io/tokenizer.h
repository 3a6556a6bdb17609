#pragma once
// Tokenizers: a built-in byte-level one (the default), sentencepiece models (LLaMA-1/2's
// tokenizer.model) and HF tokenizer.json files with a BPE model (Llama 3, Mistral, ...; see
// hf_tokenizer.h). encode() adds no BOS/EOS; the dataset puts EOS between documents.
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
  virtual int64_t vocab_size() const = 0;  // 1 + the largest id
  virtual int32_t bos_id() const = 0;      // -1 when the tokenizer has none
  virtual int32_t eos_id() const = 0;      // -1 when the tokenizer has none
  // Id of the vocabulary entry spelled exactly `piece` (added and special tokens included), or -1.
  virtual int32_t token_id(const std::string& piece) const = 0;
  virtual std::string name() const = 0;
};

// "byte": ids 0..2 are <unk>/<s>/</s> as in LLaMA, byte b is id 3 + b, vocabulary 259; decode
// skips the special ids. Anything else is a path: a file named *.json is read as an HF
// tokenizer.json, any other file as a sentencepiece model; a directory is read through its
// tokenizer.json, else its tokenizer.model (transformers' fast tokenizers also prefer
// tokenizer.json). Throws ferry::error for a missing or unreadable file or one that is neither.
std::unique_ptr<tokenizer> make_tokenizer(const std::string& spec);

// The tokenizer file a checkpoint directory ships, chosen as transformers' fast tokenizers choose:
// DIR/tokenizer.json, else DIR/tokenizer.model; "" when dir is "" or holds neither.
std::string checkpoint_tokenizer_file(const std::string& dir);

// The tokenizer of a run that starts from the checkpoint directory `checkpoint` ("" = none) whose
// model has vocab_size ids; `spec` is the tokenizer key's value and `named` whether it was set (not
// the default). Unnamed, the checkpoint's own tokenizer file replaces the default when there is
// one. Returns what make_tokenizer takes. Throws a one-line config_error, naming the key tokenizer,
// when a named file does not exist, or when a named tokenizer other than the checkpoint's own file
// has a vocabulary of another size than the checkpoint's model (both sizes in the message).
std::string resolve_run_tokenizer(const std::string& spec, bool named, const std::string& checkpoint,
                                  int64_t vocab_size);

// Trains a sentencepiece BPE model (LLaMA-style: byte fallback, digits split, <unk>=0 <s>=1
// </s>=2) on the lines of text_files and writes model_prefix + ".model" atomically. Throws
// ferry::error when a file cannot be read or the text is too small for vocab_size.
void train_sentencepiece(const std::vector<std::string>& text_files, const std::string& model_prefix, int vocab_size);

}  // namespace ferry::io
