#include "src/io/hf_pipeline.h"

#include <algorithm>
#include <nlohmann/json.hpp>

#include "src/common/error.h"
#include "src/io/hf_regex.h"
#include "src/io/hf_text.h"

namespace ferry::io::hf {

namespace {

using json = nlohmann::json;

// ---- JSON fields; `what` is "<file>: <stage> <type>" for errors ----

std::string type_of(const json& j, const std::string& where, const char* stage) {
  FERRY_CHECK(j.is_object() && j.contains("type") && j["type"].is_string(), where, ": the ", stage,
              " has no \"type\" field; expected an object such as {\"type\": \"Sequence\", ...}");
  return j["type"].get<std::string>();
}

bool bool_field(const json& j, const char* key, bool fallback, const std::string& what) {
  if (!j.contains(key) || j[key].is_null()) return fallback;
  FERRY_CHECK(j[key].is_boolean(), what, ": \"", key, "\" must be true or false");
  return j[key].get<bool>();
}

std::string string_field(const json& j, const char* key, const std::string& what) {
  FERRY_CHECK(j.contains(key) && j[key].is_string(), what, ": \"", key, "\" is missing or not a string");
  return j[key].get<std::string>();
}

// A string of exactly one character (Rust's char), as UTF-8.
std::string char_field(const json& j, const char* key, const std::string& what) {
  const std::string s = string_field(j, key, what);
  FERRY_CHECK(!s.empty() && utf8_len(static_cast<unsigned char>(s[0])) == s.size(), what, ": \"", key,
              "\" must be one character, got '", s, "'");
  return s;
}

const json& array_field(const json& j, const char* key, const std::string& what) {
  FERRY_CHECK(j.contains(key) && j[key].is_array(), what, ": \"", key, "\" is missing or not an array");
  return j[key];
}

// {"String": text} or {"Regex": pattern}.
std::unique_ptr<regex> pattern_field(const json& j, const std::string& what) {
  FERRY_CHECK(j.contains("pattern") && j["pattern"].is_object() && j["pattern"].size() == 1, what,
              ": \"pattern\" must be {\"String\": ...} or {\"Regex\": ...}");
  const auto& p = j["pattern"];
  if (p.contains("String") && p["String"].is_string())
    return std::make_unique<regex>(p["String"].get<std::string>(), regex_syntax::regex_literal, what);
  FERRY_CHECK(p.contains("Regex") && p["Regex"].is_string(), what,
              ": \"pattern\" must be {\"String\": ...} or {\"Regex\": ...}");
  return std::make_unique<regex>(p["Regex"].get<std::string>(), regex_syntax::regex_onig, what);
}

// ---- splitting (tokenizers' NormalizedString::split and PreTokenizedString::split) ----

enum class split_behavior { removed, isolated, merged_with_previous, merged_with_next, contiguous };

split_behavior behavior_field(const json& j, const char* key, const std::string& what) {
  const std::string b = string_field(j, key, what);
  if (b == "Removed") return split_behavior::removed;
  if (b == "Isolated") return split_behavior::isolated;
  if (b == "MergedWithPrevious") return split_behavior::merged_with_previous;
  if (b == "MergedWithNext") return split_behavior::merged_with_next;
  FERRY_CHECK(b == "Contiguous", what, ": \"", key, "\" '", b,
              "' is not one of Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous");
  return split_behavior::contiguous;
}

// Cuts p along the spans of a pattern (match = the pattern matched) and appends the parts kept.
void split_piece(const piece& p, std::vector<span> m, split_behavior b, std::vector<piece>& out) {
  std::vector<span> parts;  // here span::match means "remove"
  bool prev = false;
  switch (b) {
    case split_behavior::isolated:
      for (const span& s : m) parts.push_back({s.begin, s.end, false});
      break;
    case split_behavior::removed:
      parts = std::move(m);
      break;
    case split_behavior::contiguous:
      for (const span& s : m) {
        if (s.match == prev && !parts.empty()) parts.back().end = s.end;
        else parts.push_back({s.begin, s.end, false});
        prev = s.match;
      }
      break;
    case split_behavior::merged_with_previous:
      for (const span& s : m) {
        if (s.match && !prev && !parts.empty()) parts.back().end = s.end;
        else parts.push_back({s.begin, s.end, false});
        prev = s.match;
      }
      break;
    case split_behavior::merged_with_next:
      for (auto it = m.rbegin(); it != m.rend(); ++it) {
        if (it->match && !prev && !parts.empty()) parts.back().begin = it->begin;
        else parts.push_back({it->begin, it->end, false});
        prev = it->match;
      }
      std::reverse(parts.begin(), parts.end());
      break;
  }
  for (const span& s : parts)
    if (!s.match && s.end > s.begin) out.push_back({p.text.substr(s.begin, s.end - s.begin), -1, p.at_start && s.begin == 0});
}

// Applies f(text piece, out) to every text piece; token pieces pass through.
template <typename F>
void split_text_pieces(std::vector<piece>& pieces, F&& f) {
  std::vector<piece> out;
  out.reserve(pieces.size() * 2);
  for (piece& p : pieces) {
    if (p.token >= 0) out.push_back(std::move(p));
    else f(p, out);
  }
  pieces.clear();
  for (piece& p : out)
    if (p.token >= 0 || !p.text.empty()) pieces.push_back(std::move(p));
}

std::string replace_all(const std::string& s, const std::string& from, const std::string& to) {
  std::string out;
  out.reserve(s.size());
  size_t i = 0;
  for (size_t j; (j = s.find(from, i)) != std::string::npos; i = j + from.size()) {
    out.append(s, i, j - i);
    out += to;
  }
  out.append(s, i, std::string::npos);
  return out;
}

std::string bytes_to_chars(const std::string& s) {
  std::string out;
  out.reserve(s.size() * 2);
  for (unsigned char c : s) utf8_append(out, byte_char(c));
  return out;
}

// ---- normalizers ----

class normalizer_sequence final : public normalizer {
 public:
  std::vector<std::unique_ptr<normalizer>> parts;
  void normalize(std::string& s) const override {
    for (const auto& n : parts) n->normalize(s);
  }
};

class normalizer_prepend final : public normalizer {
 public:
  explicit normalizer_prepend(std::string p) : prepend_(std::move(p)) {}
  void normalize(std::string& s) const override {
    if (!s.empty()) s.insert(0, prepend_);
  }

