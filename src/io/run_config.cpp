#include "src/io/run_config.h"

#include <cmath>
#include <cstdlib>
#include <iomanip>
#include <limits>
#include <nlohmann/json.hpp>
#include <fstream>
#include <sstream>
#include <variant>

#include "src/common/error.h"
#include "src/io/atomic_file.h"

namespace ferry::io {
namespace {
using json = nlohmann::json;

struct int_key { int64_t run_config::*field; int64_t min, max; };
struct uint_key { uint64_t run_config::*field; };
struct real_key { double run_config::*field; double min, max; bool min_exclusive; bool max_exclusive = false; };
struct bool_key { bool run_config::*field; };
struct str_key { std::string run_config::*field; std::vector<std::string> choices; };  // empty choices: any string

struct key_desc {
  const char* name;
  std::variant<int_key, uint_key, real_key, bool_key, str_key> kind;
  const char* help;
};

constexpr int64_t kIntMax = std::numeric_limits<int64_t>::max();
constexpr double kInf = std::numeric_limits<double>::infinity();

// The one table of run-config keys (STYLE.md rule 12).
const std::vector<key_desc>& keys() {
  static const std::vector<key_desc> table = {
      {"model", str_key{&run_config::model, {}}, "configs/models NAME, config.json path or HF model dir; auto = debug on a GPU, tiny on CPU"},
      {"init", str_key{&run_config::init, {}}, "HF checkpoint dir to start from (empty: random init from seed)"},
      {"data", str_key{&run_config::data, {}}, "comma-separated text/JSONL/token files or dirs; empty = embedded default corpus"},
      {"tokenizer", str_key{&run_config::tokenizer, {}}, "\"byte\", an HF tokenizer.json, a sentencepiece tokenizer.model, a directory holding one, or spm:N (N pieces trained on the default corpus once)"},
      {"eval_fraction", real_key{&run_config::eval_fraction, 0, 0.5, false}, "fraction of sequences (of examples, for instruction/chat data) held out for evaluation"},
      {"chat_template", str_key{&run_config::chat_template, {"auto", "llama2", "llama3", "chatml", "zephyr"}},
       "how {\"messages\": ...} examples (and ferry-infer --chat prompts) are rendered; auto = the format of the init checkpoint's (else the tokenizer "
       "dir's) tokenizer_config.json chat_template, when it is one ferry renders exactly"},
      {"packing", bool_key{&run_config::packing},
       "instruction/chat examples: pack several into each max_length row (best-fit decreasing; positions restart and "
       "attention stays within each example) instead of one padded example per row"},
      {"long_examples", str_key{&run_config::long_examples, {"truncate", "drop", "error"}},
       "instruction/chat examples longer than max_length: keep their first max_length tokens, drop them, or stop; counted on one line"},
      {"skip_invalid_examples", bool_key{&run_config::skip_invalid_examples},
       "skip malformed example lines (counted, the first named) instead of stopping at the first with its file and line"},
      {"batch_size", int_key{&run_config::batch_size, 1, 4096}, "sequences per micro-batch"},
      {"learning_rate", real_key{&run_config::learning_rate, 0, 10, true}, "peak learning rate"},
      {"max_length", int_key{&run_config::max_length, 2, 1 << 20}, "tokens per sequence"},
      {"weight_decay", real_key{&run_config::weight_decay, 0, 10, false}, "decoupled (AdamW) weight decay"},
      {"clip_grad", real_key{&run_config::clip_grad, 0, kInf, false}, "global gradient-norm clip; 0 disables"},
      {"beta1", real_key{&run_config::beta1, 0, 1, false, true}, "AdamW beta1, in [0, 1)"},
      {"beta2", real_key{&run_config::beta2, 0, 1, false, true}, "AdamW beta2, in [0, 1)"},
      {"eps", real_key{&run_config::eps, 0, 1, true}, "AdamW epsilon"},
      {"grad_accum", int_key{&run_config::grad_accum, 1, 1 << 20}, "micro-batches per optimizer step"},
      {"micro_batch_group", int_key{&run_config::micro_batch_group, 0, 1 << 20},
       "offloaded: micro-batches run together layer by layer (each unit's weights streamed once for them, their "
       "gradients summed on the GPU); 1 = one by one, summed on the host; 0 = auto, as many of grad_accum as fit the GPU"},
      {"resident_blocks", int_key{&run_config::resident_blocks, -1, 1 << 20},
       "offloaded, one GPU: keep the first N blocks on the GPU with their fp32 master weights and AdamW moments "
       "(16 bytes/param of GPU memory) and update them there, taking their update off the host's AdamW; 0 = stream every block; "
       "-1 = as many as fit the GPU beside the rest of the plan"},
      {"embed_grad", str_key{&run_config::embed_grad, {"auto", "host", "device"}},
       "one GPU, offloaded: sum the embedding's gradient on the host from its rows (host), or in an fp32 table on "
       "the GPU copied once per step (device: vocab x hidden x 4 bytes of GPU memory, none of the update thread's "
       "time); auto = device for an untied model whose table is at most 1 GiB and fits the GPU's plan"},
      {"lr_schedule", str_key{&run_config::lr_schedule, {"constant", "cosine", "linear"}}, "learning-rate decay after warm-up"},
      {"warmup_steps", int_key{&run_config::warmup_steps, 0, kIntMax}, "linear warm-up steps"},
      {"min_lr_ratio", real_key{&run_config::min_lr_ratio, 0, 1, false}, "final lr as a fraction of the peak (cosine/linear)"},
      {"steps", int_key{&run_config::steps, 0, kIntMax}, "optimizer steps; 0 = auto (20 on a GPU, 60 on CPU)"},
      {"offload", str_key{&run_config::offload, {"none", "blocked", "overlapped"}}, "where weights and optimizer state live"},
      {"dtype", str_key{&run_config::dtype, {"auto", "fp16", "bf16", "fp32"}}, "compute precision; auto = fp16 on a GPU, fp32 on CPU"},
      {"device", str_key{&run_config::device, {"auto", "cuda", "cpu"}}, "compute device"},
      {"prefetch", int_key{&run_config::prefetch, 1, 64}, "layers prefetched ahead (overlapped)"},
      {"cpu_threads", int_key{&run_config::cpu_threads, 0, 4096}, "CPU AdamW threads; 0 = all cores but one"},
      {"activation_checkpointing", str_key{&run_config::activation_checkpointing, {"none", "blocks", "auto"}},
       "keep only block inputs and recompute each block's forward in its backward: none, blocks (all), auto (the fewest that fit the GPU)"},
      {"speculate", str_key{&run_config::speculate, {"auto", "on", "off"}}, "update layers during backward before clipping is known"},
      {"optimizer_state", str_key{&run_config::optimizer_state, {"fp32", "bf16", "int8"}},
       "AdamW moments on the host: fp32 (12 B/param with the fp32 master), bf16 (8), int8 (blockwise codes, 6); "
       "bf16 and int8 need offload blocked or overlapped"},
      {"optimizer_state_on", str_key{&run_config::optimizer_state_on, {"host", "nvme"}},
       "where the fp32 master weights and moments live: host memory, or nvme (a scratch file in nvme_path, streamed "
       "through nvme_buffers host buffers with io_uring; needs offload blocked or overlapped)"},
      {"nvme_path", str_key{&run_config::nvme_path, {}},
       "optimizer_state_on=nvme: a directory on a local disk; the run creates its own scratch file there and removes it"},
      {"nvme_buffers", int_key{&run_config::nvme_buffers, 2, 1024},
       "optimizer_state_on=nvme: host buffers of one unit's state each (reads ahead, write-behind)"},
      {"nvme_queue_depth", int_key{&run_config::nvme_queue_depth, 1, 4096},
       "optimizer_state_on=nvme: 1 MiB read/write requests kept in flight"},
      {"loss_scale", real_key{&run_config::loss_scale, 1, 1e30, false}, "initial dynamic loss scale (fp16)"},
      {"loss_scale_window", int_key{&run_config::loss_scale_window, 1, kIntMax}, "good steps before the loss scale doubles"},
      {"gpu_mem_limit_gib", real_key{&run_config::gpu_mem_limit_gib, 0, 1e6, false}, "cap on usable GPU memory in GiB; 0 = whole card"},
      {"host_mem_limit_gib", real_key{&run_config::host_mem_limit_gib, 0, 1e7, false},
       "host memory the run's plan must fit in GiB (master, moments, pinned, other); 0 = not checked"},
      {"ce_chunk", int_key{&run_config::ce_chunk, 1, 1 << 24}, "logit rows computed at once in the loss"},
      {"seed", uint_key{&run_config::seed}, "seed for init, data order and sampling"},
      {"output_dir", str_key{&run_config::output_dir, {}}, "checkpoints and metrics; empty = runs/<model>"},
      {"save_every", int_key{&run_config::save_every, 0, kIntMax}, "checkpoint every N steps; 0 = only at the end"},
      {"keep_last", int_key{&run_config::keep_last, 1, 1 << 20}, "checkpoints kept"},
      {"save_final", bool_key{&run_config::save_final}, "write a checkpoint when training ends"},
      {"log_every", int_key{&run_config::log_every, 1, kIntMax}, "steps between log lines"},
      {"eval_every", int_key{&run_config::eval_every, 0, kIntMax}, "steps between evaluations; 0 = never"},
      {"resume", str_key{&run_config::resume, {}}, "checkpoint dir or \"latest\" to resume from"},
      {"metrics", str_key{&run_config::metrics, {}}, "metrics JSONL path; empty = <output_dir>/metrics.jsonl"},
      {"tensorboard", bool_key{&run_config::tensorboard}, "write TensorBoard event files"},
      {"nvtx", bool_key{&run_config::nvtx}, "NVTX ranges around engine phases"},
      {"dist_timeout_s", real_key{&run_config::dist_timeout_s, 1, 86400, false},
       "ranks (torchrun): seconds the rendezvous and each collective may take before a missing rank stops the run"},
      {"dist_reduce", str_key{&run_config::dist_reduce, {"device", "host"}},
       "ranks: reduce-scatter each unit's gradient where the backward made it, in the compute dtype, copying only "
       "this rank's shard (device), or on the host in fp32 (host)"},
      {"dist_weights", str_key{&run_config::dist_weights, {"auto", "shared", "gather"}},
       "ranks: one shadow of the half weights per machine in shared memory, each rank writing its shard (shared), a "
       "whole shadow per rank with the shards all-gathered (gather), or shared when all ranks are on one machine "
       "(auto)"},
      {"prompt", str_key{&run_config::prompt, {}}, "generation prompt (ferry-infer)"},
      {"prompt_file", str_key{&run_config::prompt_file, {}}, "file with one prompt per line (ferry-infer)"},
      {"max_new_tokens", int_key{&run_config::max_new_tokens, 1, 1 << 20}, "tokens generated per prompt"},
      {"temperature", real_key{&run_config::temperature, 0, 100, false}, "sampling temperature; 0 = greedy"},
      {"top_k", int_key{&run_config::top_k, 0, kIntMax}, "top-k sampling; 0 = off"},
      {"top_p", real_key{&run_config::top_p, 0, 1, true}, "nucleus sampling mass"},
      {"chat", bool_key{&run_config::chat},
       "ferry-infer: render each prompt as one user turn of chat_template followed by the assistant's header (as "
       "apply_chat_template(add_generation_prompt=True) does), and stop at the template's end-of-turn token or EOS; job generate unless job is set"},
      {"system_prompt", str_key{&run_config::system_prompt, {}}, "ferry-infer with chat: a system message before each prompt"},
      {"job", str_key{&run_config::job, {"evaluate", "generate", "both"}}, "ferry-infer job"},
      {"eval_batches", int_key{&run_config::eval_batches, 1, kIntMax}, "batches per evaluation"},
  };
  return table;
}

const key_desc* find_key(const std::string& name) {
  for (const auto& k : keys())
    if (name == k.name) return &k;
  return nullptr;
}

std::string valid_keys_hint(const std::string& name) {
  // Suggest keys sharing a prefix or a substring; otherwise point at --help.
  std::string near;
  for (const auto& k : keys()) {
    std::string kn = k.name;
    if (kn.find(name) != std::string::npos || name.find(kn) != std::string::npos ||
        (name.size() >= 3 && kn.compare(0, 3, name, 0, 3) == 0))
      near += (near.empty() ? "" : ", ") + kn;
  }
  return near.empty() ? "see ferry-train --help for the valid keys" : "did you mean " + near + "?";
}

std::string describe_range(const key_desc& k) {
  std::ostringstream os;
  std::visit(
      [&](const auto& d) {
        using T = std::decay_t<decltype(d)>;
        if constexpr (std::is_same_v<T, int_key>) {
          os << "an integer in [" << d.min << ", ";
          if (d.max == kIntMax) os << "inf)"; else os << d.max << "]";
        } else if constexpr (std::is_same_v<T, uint_key>) {
          os << "a non-negative integer";
        } else if constexpr (std::is_same_v<T, real_key>) {
          os << "a number in " << (d.min_exclusive ? "(" : "[") << d.min << ", " << d.max << (d.max_exclusive ? ")" : "]");
        } else if constexpr (std::is_same_v<T, bool_key>) {
          os << "true or false";
        } else {
          if (d.choices.empty()) { os << "a string"; return; }
          os << "one of";
          for (size_t i = 0; i < d.choices.size(); ++i) os << (i ? ", " : " ") << d.choices[i];
        }
      },
      k.kind);
  return os.str();
}

[[noreturn]] void bad_value(const std::string& source, const key_desc& k, const std::string& got) {
  throw config_error(source + ": key \"" + k.name + "\" must be " + describe_range(k) + ", got " + got);
}

// Sets key k from a JSON value (from a file, or a --set value parsed as JSON where it parses).
void set_from_json(run_config& cfg, const key_desc& k, const json& v, const std::string& source) {
  std::visit(
      [&](const auto& d) {
        using T = std::decay_t<decltype(d)>;
        if constexpr (std::is_same_v<T, int_key>) {
          if (!v.is_number_integer()) bad_value(source, k, v.dump());
          int64_t x = v.get<int64_t>();
          if (x < d.min || x > d.max) bad_value(source, k, v.dump());
          cfg.*(d.field) = x;
        } else if constexpr (std::is_same_v<T, uint_key>) {
          if (!v.is_number_integer() || (v.is_number_integer() && !v.is_number_unsigned() && v.get<int64_t>() < 0))
            bad_value(source, k, v.dump());
          cfg.*(d.field) = v.get<uint64_t>();
        } else if constexpr (std::is_same_v<T, real_key>) {
          if (!v.is_number()) bad_value(source, k, v.dump());
          double x = v.get<double>();
          bool low_ok = d.min_exclusive ? x > d.min : x >= d.min;
          bool high_ok = d.max_exclusive ? x < d.max : x <= d.max;
          if (std::isnan(x)) bad_value(source, k, v.dump());
          if (!low_ok || !high_ok) bad_value(source, k, v.dump());
          cfg.*(d.field) = x;
        } else if constexpr (std::is_same_v<T, bool_key>) {
          if (!v.is_boolean()) bad_value(source, k, v.dump());
          cfg.*(d.field) = v.get<bool>();
        } else {
          if (!v.is_string()) bad_value(source, k, v.dump());
          std::string s = v.get<std::string>();
          if (!d.choices.empty()) {
            bool ok = false;
            for (const auto& c : d.choices) ok = ok || c == s;
            if (!ok) bad_value(source, k, "\"" + s + "\"");
          }
          cfg.*(d.field) = s;
        }
      },
      k.kind);
}

void mark_explicit(run_config& cfg, const char* name) {
  if (!cfg.is_explicit(name)) cfg.explicit_keys.push_back(name);
}

json get_as_json(const run_config& cfg, const key_desc& k) {
  return std::visit(
      [&](const auto& d) -> json {
        using T = std::decay_t<decltype(d)>;
        if constexpr (std::is_same_v<T, str_key>) return cfg.*(d.field);
        else return cfg.*(d.field);
      },
      k.kind);
}
}  // namespace

void apply_json(run_config& cfg, const std::string& text, const std::string& source) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::parse_error& e) {
    throw config_error(source + ": not valid JSON (" + e.what() + ")");
  }
  FERRY_CONFIG_CHECK(j.is_object(), source, ": expected a JSON object of run-config keys");
  for (auto it = j.begin(); it != j.end(); ++it) {
    const key_desc* k = find_key(it.key());
    FERRY_CONFIG_CHECK(k != nullptr, source, ": unknown key \"", it.key(), "\"; ", valid_keys_hint(it.key()));
    set_from_json(cfg, *k, it.value(), source);
    mark_explicit(cfg, k->name);
  }
}

