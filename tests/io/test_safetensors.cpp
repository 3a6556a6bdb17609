// safetensors: round trip over every dtype (incl. empty and 0-d tensors, metadata) and one test
// per malformed-file error, each checking that the message names the file and the problem.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <numeric>

#include "src/common/error.h"
#include "src/io/safetensors.h"
#include "tests/io/io_test_util.h"

namespace ferry::io {
namespace {
using test::scratch_dir;

std::string le64(uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>(v >> (8 * i));
  return s;
}

// A raw file: header JSON, declared length (default: its size), then `buffer` bytes.
std::string raw_file(const std::string& header, size_t buffer, int64_t declared = -1) {
  uint64_t n = declared < 0 ? header.size() : static_cast<uint64_t>(declared);
  return le64(n) + header + std::string(buffer, '\x5a');
}

TEST(safetensors, round_trip_all_dtypes) {
  scratch_dir dir;
  const std::vector<std::string> dtypes = {"F64", "F32", "F16",  "BF16",    "I64",    "I32", "I16", "I8",
                                           "U64", "U32", "U16", "U8", "BOOL", "F8_E4M3", "F8_E5M2"};
  std::vector<std::string> storage;
  std::vector<st_write_entry> entries;
  // Interleave sizes so the writer has to reorder for alignment.
  for (size_t i = 0; i < dtypes.size(); ++i) {
    std::vector<int64_t> shape = {static_cast<int64_t>(i % 3 + 1), 3};
    size_t bytes = static_cast<size_t>(shape[0] * shape[1]) * st_dtype_size(dtypes[i]);
    std::string data(bytes, '\0');
    for (size_t b = 0; b < bytes; ++b) data[b] = static_cast<char>(b * 7 + i);
    storage.push_back(data);
  }
  for (size_t i = 0; i < dtypes.size(); ++i) {
    int64_t rows = static_cast<int64_t>(i % 3 + 1);
    entries.push_back({"t." + dtypes[i], dtypes[i], {rows, 3}, storage[i].data(), storage[i].size()});
  }
  entries.push_back({"empty", "F32", {0, 4}, nullptr, 0});
  float scalar = 3.5f;
  entries.push_back({"scalar", "F32", {}, &scalar, 4});
  const std::map<std::string, std::string> meta = {{"format", "pt"}, {"note", "ferry \"test\""}};
  const std::string path = dir / "a.safetensors";
  write_safetensors(path, entries, meta);

  safetensors_file f(path);
  EXPECT_EQ(f.path(), path);
  EXPECT_EQ(f.metadata(), meta);
  ASSERT_EQ(f.tensors().size(), entries.size());
  for (const auto& e : entries) {
    const st_tensor_info* t = f.find(e.name);
    ASSERT_NE(t, nullptr) << e.name;
    EXPECT_EQ(t->dtype, e.dtype);
    EXPECT_EQ(t->shape, e.shape);
    EXPECT_EQ(t->end - t->begin, e.bytes);
    if (e.bytes > 0) {
      EXPECT_EQ(std::memcmp(f.data(*t), e.data, e.bytes), 0) << e.name;
    }
    EXPECT_EQ(reinterpret_cast<uintptr_t>(f.data(*t)) % st_dtype_size(e.dtype), 0u) << e.name << " misaligned";
  }
  EXPECT_EQ(f.find("absent"), nullptr);
  std::string raw = test::read_bytes(path);
  uint64_t n = 0;
  std::memcpy(&n, raw.data(), 8);
  EXPECT_EQ(n % 8, 0u);
  EXPECT_FALSE(std::filesystem::exists(path + ".tmp." + std::to_string(::getpid())));
}

TEST(safetensors, no_tensors_and_no_metadata) {
  scratch_dir dir;
  write_safetensors(dir / "e.safetensors", {});
  safetensors_file f(dir / "e.safetensors");
  EXPECT_TRUE(f.tensors().empty());
  EXPECT_TRUE(f.metadata().empty());
}

TEST(safetensors, writer_rejects_bad_entries) {
  scratch_dir dir;
  float x[4] = {};
  EXPECT_ERROR_HAS(write_safetensors(dir / "a", {{"x", "F32", {2, 3}, x, 16}}), "'x'", "needs 24");
  EXPECT_ERROR_HAS(write_safetensors(dir / "a", {{"x", "F12", {1}, x, 4}}), "unknown dtype 'F12'");
  EXPECT_ERROR_HAS(write_safetensors(dir / "a", {{"x", "F32", {1}, x, 4}, {"x", "F32", {1}, x, 4}}), "used twice");
  EXPECT_FALSE(std::filesystem::exists(dir / "a"));
}

TEST(safetensors, missing_file) {
  EXPECT_ERROR_HAS(safetensors_file("/nonexistent/x.safetensors"), "/nonexistent/x.safetensors", "cannot open");
}

TEST(safetensors, truncated_below_length_field) {
  scratch_dir dir;
  test::write_bytes(dir / "t", "abc");
  EXPECT_ERROR_HAS(safetensors_file(dir / "t"), (dir / "t").c_str(), "3 bytes", "shorter than the 8-byte");
}

TEST(safetensors, header_length_larger_than_file) {
  scratch_dir dir;
  test::write_bytes(dir / "t", raw_file("{}", 0, 1000));
  EXPECT_ERROR_HAS(safetensors_file(dir / "t"), (dir / "t").c_str(), "header length 1000 exceeds the file size");
}

TEST(safetensors, bad_json) {
  scratch_dir dir;
  test::write_bytes(dir / "t", raw_file("{\"a\": [1, 2", 0));
  EXPECT_ERROR_HAS(safetensors_file(dir / "t"), (dir / "t").c_str(), "not valid JSON");
  test::write_bytes(dir / "u", raw_file("[1, 2]", 0));
  EXPECT_ERROR_HAS(safetensors_file(dir / "u"), "not a JSON object");
}

TEST(safetensors, unknown_dtype) {
  scratch_dir dir;
  test::write_bytes(dir / "t", raw_file(R"({"w": {"dtype": "F12", "shape": [2], "data_offsets": [0, 4]}})", 4));
  EXPECT_ERROR_HAS(safetensors_file(dir / "t"), (dir / "t").c_str(), "tensor 'w'", "unknown dtype 'F12'");
}

TEST(safetensors, missing_fields_and_bad_shape) {
  scratch_dir dir;
  test::write_bytes(dir / "t", raw_file(R"({"w": {"dtype": "F32", "shape": [2]}})", 0));
  EXPECT_ERROR_HAS(safetensors_file(dir / "t"), "tensor 'w'", "needs dtype, shape and data_offsets");
  test::write_bytes(dir / "u", raw_file(R"({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}})", 8));
  EXPECT_ERROR_HAS(safetensors_file(dir / "u"), "tensor 'w'", "non-negative");
}

TEST(safetensors, shape_offset_mismatch) {
  scratch_dir dir;
  test::write_bytes(dir / "t", raw_file(R"({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}})", 20));
  EXPECT_ERROR_HAS(safetensors_file(dir / "t"), (dir / "t").c_str(), "tensor 'w'", "[2, 3]", "needs 24 bytes",
                   "hold 20");
}

TEST(safetensors, overlapping_offsets) {
  scratch_dir dir;
  test::write_bytes(dir / "t", raw_file(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})",
                                        12));
  EXPECT_ERROR_HAS(safetensors_file(dir / "t"), (dir / "t").c_str(), "tensor 'b'", "overlap", "'a'");
}

