#pragma once
// Two kinds of failure (STYLE.md rule 3):
//  - a user error: bad config, flag, file, or too little memory. Thrown as ferry::config_error
//    (the CLI exits 2) or ferry::error (exit 1), with one sentence that says what was wrong and
//    what to do.
//  - a broken invariant: FERRY_ASSERT, whose message starts with "bug:" and names file and line.
#include <cstdio>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace ferry {

// A runtime failure the user can act on (missing file, host cannot pin memory, run does not fit).
class error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Bad usage or configuration: unknown key, wrong type, value out of range. The CLI exits 2.
class config_error : public error {
 public:
  using error::error;
};

// A broken invariant inside ferry.
class bug_error : public std::logic_error {
 public:
  using std::logic_error::logic_error;
};

namespace detail {
template <typename... Args>
std::string str_cat(Args&&... args) {
  std::ostringstream os;
  (void)(os << ... << std::forward<Args>(args));
  return os.str();
}
[[noreturn]] inline void throw_bug(const char* cond, const char* file, int line, const std::string& msg) {
  throw bug_error(str_cat("bug: ", msg, " (", cond, " failed at ", file, ":", line, ")"));
}
}  // namespace detail

// The main() of a ferry tool: returns body(), or prints the failure as "<tool>: <first line of the
// message>" on stderr and returns the CLI's exit code (2 bad usage or config, 1 anything else).
template <typename Body>
int run_tool(const char* tool, Body&& body) {
  try {
    return body();
  } catch (const config_error& e) {
    std::fprintf(stderr, "%s: %s\n", tool, e.what());
    return 2;
  } catch (const std::exception& e) {
    const std::string msg = e.what();
    std::fprintf(stderr, "%s: %s\n", tool, msg.substr(0, msg.find('\n')).c_str());
    return 1;
  }
}

}  // namespace ferry

// User-facing check: throws ferry::error with the concatenated message.
#define FERRY_CHECK(cond, ...)                                             \
  do {                                                                     \
    if (!(cond)) throw ::ferry::error(::ferry::detail::str_cat(__VA_ARGS__)); \
  } while (0)

// Config check: throws ferry::config_error (exit code 2 in the CLI).
#define FERRY_CONFIG_CHECK(cond, ...)                                             \
  do {                                                                            \
    if (!(cond)) throw ::ferry::config_error(::ferry::detail::str_cat(__VA_ARGS__)); \
  } while (0)

// Invariant: a failure is a bug in ferry, never the user's fault.
#define FERRY_ASSERT(cond, ...)                                                         \
  do {                                                                                  \
    if (!(cond)) ::ferry::detail::throw_bug(#cond, __FILE__, __LINE__, ::ferry::detail::str_cat(__VA_ARGS__)); \
  } while (0)
