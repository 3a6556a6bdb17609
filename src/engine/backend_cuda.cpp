// The CUDA backend: a compute stream, two copy streams, CUDA events, page-locked host memory.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <cuda_runtime.h>

#include "src/common/error.h"
#include "src/engine/backend.h"
#include "src/engine/backend_util.h"

#define ENGINE_CUDA_CHECK(stmt)                                                                   \
  do {                                                                                            \
    cudaError_t err_ = (stmt);                                                                    \
    FERRY_CHECK(err_ == cudaSuccess, #stmt, " failed: ", cudaGetErrorString(err_), " (", __FILE__, \
                ":", __LINE__, ")");                                                              \
  } while (0)

namespace ferry::engine {
namespace {

class cuda_event final : public event {
 public:
  explicit cuda_event(bool timing) {
    ENGINE_CUDA_CHECK(cudaEventCreateWithFlags(&ev_, timing ? cudaEventDefault : cudaEventDisableTiming));
  }
  ~cuda_event() override { cudaEventDestroy(ev_); }
  void synchronize() override { ENGINE_CUDA_CHECK(cudaEventSynchronize(ev_)); }
  cudaEvent_t get() const { return ev_; }

 private:
  cudaEvent_t ev_ = nullptr;
};

class cuda_backend final : public backend {
 public:
  cuda_backend(int64_t delay_us, uint64_t seed)
      : device_(at::kCUDA, static_cast<c10::DeviceIndex>(at::cuda::current_device())),
        compute_(c10::cuda::getStreamFromPool(true)),
        h2d_(c10::cuda::getStreamFromPool(true)),
        d2h_(c10::cuda::getStreamFromPool(true)),
        delay_(delay_us, seed) {
    // The caching allocator initialises lazily on the first allocation; its statistics and the
    // memory cap need it now.
    at::empty({1}, at::TensorOptions().device(device_));
  }

  at::Device device() const override { return device_; }
  bool is_cuda() const override { return true; }
  std::string name() const override { return at::cuda::getDeviceProperties(device_.index())->name; }

  void* host_alloc(size_t bytes) override {
    void* p = nullptr;
    cudaError_t err = cudaHostAlloc(&p, bytes == 0 ? 1 : bytes, cudaHostAllocDefault);
    if (err != cudaSuccess) {
      cudaGetLastError();
      throw error("cannot pin " + std::to_string(bytes) + " bytes (" + std::to_string(bytes >> 20) +
                  " MiB) of host memory: " + cudaGetErrorString(err) +
                  "; free host memory, raise the locked-memory limit (ulimit -l), or train a smaller model");
    }
    return p;
  }
  void host_free(void* p) override { cudaFreeHost(p); }

  // The device buffer of a copy belongs to the compute stream's pool: recordStream keeps the
  // caching allocator from handing it out again, once the engine drops the tensor, before the
  // copy stream's work queued so far is done (the embedding's gradient is dropped right after
  // its copy is queued, and the next micro-batch allocates the same size).
  void copy_h2d(const at::Tensor& dst, const void* src, size_t bytes) override {
    debug_delay();
    ENGINE_CUDA_CHECK(cudaMemcpyAsync(dst.data_ptr(), src, bytes, cudaMemcpyHostToDevice, h2d_.stream()));
    c10::cuda::CUDACachingAllocator::recordStream(dst.storage().data_ptr(), h2d_);
  }
  void copy_d2h(void* dst, const at::Tensor& src, size_t bytes) override {
    debug_delay();
    ENGINE_CUDA_CHECK(cudaMemcpyAsync(dst, src.data_ptr(), bytes, cudaMemcpyDeviceToHost, d2h_.stream()));
    c10::cuda::CUDACachingAllocator::recordStream(src.storage().data_ptr(), d2h_);
  }

  event_ptr record(queue q, bool timing) override {
    auto e = std::make_shared<cuda_event>(timing);
    ENGINE_CUDA_CHECK(cudaEventRecord(e->get(), stream(q).stream()));
    return e;
  }
  void wait(queue waiter, const event_ptr& e) override {
    ENGINE_CUDA_CHECK(cudaStreamWaitEvent(stream(waiter).stream(), static_cast<cuda_event*>(e.get())->get(), 0));
  }
  double elapsed_ms(const event_ptr& a, const event_ptr& b) override {
    float ms = 0;
    ENGINE_CUDA_CHECK(cudaEventElapsedTime(&ms, static_cast<cuda_event*>(a.get())->get(),
                                           static_cast<cuda_event*>(b.get())->get()));
    return ms;
  }
  void synchronize() override { ENGINE_CUDA_CHECK(cudaDeviceSynchronize()); }

  std::shared_ptr<void> enter_compute() override {
    return std::make_shared<c10::cuda::CUDAStreamGuard>(compute_);
  }

  device_memory_stats memory_stats() override {
    auto s = c10::cuda::CUDACachingAllocator::getDeviceStats(device_.index());
    device_memory_stats out;
    out.allocated_peak = s.allocated_bytes[0].peak;
    out.reserved_peak = s.reserved_bytes[0].peak;
    size_t free_b = 0, total_b = 0;
    cudaMemGetInfo(&free_b, &total_b);
    out.total = static_cast<int64_t>(total_b);
    return out;
  }
  void reset_memory_peak() override { c10::cuda::CUDACachingAllocator::resetPeakStats(device_.index()); }
  void limit_memory(double gib) override {
    if (gib <= 0) return;
    size_t free_b = 0, total_b = 0;
    ENGINE_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
    double fraction = gib * double(1ull << 30) / double(total_b);
    FERRY_CHECK(fraction <= 1.0, "gpu_mem_limit_gib=", gib, " exceeds this card's ", total_b >> 30, " GiB");
    c10::cuda::CUDACachingAllocator::setMemoryFraction(fraction, device_.index());
  }

  void debug_delay() override { delay_(); }

 private:
  c10::cuda::CUDAStream& stream(queue q) {
    switch (q) {
      case queue::queue_compute: return compute_;
      case queue::queue_h2d: return h2d_;
      case queue::queue_d2h: return d2h_;
    }
    return compute_;
  }

  at::Device device_;
  c10::cuda::CUDAStream compute_, h2d_, d2h_;
  detail::random_delay delay_;
};

}  // namespace

bool cuda_usable() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

std::unique_ptr<backend> make_cuda_backend(int64_t debug_delay_us, uint64_t seed) {
  FERRY_CHECK(cuda_usable(), "no CUDA device is usable here; use --device cpu");
  return std::make_unique<cuda_backend>(debug_delay_us, seed);
}

}  // namespace ferry::engine
