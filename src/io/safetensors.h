#pragma once
// safetensors files (https://github.com/huggingface/safetensors): an 8-byte little-endian header
// length N, N bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__":
// {str: str}}, then the byte buffer that the offsets index (relative to its start).
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <unordered_map>
#include <vector>

#include "src/io/mapped_file.h"

namespace ferry::io {

struct st_tensor_info {
  std::string name;
  std::string dtype;  // "F64","F32","F16","BF16","I64","I32","I16","I8","U64","U32","U16","U8","BOOL","F8_E4M3","F8_E5M2"
  std::vector<int64_t> shape;
  size_t begin = 0, end = 0;  // byte offsets into the data buffer
};

// Bytes per element of a safetensors dtype name; 0 for an unknown name.
size_t st_dtype_size(const std::string& dtype);

// A memory-mapped safetensors file, validated on open: header length against the file size, JSON
// syntax, known dtype names, shape * itemsize == end - begin, offsets tiling the buffer with no
// gap or overlap and staying in bounds. Every error (ferry::error) names the file and the tensor.
class safetensors_file {
 public:
  explicit safetensors_file(const std::string& path);

  const std::vector<st_tensor_info>& tensors() const { return tensors_; }  // in buffer order
  const st_tensor_info* find(const std::string& name) const;              // nullptr if absent
  const void* data(const st_tensor_info& t) const { return buffer_ + t.begin; }  // not necessarily aligned
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::string& path() const { return file_.path(); }

 private:
  mapped_file file_;
  const uint8_t* buffer_ = nullptr;
  std::vector<st_tensor_info> tensors_;
  std::unordered_map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

struct st_write_entry {
  std::string name;
  std::string dtype;
  std::vector<int64_t> shape;
  const void* data;
  size_t bytes;  // must equal prod(shape) * st_dtype_size(dtype)
};

// Writes atomically (atomic_file): the header is padded with spaces to a multiple of 8 bytes, as
// the reference implementation does, and tensors are laid out by decreasing element size (ties
// keep the caller's order) so that every tensor's data stays aligned to its element size.
void write_safetensors(const std::string& path, const std::vector<st_write_entry>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// The streaming form behind write_safetensors, for writers that produce data on the fly (dtype
// conversion of a large model without a second copy). `write_data(i, sink)` must write exactly
// the bytes of entry i (its data/bytes fields are ignored) through sink(ptr, bytes); it is called
// once per entry in file order.
using st_sink = std::function<void(const void*, size_t)>;
void write_safetensors_streamed(const std::string& path, const std::vector<st_write_entry>& tensors,
                                const std::map<std::string, std::string>& metadata,
                                const std::function<void(size_t, const st_sink&)>& write_data);

}  // namespace ferry::io
