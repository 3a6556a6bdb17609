#pragma once
// A read-only memory map of a whole file (safetensors shards, token files). The mapping lives as
// long as the object; pointers into it are valid until then. Zero-length files map to nothing
// (data() == nullptr, size() == 0).
#include <cstddef>
#include <cstdint>
#include <string>

namespace ferry::io {

class mapped_file {
 public:
  // Throws ferry::error naming the path and the OS reason (missing, unreadable, a directory).
  explicit mapped_file(const std::string& path);
  ~mapped_file();
  mapped_file(mapped_file&& other) noexcept;
  mapped_file& operator=(mapped_file&& other) noexcept;
  mapped_file(const mapped_file&) = delete;
  mapped_file& operator=(const mapped_file&) = delete;

  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  void release();
  std::string path_;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace ferry::io
