#pragma once
// Asynchronous file reads and writes through io_uring (liburing), the I/O path of the state tier on
// disk (nvme_state.h) and of ferry-bench-adamw --nvme. An operation over [offset, offset + len) of
// a file is split into requests of at most `chunk` bytes; at most `depth` requests of all
// operations are in flight, issued in queue order. An operation's callback runs on the completion
// thread once every one of its requests has completed, with the first failure if any.
//
// Threads: read/write may be called from any thread (one mutex guards the submission queue); one
// completion thread reaps the ring and runs the callbacks, with no lock of this class held, so a
// callback may queue further operations.
//
// Where the kernel refuses io_uring (seccomp profiles of container runtimes block io_uring_setup,
// older kernels lack it), the same thread runs the operations itself with pread/pwrite, one
// request at a time: the same results, no queue depth. uring_error() says which path runs.
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace ferry::engine {

struct uring_result {
  int err = 0;         // errno of the first failed request (0: none failed)
  int64_t done = 0;    // bytes transferred
  int64_t want = 0;    // bytes asked for; done < want with err == 0 is a short transfer (end of file)
  bool ok() const { return err == 0 && done == want; }
};

class uring_io {
 public:
  using callback = std::function<void(const uring_result&)>;

  // use_uring false: the pread/pwrite path even where io_uring works (tests).
  uring_io(int64_t depth, int64_t chunk, bool use_uring = true);
  // Waits for every queued operation to complete, then stops the completion thread.
  ~uring_io();
  uring_io(const uring_io&) = delete;
  uring_io& operator=(const uring_io&) = delete;

  // buf, offset and len as the file's open mode needs them (O_DIRECT: 4096-aligned).
  void read(int fd, void* buf, int64_t offset, int64_t len, callback done);
  void write(int fd, const void* buf, int64_t offset, int64_t len, callback done);
  // 0 while io_uring runs the I/O, else the errno io_uring_queue_init failed with (ENOSYS when
  // use_uring was false): the pread/pwrite path.
  int uring_error() const { return uring_error_; }

 private:
  struct op;
  struct request {
    op* owner = nullptr;
    int64_t len = 0;
  };
  void queue(bool write, int fd, void* buf, int64_t offset, int64_t len, callback done);
  void pump();   // with mu_ held: requests from the queue into free slots, then one submit
  void loop();
  void sync_loop();   // the pread/pwrite path

  struct ring;
  std::unique_ptr<ring> ring_;
  const int64_t depth_, chunk_;
  int uring_error_ = 0;
  bool stop_ = false;                // sync_loop: no operation will come
  std::mutex mu_;
  std::condition_variable idle_, work_;
  std::deque<op*> queued_;           // operations with requests not yet issued, in order
  std::vector<request> slots_;       // requests in flight, by user_data
  std::vector<int64_t> free_slots_;
  int64_t ops_open_ = 0;             // operations queued and not yet called back
  std::thread thread_;
};

}  // namespace ferry::engine