 private:
  std::string prepend_;
};

class normalizer_replace final : public normalizer {
 public:
  normalizer_replace(std::unique_ptr<regex> r, std::string content) : re_(std::move(r)), content_(std::move(content)) {}
  void normalize(std::string& s) const override {
    std::string out;
    out.reserve(s.size());
    for (const span& m : re_->find_matches(s)) {
      if (m.match) out += content_;
      else out.append(s, m.begin, m.end - m.begin);
    }
    s = std::move(out);
  }

 private:
  std::unique_ptr<regex> re_;
  std::string content_;
};

class normalizer_strip final : public normalizer {
 public:
  normalizer_strip(bool left, bool right) : left_(left), right_(right) {}
  void normalize(std::string& s) const override {
    size_t b = 0, e = s.size();
    if (left_)
      while (b < e && is_white_space(utf8_at(s, b))) b += utf8_len(static_cast<unsigned char>(s[b]));
    if (right_)
      while (e > b && is_white_space(utf8_at(s, utf8_prev(s, e)))) e = utf8_prev(s, e);
    s = s.substr(b, e - b);
  }

 private:
  bool left_, right_;
};

class normalizer_byte_level final : public normalizer {
 public:
  void normalize(std::string& s) const override { s = bytes_to_chars(s); }
};

// ---- pre-tokenizers ----

class pre_tokenizer_sequence final : public pre_tokenizer {
 public:
  std::vector<std::unique_ptr<pre_tokenizer>> parts;
  void pre_tokenize(std::vector<piece>& pieces) const override {
    for (const auto& p : parts) p->pre_tokenize(pieces);
  }
};

// Split, and the fixed-pattern pre-tokenizers built on it.
class pre_tokenizer_split final : public pre_tokenizer {
 public:
  pre_tokenizer_split(std::unique_ptr<regex> r, split_behavior b, bool invert)
      : re_(std::move(r)), behavior_(b), invert_(invert) {}
  void pre_tokenize(std::vector<piece>& pieces) const override {
    split_text_pieces(pieces, [&](const piece& p, std::vector<piece>& out) {
      std::vector<span> m = re_->find_matches(p.text);
      if (invert_)
        for (span& s : m) s.match = !s.match;
      split_piece(p, std::move(m), behavior_, out);
    });
  }

