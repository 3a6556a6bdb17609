#pragma once
// A TensorBoard event-file writer for scalars. The format is small: a TFRecord stream (length,
// masked CRC32C of the length, payload, masked CRC32C of the payload) of tensorflow.Event
// protobufs, which we encode by hand (wall_time=1 double, step=2 int64, file_version=3 string,
// summary=5 {value=1 {tag=1 string, simple_value=2 float}}), so no protobuf or TensorFlow
// dependency is needed.
#include <cstdint>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

namespace ferry::io {

class tensorboard_writer {
 public:
  // Creates <dir>/events.out.tfevents.<time>.<host>; throws ferry::error when it cannot.
  explicit tensorboard_writer(const std::string& dir);
  ~tensorboard_writer();
  tensorboard_writer(const tensorboard_writer&) = delete;
  tensorboard_writer& operator=(const tensorboard_writer&) = delete;

  void add_scalars(int64_t step, const std::vector<std::pair<std::string, double>>& values);
  void flush();
  const std::string& path() const { return path_; }

 private:
  void write_record(const std::string& payload);
  std::string path_;
  std::FILE* f_ = nullptr;
};

uint32_t crc32c(const void* data, size_t n);

}  // namespace ferry::io
