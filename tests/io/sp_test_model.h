#pragma once
// One sentencepiece model per test binary, trained on /usr/share/common-licenses (present on
// every Debian/Ubuntu system) the first time a test asks for it.
#include <filesystem>
#include <string>
#include <vector>

#include "src/io/tokenizer.h"
#include "tests/io/io_test_util.h"

namespace ferry::io::test {

constexpr int k_sp_vocab = 800;

// Returns the directory holding tokenizer.model, or "" when the corpus is absent.
inline const std::string& sp_model_dir() {
  static const std::string dir = [] {
    const std::filesystem::path corpus = "/usr/share/common-licenses";
    if (!std::filesystem::is_directory(corpus)) return std::string();
    std::vector<std::string> files;
    for (const auto& e : std::filesystem::directory_iterator(corpus))
      if (e.is_regular_file()) files.push_back(e.path().string());
    std::sort(files.begin(), files.end());
    auto d = std::filesystem::temp_directory_path() / ("ferry_io_sp_" + std::to_string(::getpid()));
    std::filesystem::create_directories(d);
    static struct cleanup {
      std::string path;
      ~cleanup() { scratch_dir::remove_tree(path); }
    } at_exit{d.string()};
    train_sentencepiece(files, (d / "tokenizer").string(), k_sp_vocab);
    return d.string();
  }();
  return dir;
}

}  // namespace ferry::io::test
