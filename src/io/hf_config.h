#pragma once
// HF config.json <-> llama_config. Accepts transformers 4.x and 5.x spellings
// (torch_dtype / dtype, rope_theta / rope_parameters.rope_theta).
#include <string>

#include "src/model/llama_config.h"

namespace ferry::io {

// Reads config.json (or a NAME resolved against configs/models/, see resolve_model_config).
// Throws ferry::config_error naming the file and key on bad input.
model::llama_config load_hf_config(const std::string& path);

// Parses the JSON text of a config; `origin` names the file in error messages.
model::llama_config parse_hf_config(const std::string& json_text, const std::string& origin);

// Writes config.json as transformers 5.x writes it (atomically: temp name, fsync, rename).
void save_hf_config(const model::llama_config& cfg, const std::string& path);

// A NAME ("debug", "1b", ...) becomes <configs dir>/models/NAME.json; a path is returned as is.
// A directory holding config.json resolves to that file. Throws config_error listing valid names.
std::string resolve_model_config(const std::string& name_or_path);

// The configs/ directory: $FERRY_CONFIGS if set, else the source tree's configs/.
std::string configs_dir();

}  // namespace ferry::io
