#pragma once
// CUDA runtime helpers for the offload engine: exact-size pinned host and device buffers, RAII
// streams and events, checked async copies, host callbacks on a stream, and NVTX ranges.
// Framework-free (no ATen): the engine may mix these with c10::cuda::CUDAStream, whose .stream()
// is a cudaStream_t that every function here accepts.
#include <cuda_runtime_api.h>

#include <cstddef>
#include <functional>

#if defined(FERRY_NVTX) && FERRY_NVTX
#include <nvtx3/nvToolsExt.h>
#endif

namespace ferry::gpu {

// Page-locked host memory of exactly `bytes` (cudaHostAlloc, portable: usable from every device).
// Move-only. Construction throws ferry::error naming the size and what to do when the host cannot
// pin it. bytes == 0 gives an empty buffer (data() == nullptr).
class pinned_buffer {
 public:
  pinned_buffer() = default;
  explicit pinned_buffer(size_t bytes);
  ~pinned_buffer();
  pinned_buffer(pinned_buffer&& other) noexcept;
  pinned_buffer& operator=(pinned_buffer&& other) noexcept;
  pinned_buffer(const pinned_buffer&) = delete;
  pinned_buffer& operator=(const pinned_buffer&) = delete;

  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(data_);
  }

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

// Device memory of exactly `bytes` on the current device (cudaMalloc, outside PyTorch's caching
// allocator: for fixed pools planned at start-up). Move-only; throws ferry::error with the size
// and the device's free memory when it does not fit.
class device_buffer {
 public:
  device_buffer() = default;
  explicit device_buffer(size_t bytes);
  ~device_buffer();
  device_buffer(device_buffer&& other) noexcept;
  device_buffer& operator=(device_buffer&& other) noexcept;
  device_buffer(const device_buffer&) = delete;
  device_buffer& operator=(const device_buffer&) = delete;

  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(data_);
  }

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

class event;

// An owned, non-blocking stream on the current device (never synchronises with the legacy
// default stream). priority: lower is higher priority (cudaDeviceGetStreamPriorityRange), 0 normal.
class stream {
 public:
  explicit stream(int priority = 0);
  ~stream();
  stream(stream&& other) noexcept;
  stream& operator=(stream&& other) noexcept;
  stream(const stream&) = delete;
  stream& operator=(const stream&) = delete;

  cudaStream_t get() const { return stream_; }
  void synchronize() const;
  // Work submitted to this stream after the call waits for e's last record.
  void wait(const event& e) const;

 private:
  cudaStream_t stream_ = nullptr;
};

// An owned event. timing=false (the default) makes record/wait cheaper; elapsed_ms needs timing.
class event {
 public:
  explicit event(bool timing = false);
  ~event();
  event(event&& other) noexcept;
  event& operator=(event&& other) noexcept;
  event(const event&) = delete;
  event& operator=(const event&) = delete;

  cudaEvent_t get() const { return event_; }
  void record(cudaStream_t s) const;
  void synchronize() const;
  // True when the work before the last record has finished (or nothing was recorded).
  bool query() const;
  // Milliseconds between two recorded, completed timing events.
  static float elapsed_ms(const event& start, const event& end);

 private:
  cudaEvent_t event_ = nullptr;
};

struct memory_info_t {
  size_t free_bytes;
  size_t total_bytes;
};
// cudaMemGetInfo on the current device.
memory_info_t memory_info();

// Checked cudaMemcpyAsync. For truly asynchronous host<->device copies the host side must be
// pinned (pinned_buffer); pageable memory silently makes the copy synchronous.
void copy_async(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t s);

// Runs fn on a CUDA-owned host thread once all prior work on s has finished; later work on s
// waits for fn to return. Contract (CUDA's): fn must not call CUDA APIs and should be short (it
// blocks the stream). fn must not throw: an exception escaping it is reported on stderr and
// terminates the process, since no caller is left to catch it.
void launch_host_func(cudaStream_t s, std::function<void()> fn);

// An NVTX range for Nsight Systems, pushed on construction and popped on destruction. Compiled to
// nothing unless built with FERRY_NVTX (the CMake option of that name).
class nvtx_range {
 public:
#if defined(FERRY_NVTX) && FERRY_NVTX
  explicit nvtx_range(const char* name) { nvtxRangePushA(name); }
  ~nvtx_range() { nvtxRangePop(); }
#else
  explicit nvtx_range(const char*) {}
#endif
  nvtx_range(const nvtx_range&) = delete;
  nvtx_range& operator=(const nvtx_range&) = delete;
};

// A point marker on the NVTX timeline (no-op without FERRY_NVTX).
inline void nvtx_mark(const char* name) {
#if defined(FERRY_NVTX) && FERRY_NVTX
  nvtxMarkA(name);
#else
  (void)name;
#endif
}

}  // namespace ferry::gpu
