#pragma once
// HF tokenizer.json files with a BPE model: the byte-level BPE of Llama 3 and GPT-2 and the
// sentencepiece-style BPE of Llama 2 and Mistral (byte fallback), encoded exactly as HF
// tokenizers' Tokenizer.encode(text, add_special_tokens=False) and decoded as its
// decode(ids, skip_special_tokens=True):
//   1. added tokens with "normalized": false are cut out of the raw text (leftmost-longest,
//      honouring single_word, lstrip and rstrip);
//   2. the rest is normalized, and added tokens with "normalized": true are cut out of it;
//   3. the pre-tokenizer splits the remaining text, and the BPE model encodes each part.
// The stages are in hf_pipeline.h and hf_bpe.h, the regular expressions (PCRE2) in hf_regex.h.
// "truncation", "padding" and "post_processor" do not change encode(); the post-processor is
// only consulted for BOS/EOS. Text that is not valid UTF-8 is read as Python's
// bytes.decode(errors="replace") reads it.
//
// Known limits: code points assigned after Unicode 14.0 (PCRE2 10.42's tables; tokenizers' own
// tables are newer) may pre-tokenize differently; Oniguruma's POSIX bracket classes and \b keep
// PCRE2's meaning.
#include <memory>
#include <string>

#include "src/io/tokenizer.h"

namespace ferry::io {

// path: a tokenizer.json. BOS and EOS come from bos_token / eos_token of a tokenizer_config.json
// in the same directory (a string or {"content": ...}; null means none), else from the
// post-processor's template (the special token before $A is BOS, after it EOS), else from special
// added tokens with the usual names (<s> </s>, <|begin_of_text|> <|end_of_text|>, ...); -1 when
// nothing names one. Throws ferry::error, one line naming the file and the component, for a
// file that is not JSON, lacks a field, or uses a component ferry does not implement
// (WordPiece, Unigram, Unicode normal forms, ...).
std::unique_ptr<tokenizer> load_hf_tokenizer(const std::string& path);

}  // namespace ferry::io