void apply_override(run_config& cfg, const std::string& kv, const std::string& source) {
  auto eq = kv.find('=');
  FERRY_CONFIG_CHECK(eq != std::string::npos && eq > 0, source, " ", kv, ": expected key=value");
  std::string name = kv.substr(0, eq), value = kv.substr(eq + 1);
  const key_desc* k = find_key(name);
  FERRY_CONFIG_CHECK(k != nullptr, source, " ", kv, ": unknown key \"", name, "\"; ", valid_keys_hint(name));
  json v;
  if (std::holds_alternative<str_key>(k->kind)) {
    v = value;  // strings are taken verbatim: --set data=a.txt,b.txt
  } else {
    try {
      v = json::parse(value);
    } catch (const json::parse_error&) {
      bad_value(source + " " + kv, *k, "\"" + value + "\"");
    }
  }
  set_from_json(cfg, *k, v, source + " " + kv);
  mark_explicit(cfg, k->name);
}

bool run_config::is_explicit(const std::string& key) const {
  for (const auto& k : explicit_keys)
    if (k == key) return true;
  return false;
}

void validate(const run_config& cfg) {
  FERRY_CONFIG_CHECK(cfg.warmup_steps == 0 || cfg.steps == 0 || cfg.warmup_steps <= cfg.steps,
                     "warmup_steps (", cfg.warmup_steps, ") must not exceed steps (", cfg.steps, ")");
  FERRY_CONFIG_CHECK(cfg.prompt.empty() || cfg.prompt_file.empty(),
                     "give either prompt or prompt_file, not both");
  FERRY_CONFIG_CHECK(cfg.optimizer_state_on != "nvme" || !cfg.nvme_path.empty(),
                     "optimizer_state_on=nvme needs nvme_path, a directory on a local disk for the tier's scratch file");
  FERRY_CONFIG_CHECK(cfg.system_prompt.empty() || cfg.chat,
                     "system_prompt is set but chat is off; add --chat (chat=true) to render prompts with the chat template");
}

run_config load_run_config(const std::string& path, const std::vector<std::string>& overrides) {
  run_config cfg;
  if (!path.empty()) {
    std::ifstream probe(path);
    FERRY_CONFIG_CHECK(probe.good(), "run config file ", path, " cannot be read; check the path given to --config");
    apply_json(cfg, read_file(path), path);
  }
  for (const auto& o : overrides) apply_override(cfg, o, "--set");
  validate(cfg);
  return cfg;
}

std::string to_json(const run_config& cfg) {
  json j = json::object();
  for (const auto& k : keys()) j[k.name] = get_as_json(cfg, k);
  return j.dump(2);
}

std::string describe_keys() {
  std::ostringstream os;
  run_config defaults;
  for (const auto& k : keys()) {
    os << "  " << std::left << std::setw(20) << k.name << " " << k.help << " (" << describe_range(k)
       << "; default " << get_as_json(defaults, k).dump() << ")\n";
  }
  return os.str();
}

}  // namespace ferry::io
