#include "src/io/hf_tokenizer.h"

#include <algorithm>
#include <array>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <unordered_map>
#include <unordered_set>

#include "src/common/error.h"
#include "src/io/atomic_file.h"
#include "src/io/hf_bpe.h"
#include "src/io/hf_pipeline.h"
#include "src/io/hf_regex.h"
#include "src/io/hf_text.h"

namespace ferry::io {
namespace fs = std::filesystem;
using nlohmann::json;

namespace hf {
namespace {

struct added_token {
  std::string content;
  bool single_word = false, lstrip = false, rstrip = false, normalized = true, special = false;
  bool same_flags(const added_token& o) const {
    return content == o.content && single_word == o.single_word && lstrip == o.lstrip && rstrip == o.rstrip &&
           normalized == o.normalized && special == o.special;
  }
};

struct token_match {
  size_t begin, end;
  int32_t id;
};

// Byte trie over added-token spellings: the non-overlapping leftmost-longest matches that
// tokenizers' daachorse automaton (MatchKind::LeftmostLongest) reports.
class token_trie {
 public:
  void add(const std::string& pattern, int32_t id) {
    if (pattern.empty()) return;
    int node = 0;
    for (unsigned char c : pattern) {
      auto& e = nodes_[static_cast<size_t>(node)].next;
      auto it = std::find_if(e.begin(), e.end(), [&](const auto& x) { return x.first == c; });
      if (it != e.end()) {
        node = it->second;
      } else {
        const int child = static_cast<int>(nodes_.size());
        e.emplace_back(c, child);
        nodes_.emplace_back();
        node = child;
      }
    }
    nodes_[static_cast<size_t>(node)].id = id;
    first_[static_cast<unsigned char>(pattern[0])] = true;
  }
  bool empty() const { return nodes_.size() == 1; }
  std::vector<token_match> find(std::string_view s) const {
    std::vector<token_match> out;
    for (size_t i = 0; i < s.size();) {
      if (!first_[static_cast<unsigned char>(s[i])]) {
        ++i;
        continue;
      }
      int node = 0;
      size_t best_end = 0;
      int32_t best_id = -1;
      for (size_t j = i; j < s.size(); ++j) {
        const auto& e = nodes_[static_cast<size_t>(node)].next;
        auto it = std::find_if(e.begin(), e.end(), [&](const auto& x) { return x.first == static_cast<unsigned char>(s[j]); });
        if (it == e.end()) break;
        node = it->second;
        if (nodes_[static_cast<size_t>(node)].id >= 0) {
          best_end = j + 1;
          best_id = nodes_[static_cast<size_t>(node)].id;
        }
      }
      if (best_id >= 0) {
        out.push_back({i, best_end, best_id});
        i = best_end;
      } else {
        ++i;
      }
    }
    return out;
  }

 private:
  struct node {
    std::vector<std::pair<unsigned char, int>> next;
    int32_t id = -1;
  };
  std::vector<node> nodes_ = std::vector<node>(1);
  std::array<bool, 256> first_{};
};

// Well-known spellings of BOS and EOS, consulted when neither tokenizer_config.json nor the
// post-processor names them.
constexpr const char* k_bos_names[] = {"<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>"};
constexpr const char* k_eos_names[] = {"</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>"};

class hf_tokenizer final : public tokenizer {
 public:
  explicit hf_tokenizer(const std::string& path);

  std::vector<int32_t> encode(const std::string& text) const override;
  std::string decode(const std::vector<int32_t>& ids) const override;
  int64_t vocab_size() const override { return vocab_size_; }
  int32_t bos_id() const override { return bos_; }
  int32_t eos_id() const override { return eos_; }
  int32_t token_id(const std::string& piece) const override {
    auto it = added_ids_.find(piece);
    return it != added_ids_.end() ? it->second : model_->id_of(piece);
  }
  std::string name() const override { return "tokenizer.json:" + path_; }

 private:
  void load_added_tokens(const json& list);
  void split_added(piece p, const token_trie& trie, std::vector<piece>& out) const;
  int32_t special_id(const std::string& content) const;
  int32_t config_token(const json& config, const char* key, const std::string& config_path, bool* found) const;
  int32_t template_token(const json& processor, bool want_bos) const;
  void resolve_bos_eos(const json& root);

