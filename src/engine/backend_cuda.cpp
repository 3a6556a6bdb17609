// The CUDA backend: one device, a stream per queue, the CUDA runtime layer of gpu/runtime.h
// (events) and gpu/cuda_check.h (checked calls), page-locked host memory.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <cuda_runtime.h>

#include <array>

#include "gpu/cuda_check.h"
#include "gpu/ops.h"
#include "gpu/runtime.h"
#include "src/common/error.h"
#include "src/engine/backend.h"

namespace ferry::engine {
namespace {

class cuda_event final : public event {
 public:
  cuda_event(bool timing, cudaStream_t s) : ev_(timing) { ev_.record(s); }
  void synchronize() override { ev_.synchronize(); }
  bool ready() override { return ev_.query(); }
  const gpu::event& get() const { return ev_; }

 private:
  gpu::event ev_;
};

const gpu::event& ev(const event_ptr& e) { return static_cast<cuda_event*>(e.get())->get(); }

// The caching allocator's peaks on a device (total left 0).
device_memory_stats allocator_peaks(c10::DeviceIndex index) {
  const auto s = c10::cuda::CUDACachingAllocator::getDeviceStats(index);
  device_memory_stats out;
  out.allocated_peak = s.allocated_bytes[0].peak;
  out.reserved_peak = s.reserved_bytes[0].peak;
  return out;
}

class cuda_backend final : public backend {
 public:
  cuda_backend(int index, int64_t delay_us, uint64_t seed)
      : backend(delay_us, seed),
        device_(at::kCUDA, static_cast<c10::DeviceIndex>(index)),
        // This thread's runtime calls go to this device's context (backend::bind_thread) from here
        // on, before the streams: libtorch's first stream request asks the current device for its
        // stream priority range, which on an unbound thread makes GPU 0's context.
        bound_(bind_to(device_)),
        streams_{c10::cuda::getStreamFromPool(true, device_.index()), c10::cuda::getStreamFromPool(true, device_.index()),
                 c10::cuda::getStreamFromPool(true, device_.index())} {
    // The caching allocator initialises lazily on the first allocation; its statistics and the
    // memory cap need it now.
    at::empty({1}, at::TensorOptions().device(device_));
  }

  void bind_thread() override { bind_to(device_); }

  at::Device device() const override { return device_; }
  bool is_cuda() const override { return true; }
  std::string name() const override { return at::cuda::getDeviceProperties(device_.index())->name; }

