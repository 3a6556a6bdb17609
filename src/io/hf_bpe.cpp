#include "src/io/hf_bpe.h"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <queue>

#include "src/common/error.h"
#include "src/io/hf_text.h"

namespace ferry::io::hf {

namespace {

// A thread's memo of words it encoded, for one model at a time (tokenizers' BPE cache: 10,000
// words of under 256 bytes).
struct word_memo {
  uint64_t model = 0;
  std::unordered_map<std::string, std::vector<int32_t>> words;
};
constexpr size_t k_memo_words = 10000, k_memo_word_bytes = 256;
std::atomic<uint64_t> next_serial{1};

// A string field that may be absent or null ("" then).
std::string optional_string(const nlohmann::json& m, const char* key, const std::string& where) {
  if (!m.contains(key) || m[key].is_null()) return "";
  FERRY_CHECK(m[key].is_string(), where, ": model.", key, " must be a string or null");
  return m[key].get<std::string>();
}

bool optional_bool(const nlohmann::json& m, const char* key, const std::string& where) {
  if (!m.contains(key) || m[key].is_null()) return false;
  FERRY_CHECK(m[key].is_boolean(), where, ": model.", key, " must be true, false or null");
  return m[key].get<bool>();
}

}  // namespace

bpe_model::bpe_model(const nlohmann::json& m, const std::string& where) : serial_(next_serial++), where_(where) {
  FERRY_CHECK(m.is_object(), where, ": \"model\" must be an object");
  const std::string type = m.contains("type") && m["type"].is_string() ? m["type"].get<std::string>() : "BPE";
  FERRY_CHECK(type == "BPE", where, ": model type '", type,
              "' is not supported; ferry reads BPE tokenizer.json files (byte-level as in Llama 3 and GPT-2, or "
              "sentencepiece-style as in Llama 2 and Mistral)");
  FERRY_CHECK(m.contains("vocab") && m["vocab"].is_object(), where, ": model.vocab is missing or not an object");
  FERRY_CHECK(m.contains("merges") && m["merges"].is_array(), where, ": model.merges is missing or not an array");
  if (m.contains("dropout") && !m["dropout"].is_null()) {
    FERRY_CHECK(m["dropout"].is_number(), where, ": model.dropout must be a number or null");
    const double p = m["dropout"].get<double>();
    FERRY_CHECK(p == 0.0, where, ": model.dropout is ", p,
                "; BPE dropout is a random training-time augmentation ferry does not apply: set it to null");
  }
  unk_ = optional_string(m, "unk_token", where);
  prefix_ = optional_string(m, "continuing_subword_prefix", where);
  suffix_ = optional_string(m, "end_of_word_suffix", where);
  fuse_unk_ = optional_bool(m, "fuse_unk", where);
  byte_fallback_ = optional_bool(m, "byte_fallback", where);
  ignore_merges_ = optional_bool(m, "ignore_merges", where);

  vocab_.reserve(m["vocab"].size());
  for (const auto& [piece, id] : m["vocab"].items()) {
    FERRY_CHECK(id.is_number_integer() && id.get<int64_t>() >= 0 && id.get<int64_t>() < INT32_MAX, where,
                ": model.vocab['", piece, "'] is not a token id (a non-negative integer)");
    const int32_t v = id.get<int32_t>();
    vocab_[piece] = v;
    pieces_[v] = piece;
    max_id_ = std::max(max_id_, v);
  }
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    byte_ids_[b] = id_of(name);
  }

  const auto& merges = m["merges"];
  merges_.reserve(merges.size());
  uint32_t rank = 0;
  for (const auto& e : merges) {
    std::string a, b;
    if (e.is_string()) {
      const std::string line = e.get<std::string>();
      if (line.rfind("#version", 0) == 0) continue;  // a merges.txt header, skipped without a rank
      const size_t sp = line.find(' ');
      FERRY_CHECK(sp != std::string::npos && line.find(' ', sp + 1) == std::string::npos, where, ": model.merges[",
                  rank, "] '", line, "' is not two pieces separated by one space");
      a = line.substr(0, sp);
      b = line.substr(sp + 1);
    } else {
      FERRY_CHECK(e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string(), where, ": model.merges[",
                  rank, "] is neither \"a b\" nor [\"a\", \"b\"]");
      a = e[0].get<std::string>();
      b = e[1].get<std::string>();
    }
    const int32_t ia = id_of(a), ib = id_of(b);
    FERRY_CHECK(ia >= 0 && ib >= 0, where, ": model.merges[", rank, "] uses '", ia < 0 ? a : b,
                "', which is not in model.vocab");
    // As tokenizers does: the merged piece drops as many leading bytes of the right part as
    // continuing_subword_prefix has.
    const std::string merged = a + b.substr(std::min(prefix_.size(), b.size()));
    const int32_t im = id_of(merged);
    FERRY_CHECK(im >= 0, where, ": model.merges[", rank, "] makes '", merged, "', which is not in model.vocab");
    merges_[pair_key(ia, ib)] = merge{rank, im};  // a repeated pair keeps its last rank
    ++rank;
  }
}