  std::string path_;
  std::unique_ptr<bpe_model> model_;
  std::unique_ptr<normalizer> normalizer_;
  std::unique_ptr<pre_tokenizer> pre_tokenizer_;
  std::unique_ptr<decoder> decoder_;
  std::unordered_map<std::string, int32_t> added_ids_;      // content -> id
  std::unordered_map<int32_t, added_token> added_tokens_;  // id -> token
  std::unordered_map<int32_t, std::string> normalized_;    // id -> normalized content, where it differs
  std::unordered_set<std::string> special_;                // contents of special tokens
  token_trie raw_trie_, normalized_trie_;
  std::unique_ptr<regex> word_char_;  // Rust regex's \w, for single_word
  int64_t vocab_size_ = 0;
  int32_t bos_ = -1, eos_ = -1;
};

hf_tokenizer::hf_tokenizer(const std::string& path) : path_(path) {
  json root;
  try {
    root = json::parse(read_file(path));
  } catch (const json::exception& e) {
    FERRY_CHECK(false, path, " is not valid JSON (", e.what(), "); pass an HF tokenizer.json");
  }
  FERRY_CHECK(root.is_object(), path, " is not a tokenizer.json (the top level is not an object)");
  if (root.contains("version"))
    FERRY_CHECK(root["version"] == "1.0", path, ": tokenizer.json version ", root["version"].dump(),
                " is not supported (ferry reads version \"1.0\")");
  FERRY_CHECK(root.contains("model"), path, " has no \"model\"; pass an HF tokenizer.json");
  model_ = std::make_unique<bpe_model>(root["model"], path);
  normalizer_ = make_normalizer(root.value("normalizer", json()), path);
  pre_tokenizer_ = make_pre_tokenizer(root.value("pre_tokenizer", json()), path);
  decoder_ = make_decoder(root.value("decoder", json()), path);
  word_char_ = std::make_unique<regex>("[\\p{Alphabetic}\\p{M}\\p{Nd}\\p{Pc}\\p{Join_Control}]",
                                       regex_syntax::regex_pcre2, path);
  if (root.contains("added_tokens") && !root["added_tokens"].is_null()) load_added_tokens(root["added_tokens"]);

  int64_t max_id = model_->max_id();
  for (const auto& [id, t] : added_tokens_) max_id = std::max<int64_t>(max_id, id);
  vocab_size_ = max_id + 1;
  FERRY_CHECK(vocab_size_ > 0, path, " has an empty vocabulary");
  resolve_bos_eos(root);
}

// tokenizers' AddedVocabulary::add_tokens as the tokenizer.json loader calls it: the "id" fields
// are not read back; a token takes its id from the model vocabulary when spelled there, else the
// next id after it.
void hf_tokenizer::load_added_tokens(const json& list) {
  FERRY_CHECK(list.is_array(), path_, ": \"added_tokens\" must be an array");
  int32_t next_id = static_cast<int32_t>(model_->entries());
  for (size_t i = 0; i < list.size(); ++i) {
    const json& j = list[i];
    const std::string what = path_ + ": added_tokens[" + std::to_string(i) + "]";
    FERRY_CHECK(j.is_object() && j.contains("content") && j["content"].is_string(), what,
                " has no \"content\" string");
    added_token t;
    t.content = j["content"].get<std::string>();
    const auto flag = [&](const char* key, bool fallback) {
      if (!j.contains(key)) return fallback;
      FERRY_CHECK(j[key].is_boolean(), what, ": \"", key, "\" must be true or false");
      return j[key].get<bool>();
    };
    t.special = flag("special", false);
    t.single_word = flag("single_word", false);
    t.lstrip = flag("lstrip", false);
    t.rstrip = flag("rstrip", false);
    t.normalized = flag("normalized", !t.special);
    if (t.content.empty()) continue;
    auto known = added_ids_.find(t.content);
    if (known != added_ids_.end() && added_tokens_[known->second].same_flags(t)) continue;
    int32_t id = known != added_ids_.end() ? known->second : model_->id_of(t.content);
    if (id < 0) id = next_id++;
    if (j.contains("id") && j["id"].is_number_integer() && j["id"].get<int64_t>() != id)
      std::fprintf(stderr, "warning: %s: token '%s' has id %lld in the file but %d as HF tokenizers assigns it\n",
                   path_.c_str(), t.content.c_str(), static_cast<long long>(j["id"].get<int64_t>()), id);
    if (t.normalized && normalizer_) {
      std::string n = t.content;
      normalizer_->normalize(n);
      if (n != t.content) normalized_[id] = n;
    }
    added_ids_[t.content] = id;
    if (t.special) special_.insert(t.content);
    added_tokens_[id] = t;
  }
  for (const auto& [id, t] : added_tokens_) {
    if (!t.normalized) raw_trie_.add(t.content, id);
    else normalized_trie_.add(normalized_.count(id) ? normalized_.at(id) : t.content, id);
  }
}

// tokenizers' AddedVocabulary::find_matches and split_with_indices.
void hf_tokenizer::split_added(piece p, const token_trie& trie, std::vector<piece>& out) const {
  if (p.text.empty()) return;
  if (trie.empty()) {
    out.push_back(std::move(p));
    return;
  }
  const std::string& s = p.text;
  size_t start_offset = 0;
  const auto emit = [&](size_t b, size_t e, int32_t id) { out.push_back({s.substr(b, e - b), id, p.at_start && b == 0}); };
  for (token_match m : trie.find(s)) {
    const added_token& t = added_tokens_.at(m.id);
    if (t.single_word) {
      const bool space_before = m.begin == 0 || !word_char_->matches_at(s, utf8_prev(s, m.begin));
      const bool space_after = m.end == s.size() || !word_char_->matches_at(s, m.end);
      if (!space_before || !space_after) continue;
    }
    if (t.lstrip) {
      size_t b = m.begin;
      while (b > 0 && is_white_space(utf8_at(s, utf8_prev(s, b)))) b = utf8_prev(s, b);
      m.begin = std::max(b, start_offset);
    }
    if (t.rstrip)
      while (m.end < s.size() && is_white_space(utf8_at(s, m.end))) m.end += utf8_len(static_cast<unsigned char>(s[m.end]));
    if (start_offset < m.begin) emit(start_offset, m.begin, -1);
    emit(m.begin, m.end, m.id);
    start_offset = m.end;
  }
  if (start_offset < s.size()) emit(start_offset, s.size(), -1);
}

std::vector<int32_t> hf_tokenizer::encode(const std::string& raw) const {
  std::vector<piece> first, pieces;
  split_added({utf8_lossy(raw), -1, true}, raw_trie_, first);
  for (piece& p : first) {
    if (p.token >= 0) {
      pieces.push_back(std::move(p));
      continue;
    }
    if (normalizer_) normalizer_->normalize(p.text);
    split_added(std::move(p), normalized_trie_, pieces);
  }
  if (pre_tokenizer_) pre_tokenizer_->pre_tokenize(pieces);
  std::vector<int32_t> ids;
  ids.reserve(raw.size() / 3 + 1);
  for (const piece& p : pieces) {
    if (p.token >= 0) ids.push_back(p.token);
    else model_->encode(p.text, ids);
  }
  return ids;
}

std::string hf_tokenizer::decode(const std::vector<int32_t>& ids) const {
  std::vector<std::string> tokens;
  tokens.reserve(ids.size());
  for (int32_t id : ids) {
    FERRY_CHECK(id >= 0 && id < vocab_size_, "token id ", id, " is outside the vocabulary of ", path_, " (",
                vocab_size_, " ids)");
    const std::string* t = nullptr;
    auto added = added_tokens_.find(id);
    if (added != added_tokens_.end()) {
      auto n = normalized_.find(id);
      t = n != normalized_.end() ? &n->second : &added->second.content;
    } else {
      t = model_->piece_of(id);
    }
    if (t == nullptr || special_.count(*t)) continue;  // skip_special_tokens=True
    tokens.push_back(*t);
  }
  std::string out;
  if (!decoder_) {
    for (size_t i = 0; i < tokens.size(); ++i) out += (i ? " " : "") + tokens[i];
    return out;
  }
  decoder_->decode_chain(tokens);
  for (const std::string& t : tokens) out += t;
  return out;
}

int32_t hf_tokenizer::special_id(const std::string& content) const {
  auto it = added_ids_.find(content);
  return it != added_ids_.end() && special_.count(content) ? it->second : -1;
}

// bos_token / eos_token of tokenizer_config.json: a string, {"content": ...}, or null.
int32_t hf_tokenizer::config_token(const json& config, const char* key, const std::string& config_path,
                                   bool* found) const {
  *found = config.contains(key);
  if (!*found || config[key].is_null()) return -1;
  const json& v = config[key];
  std::string content;
  if (v.is_string()) {
    content = v.get<std::string>();
  } else {
    FERRY_CHECK(v.is_object() && v.contains("content") && v["content"].is_string(), config_path, ": \"", key,
                "\" must be a string, {\"content\": ...} or null");
    content = v["content"].get<std::string>();
  }
  const int32_t id = token_id(content);
  FERRY_CHECK(id >= 0, config_path, ": \"", key, "\" is '", content, "', which is not in the vocabulary of ", path_);
  return id;
}

// The special token before (BOS) or after (EOS) the sequence in a TemplateProcessing "single"
// template, or the cls/sep token of Bert/RobertaProcessing; -1 when there is none.
int32_t hf_tokenizer::template_token(const json& p, bool want_bos) const {
  if (!p.is_object() || !p.contains("type") || !p["type"].is_string()) return -1;
  const std::string type = p["type"].get<std::string>();
  if (type == "Sequence" && p.contains("processors") && p["processors"].is_array()) {
    for (const json& q : p["processors"]) {
      const int32_t id = template_token(q, want_bos);
      if (id >= 0) return id;
    }
    return -1;
  }
  if (type == "BertProcessing" || type == "RobertaProcessing") {
    const char* key = want_bos ? "cls" : "sep";
    if (p.contains(key) && p[key].is_array() && !p[key].empty() && p[key][0].is_string())
      return token_id(p[key][0].get<std::string>());
    return -1;
  }
  if (type != "TemplateProcessing" || !p.contains("single") || !p["single"].is_array()) return -1;
  std::string before, after;
  bool seen_sequence = false;
  for (const json& item : p["single"]) {
    if (item.contains("Sequence")) {
      seen_sequence = true;
    } else if (item.contains("SpecialToken") && item["SpecialToken"].contains("id") &&
               item["SpecialToken"]["id"].is_string()) {
      const std::string name = item["SpecialToken"]["id"].get<std::string>();
      if (!seen_sequence && before.empty()) before = name;
      if (seen_sequence) after = name;
    }
  }
  const std::string& name = want_bos ? before : after;
  if (name.empty()) return -1;
  // The template names an entry of its special_tokens map, whose single id is the token.
  const json& st = p.value("special_tokens", json::object());
  if (st.contains(name) && st[name].contains("ids") && st[name]["ids"].is_array() && st[name]["ids"].size() == 1 &&
      st[name]["ids"][0].is_number_integer())
    return st[name]["ids"][0].get<int32_t>();
  return token_id(name);
}

void hf_tokenizer::resolve_bos_eos(const json& root) {
  bool bos_found = false, eos_found = false;
  const fs::path config_path = fs::path(path_).parent_path() / "tokenizer_config.json";
  std::error_code ec;
  if (fs::is_regular_file(config_path, ec)) {
    json config;
    try {
      config = json::parse(read_file(config_path.string()));
    } catch (const json::exception& e) {
      FERRY_CHECK(false, config_path.string(), " is not valid JSON (", e.what(), ")");
    }
    FERRY_CHECK(config.is_object(), config_path.string(), " is not a JSON object");
    bos_ = config_token(config, "bos_token", config_path.string(), &bos_found);
    eos_ = config_token(config, "eos_token", config_path.string(), &eos_found);
  }
  const json processor = root.value("post_processor", json());
  if (!bos_found) bos_ = template_token(processor, true);
  if (!eos_found) eos_ = template_token(processor, false);
  for (const char* n : k_bos_names)
    if (!bos_found && bos_ < 0) bos_ = special_id(n);
  for (const char* n : k_eos_names)
    if (!eos_found && eos_ < 0) eos_ = special_id(n);
}

}  // namespace
}  // namespace hf

std::unique_ptr<tokenizer> load_hf_tokenizer(const std::string& path) {
  return std::make_unique<hf::hf_tokenizer>(path);
}

}  // namespace ferry::io
