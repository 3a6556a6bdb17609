#include "src/io/hf_config.h"

#include <sys/stat.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>

#include "ferry_version.h"
#include "src/common/error.h"
#include "src/io/atomic_file.h"

namespace ferry::io {
namespace {
using json = nlohmann::json;

int64_t get_int(const json& j, const char* key, int64_t fallback, const std::string& origin, int64_t min_value) {
  if (!j.contains(key) || j[key].is_null()) return fallback;
  const json& v = j[key];
  FERRY_CONFIG_CHECK(v.is_number_integer(), origin, ": key \"", key, "\" must be an integer, got ", v.dump());
  int64_t x = v.get<int64_t>();
  FERRY_CONFIG_CHECK(x >= min_value, origin, ": key \"", key, "\" must be >= ", min_value, ", got ", x);
  return x;
}

double get_double(const json& j, const char* key, double fallback, const std::string& origin) {
  if (!j.contains(key) || j[key].is_null()) return fallback;
  const json& v = j[key];
  FERRY_CONFIG_CHECK(v.is_number(), origin, ": key \"", key, "\" must be a number, got ", v.dump());
  return v.get<double>();
}

bool get_bool(const json& j, const char* key, bool fallback, const std::string& origin) {
  if (!j.contains(key) || j[key].is_null()) return fallback;
  FERRY_CONFIG_CHECK(j[key].is_boolean(), origin, ": key \"", key, "\" must be true or false, got ", j[key].dump());
  return j[key].get<bool>();
}
}  // namespace

model::llama_config parse_hf_config(const std::string& text, const std::string& origin) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::parse_error& e) {
    throw config_error(origin + ": not valid JSON (" + e.what() + ")");
  }
  FERRY_CONFIG_CHECK(j.is_object(), origin, ": expected a JSON object with LlamaConfig keys");
  if (j.contains("model_type") && j["model_type"].is_string()) {
    std::string mt = j["model_type"].get<std::string>();
    FERRY_CONFIG_CHECK(mt == "llama", origin, ": model_type \"", mt, "\" is not supported; ferry trains \"llama\" models");
  }
  model::llama_config c;
  c.vocab_size = get_int(j, "vocab_size", c.vocab_size, origin, 1);
  c.hidden_size = get_int(j, "hidden_size", c.hidden_size, origin, 1);
  c.intermediate_size = get_int(j, "intermediate_size", c.intermediate_size, origin, 1);
  c.num_hidden_layers = get_int(j, "num_hidden_layers", c.num_hidden_layers, origin, 1);
  c.num_attention_heads = get_int(j, "num_attention_heads", c.num_attention_heads, origin, 1);
  c.num_key_value_heads = get_int(j, "num_key_value_heads", c.num_attention_heads, origin, 1);
  c.max_position_embeddings = get_int(j, "max_position_embeddings", c.max_position_embeddings, origin, 1);
  c.rms_norm_eps = get_double(j, "rms_norm_eps", c.rms_norm_eps, origin);
  c.tie_word_embeddings = get_bool(j, "tie_word_embeddings", c.tie_word_embeddings, origin);
  c.attention_bias = get_bool(j, "attention_bias", false, origin);
  c.mlp_bias = get_bool(j, "mlp_bias", false, origin);
  c.initializer_range = get_double(j, "initializer_range", c.initializer_range, origin);
  c.bos_token_id = get_int(j, "bos_token_id", c.bos_token_id, origin, 0);
  c.eos_token_id = j.contains("eos_token_id") && j["eos_token_id"].is_array() && !j["eos_token_id"].empty()
                       ? j["eos_token_id"][0].get<int64_t>()
                       : get_int(j, "eos_token_id", c.eos_token_id, origin, 0);

  FERRY_CONFIG_CHECK(c.hidden_size % c.num_attention_heads == 0 || j.contains("head_dim"), origin,
                     ": hidden_size ", c.hidden_size, " is not divisible by num_attention_heads ",
                     c.num_attention_heads, "; give head_dim explicitly");
  c.head_dim = get_int(j, "head_dim", c.hidden_size / c.num_attention_heads, origin, 1);
  FERRY_CONFIG_CHECK(c.num_attention_heads % c.num_key_value_heads == 0, origin, ": num_attention_heads ",
                     c.num_attention_heads, " must be a multiple of num_key_value_heads ", c.num_key_value_heads);
  FERRY_CONFIG_CHECK(c.head_dim % 2 == 0, origin, ": head_dim ", c.head_dim, " must be even for rotary embeddings");
  FERRY_CONFIG_CHECK(!c.attention_bias && !c.mlp_bias, origin,
                     ": attention_bias / mlp_bias = true is not supported (LLaMA has no biases); set them to false");
  FERRY_CONFIG_CHECK(c.rms_norm_eps > 0, origin, ": rms_norm_eps must be > 0");

  // transformers 4.x: rope_theta at top level; 5.x: rope_parameters {rope_type, rope_theta}.
  c.rope_theta = get_double(j, "rope_theta", c.rope_theta, origin);
  // Frequency scaling: default, linear (factor) and llama3 (factor, low/high_freq_factor,
  // original_max_position_embeddings), as transformers reads them.
  auto check_rope_type = [&](const json& r, const char* where) {
    if (r.is_null()) return;
    FERRY_CONFIG_CHECK(r.is_object(), origin, ": ", where, " must be an object or null");
    std::string type = r.value("rope_type", r.value("type", std::string("default")));
    FERRY_CONFIG_CHECK(type == "default" || type == "linear" || type == "llama3", origin, ": ", where, " rope_type \"",
                       type, "\" is not supported (valid: default, linear, llama3)");
    const std::string at = origin + " " + where;
    c.rope_type = type;
    if (type == "default") return;
    FERRY_CONFIG_CHECK(r.contains("factor"), at, ": rope_type ", type, " needs \"factor\"");
    c.rope_factor = get_double(r, "factor", 1.0, at);
    FERRY_CONFIG_CHECK(c.rope_factor > 0, at, ": factor must be > 0");
    if (type != "llama3") return;
    for (const char* k : {"low_freq_factor", "high_freq_factor", "original_max_position_embeddings"})
      FERRY_CONFIG_CHECK(r.contains(k), at, ": rope_type llama3 needs \"", k, "\"");
    c.rope_low_freq_factor = get_double(r, "low_freq_factor", 1.0, at);
    c.rope_high_freq_factor = get_double(r, "high_freq_factor", 4.0, at);
    c.rope_original_max_positions = get_int(r, "original_max_position_embeddings", 8192, at, 1);
    FERRY_CONFIG_CHECK(c.rope_low_freq_factor > 0 && c.rope_high_freq_factor > c.rope_low_freq_factor, at,
                       ": llama3 rope scaling needs 0 < low_freq_factor < high_freq_factor");
  };
  if (j.contains("rope_parameters")) {
    const json& r = j["rope_parameters"];
    check_rope_type(r, "rope_parameters");
    if (r.is_object()) c.rope_theta = get_double(r, "rope_theta", c.rope_theta, origin + " rope_parameters");
  }
  if (j.contains("rope_scaling")) check_rope_type(j["rope_scaling"], "rope_scaling");
  FERRY_CONFIG_CHECK(c.rope_theta > 0, origin, ": rope_theta must be > 0");

  std::string dtype = "float16";
  if (j.contains("dtype") && j["dtype"].is_string()) dtype = j["dtype"].get<std::string>();
  else if (j.contains("torch_dtype") && j["torch_dtype"].is_string()) dtype = j["torch_dtype"].get<std::string>();
  static const std::set<std::string> dtypes = {"float16", "bfloat16", "float32"};
  FERRY_CONFIG_CHECK(dtypes.count(dtype), origin, ": dtype \"", dtype, "\" is not one of float16, bfloat16, float32");
  c.torch_dtype = dtype;
  if (j.contains("_name_or_path") && j["_name_or_path"].is_string()) c.name = j["_name_or_path"].get<std::string>();
  return c;
}

