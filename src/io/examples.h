#pragma once
// Instruction and chat examples, one per line of a .jsonl file:
//   {"prompt": "...", "completion": "..."}          BOS (when the tokenizer has one) + prompt, then
//                                                   completion + EOS, trained (TRL's "standard"
//                                                   prompt-completion form)
//   {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
//                                                   the chat template; assistant messages trained
//   {"prompt": [messages], "completion": [messages]} the chat template over both; the completion's
//                                                   assistant messages trained
// Other keys on a line are ignored. A .jsonl file holds examples when its first non-blank line has
// "messages" or "prompt"; otherwise it is a {"text": ...} file (token_stream.h).
//
// Each example is its tokens and a per-token flag: 1 where the token is a target of the loss
// (chat_template.h says which tokens those are). An example longer than max_length tokens is cut
// to its first max_length tokens (TRL's default), dropped, or an error (long_examples); one line
// on stderr counts them. An example with no trained target left is dropped and counted. A
// malformed line (not JSON, a missing or mistyped field, an unknown role, an empty completion, a
// conversation the template refuses) is a one-line error naming file and line, or, with
// skip_invalid, a counted skip.
#include <cstdint>
#include <string>
#include <vector>

#include "src/io/token_stream.h"
#include "src/io/tokenizer.h"

namespace ferry::io {

enum class long_example_policy { long_truncate, long_drop, long_error };
long_example_policy parse_long_example_policy(const std::string& name);  // truncate | drop | error

struct example_options {
  std::string chat_template = "auto";  // llama2 | llama3 | chatml | zephyr | auto (chat_template.h)
  std::string template_dir;            // where auto reads tokenizer_config.json ("" = nowhere)
  int64_t max_length = 4096;           // tokens per example at most
  long_example_policy long_examples = long_example_policy::long_truncate;
  bool skip_invalid = false;
};

// Whether the .jsonl file at path holds examples (see above).
bool jsonl_holds_examples(const std::string& path);

class example_set {
 public:
  // Reads, renders and encodes every example of files (each a .jsonl example file), in file and
  // line order. Throws as described above; an input with no usable example is an error.
  static example_set load(const std::vector<std::string>& files, const tokenizer& tok, const example_options& opt,
                          bool progress = true);

  int64_t size() const { return static_cast<int64_t>(offsets_.size()) - 1; }
  int64_t length(int64_t i) const { return offsets_[size_t(i) + 1] - offsets_[size_t(i)]; }
  const int32_t* ids(int64_t i) const { return ids_.data() + offsets_[size_t(i)]; }
  const uint8_t* trained(int64_t i) const { return trained_.data() + offsets_[size_t(i)]; }
  int64_t num_tokens() const { return static_cast<int64_t>(ids_.size()); }
  int64_t num_targets() const { return targets_; }  // trained tokens that are targets (not an example's first)
  int64_t max_id() const { return max_id_; }
  // "chat template llama3; 3 examples truncated to 4096 tokens (first: a.jsonl:17); ..." (may be empty)
  const std::string& notes() const { return notes_; }

 private:
  std::vector<int32_t> ids_;
  std::vector<uint8_t> trained_;
  std::vector<int64_t> offsets_{0};
  int64_t targets_ = 0;
  int64_t max_id_ = -1;
  std::string notes_;
};

// Best-fit decreasing: lengths (each in [1, capacity]) grouped into bins of total length at most
// capacity, every index in exactly one bin; each example goes, longest first (ties: lower index
// first), to the bin with the least room that fits it. Bins are listed in creation order with
// their indices ascending. Deterministic.
std::vector<std::vector<int64_t>> pack_best_fit(const std::vector<int64_t>& lengths, int64_t capacity);

}  // namespace ferry::io
