#include "src/io/safetensors.h"

#include <algorithm>
#include <cstring>
#include <nlohmann/json.hpp>
#include <numeric>

#include "src/common/error.h"
#include "src/io/atomic_file.h"

namespace ferry::io {
namespace {

// The reference implementation refuses headers above 100 MB; so do we, before parsing them.
constexpr uint64_t k_max_header = uint64_t(100) << 20;

uint64_t read_u64_le(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

// prod(shape) * itemsize, or false on a negative dimension or overflow.
bool checked_bytes(const std::vector<int64_t>& shape, size_t itemsize, size_t* out) {
  unsigned __int128 n = itemsize;
  for (int64_t d : shape) {
    if (d < 0) return false;
    n *= static_cast<uint64_t>(d);
    if (n > (static_cast<unsigned __int128>(1) << 62)) return false;
  }
  *out = static_cast<size_t>(n);
  return true;
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

}  // namespace

size_t st_dtype_size(const std::string& dtype) {
  static const std::map<std::string, size_t> sizes = {
      {"F64", 8}, {"F32", 4}, {"F16", 2}, {"BF16", 2}, {"I64", 8},     {"I32", 4},    {"I16", 2}, {"I8", 1},
      {"U64", 8}, {"U32", 4}, {"U16", 2}, {"U8", 1},   {"BOOL", 1}, {"F8_E4M3", 1}, {"F8_E5M2", 1}};
  auto it = sizes.find(dtype);
  return it == sizes.end() ? 0 : it->second;
}

safetensors_file::safetensors_file(const std::string& path) : file_(path) {
  const std::string& p = file_.path();
  const std::string hint = " (the file is corrupt or truncated; re-download or re-save it)";
  FERRY_CHECK(file_.size() >= 8, p, ": file is ", file_.size(),
              " bytes, shorter than the 8-byte safetensors header length", hint);
  uint64_t n = read_u64_le(file_.data());
  FERRY_CHECK(n <= file_.size() - 8, p, ": header length ", n, " exceeds the file size (", file_.size(),
              " bytes)", hint);
  FERRY_CHECK(n <= k_max_header, p, ": header length ", n, " is above the 100 MB limit", hint);
  buffer_ = file_.data() + 8 + n;
  const size_t buffer_size = file_.size() - 8 - n;

  nlohmann::json header;
  try {
    header = nlohmann::json::parse(file_.data() + 8, file_.data() + 8 + n);
  } catch (const nlohmann::json::exception& e) {
    FERRY_CHECK(false, p, ": header is not valid JSON: ", e.what(), hint);
  }
  FERRY_CHECK(header.is_object(), p, ": header is not a JSON object", hint);

  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const auto& v = it.value();
    if (name == "__metadata__") {
      FERRY_CHECK(v.is_object(), p, ": __metadata__ is not an object of strings", hint);
      for (auto m = v.begin(); m != v.end(); ++m) {
        FERRY_CHECK(m.value().is_string(), p, ": __metadata__ value of '", m.key(), "' is not a string", hint);
        metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    const std::string where = p + ": tensor '" + name + "'";
    FERRY_CHECK(v.is_object() && v.contains("dtype") && v.contains("shape") && v.contains("data_offsets"), where,
                ": entry needs dtype, shape and data_offsets", hint);
    st_tensor_info t;
    t.name = name;
    FERRY_CHECK(v["dtype"].is_string(), where, ": dtype is not a string", hint);
    t.dtype = v["dtype"].get<std::string>();
    size_t itemsize = st_dtype_size(t.dtype);
    FERRY_CHECK(itemsize > 0, where, ": unknown dtype '", t.dtype, "'", hint);
    FERRY_CHECK(v["shape"].is_array(), where, ": shape is not an array", hint);
    for (const auto& d : v["shape"]) {
      FERRY_CHECK(d.is_number_integer() && d.get<int64_t>() >= 0, where, ": shape ", v["shape"].dump(),
                  " is not a list of non-negative integers", hint);
      t.shape.push_back(d.get<int64_t>());
    }
    const auto& off = v["data_offsets"];
    FERRY_CHECK(off.is_array() && off.size() == 2 && off[0].is_number_unsigned() && off[1].is_number_unsigned(),
                where, ": data_offsets ", off.dump(), " is not a pair of non-negative integers", hint);
    t.begin = off[0].get<uint64_t>();
    t.end = off[1].get<uint64_t>();
    FERRY_CHECK(t.begin <= t.end, where, ": data_offsets [", t.begin, ", ", t.end, "] end before they begin", hint);
    FERRY_CHECK(t.end <= buffer_size, where, ": data_offsets [", t.begin, ", ", t.end,
                "] run past the end of the data buffer (", buffer_size, " bytes)", hint);
    size_t bytes = 0;
    FERRY_CHECK(checked_bytes(t.shape, itemsize, &bytes) && bytes == t.end - t.begin, where, ": shape ",
                shape_str(t.shape), " of ", t.dtype, " needs ", bytes, " bytes but data_offsets [", t.begin, ", ",
                t.end, "] hold ", t.end - t.begin, hint);
    tensors_.push_back(std::move(t));
  }

  // Offsets must tile [0, buffer_size): sorted by (begin, end), each starts where the last ended.
  std::stable_sort(tensors_.begin(), tensors_.end(), [](const st_tensor_info& a, const st_tensor_info& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  size_t pos = 0;
  for (size_t i = 0; i < tensors_.size(); ++i) {
    const auto& t = tensors_[i];
    FERRY_CHECK(t.begin >= pos, p, ": tensor '", t.name, "' data_offsets [", t.begin, ", ", t.end,
                "] overlap the previous tensor '", tensors_[i - 1].name, "' (which ends at ", pos, ")", hint);
    FERRY_CHECK(t.begin == pos, p, ": tensor '", t.name, "' data_offsets [", t.begin, ", ", t.end,
                "] leave a gap of ", t.begin - pos, " bytes after ", i ? "tensor '" + tensors_[i - 1].name + "'"
                                                                        : std::string("the header"), hint);
    pos = t.end;
  }
  FERRY_CHECK(pos == buffer_size, p, ": the tensors cover ", pos, " bytes but the data buffer holds ", buffer_size,
              " (trailing bytes after the last tensor)", hint);
  for (size_t i = 0; i < tensors_.size(); ++i) index_.emplace(tensors_[i].name, i);
}

const st_tensor_info* safetensors_file::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

void write_safetensors_streamed(const std::string& path, const std::vector<st_write_entry>& tensors,
                                const std::map<std::string, std::string>& metadata,
                                const std::function<void(size_t, const st_sink&)>& write_data) {
  // Decreasing element size keeps every tensor aligned (the buffer starts 8-aligned).
  std::vector<size_t> order(tensors.size());
  std::iota(order.begin(), order.end(), size_t(0));
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return st_dtype_size(tensors[a].dtype) > st_dtype_size(tensors[b].dtype);
  });

  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::vector<size_t> sizes(tensors.size());
  size_t offset = 0;
  for (size_t i : order) {
    const auto& t = tensors[i];
    FERRY_CHECK(t.name != "__metadata__" && !header.contains(t.name), "cannot write ", path, ": tensor name '",
                t.name, "' is reserved or used twice");
    size_t itemsize = st_dtype_size(t.dtype);
    FERRY_CHECK(itemsize > 0, "cannot write ", path, ": tensor '", t.name, "' has unknown dtype '", t.dtype, "'");
    FERRY_CHECK(checked_bytes(t.shape, itemsize, &sizes[i]), "cannot write ", path, ": tensor '", t.name,
                "' has an invalid shape ", shape_str(t.shape));
    header[t.name] = {{"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {offset, offset + sizes[i]}}};
    offset += sizes[i];
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(static_cast<uint64_t>(text.size()) >> (8 * i));

  atomic_file out(path);
  out.write(len, 8);
  out.write(text.data(), text.size());
  for (size_t i : order) {
    size_t written = 0;
    write_data(i, [&](const void* p, size_t bytes) {
      out.write(p, bytes);
      written += bytes;
    });
    FERRY_ASSERT(written == sizes[i], "wrote ", written, " bytes for tensor '", tensors[i].name, "', expected ",
                 sizes[i]);
  }
  out.commit();
}

void write_safetensors(const std::string& path, const std::vector<st_write_entry>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  for (const auto& t : tensors) {
    size_t bytes = 0;
    size_t itemsize = st_dtype_size(t.dtype);
    FERRY_CHECK(itemsize > 0, "cannot write ", path, ": tensor '", t.name, "' has unknown dtype '", t.dtype, "'");
    FERRY_CHECK(checked_bytes(t.shape, itemsize, &bytes) && bytes == t.bytes, "cannot write ", path, ": tensor '",
                t.name, "' has ", t.bytes, " bytes but shape ", shape_str(t.shape), " of ", t.dtype, " needs ", bytes);
    FERRY_CHECK(bytes == 0 || t.data != nullptr, "cannot write ", path, ": tensor '", t.name, "' has no data");
  }
  write_safetensors_streamed(path, tensors, metadata, [&](size_t i, const st_sink& sink) {
    if (tensors[i].bytes > 0) sink(tensors[i].data, tensors[i].bytes);
  });
}

}  // namespace ferry::io