model::llama_config load_hf_config(const std::string& path) {
  std::string resolved = resolve_model_config(path);
  std::error_code ec;
  FERRY_CONFIG_CHECK(std::filesystem::is_regular_file(resolved, ec), "model config ", resolved, " does not exist");
  model::llama_config c = parse_hf_config(read_file(resolved), resolved);
  std::filesystem::path p(resolved);
  if (c.name.empty() || path.find('/') == std::string::npos) {
    c.name = p.filename() == "config.json" ? p.parent_path().filename().string() : p.stem().string();
  }
  return c;
}

void save_hf_config(const model::llama_config& c, const std::string& path) {
  json j;
  j["architectures"] = {"LlamaForCausalLM"};
  j["model_type"] = "llama";
  j["attention_bias"] = false;
  j["attention_dropout"] = 0.0;
  j["mlp_bias"] = false;
  j["hidden_act"] = "silu";
  j["bos_token_id"] = c.bos_token_id;
  j["eos_token_id"] = c.eos_token_id;
  j["head_dim"] = c.head_dim;
  j["hidden_size"] = c.hidden_size;
  j["initializer_range"] = c.initializer_range;
  j["intermediate_size"] = c.intermediate_size;
  j["max_position_embeddings"] = c.max_position_embeddings;
  j["num_attention_heads"] = c.num_attention_heads;
  j["num_hidden_layers"] = c.num_hidden_layers;
  j["num_key_value_heads"] = c.num_key_value_heads;
  j["pretraining_tp"] = 1;
  j["rms_norm_eps"] = c.rms_norm_eps;
  json rope = {{"rope_type", c.rope_type}, {"rope_theta", c.rope_theta}};
  if (c.rope_type != "default") rope["factor"] = c.rope_factor;
  if (c.rope_type == "llama3") {
    rope["low_freq_factor"] = c.rope_low_freq_factor;
    rope["high_freq_factor"] = c.rope_high_freq_factor;
    rope["original_max_position_embeddings"] = c.rope_original_max_positions;
  }
  j["rope_parameters"] = rope;
  if (c.rope_type != "default") j["rope_scaling"] = rope;   // transformers 4.x reads this key
  j["rope_theta"] = c.rope_theta;
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  j["dtype"] = c.torch_dtype;
  j["use_cache"] = true;
  j["vocab_size"] = c.vocab_size;
  j["transformers_version"] = "5.0.0";
  j["ferry_version"] = FERRY_VERSION;
  write_file_atomic(path, j.dump(2) + "\n");
}

