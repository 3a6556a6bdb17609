#pragma once
// Helpers shared by the src/io tests: a scratch directory per test, file writers, and a matcher
// for error messages.
#include <gtest/gtest.h>
#include <ftw.h>
#include <stdlib.h>

#include <cstdio>

#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

namespace ferry::io::test {

class scratch_dir {
 public:
  scratch_dir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "ferry_io_test.XXXXXX").string();
    char* p = ::mkdtemp(tmpl.data());
    EXPECT_NE(p, nullptr);
    path_ = tmpl;
  }
  // Not std::filesystem::remove_all: the libtorch wheel exports a copy of it that calls a null
  // weak symbol (recursive_directory_iterator) and crashes.
  ~scratch_dir() { remove_tree(path_); }
  static void remove_tree(const std::string& path) {
    ::nftw(path.c_str(), [](const char* p, const struct stat*, int, struct FTW*) { return ::remove(p); }, 16,
           FTW_DEPTH | FTW_PHYS);
  }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

inline void write_bytes(const std::string& path, const std::string& bytes) {
  std::filesystem::create_directories(std::filesystem::path(path).parent_path());
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

inline std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// Runs f, expects it to throw E, and returns the message ("" when nothing was thrown).
template <typename E = std::exception, typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const E& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected an exception";
  return "";
}

#define EXPECT_ERROR_HAS(stmt, ...)                                                     \
  do {                                                                                  \
    std::string msg_ = ::ferry::io::test::error_of([&] { stmt; });                      \
    const std::vector<std::string> parts_ = {__VA_ARGS__};                              \
    for (const std::string& part_ : parts_)                                             \
      EXPECT_NE(msg_.find(part_), std::string::npos) << "'" << part_ << "' not in: " << msg_; \
  } while (0)

}  // namespace ferry::io::test
