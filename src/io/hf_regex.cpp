#include "src/io/hf_regex.h"

#include <pcre2.h>

#include <memory>

#include "src/common/error.h"
#include "src/io/hf_text.h"

namespace ferry::io::hf {

namespace {

// Oniguruma's \w, measured against tokenizers 0.23 over every code point: Alphabetic, marks,
// decimal digits and connector punctuation; outside brackets also the Latin-1 superscripts and
// fractions (its single-byte table), inside brackets not.
constexpr const char* k_word_in_class = "\\p{Alphabetic}\\p{M}\\p{Nd}\\p{Pc}";
constexpr const char* k_word = "\\p{Alphabetic}\\p{M}\\p{Nd}\\p{Pc}\\x{B2}\\x{B3}\\x{B9}\\x{BC}-\\x{BE}";

std::string pcre2_message(int code) {
  PCRE2_UCHAR buf[256];
  pcre2_get_error_message(code, buf, sizeof(buf));
  return reinterpret_cast<const char*>(buf);
}

// Per-thread JIT stack and match data: pcre2_match may run on many threads at once.
struct match_state {
  pcre2_match_context* context = nullptr;
  pcre2_jit_stack* stack = nullptr;
  pcre2_match_data* data = nullptr;
  match_state() {
    context = pcre2_match_context_create(nullptr);
    stack = pcre2_jit_stack_create(32 * 1024, 16 * 1024 * 1024, nullptr);
    if (context != nullptr && stack != nullptr) pcre2_jit_stack_assign(context, nullptr, stack);
    data = pcre2_match_data_create(1, nullptr);
    FERRY_CHECK(context != nullptr && data != nullptr, "out of memory setting up PCRE2 matching");
  }
  ~match_state() {
    pcre2_match_data_free(data);
    pcre2_jit_stack_free(stack);
    pcre2_match_context_free(context);
  }
};

match_state& thread_state() {
  thread_local match_state s;
  return s;
}

}  // namespace

std::string onig_to_pcre2(const std::string& p) {
  std::string out;
  out.reserve(p.size() + 32);
  int depth = 0;  // inside a [...] class when > 0
  for (size_t i = 0; i < p.size(); ++i) {
    const char c = p[i];
    if (c == '\\' && i + 1 < p.size()) {
      const char e = p[++i];
      const bool in_class = depth > 0;
      switch (e) {
        case 's': out += "\\p{White_Space}"; break;
        case 'S': out += "\\P{White_Space}"; break;
        case 'w': out += in_class ? std::string(k_word_in_class) : "[" + std::string(k_word) + "]"; break;
        case 'W': out += in_class ? std::string("\\W") : "[^" + std::string(k_word) + "]"; break;
        case 'h': out += in_class ? "0-9a-fA-F" : "[0-9a-fA-F]"; break;
        case 'H': out += in_class ? "\\H" : "[^0-9a-fA-F]"; break;
        default:
          out += '\\';
          out += e;
      }
      continue;
    }
    if (c == '[') {
      if (depth > 0 && i + 1 < p.size() && p[i + 1] == ':') {  // a POSIX class [:name:]
        const size_t close = p.find(":]", i + 2);
        if (close != std::string::npos) {
          out.append(p, i, close + 2 - i);
          i = close + 1;
          continue;
        }
      }
      ++depth;
      out += c;
      // A ']' right after '[' or '[^' is a literal member, not the end of the class.
      if (i + 1 < p.size() && p[i + 1] == '^') out += p[++i];
      if (i + 1 < p.size() && p[i + 1] == ']') out += p[++i];
      continue;
    }
    if (c == ']' && depth > 0) --depth;
    out += c;
  }
  return out;
}

regex::regex(const std::string& pattern, regex_syntax syntax, const std::string& where) : where_(where) {
  const bool literal = syntax == regex_syntax::regex_literal;
  const std::string source = syntax == regex_syntax::regex_onig ? onig_to_pcre2(pattern) : pattern;
  std::unique_ptr<pcre2_compile_context, decltype(&pcre2_compile_context_free)> ctx(
      pcre2_compile_context_create(nullptr), &pcre2_compile_context_free);
  FERRY_CHECK(ctx != nullptr, "out of memory compiling the pattern of ", where);
  pcre2_set_newline(ctx.get(), PCRE2_NEWLINE_LF);
  const uint32_t options = PCRE2_UTF | (literal ? PCRE2_LITERAL : PCRE2_UCP | PCRE2_MULTILINE);
  int err = 0;
  PCRE2_SIZE offset = 0;
  code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(source.data()), source.size(), options, &err, &offset, ctx.get());
  FERRY_CHECK(code_ != nullptr, where, ": pattern '", pattern, "' is not a regular expression PCRE2 accepts (",
              pcre2_message(err), " at offset ", offset, ")");
  pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE);  // no JIT on this platform: the interpreter runs it
}

regex::~regex() { pcre2_code_free(code_); }

bool regex::search(std::string_view s, size_t from, bool anchored, size_t* begin, size_t* end) const {
  match_state& st = thread_state();
  const uint32_t options = PCRE2_NO_UTF_CHECK | (anchored ? PCRE2_ANCHORED : 0);
  const int rc = pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), from, options, st.data,
                             st.context);
  if (rc == PCRE2_ERROR_NOMATCH) return false;
  FERRY_CHECK(rc >= 0, where_, ": matching its pattern failed (", pcre2_message(rc), ")");
  const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(st.data);
  *begin = ov[0];
  *end = ov[1];
  return true;
}

std::vector<span> regex::find_matches(std::string_view s) const {
  if (s.empty()) return {{0, 0, false}};
  std::vector<span> out;
  size_t prev = 0, last_end = 0, b = 0, e = 0;
  bool skip_next_empty = false;
  while (last_end <= s.size() && search(s, last_end, false, &b, &e)) {
    last_end = e;
    if (b == e) {
      last_end += last_end < s.size() ? utf8_len(static_cast<unsigned char>(s[last_end])) : 1;
      if (skip_next_empty) {
        skip_next_empty = false;
        continue;
      }
    } else {
      skip_next_empty = true;
    }
    if (prev != b) out.push_back({prev, b, false});
    out.push_back({b, e, true});
    prev = e;
  }
  if (prev != s.size()) out.push_back({prev, s.size(), false});
  return out;
}

bool regex::matches_at(std::string_view s, size_t pos) const {
  size_t b = 0, e = 0;
  return search(s, pos, true, &b, &e);
}

}  // namespace ferry::io::hf
