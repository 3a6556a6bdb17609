#pragma once
// The shape of a LLaMA-family model, as HF transformers' LlamaConfig spells it.
// Parsing and writing config.json lives in src/io/hf_config.h; this header knows no files.
#include <cstdint>
#include <string>

namespace ferry::model {

struct llama_config {
  std::string name;                   // "debug", "1b", ... or the directory it came from
  int64_t vocab_size = 32000;
  int64_t hidden_size = 4096;
  int64_t intermediate_size = 11008;
  int64_t num_hidden_layers = 32;
  int64_t num_attention_heads = 32;
  int64_t num_key_value_heads = 32;
  int64_t head_dim = 128;             // hidden_size / num_attention_heads unless the file says otherwise
  int64_t max_position_embeddings = 2048;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  // Rotary frequency scaling (HF rope_parameters / rope_scaling): "default", "linear" (every
  // frequency divided by rope_factor) or "llama3" (Llama 3.1's: low frequencies divided by
  // rope_factor, high ones kept, a smooth blend between, by the wavelength bounds
  // rope_original_max_positions / rope_low_freq_factor and / rope_high_freq_factor).
  std::string rope_type = "default";
  double rope_factor = 1.0;
  double rope_low_freq_factor = 1.0, rope_high_freq_factor = 4.0;
  int64_t rope_original_max_positions = 8192;
  bool tie_word_embeddings = false;
  bool attention_bias = false;        // only false is supported (LLaMA); checked on load
  bool mlp_bias = false;
  std::string torch_dtype = "float16";
  int64_t bos_token_id = 1;
  int64_t eos_token_id = 2;
  double initializer_range = 0.02;

  int64_t q_dim() const { return num_attention_heads * head_dim; }
  int64_t kv_dim() const { return num_key_value_heads * head_dim; }

  // Parameters of one decoder block: two norms, q/k/v/o projections, gate/up/down.
  int64_t block_params() const {
    return 2 * hidden_size + hidden_size * (q_dim() + 2 * kv_dim()) + q_dim() * hidden_size +
           3 * hidden_size * intermediate_size;
  }
  int64_t embed_params() const { return vocab_size * hidden_size; }
  // Final norm plus lm_head (absent when tied to the embedding: the head then reads the embedding's
  // matrix, and the parameter is counted once, in embed_params).
  int64_t head_params() const { return hidden_size + (tie_word_embeddings ? 0 : vocab_size * hidden_size); }
  // The head's weights as a device slot holds them for the loss: the final norm, then the lm_head
  // matrix (V, h), which is a copy of the embedding's when tied. The same in both cases.
  int64_t head_slot_params() const { return hidden_size + vocab_size * hidden_size; }
  int64_t total_params() const { return embed_params() + num_hidden_layers * block_params() + head_params(); }
};

}  // namespace ferry::model
