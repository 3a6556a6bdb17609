#pragma once
// UTF-8 helpers for the tokenizer.json reader (hf_tokenizer.h): code point stepping, Rust's
// String::from_utf8_lossy, the White_Space property, and GPT-2's byte <-> character table.
#include <cstdint>
#include <string>
#include <string_view>

namespace ferry::io::hf {

// Length in bytes of the UTF-8 sequence starting with lead byte b (1 for a stray continuation byte).
inline size_t utf8_len(unsigned char b) { return b < 0x80 ? 1 : b < 0xE0 ? 2 : b < 0xF0 ? 3 : 4; }

// The code point starting at s[i] of a valid UTF-8 string.
uint32_t utf8_at(std::string_view s, size_t i);

// Start of the code point that ends at byte `end` (> 0) of a valid UTF-8 string.
size_t utf8_prev(std::string_view s, size_t end);

void utf8_append(std::string& out, uint32_t cp);

// s itself when it is valid UTF-8, else s with each invalid sequence replaced by U+FFFD the way
// Rust's String::from_utf8_lossy and Python's bytes.decode(errors="replace") do (one U+FFFD per
// maximal invalid subpart, Unicode 3.9 / WHATWG).
std::string utf8_lossy(std::string_view s);
bool utf8_valid(std::string_view s);

// Unicode White_Space (Rust's char::is_whitespace, regex \s).
bool is_white_space(uint32_t cp);

// GPT-2's byte-level alphabet: byte b is spelled by code point byte_char(b); char_byte is its
// inverse (-1 for code points outside the alphabet).
uint32_t byte_char(uint8_t b);
int char_byte(uint32_t cp);

}  // namespace ferry::io::hf
