#pragma once
// The peak of what a device's allocator handed out in a window of a test, beyond what was allocated
// when the window opened: the measurement that the planner's byte counts are upper bounds of.
//  - CUDA (the suites built with FERRY_TEST_CUDA=1): the caching allocator's own statistics, which
//    count whole blocks; while the meter lives the allocator also records its history, so report()
//    can list the allocations alive at the peak with their call stacks.
//  - CPU: c10's memory-profiling hook on this thread, which sees every allocation of the default CPU
//    allocator made here while the meter lives (and their frees).
#include <c10/core/Allocator.h>
#include <c10/util/ThreadLocalDebugInfo.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

// The CUDA side needs a CUDA build (the gpu-labelled suites are compiled in CPU-only builds too,
// where they skip).
#if defined(FERRY_TEST_CUDA) && FERRY_TEST_CUDA && defined(FERRY_WITH_CUDA) && FERRY_WITH_CUDA
#define FERRY_ALLOC_METER_CUDA 1
#else
#define FERRY_ALLOC_METER_CUDA 0
#endif

#if FERRY_ALLOC_METER_CUDA
#include <ATen/Context.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/util/Backtrace.h>
#endif

namespace ferry::test {

class alloc_meter {
 public:
  explicit alloc_meter(bool cuda) : cuda_(cuda) {
#if FERRY_ALLOC_METER_CUDA
    if (cuda_) {
      namespace alloc = c10::cuda::CUDACachingAllocator;
      at::globalContext().lazyInitDevice(c10::DeviceType::CUDA);   // the allocator's per-device state
      device_ = c10::cuda::current_device();
      alloc::recordHistory(true, &stack_context::gather, 200000, c10::CachingDeviceAllocator::RecordContext::ALLOC,
                           /*clearHistory=*/true, {});
      alloc::resetPeakStats(device_);
      start_ = alloc::getDeviceStats(device_).allocated_bytes[0].current;
      return;
    }
#endif
    reporter_ = std::make_shared<cpu_reporter>();
    guard_ = std::make_unique<c10::DebugInfoGuard>(c10::DebugInfoKind::PROFILER_STATE, reporter_);
  }
  ~alloc_meter() {
#if FERRY_ALLOC_METER_CUDA
    if (cuda_) {
      c10::cuda::CUDACachingAllocator::recordHistory(false, nullptr, 0, c10::CachingDeviceAllocator::RecordContext::NEVER,
                                                     /*clearHistory=*/true, {});
    }
#endif
  }
  alloc_meter(const alloc_meter&) = delete;
  alloc_meter& operator=(const alloc_meter&) = delete;

  // Bytes at the highest point since construction, beyond those allocated at construction.
  int64_t peak() const {
#if FERRY_ALLOC_METER_CUDA
    if (cuda_) return c10::cuda::CUDACachingAllocator::getDeviceStats(device_).allocated_bytes[0].peak - start_;
#endif
    return reporter_->peak;
  }

  // CUDA: the allocations alive at the peak of the recorded history, each counted as the allocator
  // counts it (whole 512-byte blocks, so many small tensors can make the peak), with the size asked
  // for and the call stack that asked, largest first: what a plan that fell short left out. Empty
  // on the CPU.
  std::string report(size_t max_frames_shown = 8) const {
#if FERRY_ALLOC_METER_CUDA
    if (!cuda_) return "";
    using entry = c10::CachingDeviceAllocator::TraceEntry;
    const auto snap = c10::cuda::CUDACachingAllocator::snapshot();
    if (size_t(device_) >= snap.device_traces.size()) return "(no allocator history)";
    struct live { size_t size; std::shared_ptr<c10::GatheredContext> ctx; };
    auto block = [](size_t n) { return std::max<size_t>(512, (n + 511) / 512 * 512); };
    std::map<size_t, live> now, at_peak;
    int64_t total = 0, best = -1;
    for (const auto& t : snap.device_traces[size_t(device_)]) {
      if (t.action_ == entry::ALLOC) {
        now[t.addr_] = {t.size_, t.context_};
        total += int64_t(block(t.size_));
      } else if (t.action_ == entry::FREE_COMPLETED) {
        auto it = now.find(t.addr_);
        if (it != now.end()) {
          total -= int64_t(block(it->second.size));
          now.erase(it);
        }
      }
      if (total > best) {
        best = total;
        at_peak = now;
      }
    }
    std::vector<const live*> v;
    for (const auto& kv : at_peak) v.push_back(&kv.second);
    std::sort(v.begin(), v.end(), [](const live* a, const live* b) { return a->size > b->size; });
    std::ostringstream os;
    os << "allocations alive at the recorded peak (" << best << " bytes in 512-byte blocks, " << v.size()
       << " tensors; sizes as asked for):\n";
    for (const live* l : v) {
      os << "  " << l->size << " bytes";
      if (auto* s = dynamic_cast<const stack_context*>(l->ctx.get())) {
        std::istringstream frames(s->trace->get());
        std::string line;
        for (size_t k = 0; k < max_frames_shown && std::getline(frames, line); ++k) os << "\n      " << line;
      }
      os << "\n";
    }
    return os.str();
#else
    (void)max_frames_shown;
    return "";
#endif
  }

 private:
  struct cpu_reporter : c10::MemoryReportingInfoBase {
    int64_t current = 0, peak = 0;
    void reportMemoryUsage(void*, int64_t alloc_size, size_t, size_t, c10::Device device) override {
      if (!device.is_cpu()) return;
      current += alloc_size;
      peak = std::max(peak, current);
    }
    bool memoryProfilingEnabled() const override { return true; }
  };
#if FERRY_ALLOC_METER_CUDA
  struct stack_context : c10::GatheredContext {
    c10::Backtrace trace;   // symbolised only when a report asks for it
    static std::shared_ptr<c10::GatheredContext> gather() {
      auto c = std::make_shared<stack_context>();
      c->trace = c10::get_lazy_backtrace(/*frames_to_skip=*/3, /*maximum_number_of_frames=*/24);
      return c;
    }
  };
  c10::DeviceIndex device_ = 0;
  int64_t start_ = 0;
#endif
  bool cuda_;
  std::shared_ptr<cpu_reporter> reporter_;
  std::unique_ptr<c10::DebugInfoGuard> guard_;
};

}  // namespace ferry::test
