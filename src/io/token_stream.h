#pragma once
// Training inputs as one token stream. Which file is what (documented for users in dataset.h):
//   - a file starting with the llm.c magic 20240520 (int32 little-endian) is an llm.c token file:
//     256 int32 header {magic, version, n_tokens, 0...}, version 1 = uint16 tokens, 2 = uint32;
//   - any other *.bin is a headerless uint16 token file, as nanoGPT's prepare.py writes;
//   - *.jsonl: one JSON object per line with a string "text" field (blank lines are skipped);
//   - anything else is UTF-8 text, one document per file.
// Directories are walked recursively in sorted path order, skipping hidden entries (".name").
// Token files are memory-mapped and used as they are (llm.c files already carry their document
// separators); text and JSONL are tokenized once at load, each document followed by EOS.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "src/io/mapped_file.h"
#include "src/io/tokenizer.h"

namespace ferry::io {

enum class input_kind { input_text, input_jsonl, input_llmc_tokens, input_nanogpt_tokens };

struct input_file {
  std::string path;
  input_kind kind;
};

// Expands files and directories; throws ferry::error for a missing path or a directory with no
// usable file in it.
std::vector<input_file> list_inputs(const std::vector<std::string>& paths);

class token_stream {
 public:
  // `tok` tokenizes text and JSONL inputs (it may be null when every input is a token file).
  // vocab_limit > 0: throws when the tokenizer's vocabulary or any id in a token file is too big
  // for it. progress: draw a progress bar on stderr when it is a terminal.
  static token_stream build(const std::vector<input_file>& inputs, const tokenizer* tok, int64_t vocab_limit,
                            bool progress = true);

  int64_t size() const { return size_; }
  int64_t max_id() const { return max_id_; }  // -1 for an empty stream
  // out[i] = token at (begin + i) mod size() for i in [0, n): reads past the end wrap around.
  void read(int64_t begin, int64_t n, int64_t* out) const;

 private:
  struct segment {
    int64_t start;        // position of its first token in the stream
    int64_t length;
    const uint8_t* data;  // little-endian tokens of `width` bytes
    int width;            // 2 or 4
  };
  void append(const uint8_t* data, int64_t length, int width);

  std::vector<mapped_file> maps_;
  std::vector<std::vector<uint8_t>> owned_;  // tokenized text; heap buffers stay put when moved
  std::vector<segment> segments_;
  int64_t size_ = 0;
  int64_t max_id_ = -1;
};

// Writes the tokens of `s` as an llm.c token file (version 1, uint16, when vocab_size <= 65536,
// else version 2, uint32), atomically. Throws when the stream exceeds llm.c's int32 token count.
void write_llmc_token_file(const std::string& path, const token_stream& s, int64_t vocab_size, bool progress = true);

}  // namespace ferry::io
