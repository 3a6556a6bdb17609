#pragma once
// The optimizer state tier on a local disk (run-config optimizer_state_on=nvme, nvme_path): every
// unit's fp32 master weights and moments live in one scratch file, streamed through a few host
// buffers by io_uring (uring_io.h) with O_DIRECT.
//
// The file, "ferry-state-<pid>-<random>.tier" in nvme_path, is created exclusively (a file of a
// killed run is never reused), preallocated with fallocate before anything else is written (too
// little space is a one-line error naming nvme_path, the bytes needed and the bytes free), and
// removed when the tier is destroyed. Unit u's block starts at a 4096-aligned offset and holds
// exactly state_bytes(kind) bytes of the in-memory form, arrays in this order: the fp32 master,
// (int8) the fp32 scales of m and of v, then m and v; a buffer holds a block the same way.
// A filesystem that refuses O_DIRECT (tmpfs before Linux 6.6) gets buffered I/O, and a kernel or
// container that refuses io_uring gets uring_io's pread/pwrite path, each with a notice in
// describe().
//
// Streaming: prefetch(u) queues a read of u into a free buffer (an empty one, else the least
// recently used clean one that no prefetch asked for); acquire(u) hands out the buffer holding u,
// waiting for its read or write-back if one is in flight, and reads it itself when no prefetch
// did; release(u, dirty) writes the buffer back (write-behind) and the buffer is reused only after
// that write completed, so no unit is ever seen half-written. A failed or short read or write
// (EIO, ENOSPC, a truncated file) is sticky: that acquire, every later one, and flush() throw
// ferry::error with one line naming the file and the unit.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "src/engine/state_tier.h"

namespace ferry::engine {

// The run-config key optimizer_state_on.
enum class state_place {
  place_host,  // make_host_state
  place_nvme,  // make_nvme_state
};
state_place parse_state_place(const std::string& s);   // throws config_error naming the key
const char* state_place_name(state_place p);           // "host", "nvme"

struct nvme_options {
  std::string path;            // nvme_path: the directory the tier's file is created in
  // Defaults from ferry-bench-adamw --nvme on the 2-core dev VM (BENCHMARKS.md): 3-4 buffers keep
  // the disk busy while a unit is updated (2 leave it idle during the update); the queue depth
  // mattered little there (best read at 16).
  int64_t buffers = 4;         // nvme_buffers: host buffers of the largest unit's block (>= 2)
  int64_t queue_depth = 16;    // nvme_queue_depth: requests of k_nvme_chunk bytes in flight
  // Test hooks (tests/engine only; never set by the CLI).
  bool debug_refuse_direct = false;  // act as if the filesystem refused O_DIRECT
  bool debug_no_uring = false;       // act as if the kernel refused io_uring (pread/pwrite path)
  int debug_fallocate_errno = 0;     // preallocation fails with this errno
  int64_t debug_fail_write = -1;     // write-backs from this one on (0-based) go to a read-only
                                     // descriptor, so their completions carry EBADF
};

constexpr int64_t k_nvme_align = 4096;            // O_DIRECT alignment of offsets, lengths, buffers
constexpr int64_t k_nvme_chunk = int64_t(1) << 20;  // bytes per read or write request

// One unit's block in the file and in a buffer: state_bytes rounded up to k_nvme_align.
int64_t nvme_unit_stride(state_kind k, bool moments, int64_t numel);
// The tier file's bytes (every unit's stride) and its host buffers' (buffers x the largest stride),
// exactly what make_nvme_state allocates: the planner charges these.
int64_t nvme_file_bytes(const std::vector<int64_t>& unit_numel, state_kind k, bool moments);
int64_t nvme_buffer_bytes(const std::vector<int64_t>& unit_numel, state_kind k, bool moments, int64_t buffers);
// Bytes free for an unprivileged user on the filesystem of dir (statvfs), -1 when unknown.
int64_t nvme_free_bytes(const std::string& dir);
// Unit u's arrays in a block at base (nvme_state.h's order); n elements, seed u + 1.
state_view nvme_block_view(char* base, state_kind k, bool moments, int64_t u, int64_t n);

// Throws config_error (naming nvme_path and what is wrong) for a missing or unusable directory, an
// option out of range or too little space; ferry::error when io_uring or the host buffers cannot be
// set up. The moments start at zero (the preallocated file reads as zeros).
std::unique_ptr<state_tier> make_nvme_state(const std::vector<int64_t>& unit_numel, state_kind kind, bool moments,
                                            const nvme_options& o);

}  // namespace ferry::engine
