// CUDA runtime helpers (gpu/runtime.h). Destructors never throw: a failing free during unwinding
// is reported on stderr and otherwise ignored.
#include "gpu/runtime.h"

#include <cstdio>
#include <exception>
#include <memory>
#include <utility>

#include "gpu/cuda_check.h"

namespace ferry::gpu {
namespace {

double gib(size_t bytes) { return static_cast<double>(bytes) / (1024.0 * 1024.0 * 1024.0); }

void report_dtor_error(cudaError_t err, const char* what) {
  if (err != cudaSuccess && err != cudaErrorCudartUnloading) {
    std::fprintf(stderr, "ferry: %s failed in a destructor: %s\n", what, cudaGetErrorString(err));
  }
}

}  // namespace

pinned_buffer::pinned_buffer(size_t bytes) {
  if (bytes == 0) return;
  const cudaError_t err = cudaHostAlloc(&data_, bytes, cudaHostAllocPortable);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    data_ = nullptr;
    throw ::ferry::error(::ferry::detail::str_cat(
        "could not pin ", bytes, " bytes (", gib(bytes), " GiB) of host memory: ", cudaGetErrorString(err),
        ". Free host memory, raise the locked-memory limit (ulimit -l; the container's memlock limit), or "
        "choose a smaller model or offload mode"));
  }
  bytes_ = bytes;
}

pinned_buffer::~pinned_buffer() {
  if (data_ != nullptr) report_dtor_error(cudaFreeHost(data_), "cudaFreeHost");
}

pinned_buffer::pinned_buffer(pinned_buffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}

pinned_buffer& pinned_buffer::operator=(pinned_buffer&& other) noexcept {
  if (this != &other) {
    if (data_ != nullptr) report_dtor_error(cudaFreeHost(data_), "cudaFreeHost");
    data_ = std::exchange(other.data_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

device_buffer::device_buffer(size_t bytes) {
  if (bytes == 0) return;
  const cudaError_t err = cudaMalloc(&data_, bytes);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    data_ = nullptr;
    size_t free_b = 0, total_b = 0;
    (void)cudaMemGetInfo(&free_b, &total_b);
    throw ::ferry::error(::ferry::detail::str_cat(
        "could not allocate ", bytes, " bytes (", gib(bytes), " GiB) on the GPU (", gib(free_b), " GiB free of ",
        gib(total_b), " GiB): ", cudaGetErrorString(err),
        ". Lower the prefetch depth or sequence length, or use an offload mode that keeps less on the GPU"));
  }
  bytes_ = bytes;
}

device_buffer::~device_buffer() {
  if (data_ != nullptr) report_dtor_error(cudaFree(data_), "cudaFree");
}

device_buffer::device_buffer(device_buffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}

device_buffer& device_buffer::operator=(device_buffer&& other) noexcept {
  if (this != &other) {
    if (data_ != nullptr) report_dtor_error(cudaFree(data_), "cudaFree");
    data_ = std::exchange(other.data_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

stream::stream(int priority) {
  FERRY_CUDA_CHECK(cudaStreamCreateWithPriority(&stream_, cudaStreamNonBlocking, priority));
}
stream::~stream() {
  if (stream_ != nullptr) report_dtor_error(cudaStreamDestroy(stream_), "cudaStreamDestroy");
}
stream::stream(stream&& other) noexcept : stream_(std::exchange(other.stream_, nullptr)) {}
stream& stream::operator=(stream&& other) noexcept {
  if (this != &other) {
    if (stream_ != nullptr) report_dtor_error(cudaStreamDestroy(stream_), "cudaStreamDestroy");
    stream_ = std::exchange(other.stream_, nullptr);
  }
  return *this;
}
void stream::synchronize() const { FERRY_CUDA_CHECK(cudaStreamSynchronize(stream_)); }
void stream::wait(const event& e) const { FERRY_CUDA_CHECK(cudaStreamWaitEvent(stream_, e.get(), 0)); }

event::event(bool timing) {
  FERRY_CUDA_CHECK(cudaEventCreateWithFlags(&event_, timing ? cudaEventDefault : cudaEventDisableTiming));
}
event::~event() {
  if (event_ != nullptr) report_dtor_error(cudaEventDestroy(event_), "cudaEventDestroy");
}
event::event(event&& other) noexcept : event_(std::exchange(other.event_, nullptr)) {}
event& event::operator=(event&& other) noexcept {
  if (this != &other) {
    if (event_ != nullptr) report_dtor_error(cudaEventDestroy(event_), "cudaEventDestroy");
    event_ = std::exchange(other.event_, nullptr);
  }
  return *this;
}
void event::record(cudaStream_t s) const { FERRY_CUDA_CHECK(cudaEventRecord(event_, s)); }
void event::synchronize() const { FERRY_CUDA_CHECK(cudaEventSynchronize(event_)); }
bool event::query() const {
  const cudaError_t err = cudaEventQuery(event_);
  if (err == cudaErrorNotReady) return false;
  FERRY_CUDA_CHECK(err);
  return true;
}
float event::elapsed_ms(const event& start, const event& end) {
  float ms = 0.f;
  FERRY_CUDA_CHECK(cudaEventElapsedTime(&ms, start.event_, end.event_));
  return ms;
}

memory_info_t memory_info() {
  memory_info_t info{0, 0};
  FERRY_CUDA_CHECK(cudaMemGetInfo(&info.free_bytes, &info.total_bytes));
  return info;
}

void copy_async(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t s) {
  if (bytes == 0) return;
  FERRY_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, kind, s));
}

namespace {
void CUDART_CB run_host_func(void* arg) {
  std::unique_ptr<std::function<void()>> fn(static_cast<std::function<void()>*>(arg));
  try {
    (*fn)();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ferry: bug: a stream host callback threw: %s\n", e.what());
    std::terminate();
  } catch (...) {
    std::fprintf(stderr, "ferry: bug: a stream host callback threw a non-standard exception\n");
    std::terminate();
  }
}
}  // namespace

void launch_host_func(cudaStream_t s, std::function<void()> fn) {
  auto owned = std::make_unique<std::function<void()>>(std::move(fn));
  FERRY_CUDA_CHECK(cudaLaunchHostFunc(s, run_host_func, owned.get()));
  owned.release();  // run_host_func owns it now
}

}  // namespace ferry::gpu
