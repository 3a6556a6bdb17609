#include "src/engine/trace.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <mutex>

#include "src/common/error.h"

namespace ferry::engine::trace {
namespace {

struct sink {
  std::FILE* f = nullptr;
  std::mutex mu;
  sink() {
    const char* path = std::getenv("FERRY_TRACE");
    if (!path || !*path) return;
    f = std::fopen(path, "a");
    FERRY_CHECK(f, "FERRY_TRACE=", path, ": cannot open it for appending");
  }
  ~sink() {
    if (f) std::fclose(f);
  }
};

sink& the_sink() {
  static sink s;
  return s;
}

}  // namespace

bool enabled() { return the_sink().f != nullptr; }

double now_ms() {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

void record(const char* what, int64_t unit, double t0, double t1) {
  sink& s = the_sink();
  if (!s.f) return;
  std::lock_guard<std::mutex> lock(s.mu);
  std::fprintf(s.f, "{\"what\":\"%s\",\"unit\":%lld,\"t0\":%.3f,\"t1\":%.3f}\n", what, (long long)unit, t0, t1);
}

}  // namespace ferry::engine::trace
