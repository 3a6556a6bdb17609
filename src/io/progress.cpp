#include "src/io/progress.h"

#include <unistd.h>

#include <cstdio>

namespace ferry::io {

progress_bar::progress_bar(std::string label, int64_t total, std::string unit)
    : progress_bar(std::move(label), total, std::move(unit), ::isatty(STDERR_FILENO) != 0) {}

progress_bar::progress_bar(std::string label, int64_t total, std::string unit, bool enabled)
    : label_(std::move(label)), unit_(std::move(unit)), total_(total), enabled_(enabled) {
  start_ = last_ = std::chrono::steady_clock::now();
}

progress_bar::~progress_bar() { finish(); }

void progress_bar::add(int64_t n) {
  int64_t done = done_.fetch_add(n) + n;
  if (!enabled_) return;
  auto now = std::chrono::steady_clock::now();
  std::unique_lock<std::mutex> lock(mu_, std::try_to_lock);
  if (!lock.owns_lock() || finished_ || now - last_ < std::chrono::milliseconds(100)) return;
  last_ = now;
  draw(done, false);
}

void progress_bar::finish() {
  std::lock_guard<std::mutex> lock(mu_);
  if (finished_) return;
  finished_ = true;
  if (enabled_) draw(done_.load(), true);
}

void progress_bar::draw(int64_t done, bool final) {
  const int width = 30;
  double frac = total_ > 0 ? static_cast<double>(done) / static_cast<double>(total_) : 1.0;
  if (frac > 1) frac = 1;
  int fill = static_cast<int>(frac * width);
  std::string bar(static_cast<size_t>(fill), '#');
  bar.append(static_cast<size_t>(width - fill), '.');
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  double rate = secs > 0 ? static_cast<double>(done) / secs : 0;
  if (unit_ == "B") {
    std::fprintf(stderr, "\r%s [%s] %5.1f%% %.1f/%.1f MiB %.1f MiB/s", label_.c_str(), bar.c_str(), 100 * frac,
                 done / 1048576.0, total_ / 1048576.0, rate / 1048576.0);
  } else {
    std::fprintf(stderr, "\r%s [%s] %5.1f%% %lld/%lld %s %.0f/s", label_.c_str(), bar.c_str(), 100 * frac,
                 static_cast<long long>(done), static_cast<long long>(total_), unit_.c_str(), rate);
  }
  if (final) std::fputc('\n', stderr);
  std::fflush(stderr);
}

}  // namespace ferry::io
