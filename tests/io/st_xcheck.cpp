// The C++ side of safetensors_xcheck.py. "write PATH" writes a fixed set of tensors (every dtype
// the Python side can build, an empty tensor, metadata); "dump PATH" prints a file's metadata and
// tensors (dtype, shape, hex bytes) as JSON on stdout; "hf-check DIR" validates an HF checkpoint
// and prints every tensor as read (shape and fp32 values; JSON numbers round-trip a float
// exactly); "hf-write DIR" also rewrites DIR's checkpoint (sharded, BF16).
#include <cstdio>
#include <cstring>
#include <exception>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "src/io/half_convert.h"
#include "src/io/hf_checkpoint.h"
#include "src/io/hf_config.h"
#include "src/io/safetensors.h"

namespace {

std::vector<uint8_t> values_for(const std::string& dt) {
  std::vector<uint8_t> out;
  for (int k = 0; k < 6; ++k) {
    double v = dt == "BOOL" ? k % 2 : (dt[0] == 'F' || dt == "BF16") ? (k - 2) * 0.5 : (dt[0] == 'U' ? k * 40 : k * 40 - 100);
    uint8_t b[8] = {};
    size_t n = ferry::io::st_dtype_size(dt);
    if (dt == "F64") std::memcpy(b, &v, 8);
    else if (dt == "F32") { float f = static_cast<float>(v); std::memcpy(b, &f, 4); }
    else if (dt == "F16") { uint16_t h = ferry::io::f32_to_f16(static_cast<float>(v)); std::memcpy(b, &h, 2); }
    else if (dt == "BF16") { uint16_t h = ferry::io::f32_to_bf16(static_cast<float>(v)); std::memcpy(b, &h, 2); }
    else { int64_t i = static_cast<int64_t>(v); std::memcpy(b, &i, n); }  // little-endian truncation
    out.insert(out.end(), b, b + n);
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: st_xcheck write|dump PATH\n");
    return 2;
  }
  try {
    std::string mode = argv[1], path = argv[2];
    if (mode == "write") {
      std::vector<std::string> dts = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL"};
      std::vector<std::vector<uint8_t>> data;
      for (const auto& d : dts) data.push_back(values_for(d));
      std::vector<ferry::io::st_write_entry> e;
      for (size_t i = 0; i < dts.size(); ++i) e.push_back({"x_" + dts[i], dts[i], {2, 3}, data[i].data(), data[i].size()});
      e.push_back({"empty", "F32", {0, 3}, nullptr, 0});
      ferry::io::write_safetensors(path, e, {{"format", "pt"}, {"origin", "ferry"}});
      return 0;
    }
    if (mode == "hf-check" || mode == "hf-write") {
      ferry::io::hf_checkpoint_reader r(path);
      r.validate_against_config();
      nlohmann::json read;
      std::vector<std::vector<float>> store;
      std::vector<ferry::io::named_f32> views;
      for (const auto& [name, shape] : ferry::io::llama_tensor_names(r.config())) {
        size_t n = 1;
        for (int64_t d : shape) n *= static_cast<size_t>(d);
        store.emplace_back(n);
        r.read_f32(name, shape, store.back().data());
        read[name] = {{"shape", shape}, {"values", store.back()}};
        views.push_back({name, shape, store.back().data()});
      }
      if (mode == "hf-write") ferry::io::write_hf_checkpoint(path + "/ferry", r.config(), views, "BF16", 20000);
      std::puts(read.dump().c_str());
      return 0;
    }
    ferry::io::safetensors_file f(path);
    nlohmann::json out;
    out["metadata"] = f.metadata();
    out["tensors"] = nlohmann::json::object();
    static const char* hex = "0123456789abcdef";
    for (const auto& t : f.tensors()) {
      std::string h;
      const auto* p = static_cast<const uint8_t*>(f.data(t));
      for (size_t i = 0; i < t.end - t.begin; ++i) {
        h.push_back(hex[p[i] >> 4]);
        h.push_back(hex[p[i] & 15]);
      }
      out["tensors"][t.name] = {{"dtype", t.dtype}, {"shape", t.shape}, {"hex", h}};
    }
    std::puts(out.dump().c_str());
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "st_xcheck: %s\n", e.what());
    return 1;
  }
}
