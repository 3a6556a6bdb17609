#pragma once
// The BPE model of a tokenizer.json ("model": {"type": "BPE", ...}) as HF tokenizers runs it
// (models/bpe/model.rs, word.rs): each pre-token's characters looked up in the vocabulary (with
// byte fallback to <0xXX> pieces, else the unknown token, fused or not), then merged lowest rank
// first, leftmost first among equal ranks; with ignore_merges a pre-token that is itself in the
// vocabulary is taken whole. Merges come as "a b" strings or ["a", "b"] pairs.
#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace ferry::io::hf {

class bpe_model {
 public:
  // m: the "model" object. where: the file, for errors (ferry::error, one line): a type other
  // than BPE, dropout, a merge whose parts or result are not in the vocabulary.
  bpe_model(const nlohmann::json& m, const std::string& where);

  // Appends the ids of one pre-token (valid UTF-8; nothing for an empty one). Thread-safe: each
  // thread keeps its own memo of recent words, as tokenizers does (words repeat in any corpus).
  void encode(std::string_view word, std::vector<int32_t>& out) const;

  int32_t id_of(const std::string& piece) const;      // -1 when absent
  const std::string* piece_of(int32_t id) const;      // nullptr when no entry has that id
  int64_t entries() const { return static_cast<int64_t>(vocab_.size()); }
  int32_t max_id() const { return max_id_; }           // -1 for an empty vocabulary

 private:
  struct merge {
    uint32_t rank;
    int32_t id;  // of the merged piece
  };
  static uint64_t pair_key(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }
  void encode_word(std::string_view word, std::vector<int32_t>& out) const;
  void merge_all(std::vector<int32_t>& ids) const;

  uint64_t serial_;  // tells this model's memo entries from another's on a shared thread

  std::string where_;
  std::unordered_map<std::string, int32_t> vocab_;
  std::unordered_map<int32_t, std::string> pieces_;
  std::unordered_map<uint64_t, merge> merges_;
  int32_t byte_ids_[256];  // id of <0xXX>, -1 when absent (byte fallback)
  std::string unk_;        // "" = no unknown token
  std::string prefix_;     // continuing_subword_prefix
  std::string suffix_;     // end_of_word_suffix
  bool fuse_unk_ = false;
  bool byte_fallback_ = false;
  bool ignore_merges_ = false;
  int32_t max_id_ = -1;
};

}  // namespace ferry::io::hf
