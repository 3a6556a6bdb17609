#pragma once
// The text stages of a tokenizer.json around its model, as HF tokenizers defines them: the
// normalizer, the pre-tokenizer and the decoder. Each is built from its JSON object; a type ferry
// does not implement is a one-line ferry::error naming the file and the component.
//
//   normalizers:    Sequence, Prepend, Replace, Strip, ByteLevel
//   pre-tokenizers: Sequence, Split, ByteLevel, Metaspace, Digits, Whitespace, WhitespaceSplit,
//                   Punctuation, CharDelimiterSplit
//   decoders:       Sequence, ByteLevel, Metaspace, Replace, ByteFallback, Fuse, Strip, BPEDecoder
//
// Offsets are not tracked; the one place tokenizers consults them for ids (Metaspace's
// prepend_scheme "first") uses piece::at_start instead.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace ferry::io::hf {

// A part of the text on its way to the model (tokenizers' Split): normalized text still to be
// tokenized, or an added token already recognised.
struct piece {
  std::string text;
  int32_t token = -1;     // the added token's id; -1 for text
  bool at_start = false;  // starts at offset 0 of the original text
};

class normalizer {
 public:
  virtual ~normalizer() = default;
  virtual void normalize(std::string& s) const = 0;
};

class pre_tokenizer {
 public:
  virtual ~pre_tokenizer() = default;
  // Splits the text pieces (token pieces stay as they are); empty pieces are dropped.
  virtual void pre_tokenize(std::vector<piece>& pieces) const = 0;
};

class decoder {
 public:
  virtual ~decoder() = default;
  // tokenizers' decode_chain: token strings in, strings out (joined by the caller).
  virtual void decode_chain(std::vector<std::string>& tokens) const = 0;
};

// Each returns nullptr for a JSON null. `where` is the file, for errors.
std::unique_ptr<normalizer> make_normalizer(const nlohmann::json& j, const std::string& where);
std::unique_ptr<pre_tokenizer> make_pre_tokenizer(const nlohmann::json& j, const std::string& where);
std::unique_ptr<decoder> make_decoder(const nlohmann::json& j, const std::string& where);

}  // namespace ferry::io::hf
