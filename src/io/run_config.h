#pragma once
// The run configuration of ferry-train / ferry-infer: one typed struct, loaded from built-in
// defaults < a JSON file < command-line overrides. Every key is declared once, in the table in
// run_config.cpp, with its type, range and help; JSON loading, --set key=value and --help all
// read that table, so an unknown key, a wrong type or an out-of-range value always gets the same
// one-line error naming the source (file or flag), the key and what would be valid.
#include <cstdint>
#include <string>
#include <vector>

namespace ferry::io {

struct run_config {
  // model and data
  std::string model = "auto";        // configs/models NAME, a config.json, or an HF model dir; auto: debug on a GPU, tiny without
  std::string init = "";             // HF checkpoint dir to start from ("" = random init from seed)
  std::string data = "";             // comma-separated files/dirs; "" = the embedded default corpus
  std::string tokenizer = "byte";    // "byte", a tokenizer.json or tokenizer.model (or a dir), or spm:N
  double eval_fraction = 0.01;
  // instruction and chat data (src/io/examples.h)
  std::string chat_template = "auto";     // llama2 | llama3 | chatml | zephyr | auto (the init checkpoint's)
  bool packing = false;                   // pack short examples into max_length rows (attention stays within each)
  std::string long_examples = "truncate"; // truncate | drop | error: examples longer than max_length
  bool skip_invalid_examples = false;     // skip (and count) malformed example lines instead of stopping
  // the request's training keys
  int64_t batch_size = 1;
  double learning_rate = 1e-5;
  int64_t max_length = 4096;         // "auto": 4096 on a GPU; the CPU default run uses the tiny model at 256
  double weight_decay = 0.01;
  double clip_grad = 1.0;            // global-norm clipping; 0 disables
  // optimizer and schedule
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  int64_t grad_accum = 1;
  int64_t micro_batch_group = 0;   // engine_options::micro_group (0 = auto)
  int64_t resident_blocks = 0;     // engine_options::resident_blocks
  std::string embed_grad = "auto";   // engine_options::embed_grad (auto | host | device)
  std::string lr_schedule = "constant";  // constant | cosine | linear
  int64_t warmup_steps = 0;
  double min_lr_ratio = 0.1;
  int64_t steps = 0;                 // optimizer steps; 0 = auto (20 on a GPU, 60 on CPU)
  // engine
  std::string offload = "overlapped";  // none | blocked | overlapped
  std::string dtype = "auto";          // fp16 | bf16 | fp32 | auto (fp16 on a GPU, fp32 on CPU)
  std::string device = "auto";         // auto | cuda | cpu
  int64_t prefetch = 2;                // layers prefetched ahead in overlapped mode
  int64_t cpu_threads = 0;             // CPU AdamW threads; 0 = all cores but one
  std::string activation_checkpointing = "none";  // none | blocks | auto: recompute block forwards in the backward
  std::string speculate = "auto";      // auto | on | off: update layers during backward before the clip coefficient is known
  std::string optimizer_state = "fp32";  // fp32 | bf16 | int8: the form of the AdamW moments on the host
  std::string optimizer_state_on = "host";  // host | nvme: master weights and moments in memory or in a file on nvme_path
  std::string nvme_path = "";          // optimizer_state_on=nvme: the directory (local disk) of the tier's scratch file
  int64_t nvme_buffers = 4;            // host buffers the nvme tier streams units through
  int64_t nvme_queue_depth = 16;       // 1 MiB I/O requests the nvme tier keeps in flight
  double loss_scale = 65536.0;         // initial dynamic loss scale (fp16)
  int64_t loss_scale_window = 2000;    // good steps before the scale doubles
  double gpu_mem_limit_gib = 0;        // cap usable GPU memory (0 = the whole card)
  double host_mem_limit_gib = 0;       // host memory the run may plan for (0 = not checked)
  int64_t ce_chunk = 1024;             // rows of logits computed at once in the loss
  // run control
  uint64_t seed = 1234;
  std::string output_dir = "";       // "" = runs/<model>
  int64_t save_every = 0;            // 0 = only at the end
  int64_t keep_last = 2;
  bool save_final = true;
  int64_t log_every = 1;
  int64_t eval_every = 0;
  std::string resume = "";           // checkpoint dir or "latest"
  std::string metrics = "";          // "" = <output_dir>/metrics.jsonl
  bool tensorboard = true;
  bool nvtx = false;
  double dist_timeout_s = 300;         // ranks: rendezvous and collective timeout (src/dist)
  std::string dist_reduce = "device";  // ranks: where gradients are reduce-scattered (device | host)
  std::string dist_weights = "auto";   // ranks: how the updated shards reach every rank (auto | shared | gather)
  // inference
  std::string prompt = "";
  std::string prompt_file = "";
  int64_t max_new_tokens = 64;
  double temperature = 0.0;          // 0 = greedy
  int64_t top_k = 0;
  double top_p = 1.0;
  bool chat = false;                 // infer: each prompt is one user turn of chat_template, answered by the assistant
  std::string system_prompt = "";    // infer, with chat: a system message before each prompt
  std::string job = "both";          // infer: evaluate | generate | both
  int64_t eval_batches = 4;

  // Keys set by a file or the command line (not defaults): "auto" resolution leaves them alone.
  std::vector<std::string> explicit_keys;
  bool is_explicit(const std::string& key) const;
};

// Built-in defaults, then the JSON file `path` (unknown keys, wrong types, bad values are
// config_errors naming the file and key), then `overrides` of the form key=value.
run_config load_run_config(const std::string& path, const std::vector<std::string>& overrides);
// Applies one "key=value" (source names the flag for error messages, e.g. "--set").
void apply_override(run_config& cfg, const std::string& key_value, const std::string& source);
// Applies a JSON object (source: the file name).
void apply_json(run_config& cfg, const std::string& json_text, const std::string& source);
// Checks values that depend on each other; throws config_error.
void validate(const run_config& cfg);
// The resolved config as pretty JSON (every key), for --dry-run and checkpoints.
std::string to_json(const run_config& cfg);
// One line per key: name, type, default, help (for --help).
std::string describe_keys();

}  // namespace ferry::io