 private:
  std::unique_ptr<regex> re_;
  split_behavior behavior_;
  bool invert_;
};

class pre_tokenizer_byte_level final : public pre_tokenizer {
 public:
  pre_tokenizer_byte_level(bool add_prefix_space, bool use_regex, const std::string& what)
      : add_prefix_space_(add_prefix_space), use_regex_(use_regex) {
    // GPT-2's pattern, as tokenizers' pre_tokenizers/byte_level.rs spells it.
    if (use_regex_)
      re_ = std::make_unique<regex>("'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+",
                                    regex_syntax::regex_onig, what);
  }
  void pre_tokenize(std::vector<piece>& pieces) const override {
    split_text_pieces(pieces, [&](piece& p, std::vector<piece>& out) {
      if (add_prefix_space_ && !p.text.empty() && p.text[0] != ' ') p.text.insert(0, " ");
      if (use_regex_) split_piece(p, re_->find_matches(p.text), split_behavior::isolated, out);
      else out.push_back(std::move(p));
    });
    for (piece& p : pieces)
      if (p.token < 0) p.text = bytes_to_chars(p.text);
  }

 private:
  bool add_prefix_space_, use_regex_;
  std::unique_ptr<regex> re_;
};

enum class prepend_scheme { prepend_always, prepend_first, prepend_never };

// Metaspace's fields, shared by the pre-tokenizer and the decoder (tokenizers' MetaspaceHelper).
struct metaspace_config {
  std::string replacement;
  prepend_scheme scheme = prepend_scheme::prepend_always;
  bool split = true;
};

metaspace_config metaspace_fields(const json& j, const std::string& what) {
  metaspace_config c;
  c.replacement = char_field(j, "replacement", what);
  if (j.contains("prepend_scheme") && !j["prepend_scheme"].is_null()) {
    const std::string s = string_field(j, "prepend_scheme", what);
    FERRY_CHECK(s == "always" || s == "first" || s == "never", what, ": \"prepend_scheme\" '", s,
                "' is not one of always, first, never");
    c.scheme = s == "always" ? prepend_scheme::prepend_always
               : s == "first" ? prepend_scheme::prepend_first
                              : prepend_scheme::prepend_never;
  }
  if (j.contains("add_prefix_space") && !bool_field(j, "add_prefix_space", true, what)) {
    FERRY_CHECK(c.scheme == prepend_scheme::prepend_never, what,
                ": \"add_prefix_space\": false contradicts \"prepend_scheme\" (tokenizers rejects this file too)");
  }
  c.split = bool_field(j, "split", true, what);
  return c;
}

class pre_tokenizer_metaspace final : public pre_tokenizer {
 public:
  pre_tokenizer_metaspace(metaspace_config c, const std::string& what) : c_(std::move(c)) {
    if (c_.split) re_ = std::make_unique<regex>(c_.replacement, regex_syntax::regex_literal, what);
  }
  void pre_tokenize(std::vector<piece>& pieces) const override {
    split_text_pieces(pieces, [&](piece& p, std::vector<piece>& out) {
      p.text = replace_all(p.text, " ", c_.replacement);
      const bool starts = p.text.compare(0, c_.replacement.size(), c_.replacement) == 0;
      if (!starts && !p.text.empty() &&
          (c_.scheme == prepend_scheme::prepend_always || (c_.scheme == prepend_scheme::prepend_first && p.at_start)))
        p.text.insert(0, c_.replacement);
      if (c_.split) split_piece(p, re_->find_matches(p.text), split_behavior::merged_with_next, out);
      else out.push_back(std::move(p));
    });
  }

 private:
  metaspace_config c_;
  std::unique_ptr<regex> re_;
};

std::unique_ptr<pre_tokenizer> fixed_split(const std::string& pcre2, split_behavior b, bool invert,
                                           const std::string& what) {
  return std::make_unique<pre_tokenizer_split>(std::make_unique<regex>(pcre2, regex_syntax::regex_pcre2, what), b,
                                               invert);
}

// ---- decoders ----

class decoder_sequence final : public decoder {
 public:
  std::vector<std::unique_ptr<decoder>> parts;
  void decode_chain(std::vector<std::string>& t) const override {
    for (const auto& d : parts) d->decode_chain(t);
  }
};

class decoder_byte_level final : public decoder {
 public:
  void decode_chain(std::vector<std::string>& t) const override {
    std::string bytes;
    for (const std::string& tok : t) {
      std::string mapped;
      bool all = true;
      for (size_t i = 0; i < tok.size() && all; i += utf8_len(static_cast<unsigned char>(tok[i]))) {
        const int b = char_byte(utf8_at(tok, i));
        all = b >= 0;
        mapped.push_back(static_cast<char>(b));
      }
      bytes += all ? mapped : tok;
    }
    t.assign(1, utf8_lossy(bytes));
  }
};

class decoder_metaspace final : public decoder {
 public:
  explicit decoder_metaspace(metaspace_config c) : c_(std::move(c)) {}
  void decode_chain(std::vector<std::string>& t) const override {
    for (size_t i = 0; i < t.size(); ++i) {
      const bool drop = i == 0 && c_.scheme != prepend_scheme::prepend_never;
      t[i] = replace_all(t[i], c_.replacement, drop ? "" : " ");
    }
  }