TEST(safetensors, gapped_offsets) {
  scratch_dir dir;
  test::write_bytes(dir / "t", raw_file(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                            "b": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}})",
                                        20));
  EXPECT_ERROR_HAS(safetensors_file(dir / "t"), (dir / "t").c_str(), "tensor 'b'", "gap of 4 bytes");
  test::write_bytes(dir / "u", raw_file(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})", 12));
  EXPECT_ERROR_HAS(safetensors_file(dir / "u"), "tensor 'a'", "gap of 4 bytes after the header");
}

TEST(safetensors, offsets_out_of_bounds_and_trailing_bytes) {
  scratch_dir dir;
  test::write_bytes(dir / "t", raw_file(R"({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})", 12));
  EXPECT_ERROR_HAS(safetensors_file(dir / "t"), "tensor 'a'", "run past the end of the data buffer (12 bytes)");
  test::write_bytes(dir / "u", raw_file(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})", 12));
  EXPECT_ERROR_HAS(safetensors_file(dir / "u"), "cover 8 bytes", "holds 12");
}

TEST(safetensors, truncated_valid_file) {
  scratch_dir dir;
  std::vector<float> a(100, 1.0f), b(50, 2.0f);
  write_safetensors(dir / "m", {{"a", "F32", {100}, a.data(), 400}, {"b", "F32", {50}, b.data(), 200}});
  std::string raw = test::read_bytes(dir / "m");
  test::write_bytes(dir / "cut", raw.substr(0, raw.size() - 10));
  EXPECT_ERROR_HAS(safetensors_file(dir / "cut"), (dir / "cut").c_str(), "tensor 'b'", "run past the end",
                   "corrupt or truncated");
}

TEST(safetensors, bad_metadata) {
  scratch_dir dir;
  test::write_bytes(dir / "t", raw_file(R"({"__metadata__": {"k": 1}})", 0));
  EXPECT_ERROR_HAS(safetensors_file(dir / "t"), "__metadata__", "'k'", "not a string");
}

}  // namespace
}  // namespace ferry::io