int32_t bpe_model::id_of(const std::string& piece) const {
  auto it = vocab_.find(piece);
  return it == vocab_.end() ? -1 : it->second;
}

const std::string* bpe_model::piece_of(int32_t id) const {
  auto it = pieces_.find(id);
  return it == pieces_.end() ? nullptr : &it->second;
}

void bpe_model::encode(std::string_view w, std::vector<int32_t>& out) const {
  if (w.empty()) return;
  if (w.size() >= k_memo_word_bytes) return encode_word(w, out);
  thread_local word_memo memo;
  if (memo.model != serial_) {
    memo.model = serial_;
    memo.words.clear();
  }
  std::string key(w);
  auto it = memo.words.find(key);
  if (it == memo.words.end()) {
    std::vector<int32_t> ids;
    encode_word(w, ids);
    if (memo.words.size() >= k_memo_words) memo.words.clear();
    it = memo.words.emplace(std::move(key), std::move(ids)).first;
  }
  out.insert(out.end(), it->second.begin(), it->second.end());
}

void bpe_model::encode_word(std::string_view w, std::vector<int32_t>& out) const {
  std::string s(w);
  if (ignore_merges_) {
    auto it = vocab_.find(s);
    if (it != vocab_.end()) {
      out.push_back(it->second);
      return;
    }
  }
  std::vector<int32_t> ids;
  ids.reserve(w.size());
  int32_t unk = -1;  // a pending unknown token, emitted before the next known piece
  for (size_t i = 0; i < w.size();) {
    const size_t n = utf8_len(static_cast<unsigned char>(w[i]));
    s.clear();
    if (i > 0) s += prefix_;
    s.append(w.substr(i, n));
    if (i + n == w.size()) s += suffix_;
    i += n;
    auto it = vocab_.find(s);
    if (it != vocab_.end()) {
      if (unk >= 0) ids.push_back(unk);
      unk = -1;
      ids.push_back(it->second);
      continue;
    }
    if (byte_fallback_) {
      bool all = true;
      for (unsigned char c : s) all = all && byte_ids_[c] >= 0;
      if (all) {  // tokenizers leaves a pending unknown token pending here
        for (unsigned char c : s) ids.push_back(byte_ids_[c]);
        continue;
      }
    }
    if (unk_.empty()) continue;  // no unknown token: the character is dropped, as tokenizers does
    if (unk >= 0 && fuse_unk_) continue;
    if (unk >= 0) ids.push_back(unk);
    unk = id_of(unk_);
    FERRY_CHECK(unk >= 0, where_, ": model.unk_token '", unk_, "' is not in model.vocab");
  }
  if (unk >= 0) ids.push_back(unk);
  merge_all(ids);
  out.insert(out.end(), ids.begin(), ids.end());
}

// tokenizers' Word::merge_all without dropout: a queue of candidate merges ordered by rank, then
// position; an entry is stale when the pair now at its position no longer merges into its id.
void bpe_model::merge_all(std::vector<int32_t>& ids) const {
  const int n = static_cast<int>(ids.size());
  if (n < 2) return;
  struct symbol {
    int32_t id;
    int prev, next;
    bool alive;
  };
  struct candidate {
    uint32_t rank;
    int pos;
    int32_t id;
  };
  const auto later = [](const candidate& a, const candidate& b) {
    return a.rank != b.rank ? a.rank > b.rank : a.pos > b.pos;
  };
  std::vector<symbol> sym(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) sym[static_cast<size_t>(i)] = {ids[static_cast<size_t>(i)], i - 1, i + 1 < n ? i + 1 : -1, true};
  std::vector<candidate> heap;
  heap.reserve(static_cast<size_t>(n));
  for (int i = 0; i + 1 < n; ++i) {
    auto it = merges_.find(pair_key(ids[static_cast<size_t>(i)], ids[static_cast<size_t>(i) + 1]));
    if (it != merges_.end()) heap.push_back({it->second.rank, i, it->second.id});
  }
  std::priority_queue<candidate, std::vector<candidate>, decltype(later)> queue(later, std::move(heap));
  while (!queue.empty()) {
    const candidate top = queue.top();
    queue.pop();
    symbol& left = sym[static_cast<size_t>(top.pos)];
    if (!left.alive || left.next < 0) continue;
    symbol& right = sym[static_cast<size_t>(left.next)];
    auto cur = merges_.find(pair_key(left.id, right.id));
    if (cur == merges_.end() || cur->second.id != top.id) continue;
    left.id = top.id;
    right.alive = false;
    left.next = right.next;
    if (right.next >= 0) sym[static_cast<size_t>(right.next)].prev = top.pos;
    if (left.prev >= 0) {
      auto it = merges_.find(pair_key(sym[static_cast<size_t>(left.prev)].id, left.id));
      if (it != merges_.end()) queue.push({it->second.rank, left.prev, it->second.id});
    }
    if (left.next >= 0) {
      auto it = merges_.find(pair_key(left.id, sym[static_cast<size_t>(left.next)].id));
      if (it != merges_.end()) queue.push({it->second.rank, top.pos, it->second.id});
    }
  }
  ids.clear();
  for (const symbol& s : sym)
    if (s.alive) ids.push_back(s.id);
}

}  // namespace ferry::io::hf