 private:
  metaspace_config c_;
};

class decoder_replace final : public decoder {
 public:
  decoder_replace(std::unique_ptr<regex> r, std::string content) : n_(std::move(r), std::move(content)) {}
  void decode_chain(std::vector<std::string>& t) const override {
    for (std::string& s : t) n_.normalize(s);
  }

 private:
  normalizer_replace n_;
};

class decoder_byte_fallback final : public decoder {
 public:
  void decode_chain(std::vector<std::string>& t) const override {
    std::vector<std::string> out;
    std::string pending;  // bytes of consecutive <0xXX> tokens
    auto flush = [&] {
      if (pending.empty()) return;
      if (utf8_valid(pending)) out.push_back(pending);
      else out.insert(out.end(), pending.size(), "\xEF\xBF\xBD");  // one U+FFFD per byte token
      pending.clear();
    };
    for (std::string& tok : t) {
      int b = -1;
      if (tok.size() == 6 && tok.compare(0, 3, "<0x") == 0 && tok[5] == '>') b = hex_byte(tok[3], tok[4]);
      if (b >= 0) {
        pending.push_back(static_cast<char>(b));
      } else {
        flush();
        out.push_back(std::move(tok));
      }
    }
    flush();
    t = std::move(out);
  }

 private:
  // Rust's u8::from_str_radix(.., 16) on two characters: hex digits, or '+' then one digit.
  static int hex_byte(char a, char b) {
    const auto digit = [](char c) {
      return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
    };
    if (a == '+') return digit(b);
    const int hi = digit(a), lo = digit(b);
    return hi < 0 || lo < 0 ? -1 : hi * 16 + lo;
  }
};

class decoder_fuse final : public decoder {
 public:
  void decode_chain(std::vector<std::string>& t) const override {
    std::string all;
    for (const std::string& s : t) all += s;
    t.assign(1, all);
  }
};

class decoder_strip final : public decoder {
 public:
  decoder_strip(std::string content, size_t start, size_t stop) : c_(std::move(content)), start_(start), stop_(stop) {}
  void decode_chain(std::vector<std::string>& t) const override {
    for (std::string& s : t) {
      std::vector<size_t> at;  // byte offset of each character, then the end
      for (size_t i = 0; i < s.size(); i += utf8_len(static_cast<unsigned char>(s[i]))) at.push_back(i);
      const size_t n = at.size();
      at.push_back(s.size());
      const auto is_c = [&](size_t k) { return s.compare(at[k], at[k + 1] - at[k], c_) == 0; };
      size_t first = 0, last = n;
      for (size_t k = 0; k < std::min(start_, n) && is_c(k); ++k) first = k + 1;
      for (size_t k = 0; k < std::min(stop_, n) && is_c(n - 1 - k); ++k) last = n - 1 - k;
      s = last > first ? s.substr(at[first], at[last] - at[first]) : std::string();
    }
  }

 private:
  std::string c_;
  size_t start_, stop_;
};

class decoder_bpe final : public decoder {
 public:
  explicit decoder_bpe(std::string suffix) : suffix_(std::move(suffix)) {}
  void decode_chain(std::vector<std::string>& t) const override {
    for (size_t i = 0; i < t.size(); ++i) t[i] = replace_all(t[i], suffix_, i + 1 == t.size() ? "" : " ");
  }

