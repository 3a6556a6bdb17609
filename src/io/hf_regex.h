#pragma once
// The patterns of tokenizer.json files (Split and Replace "Regex"/"String" patterns, the
// ByteLevel pre-tokenizer's GPT-2 pattern) run with PCRE2 the way HF tokenizers runs them with
// Oniguruma: UTF-8 with Unicode properties (PCRE2_UTF | PCRE2_UCP), ^ and $ at line ends as in
// Oniguruma's default syntax, JIT-compiled where the platform has it. Where the two engines
// spell a class differently the pattern is rewritten first: \s and \S are White_Space (PCRE2's
// \s adds U+180E), \w and \W Oniguruma's word class (Alphabetic, marks, decimal digits,
// connector punctuation), \h a hex digit. Left with PCRE2's meaning: \W inside brackets, \b and
// \B, POSIX [:classes:]. Matching is thread-safe.
#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

struct pcre2_real_code_8;

namespace ferry::io::hf {

// A part of a string: [begin, end) and whether a pattern matched it.
struct span {
  size_t begin;
  size_t end;
  bool match;
};

enum class regex_syntax {
  regex_onig,     // a tokenizer.json {"Regex": ...} pattern, rewritten by onig_to_pcre2
  regex_pcre2,    // ferry's own PCRE2 pattern, used as it is
  regex_literal,  // plain text: a {"String": ...} pattern
};

class regex {
 public:
  // `where` names the file and component for the error thrown (ferry::error) when PCRE2 rejects
  // the pattern.
  regex(const std::string& pattern, regex_syntax syntax, const std::string& where);
  ~regex();
  regex(const regex&) = delete;
  regex& operator=(const regex&) = delete;

  // Spans covering s in order, alternating between unmatched text and matches, as tokenizers'
  // Pattern::find_matches: non-overlapping leftmost matches found the way the onig crate's
  // find_iter finds them (an empty match right after a non-empty one is dropped). An empty s
  // gives one empty unmatched span. s must be valid UTF-8.
  std::vector<span> find_matches(std::string_view s) const;

  // Whether the pattern matches s starting exactly at `pos` (s valid UTF-8).
  bool matches_at(std::string_view s, size_t pos) const;

 private:
  // Leftmost match starting at or after `from`; false when there is none.
  bool search(std::string_view s, size_t from, bool anchored, size_t* begin, size_t* end) const;

  pcre2_real_code_8* code_ = nullptr;
  std::string where_;
};

// The Oniguruma pattern rewritten for PCRE2 (see the header comment); exposed for tests.
std::string onig_to_pcre2(const std::string& pattern);

}  // namespace ferry::io::hf
