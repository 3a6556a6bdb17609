// The TensorBoard event writer: CRC32C against its published check value, and the TFRecord
// framing (length, masked CRC of the length, payload, masked CRC of the payload) read back.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>

#include "src/io/atomic_file.h"
#include "src/io/tensorboard.h"

namespace {
uint32_t unmask(uint32_t m) {
  uint32_t rot = m - 0xa282ead8u;
  return (rot >> 17) | (rot << 15);
}
}  // namespace

TEST(tensorboard, crc32c_check_value) {
  EXPECT_EQ(ferry::io::crc32c("123456789", 9), 0xE3069283u);
  EXPECT_EQ(ferry::io::crc32c("", 0), 0u);
}

TEST(tensorboard, records_are_framed_and_carry_the_scalars) {
  std::string dir = (std::filesystem::temp_directory_path() / ("ferry_tb_" + std::to_string(::getpid()))).string();
  std::string path;
  {
    ferry::io::tensorboard_writer w(dir);
    w.add_scalars(7, {{"train/loss", 2.5}, {"train/lr", 1e-3}});
    w.flush();
    path = w.path();
  }
  std::ifstream f(path, std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  size_t pos = 0;
  std::vector<std::string> payloads;
  while (pos < bytes.size()) {
    ASSERT_LE(pos + 12, bytes.size());
    uint64_t len;
    uint32_t len_crc, data_crc;
    std::memcpy(&len, bytes.data() + pos, 8);
    std::memcpy(&len_crc, bytes.data() + pos + 8, 4);
    EXPECT_EQ(unmask(len_crc), ferry::io::crc32c(bytes.data() + pos, 8));
    ASSERT_LE(pos + 12 + len + 4, bytes.size());
    std::string payload = bytes.substr(pos + 12, len);
    std::memcpy(&data_crc, bytes.data() + pos + 12 + len, 4);
    EXPECT_EQ(unmask(data_crc), ferry::io::crc32c(payload.data(), payload.size()));
    payloads.push_back(payload);
    pos += 12 + len + 4;
  }
  ASSERT_EQ(payloads.size(), 2u);
  EXPECT_NE(payloads[0].find("brain.Event:2"), std::string::npos);
  EXPECT_NE(payloads[1].find("train/loss"), std::string::npos);
  EXPECT_NE(payloads[1].find("train/lr"), std::string::npos);
  float loss = 2.5f;
  EXPECT_NE(payloads[1].find(std::string(reinterpret_cast<const char*>(&loss), 4)), std::string::npos);
  // step 7 as a varint after the step field's tag (field 2, wire type 0)
  EXPECT_NE(payloads[1].find(std::string("\x10\x07", 2)), std::string::npos);
  ferry::io::remove_tree(dir);
}