 private:
  std::string suffix_;
};

size_t size_field(const json& j, const char* key, const std::string& what) {
  FERRY_CHECK(j.contains(key) && j[key].is_number_unsigned(), what, ": \"", key,
              "\" is missing or not a non-negative integer");
  return j[key].get<size_t>();
}

}  // namespace

std::unique_ptr<normalizer> make_normalizer(const json& j, const std::string& where) {
  if (j.is_null()) return nullptr;
  const std::string type = type_of(j, where, "normalizer");
  const std::string what = where + ": normalizer " + type;
  if (type == "Sequence") {
    auto s = std::make_unique<normalizer_sequence>();
    for (const json& n : array_field(j, "normalizers", what)) s->parts.push_back(make_normalizer(n, where));
    return s;
  }
  if (type == "Prepend") return std::make_unique<normalizer_prepend>(string_field(j, "prepend", what));
  if (type == "Replace") return std::make_unique<normalizer_replace>(pattern_field(j, what), string_field(j, "content", what));
  if (type == "Strip")
    return std::make_unique<normalizer_strip>(bool_field(j, "strip_left", false, what), bool_field(j, "strip_right", false, what));
  if (type == "ByteLevel") return std::make_unique<normalizer_byte_level>();
  FERRY_CHECK(false, what, " is not supported; ferry reads the normalizers Sequence, Prepend, Replace, Strip and "
              "ByteLevel (Unicode normal forms and lowercasing are not implemented)");
  return nullptr;
}

std::unique_ptr<pre_tokenizer> make_pre_tokenizer(const json& j, const std::string& where) {
  if (j.is_null()) return nullptr;
  const std::string type = type_of(j, where, "pre_tokenizer");
  const std::string what = where + ": pre_tokenizer " + type;
  if (type == "Sequence") {
    auto s = std::make_unique<pre_tokenizer_sequence>();
    for (const json& p : array_field(j, "pretokenizers", what)) s->parts.push_back(make_pre_tokenizer(p, where));
    return s;
  }
  if (type == "Split")
    return std::make_unique<pre_tokenizer_split>(pattern_field(j, what), behavior_field(j, "behavior", what),
                                                 bool_field(j, "invert", false, what));
  if (type == "ByteLevel")
    return std::make_unique<pre_tokenizer_byte_level>(bool_field(j, "add_prefix_space", true, what),
                                                      bool_field(j, "use_regex", true, what), what);
  if (type == "Metaspace") return std::make_unique<pre_tokenizer_metaspace>(metaspace_fields(j, what), what);
  if (type == "Digits")
    return fixed_split("\\p{N}", bool_field(j, "individual_digits", false, what) ? split_behavior::isolated
                                                                                 : split_behavior::contiguous,
                       false, what);
  // Rust's regex \w (Alphabetic, marks, decimal digits, connector punctuation, Join_Control) and \s.
  const std::string word = "\\p{Alphabetic}\\p{M}\\p{Nd}\\p{Pc}\\p{Join_Control}";
  if (type == "Whitespace")
    return fixed_split("[" + word + "]+|[^" + word + "\\p{White_Space}]+", split_behavior::removed, true, what);
  if (type == "WhitespaceSplit") return fixed_split("\\p{White_Space}", split_behavior::removed, false, what);
  if (type == "Punctuation") {
    const split_behavior b = j.contains("behavior") ? behavior_field(j, "behavior", what) : split_behavior::isolated;
    return fixed_split("[\\p{P}\\x21-\\x2F\\x3A-\\x40\\x5B-\\x60\\x7B-\\x7E]", b, false, what);
  }
  if (type == "CharDelimiterSplit")
    return std::make_unique<pre_tokenizer_split>(
        std::make_unique<regex>(char_field(j, "delimiter", what), regex_syntax::regex_literal, what),
        split_behavior::removed, false);
  FERRY_CHECK(false, what, " is not supported; ferry reads the pre-tokenizers Sequence, Split, ByteLevel, Metaspace, "
              "Digits, Whitespace, WhitespaceSplit, Punctuation and CharDelimiterSplit");
  return nullptr;
}

std::unique_ptr<decoder> make_decoder(const json& j, const std::string& where) {
  if (j.is_null()) return nullptr;
  const std::string type = type_of(j, where, "decoder");
  const std::string what = where + ": decoder " + type;
  if (type == "Sequence") {
    auto s = std::make_unique<decoder_sequence>();
    for (const json& d : array_field(j, "decoders", what)) s->parts.push_back(make_decoder(d, where));
    return s;
  }
  if (type == "ByteLevel") return std::make_unique<decoder_byte_level>();
  if (type == "Metaspace") return std::make_unique<decoder_metaspace>(metaspace_fields(j, what));
  if (type == "Replace") return std::make_unique<decoder_replace>(pattern_field(j, what), string_field(j, "content", what));
  if (type == "ByteFallback") return std::make_unique<decoder_byte_fallback>();
  if (type == "Fuse") return std::make_unique<decoder_fuse>();
  if (type == "Strip")
    return std::make_unique<decoder_strip>(char_field(j, "content", what), size_field(j, "start", what),
                                           size_field(j, "stop", what));
  if (type == "BPEDecoder") return std::make_unique<decoder_bpe>(j.contains("suffix") ? string_field(j, "suffix", what) : "</w>");
  FERRY_CHECK(false, what, " is not supported; ferry reads the decoders Sequence, ByteLevel, Metaspace, Replace, "
              "ByteFallback, Fuse, Strip and BPEDecoder");
  return nullptr;
}

}  // namespace ferry::io::hf
