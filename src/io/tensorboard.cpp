#include "src/io/tensorboard.h"

#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>

#include "src/common/error.h"

namespace ferry::io {
namespace {

void put_varint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out.push_back(char((v & 0x7F) | 0x80));
    v >>= 7;
  }
  out.push_back(char(v));
}
void put_tag(std::string& out, int field, int wire) { put_varint(out, uint64_t(field) << 3 | uint64_t(wire)); }
void put_bytes(std::string& out, int field, const std::string& s) {
  put_tag(out, field, 2);
  put_varint(out, s.size());
  out += s;
}
template <typename T>
void put_fixed(std::string& out, int field, T v) {
  put_tag(out, field, sizeof(T) == 8 ? 1 : 5);
  char b[sizeof(T)];
  std::memcpy(b, &v, sizeof(T));
  out.append(b, sizeof(T));
}
uint32_t masked(uint32_t crc) { return ((crc >> 15) | (crc << 17)) + 0xa282ead8u; }

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}
}  // namespace

uint32_t crc32c(const void* data, size_t n) {
  static uint32_t table[256];
  static bool init = [] {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0x82f63b78u ^ (c >> 1) : c >> 1;
      table[i] = c;
    }
    return true;
  }();
  (void)init;
  uint32_t crc = 0xffffffffu;
  const auto* p = static_cast<const uint8_t*>(data);
  for (size_t i = 0; i < n; ++i) crc = table[(crc ^ p[i]) & 0xff] ^ (crc >> 8);
  return crc ^ 0xffffffffu;
}

tensorboard_writer::tensorboard_writer(const std::string& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  char host[256] = "localhost";
  gethostname(host, sizeof host - 1);
  path_ = dir + "/events.out.tfevents." + std::to_string(int64_t(now_seconds())) + "." + host;
  f_ = std::fopen(path_.c_str(), "ab");
  FERRY_CHECK(f_ != nullptr, "cannot create the TensorBoard event file ", path_, ": ", std::strerror(errno),
              " (set tensorboard=false to skip it)");
  std::string ev;
  put_fixed<double>(ev, 1, now_seconds());
  put_bytes(ev, 3, "brain.Event:2");
  write_record(ev);
}

tensorboard_writer::~tensorboard_writer() {
  if (f_) std::fclose(f_);
}

void tensorboard_writer::write_record(const std::string& payload) {
  uint64_t len = payload.size();
  uint32_t len_crc = masked(crc32c(&len, sizeof len));
  uint32_t data_crc = masked(crc32c(payload.data(), payload.size()));
  std::fwrite(&len, sizeof len, 1, f_);
  std::fwrite(&len_crc, sizeof len_crc, 1, f_);
  std::fwrite(payload.data(), 1, payload.size(), f_);
  std::fwrite(&data_crc, sizeof data_crc, 1, f_);
}

void tensorboard_writer::add_scalars(int64_t step, const std::vector<std::pair<std::string, double>>& values) {
  std::string summary;
  for (const auto& [tag, v] : values) {
    std::string value;
    put_bytes(value, 1, tag);
    put_fixed<float>(value, 2, float(v));
    put_bytes(summary, 1, value);
  }
  std::string ev;
  put_fixed<double>(ev, 1, now_seconds());
  put_tag(ev, 2, 0);
  put_varint(ev, uint64_t(step));
  put_bytes(ev, 5, summary);
  write_record(ev);
}

void tensorboard_writer::flush() {
  if (f_) std::fflush(f_);
}

}  // namespace ferry::io
