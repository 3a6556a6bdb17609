#pragma once
// The one builder of the tiny LLaMA shapes the suites build, train, run and save. Each suite keeps
// its own shape (the numbers its tolerances and expectations were set on) and names it in one
// line next to its helpers: model (tests/model/model_test_util.h), engine and checkpoint
// (tests/engine/engine_test_util.h), infer (tests/infer/infer_test.cpp), io
// (tests/io/test_hf_checkpoint.cpp).
#include <cstdint>
#include <string>
#include <utility>

#include "src/model/llama_config.h"

namespace ferry::test {

// The numbers in which the suites' tiny models differ. head_dim is given, not derived, so that
// heads * head_dim can differ from hidden_size. Fields left out keep llama_config's defaults.
struct tiny_shape {
  int64_t vocab_size;
  int64_t hidden_size;
  int64_t intermediate_size;
  int64_t layers;
  int64_t heads;
  int64_t kv_heads;
  int64_t head_dim;
  int64_t max_positions = 64;
  double rms_norm_eps = model::llama_config{}.rms_norm_eps;
};

// A llama_config of shape s; everything not in tiny_shape (rope_theta, tying, dtype, init range,
// token ids) is llama_config's default, for the caller to change.
inline model::llama_config tiny_llama(std::string name, const tiny_shape& s) {
  model::llama_config c;
  c.name = std::move(name);
  c.vocab_size = s.vocab_size;
  c.hidden_size = s.hidden_size;
  c.intermediate_size = s.intermediate_size;
  c.num_hidden_layers = s.layers;
  c.num_attention_heads = s.heads;
  c.num_key_value_heads = s.kv_heads;
  c.head_dim = s.head_dim;
  c.max_position_embeddings = s.max_positions;
  c.rms_norm_eps = s.rms_norm_eps;
  return c;
}

}  // namespace ferry::test