  // Page-locked memory belongs to the context current at its allocation or registration: this
  // device's, whatever thread asks (a thread not bound to it would create GPU 0's).
  void* host_alloc(size_t bytes) override {
    c10::cuda::CUDAGuard g(device_.index());
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
  void host_free(void* p) override {
    c10::cuda::CUDAGuard g(device_.index());
    cudaFreeHost(p);
  }
  void host_register(void* p, size_t bytes) override {
    c10::cuda::CUDAGuard g(device_.index());
    cudaError_t err = cudaHostRegister(p, bytes, cudaHostRegisterDefault);
    if (err != cudaSuccess) {
      cudaGetLastError();
      throw error("cannot page-lock " + std::to_string(bytes >> 20) + " MiB of shared host memory: " +
                  cudaGetErrorString(err) + "; raise the locked-memory limit (ulimit -l) or use dist_weights=gather");
    }
  }
  void host_unregister(void* p) override {
    c10::cuda::CUDAGuard g(device_.index());
    if (cudaHostUnregister(p) != cudaSuccess) cudaGetLastError();
  }

  // The device buffer of a copy belongs to the compute stream's pool: recordStream keeps the
  // caching allocator from handing it out again, once the engine drops the tensor, before the
  // copy stream's work queued so far is done (the embedding's gradient is dropped right after
  // its copy is queued, and the next micro-batch allocates the same size).
  void copy_h2d(const at::Tensor& dst, const void* src, size_t bytes) override {
    debug_delay();
    c10::cuda::CUDAStream& s = stream(queue::queue_h2d);
    FERRY_CUDA_CHECK(cudaMemcpyAsync(dst.data_ptr(), src, bytes, cudaMemcpyHostToDevice, s.stream()));
    c10::cuda::CUDACachingAllocator::recordStream(dst.storage().data_ptr(), s);
  }
  void copy_d2h(void* dst, const at::Tensor& src, size_t bytes) override {
    debug_delay();
    c10::cuda::CUDAStream& s = stream(queue::queue_d2h);
    FERRY_CUDA_CHECK(cudaMemcpyAsync(dst, src.data_ptr(), bytes, cudaMemcpyDeviceToHost, s.stream()));
    c10::cuda::CUDACachingAllocator::recordStream(src.storage().data_ptr(), s);
  }

  event_ptr record(queue q, bool timing) override {
    c10::cuda::CUDAGuard g(device_.index());   // an event belongs to the device current at its creation
    return std::make_shared<cuda_event>(timing, stream(q).stream());
  }
  void wait(queue waiter, const event_ptr& e) override {
    FERRY_CUDA_CHECK(cudaStreamWaitEvent(stream(waiter).stream(), ev(e).get(), 0));
  }
  double elapsed_ms(const event_ptr& a, const event_ptr& b) override { return gpu::event::elapsed_ms(ev(a), ev(b)); }
  void synchronize() override {
    for (auto& s : streams_) s.synchronize();
    c10::cuda::getCurrentCUDAStream(device_.index()).synchronize();
  }

  std::shared_ptr<void> enter_compute() override {
    return std::make_shared<c10::cuda::CUDAStreamGuard>(stream(queue::queue_compute));
  }

  device_memory_stats memory_stats() override {
    device_memory_stats out = allocator_peaks(device_.index());
    size_t free_b = 0, total_b = 0;
    c10::cuda::CUDAGuard g(device_.index());
    FERRY_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
    out.total = static_cast<int64_t>(total_b);
    return out;
  }
  void reset_memory_peak() override { c10::cuda::CUDACachingAllocator::resetPeakStats(device_.index()); }
  void limit_memory(double gib) override {
    if (gib <= 0) return;
    const int64_t total = memory_stats().total;
    double fraction = gib * double(1ull << 30) / double(total);
    FERRY_CHECK(fraction <= 1.0, "gpu_mem_limit_gib=", gib, " exceeds this card's ", total >> 30, " GiB");
    c10::cuda::CUDACachingAllocator::setMemoryFraction(fraction, device_.index());
  }

 private:
  c10::cuda::CUDAStream& stream(queue q) { return streams_[static_cast<size_t>(q)]; }

  static bool bind_to(const at::Device& d) {
    c10::cuda::set_device(d.index());
    return true;
  }

  at::Device device_;
  bool bound_;   // declared before streams_: the thread is bound before they are made
  std::array<c10::cuda::CUDAStream, k_num_queues> streams_;
};

}  // namespace

bool cuda_usable() { return gpu::device_available(); }

int cuda_device_count() {
  if (!cuda_usable()) return 0;
  int n = 0;
  FERRY_CUDA_CHECK(cudaGetDeviceCount(&n));
  return n;
}

device_memory_stats cuda_memory_stats(int device_index) {
  if (!cuda_usable() || device_index < 0 || device_index >= cuda_device_count()) return {};
  return allocator_peaks(static_cast<c10::DeviceIndex>(device_index));
}

std::string cuda_pci_bus_id(int device_index) {
  if (!cuda_usable() || device_index < 0 || device_index >= cuda_device_count()) return {};
  char id[32] = {0};
  if (cudaDeviceGetPCIBusId(id, int(sizeof id), device_index) != cudaSuccess) {
    (void)cudaGetLastError();   // clear it: the caller goes on without a bus id (no NUMA pinning)
    return {};
  }
  return id;
}

std::unique_ptr<backend> make_cuda_backend(int device_index, int64_t debug_delay_us, uint64_t seed) {
  FERRY_CHECK(cuda_usable(), "no CUDA device is usable here; use --device cpu");
  int n = 0;
  FERRY_CUDA_CHECK(cudaGetDeviceCount(&n));
  const int index = device_index >= 0 ? device_index : int(at::cuda::current_device());
  FERRY_CHECK(index < n, "CUDA device ", index, " does not exist (this machine has ", n, ")");
  return std::make_unique<cuda_backend>(index, debug_delay_us, seed);
}

}  // namespace ferry::engine
