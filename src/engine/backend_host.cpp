// The host backend: the "device" is the CPU. Copies are memcpys done at once, so every event is
// complete when recorded; ordering between the compute thread and the CPU update thread is what
// the engine's own synchronisation must get right, and what the race tests exercise.
#include <cstdlib>
#include <cstring>

#include "src/common/error.h"
#include "src/engine/backend.h"
#include "src/engine/backend_util.h"

namespace ferry::engine {
namespace {

class done_event final : public event {
 public:
  void synchronize() override {}
};

class host_backend final : public backend {
 public:
  host_backend(int64_t delay_us, uint64_t seed) : backend(delay_us, seed) {}

  at::Device device() const override { return at::Device(at::kCPU); }
  bool is_cuda() const override { return false; }
  std::string name() const override { return "host CPU"; }

  void* host_alloc(size_t bytes) override { return detail::host_alloc_aligned(bytes); }
  void host_free(void* p) override { std::free(p); }

  void copy_h2d(const at::Tensor& dst, const void* src, size_t bytes) override {
    debug_delay();
    std::memcpy(dst.data_ptr(), src, bytes);
  }
  void copy_d2h(void* dst, const at::Tensor& src, size_t bytes) override {
    debug_delay();
    std::memcpy(dst, src.data_ptr(), bytes);
  }

  event_ptr record(queue, bool) override { return std::make_shared<done_event>(); }
  void wait(queue, const event_ptr&) override {}
  double elapsed_ms(const event_ptr&, const event_ptr&) override { return 0; }
  void synchronize() override {}
  std::shared_ptr<void> enter_compute() override { return nullptr; }

  device_memory_stats memory_stats() override { return {}; }
  void reset_memory_peak() override {}
  void limit_memory(double) override {}
};

}  // namespace

std::unique_ptr<backend> make_host_backend(int64_t debug_delay_us, uint64_t seed) {
  return std::make_unique<host_backend>(debug_delay_us, seed);
}

#if !FERRY_WITH_CUDA
std::unique_ptr<backend> make_cuda_backend(int, int64_t, uint64_t) {
  throw error("this ferry was built without CUDA; rebuild on a machine with the CUDA toolkit and a CUDA libtorch, or use --device cpu");
}
bool cuda_usable() { return false; }
int cuda_device_count() { return 0; }
device_memory_stats cuda_memory_stats(int) { return {}; }
std::string cuda_pci_bus_id(int) { return {}; }
#endif

}  // namespace ferry::engine
