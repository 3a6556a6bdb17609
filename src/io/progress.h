#pragma once
// A one-line progress bar on stderr, drawn only when stderr is a terminal (so logs and CI output
// stay clean). add() may be called from several threads; redraws are throttled to ~10 per second.
#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <string>

namespace ferry::io {

class progress_bar {
 public:
  // unit: "B" shows bytes as MiB, anything else is printed after the counts.
  progress_bar(std::string label, int64_t total, std::string unit = "B");
  progress_bar(std::string label, int64_t total, std::string unit, bool enabled);
  ~progress_bar();  // finishes the line if it was drawn
  void add(int64_t n);
  void finish();

 private:
  void draw(int64_t done, bool final);
  std::string label_, unit_;
  int64_t total_;
  bool enabled_;
  bool finished_ = false;
  std::atomic<int64_t> done_{0};
  std::mutex mu_;
  std::chrono::steady_clock::time_point start_, last_;
};

}  // namespace ferry::io
