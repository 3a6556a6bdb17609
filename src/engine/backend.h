#pragma once
// The device the engine drives, behind one small interface, so the same schedule code runs on
// CUDA and on the host backend that the CPU test suite uses.
//
// Three queues: compute (ATen ops of the model), h2d (weights in) and d2h (gradients out). Work on
// one queue runs in order; wait(q, e) makes queue q wait for an event recorded on another. On
// CUDA these are streams and events of one device (the backend names it); on the host backend
// copies are memcpys executed at once and events are complete when recorded (the engine's
// concurrency there is the CPU update thread). A queue for collectives between ranks is one more
// enumerator before k_num_queues: the CUDA backend keeps one stream per queue.
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>

#include "src/engine/backend_util.h"

namespace ferry::engine {

enum class queue { queue_compute, queue_h2d, queue_d2h };
constexpr int k_num_queues = 3;

class event {
 public:
  virtual ~event() = default;
  virtual void synchronize() = 0;  // the host blocks until the work recorded before it is done
  // Whether that work is done (synchronize would return at once); any thread may ask. The strict
  // backend's copies are done only once waited for.
  virtual bool ready() { return true; }
};
using event_ptr = std::shared_ptr<event>;

struct device_memory_stats {
  int64_t allocated_peak = 0;  // bytes of tensors alive at the peak, since the last reset
  int64_t reserved_peak = 0;   // bytes held by the caching allocator at its peak
  int64_t total = 0;           // the card's memory (0 on the host backend)
};

class backend {
 public:
  backend(int64_t debug_delay_us, uint64_t seed) : delay_(debug_delay_us, seed) {}
  virtual ~backend() = default;
  virtual at::Device device() const = 0;
  virtual bool is_cuda() const = 0;
  virtual std::string name() const = 0;   // "NVIDIA H100 80GB HBM3", "host CPU"

  // Host memory device copies read and write: page-locked on CUDA (exactly `bytes`, not rounded),
  // 64-byte aligned. Throws ferry::error naming the size when the host cannot provide it.
  virtual void* host_alloc(size_t bytes) = 0;
  virtual void host_free(void* p) = 0;
  // Page-locks `bytes` of host memory allocated elsewhere (shared memory the ranks of a machine
  // map: collectives::share_host_memory) so device copies run from it at the link's rate, until
  // host_unregister. No-ops on the host backends.
  virtual void host_register(void* p, size_t bytes) {
    (void)p;
    (void)bytes;
  }
  virtual void host_unregister(void* p) { (void)p; }
  // Makes this backend's device the calling thread's current one. CUDA: a thread's runtime calls
  // (an event's synchronize, a copy) otherwise run in device 0's primary context, which they
  // create there if it does not exist: on a rank of another GPU, a second context and its device
  // memory on GPU 0. The constructing thread is bound already; other threads that touch the
  // device (the update thread) call it first. No-op on the host backends.
  virtual void bind_thread() {}

  // Asynchronous copies on the h2d / d2h queues. dst / src are contiguous device tensors; the
  // caller may drop them once the copy is queued (the backend keeps their memory from being reused
  // before the copy is done), but must not write src or read dst before waiting for the copy.
  virtual void copy_h2d(const at::Tensor& dst, const void* src, size_t bytes) = 0;
  virtual void copy_d2h(void* dst, const at::Tensor& src, size_t bytes) = 0;

  virtual event_ptr record(queue q, bool timing = false) = 0;
  virtual void wait(queue waiter, const event_ptr& e) = 0;
  // Milliseconds between two timing events (0 on the host backend).
  virtual double elapsed_ms(const event_ptr& start, const event_ptr& end) = 0;
  // The host blocks until every queue's work (and the device's current stream's) is done.
  virtual void synchronize() = 0;

  // While the returned object lives, ATen ops run on the compute queue.
  virtual std::shared_ptr<void> enter_compute() = 0;

  virtual device_memory_stats memory_stats() = 0;
  virtual void reset_memory_peak() = 0;
  // Caps usable device memory (caching allocator fraction); no-op on the host backend.
  virtual void limit_memory(double gib) = 0;

  // Race testing (engine_options::debug_delay_us): sleeps a random 0..max_us; the backends call it
  // before each copy, the engine before each compute phase and host task.
  void debug_delay() { delay_(); }

 private:
  detail::random_delay delay_;
};

// debug_delay_us > 0 injects random delays (seeded) for the race tests.
std::unique_ptr<backend> make_host_backend(int64_t debug_delay_us = 0, uint64_t seed = 0);
// The host backend with copies that run as late as a GPU's may, poisoned destinations and checked
// ordering rules (backend_strict.cpp): a missing record or wait in the engine fails there.
std::unique_ptr<backend> make_strict_host_backend(int64_t debug_delay_us = 0, uint64_t seed = 0);
// Available when built with CUDA; throws ferry::error when no device is usable. device_index -1:
// the current device.
std::unique_ptr<backend> make_cuda_backend(int device_index = -1, int64_t debug_delay_us = 0, uint64_t seed = 0);
bool cuda_usable();
// The CUDA devices this process sees (CUDA_VISIBLE_DEVICES applied), 0 without CUDA.
int cuda_device_count();
// The caching allocator's peaks on CUDA device `device_index` since the process started (the
// engine never resets them): what a data-parallel rank reports after its run. Zeros without CUDA.
device_memory_stats cuda_memory_stats(int device_index);
// The PCI bus id of CUDA device `device_index` ("0000:3b:00.0"), "" without CUDA or when the
// driver does not give one.
std::string cuda_pci_bus_id(int device_index);

}  // namespace ferry::engine
