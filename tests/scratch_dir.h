#pragma once
// A fresh directory under the system temp dir for one test (named after the process and the
// running test), removed with everything in it when the test ends.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <string>

#include "src/io/atomic_file.h"

namespace ferry::test {

struct scratch_dir {
  std::string path;
  explicit scratch_dir(const std::string& prefix) {
    path = (std::filesystem::temp_directory_path() /
            (prefix + "_" + std::to_string(::getpid()) + "_" +
             ::testing::UnitTest::GetInstance()->current_test_info()->name()))
               .string();
    io::remove_tree(path);
    std::filesystem::create_directories(path);
  }
  ~scratch_dir() { io::remove_tree(path); }
};

}  // namespace ferry::test
