#include "src/io/hf_checkpoint.h"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>

#include "src/common/error.h"
#include "src/io/atomic_file.h"
#include "src/io/half_convert.h"
#include "src/io/hf_config.h"

namespace ferry::io {
namespace fs = std::filesystem;

namespace {

const char* k_single = "model.safetensors";
const char* k_index = "model.safetensors.index.json";

std::string shape_str(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

bool is_ignored_buffer(const std::string& name) {
  const std::string suffix = "rotary_emb.inv_freq";
  return name.size() >= suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::string torch_dtype_of(const std::string& st_dtype) {
  if (st_dtype == "F16") return "float16";
  if (st_dtype == "BF16") return "bfloat16";
  return "float32";
}

}  // namespace

std::vector<std::pair<std::string, std::vector<int64_t>>> llama_tensor_names(const model::llama_config& cfg) {
  const int64_t h = cfg.hidden_size, ff = cfg.intermediate_size;
  std::vector<std::pair<std::string, std::vector<int64_t>>> r;
  r.push_back({"model.embed_tokens.weight", {cfg.vocab_size, h}});
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    r.push_back({p + "self_attn.q_proj.weight", {cfg.q_dim(), h}});
    r.push_back({p + "self_attn.k_proj.weight", {cfg.kv_dim(), h}});
    r.push_back({p + "self_attn.v_proj.weight", {cfg.kv_dim(), h}});
    r.push_back({p + "self_attn.o_proj.weight", {h, cfg.q_dim()}});
    r.push_back({p + "mlp.gate_proj.weight", {ff, h}});
    r.push_back({p + "mlp.up_proj.weight", {ff, h}});
    r.push_back({p + "mlp.down_proj.weight", {h, ff}});
    r.push_back({p + "input_layernorm.weight", {h}});
    r.push_back({p + "post_attention_layernorm.weight", {h}});
  }
  r.push_back({"model.norm.weight", {h}});
  if (!cfg.tie_word_embeddings) r.push_back({"lm_head.weight", {cfg.vocab_size, h}});
  return r;
}

hf_checkpoint_reader::hf_checkpoint_reader(const std::string& dir) : dir_(dir) {
  FERRY_CHECK(fs::is_directory(dir), "checkpoint directory ", dir,
              " does not exist; pass a directory holding config.json and model.safetensors");
  const fs::path d(dir);
  FERRY_CHECK(fs::exists(d / "config.json"), "checkpoint ", dir, " has no config.json; pass an HF model directory");
  config_ = load_hf_config((d / "config.json").string());

  auto open_shard = [&](const std::string& file) {
    const std::string path = (d / file).string();
    FERRY_CHECK(fs::exists(path), "checkpoint ", dir, ": shard ", file, " is missing");
    shards_.push_back(std::make_unique<safetensors_file>(path));
    return shards_.back().get();
  };

  if (fs::exists(d / k_index)) {
    const std::string index_path = (d / k_index).string();
    nlohmann::json index;
    try {
      index = nlohmann::json::parse(read_file(index_path));
    } catch (const nlohmann::json::exception& e) {
      FERRY_CHECK(false, index_path, " is not valid JSON: ", e.what());
    }
    FERRY_CHECK(index.is_object() && index.contains("weight_map") && index["weight_map"].is_object(), index_path,
                " has no weight_map object; re-save the checkpoint");
    std::map<std::string, const safetensors_file*> by_file;
    for (auto it = index["weight_map"].begin(); it != index["weight_map"].end(); ++it) {
      FERRY_CHECK(it.value().is_string(), index_path, ": weight_map entry '", it.key(), "' is not a file name");
      const std::string file = it.value().get<std::string>();
      FERRY_CHECK(file.find('/') == std::string::npos, index_path, ": shard name '", file,
                  "' must be a file in the checkpoint directory");
      auto f = by_file.find(file);
      const safetensors_file* shard = f != by_file.end() ? f->second : (by_file[file] = open_shard(file));
      const st_tensor_info* t = shard->find(it.key());
      FERRY_CHECK(t != nullptr, "checkpoint ", dir, ": ", k_index, " puts tensor '", it.key(), "' in ", file,
                  " but that file does not hold it");
      where_[it.key()] = {shard, t};
    }
  } else {
    FERRY_CHECK(fs::exists(d / k_single), "checkpoint ", dir, " has neither ", k_single, " nor ", k_index,
                fs::exists(d / "pytorch_model.bin") ? " (pytorch_model.bin is not supported; re-save with "
                                                      "save_pretrained(..., safe_serialization=True))"
                                                    : "");
    const safetensors_file* shard = open_shard(k_single);
    for (const auto& t : shard->tensors()) where_[t.name] = {shard, &t};
  }
}

void hf_checkpoint_reader::read_f32(const std::string& name, const std::vector<int64_t>& expected_shape,
                                    float* dst) const {
  auto it = where_.find(name);
  FERRY_CHECK(it != where_.end(), "checkpoint ", dir_, " has no tensor '", name,
              "'; it was written for another model or is incomplete");
  const auto& [file, t] = it->second;
  FERRY_CHECK(t->shape == expected_shape, "checkpoint ", dir_, ": tensor '", name, "' in ", file->path(),
              " has shape ", shape_str(t->shape), " but the model expects ", shape_str(expected_shape),
              " (the checkpoint is from a model of another shape)");
  FERRY_CHECK(t->dtype == "F32" || t->dtype == "F16" || t->dtype == "BF16", "checkpoint ", dir_, ": tensor '", name,
              "' in ", file->path(), " is stored as ", t->dtype, "; only F32, F16 and BF16 weights can be loaded");
  size_t n = (t->end - t->begin) / st_dtype_size(t->dtype);
  convert_to_f32(file->data(*t), t->dtype.c_str(), n, dst);
}

bool hf_checkpoint_reader::same_values(const std::string& a, const std::string& b) const {
  const auto& [fa, ta] = where_.at(a);
  const auto& [fb, tb] = where_.at(b);
  if (ta->shape != tb->shape) return false;
  const size_t n = (ta->end - ta->begin) / st_dtype_size(ta->dtype);
  if (ta->dtype == tb->dtype) return std::memcmp(fa->data(*ta), fb->data(*tb), ta->end - ta->begin) == 0;
  // Different dtypes: compare the fp32 values, in chunks (the tensors may be large).
  constexpr size_t k_chunk = size_t(1) << 20;
  std::vector<float> va(std::min(n, k_chunk)), vb(va.size());
  const size_t ea = st_dtype_size(ta->dtype), eb = st_dtype_size(tb->dtype);
  for (size_t i = 0; i < n; i += k_chunk) {
    const size_t m = std::min(k_chunk, n - i);
    convert_to_f32(static_cast<const char*>(fa->data(*ta)) + i * ea, ta->dtype.c_str(), m, va.data());
    convert_to_f32(static_cast<const char*>(fb->data(*tb)) + i * eb, tb->dtype.c_str(), m, vb.data());
    if (std::memcmp(va.data(), vb.data(), m * sizeof(float)) != 0) return false;
  }
  return true;
}

void hf_checkpoint_reader::validate_against_config() const {
  // A tied checkpoint that also stores lm_head.weight: transformers ties the two when the values
  // are equal and unties them (a warning) when they differ; ferry loads the first kind as tied and
  // refuses the second, which is two matrices under a config that says one.
  const char* emb = "model.embed_tokens.weight";
  auto readable = [&](const char* name) {
    const std::string& d = where_.at(name).second->dtype;
    return d == "F32" || d == "F16" || d == "BF16";
  };
  const bool lm_beside_tied = config_.tie_word_embeddings && contains("lm_head.weight") && contains(emb) &&
                              readable(emb) && readable("lm_head.weight");
  if (lm_beside_tied)
    FERRY_CHECK(same_values("lm_head.weight", emb), "checkpoint ", dir_,
                ": config.json sets tie_word_embeddings but lm_head.weight differs from ", emb,
                " (transformers would untie them); set \"tie_word_embeddings\": false in ", dir_,
                "/config.json to train them as two matrices");
  std::vector<std::string> problems;
  std::set<std::string> expected;
  for (const auto& [name, shape] : llama_tensor_names(config_)) {
    expected.insert(name);
    auto it = where_.find(name);
    if (it == where_.end()) {
      problems.push_back("missing '" + name + "'");
      continue;
    }
    const st_tensor_info* t = it->second.second;
    if (t->shape != shape)
      problems.push_back("'" + name + "' has shape " + shape_str(t->shape) + ", config.json implies " + shape_str(shape));
    else if (t->dtype != "F32" && t->dtype != "F16" && t->dtype != "BF16")
      problems.push_back("'" + name + "' is stored as " + t->dtype + " (need F32, F16 or BF16)");
  }
  for (const auto& [name, loc] : where_) {
    if (expected.count(name) || is_ignored_buffer(name)) continue;
    if (name == "lm_head.weight" && lm_beside_tied) continue;   // equal to the embedding (checked above)
    if (name == "lm_head.weight" && config_.tie_word_embeddings)
      problems.push_back("'lm_head.weight' is present but config.json sets tie_word_embeddings");
    else
      problems.push_back("unexpected tensor '" + name + "'");
  }
  if (problems.empty()) return;
  std::string msg;
  const size_t shown = std::min<size_t>(problems.size(), 5);
  for (size_t i = 0; i < shown; ++i) msg += (i ? "; " : "") + problems[i];
  if (problems.size() > shown) msg += "; and " + std::to_string(problems.size() - shown) + " more";
  FERRY_CHECK(false, "checkpoint ", dir_, " does not match its config.json (", problems.size(), " problems: ", msg,
              "); it may be from another model shape or not a LlamaForCausalLM");
}

void write_hf_checkpoint(const std::string& dir, const model::llama_config& cfg, const std::vector<named_f32>& tensors,
                         const std::string& dtype, size_t max_shard_bytes, const f32_source& source) {
  FERRY_CONFIG_CHECK(dtype == "F32" || dtype == "F16" || dtype == "BF16", "cannot save checkpoint in dtype '",
                     dtype, "'; use F32, F16 or BF16");
  const size_t itemsize = st_dtype_size(dtype);

  // The caller's tensors, arranged in HF order, each checked against the config.
  std::map<std::string, const named_f32*> given;
  for (const auto& t : tensors) {
    FERRY_CHECK(given.emplace(t.name, &t).second, "cannot save checkpoint to ", dir, ": tensor '", t.name,
                "' given twice");
  }
  std::vector<const named_f32*> ordered;
  for (const auto& [name, shape] : llama_tensor_names(cfg)) {
    auto it = given.find(name);
    FERRY_ASSERT(it != given.end(), "write_hf_checkpoint is missing tensor '", name, "'");
    FERRY_ASSERT(it->second->shape == shape, "tensor '", name, "' has shape ", shape_str(it->second->shape),
                 ", config implies ", shape_str(shape));
    ordered.push_back(it->second);
    given.erase(it);
  }
  FERRY_ASSERT(given.empty(), "write_hf_checkpoint got unexpected tensor '",
               given.empty() ? "" : given.begin()->first, "'");

  // Greedy sharding in HF order; a tensor larger than the limit gets a shard of its own.
  std::vector<std::vector<const named_f32*>> shards(1);
  size_t shard_bytes = 0, total_bytes = 0;
  for (const named_f32* t : ordered) {
    size_t bytes = itemsize;
    for (int64_t d : t->shape) bytes *= static_cast<size_t>(d);
    if (!shards.back().empty() && shard_bytes + bytes > max_shard_bytes) {
      shards.emplace_back();
      shard_bytes = 0;
    }
    shards.back().push_back(t);
    shard_bytes += bytes;
    total_bytes += bytes;
  }

  fs::create_directories(dir);
  const fs::path d(dir);
  const size_t n_shards = shards.size();
  auto shard_name = [&](size_t k) {
    if (n_shards == 1) return std::string(k_single);
    char buf[64];
    std::snprintf(buf, sizeof buf, "model-%05zu-of-%05zu.safetensors", k + 1, n_shards);
    return std::string(buf);
  };

  constexpr size_t k_chunk = size_t(1) << 22;  // elements converted per write
  std::vector<uint8_t> buf(k_chunk * itemsize);
  nlohmann::ordered_json weight_map = nlohmann::ordered_json::object();
  std::set<std::string> written;
  for (size_t k = 0; k < n_shards; ++k) {
    const std::string file = shard_name(k);
    std::vector<st_write_entry> entries;
    for (const named_f32* t : shards[k]) {
      entries.push_back({t->name, dtype, t->shape, nullptr, 0});
      weight_map[t->name] = file;
    }
    write_safetensors_streamed((d / file).string(), entries, {{"format", "pt"}}, [&](size_t i, const st_sink& sink) {
      const named_f32* t = shards[k][i];
      size_t n = 1;
      for (int64_t s : t->shape) n *= static_cast<size_t>(s);
      const float* data = source ? source(*t) : t->data;
      for (size_t b = 0; b < n; b += k_chunk) {
        size_t m = std::min(k_chunk, n - b);
        convert_from_f32(data + b, m, dtype.c_str(), buf.data());
        sink(buf.data(), m * itemsize);
      }
    });
    written.insert(file);
  }
  if (n_shards > 1) {
    nlohmann::ordered_json index = {{"metadata", {{"total_size", total_bytes}}}, {"weight_map", weight_map}};
    write_file_atomic((d / k_index).string(), index.dump(2) + "\n");
    written.insert(k_index);
  }
  model::llama_config out_cfg = cfg;
  out_cfg.torch_dtype = torch_dtype_of(dtype);
  save_hf_config(out_cfg, (d / "config.json").string());

  // Files of an earlier layout in the same directory would shadow or confuse the new one.
  for (const auto& e : fs::directory_iterator(d)) {
    const std::string name = e.path().filename().string();
    bool ours = name == k_single || name == k_index ||
                (name.rfind("model-", 0) == 0 && name.size() > 12 &&
                 name.compare(name.size() - 12, 12, ".safetensors") == 0 && name.find("-of-") != std::string::npos);
    if (ours && !written.count(name)) fs::remove(e.path());
  }
  fsync_directory(dir);
}

}  // namespace ferry::io
