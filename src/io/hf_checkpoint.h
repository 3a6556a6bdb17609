#pragma once
// HF LlamaForCausalLM checkpoints: config.json plus model.safetensors, or shards listed by
// model.safetensors.index.json ({"metadata": {"total_size": N}, "weight_map": {name: file}}).
// Tensor names and shapes are exactly transformers' (lm_head.weight absent when
// tie_word_embeddings). Shards are memory-mapped; read_f32 converts straight into the caller's
// buffer, so loading never holds a second copy of the model.
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "src/io/safetensors.h"
#include "src/model/llama_config.h"

namespace ferry::io {

class hf_checkpoint_reader {
 public:
  // Loads config.json via load_hf_config and opens (and validates) every shard. Throws
  // ferry::error naming the directory when config.json or the weights are missing.
  explicit hf_checkpoint_reader(const std::string& dir);

  const model::llama_config& config() const { return config_; }
  const std::string& dir() const { return dir_; }
  bool contains(const std::string& name) const { return where_.count(name) != 0; }

  // Copies tensor `name` (stored as F32, F16 or BF16) into dst as fp32; its shape must equal
  // expected_shape. Errors name the directory, the file, the tensor, and expected vs found.
  void read_f32(const std::string& name, const std::vector<int64_t>& expected_shape, float* dst) const;

  // Every LlamaForCausalLM tensor is present with the config's shape and a readable dtype,
  // lm_head.weight is absent iff tie_word_embeddings, and nothing unexpected is there (older
  // transformers' rotary_emb.inv_freq buffers are ignored). The message lists the first problems.
  // A tied checkpoint may also store lm_head.weight if it equals model.embed_tokens.weight (as
  // transformers, which ties such a pair); it is then ignored. One that differs is refused: a
  // one-line error saying to set tie_word_embeddings to false.
  void validate_against_config() const;

 private:
  // Whether tensors a and b (both present, readable dtypes) hold the same fp32 values.
  bool same_values(const std::string& a, const std::string& b) const;

  std::string dir_;
  model::llama_config config_;
  std::vector<std::unique_ptr<safetensors_file>> shards_;
  std::map<std::string, std::pair<const safetensors_file*, const st_tensor_info*>> where_;
};

// HF names and shapes of every LlamaForCausalLM parameter, in HF's named_parameters() order.
std::vector<std::pair<std::string, std::vector<int64_t>>> llama_tensor_names(const model::llama_config& cfg);

struct named_f32 {
  std::string name;
  std::vector<int64_t> shape;
  const float* data;
};

// Writes config.json (torch_dtype set from `dtype`) and model.safetensors, or shards of at most
// max_shard_bytes named model-0000K-of-0000N.safetensors plus model.safetensors.index.json, into
// dir (created if needed). fp32 is converted to dtype "F16", "BF16" or "F32" with round to nearest
// even, in chunks while writing. Each file is atomic; the index (or, unsharded, model.safetensors)
// is committed after the shards it names, then stale files of an earlier layout are removed.
// `tensors` must be exactly llama_tensor_names(cfg) (any order) with those shapes.
// source (optional): each tensor's data comes from source(t), called once per tensor in file order
// just before its data is written, whose pointer need stay valid only until the next call (the
// tensors' data fields are then unused): a caller streaming its weights from disk holds one unit
// at a time.
using f32_source = std::function<const float*(const named_f32& t)>;
void write_hf_checkpoint(const std::string& dir, const model::llama_config& cfg, const std::vector<named_f32>& tensors,
                         const std::string& dtype, size_t max_shard_bytes = size_t(5) << 30,
                         const f32_source& source = {});

}  // namespace ferry::io