std::string configs_dir() {
  if (const char* env = std::getenv("FERRY_CONFIGS")) return env;
  return std::string(FERRY_SOURCE_DIR) + "/configs";
}

std::string resolve_model_config(const std::string& name_or_path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::is_directory(name_or_path, ec)) {
    fs::path p = fs::path(name_or_path) / "config.json";
    FERRY_CONFIG_CHECK(fs::is_regular_file(p, ec), "model directory ", name_or_path, " has no config.json");
    return p.string();
  }
  if (name_or_path.find('/') != std::string::npos || (name_or_path.size() > 5 &&
      name_or_path.compare(name_or_path.size() - 5, 5, ".json") == 0)) {
    FERRY_CONFIG_CHECK(fs::is_regular_file(name_or_path, ec), "model config file ", name_or_path, " does not exist");
    return name_or_path;
  }
  fs::path p = fs::path(configs_dir()) / "models" / (name_or_path + ".json");
  if (fs::is_regular_file(p, ec)) return p.string();
  std::vector<std::string> names;
  for (auto& e : fs::directory_iterator(fs::path(configs_dir()) / "models", ec))
    if (e.path().extension() == ".json") names.push_back(e.path().stem().string());
  std::sort(names.begin(), names.end());
  std::string list;
  for (auto& n : names) list += (list.empty() ? "" : ", ") + n;
  throw config_error("unknown model config \"" + name_or_path + "\": use one of " + list +
                     ", or a path to a config.json or a model directory");
}

}  // namespace ferry::io
