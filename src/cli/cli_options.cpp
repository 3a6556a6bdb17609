#include "src/cli/cli_options.h"

#include <boost/program_options.hpp>
#include <cstdio>
#include <iostream>

#include "ferry_version.h"
#include "src/common/error.h"
#include "src/io/atomic_file.h"

namespace ferry::cli {
namespace po = boost::program_options;
namespace {

// A flag either takes a value that becomes key=value, or is a switch that sets key=fixed.
struct flag_desc {
  const char* flag;       // "offload" or "fp16"
  const char* key;        // run-config key it sets
  const char* fixed;      // value for a switch, nullptr when the flag takes a value
  const char* help;
  bool infer_only = false;
  bool train_only = false;
};

const flag_desc kFlags[] = {
    {"model-config", "model", nullptr, "model shape: NAME in configs/models (debug, 1b, 3b, 7b, 13b, 30b, 65b, tiny), a config.json, or an HF model dir"},
    {"model", "model", nullptr, "HF model directory (config.json + safetensors) to evaluate or generate with", true},
    {"init", "init", nullptr, "HF checkpoint directory to fine-tune from", false, true},
    {"data", "data", nullptr, "training/evaluation data: files or dirs, comma-separated"},
    {"tokenizer", "tokenizer", nullptr, "\"byte\", a tokenizer.json, a sentencepiece tokenizer.model, or a directory holding one"},
    {"chat-template", "chat_template", nullptr, "llama2 | llama3 | chatml | zephyr | auto (the checkpoint's tokenizer_config.json)"},
    {"offload", "offload", nullptr, "none | blocked | overlapped"},
    {"offloading", "offload", "overlapped", "the request's spelling: --offload overlapped"},
    {"fp16", "dtype", "fp16", "fp16 compute with dynamic loss scaling"},
    {"bf16", "dtype", "bf16", "bf16 compute"},
    {"fp32", "dtype", "fp32", "fp32 compute (tests, CPU)"},
    {"device", "device", nullptr, "auto | cuda | cpu"},
    {"steps", "steps", nullptr, "optimizer steps", false, true},
    {"batch-size", "batch_size", nullptr, "sequences per micro-batch"},
    {"max-length", "max_length", nullptr, "tokens per sequence"},
    {"seed", "seed", nullptr, "random seed"},
    {"output-dir", "output_dir", nullptr, "checkpoints and metrics directory", false, true},
    {"resume", "resume", nullptr, "checkpoint directory or \"latest\"", false, true},
    {"prompt", "prompt", nullptr, "prompt to generate from", true},
    {"prompt-file", "prompt_file", nullptr, "file of prompts, one per line", true},
    {"max-new-tokens", "max_new_tokens", nullptr, "tokens to generate", true},
    {"job", "job", nullptr, "evaluate | generate | both", true},
    {"chat", "chat", "true", "render each prompt as a user turn of the chat template and stop at its end-of-turn token", true},
    {"system", "system_prompt", nullptr, "with --chat: a system message before each prompt", true},
};

bool applies(const flag_desc& f, tool which) {
  return !(f.infer_only && which != tool::tool_infer) && !(f.train_only && which != tool::tool_train);
}
}  // namespace

cli_request parse_cli(int argc, char** argv, tool which) {
  const char* prog = which == tool::tool_train ? "ferry-train" : "ferry-infer";
  po::options_description desc(std::string("Usage: ") + prog + " [options]\n\nOptions");
  desc.add_options()("help,h", "print this help and the run-config keys, then exit")(
      "version", "print the version and exit")("config", po::value<std::string>(), "run config JSON file")(
      "set", po::value<std::vector<std::string>>()->composing(), "override any run-config key: --set key=value (repeatable)")(
      "dry-run", "print the resolved config and the memory plan, then exit");
  if (which == tool::tool_train)
    desc.add_options()("plan-json", po::value<std::string>(),
                       "write the memory plan (bytes) as JSON to FILE; with --dry-run, nothing else runs");
  if (which == tool::tool_infer)
    desc.add_options()("metrics-json", po::value<std::string>(),
                       "when the jobs are done, write their figures (loss, tokens, tokens/s, times, peak GPU "
                       "bytes) as JSON to FILE");
  for (const auto& f : kFlags) {
    if (!applies(f, which)) continue;
    if (f.fixed) desc.add_options()(f.flag, f.help);
    else desc.add_options()(f.flag, po::value<std::string>(), f.help);
  }

  po::variables_map vm;
  try {
    // Keep the command-line order of flags so later flags win, as users expect.
    po::parsed_options parsed = po::command_line_parser(argc, argv).options(desc).run();
    po::store(parsed, vm);
    po::notify(vm);

    cli_request req;
    if (vm.count("help")) {
      std::cout << desc << "\nRun-config keys (JSON file or --set key=value):\n" << io::describe_keys();
      req.exit_now = true;
      return req;
    }
    if (vm.count("version")) {
      std::cout << prog << " " << FERRY_VERSION << " (" << FERRY_GIT_COMMIT << ")\n";
      req.exit_now = true;
      return req;
    }
    std::vector<std::string> overrides;
    for (const auto& opt : parsed.options) {
      if (opt.string_key == "set") {
        for (const auto& v : opt.value) overrides.push_back(v);
        continue;
      }
      for (const auto& f : kFlags) {
        if (opt.string_key != f.flag || !applies(f, which)) continue;
        if (f.fixed) overrides.push_back(std::string(f.key) + "=" + f.fixed);
        else overrides.push_back(std::string(f.key) + "=" + opt.value.at(0));
      }
    }
    std::string config_path = vm.count("config") ? vm["config"].as<std::string>() : "";
    req.cfg = io::load_run_config(config_path, overrides);
    if (which == tool::tool_infer && vm.count("model") && !req.cfg.is_explicit("init")) req.cfg.init = vm["model"].as<std::string>();
    req.dry_run = vm.count("dry-run") > 0;
    if (vm.count("plan-json")) req.plan_json = vm["plan-json"].as<std::string>();
    if (vm.count("metrics-json")) {
      req.metrics_json = vm["metrics-json"].as<std::string>();
      io::check_output_path("--metrics-json", req.metrics_json);
    }
    return req;
  } catch (const po::error& e) {
    throw config_error(std::string(e.what()) + " (see " + prog + " --help)");
  }
}

void resolve_auto(io::run_config& cfg, bool cuda_available) {
  if (cfg.device == "auto") cfg.device = cuda_available ? "cuda" : "cpu";
  FERRY_CONFIG_CHECK(cfg.device != "cuda" || cuda_available,
                     "device=cuda but no CUDA device is usable here; use --device cpu or run on a GPU machine");
  bool gpu = cfg.device == "cuda";
  if (cfg.model == "auto") cfg.model = gpu ? "debug" : "tiny";
  if (cfg.dtype == "auto") cfg.dtype = gpu ? "fp16" : "fp32";
  if (!gpu) {
    FERRY_CONFIG_CHECK(cfg.dtype == "fp32" || cfg.dtype == "bf16", "dtype=", cfg.dtype,
                       " needs a GPU; on CPU use fp32 or bf16");
  }
  // The embedded default on a CPU is a demonstration that must finish in a minute or two.
  if (!gpu && cfg.model == "tiny") {
    if (!cfg.is_explicit("max_length")) cfg.max_length = 256;
    if (!cfg.is_explicit("learning_rate")) cfg.learning_rate = 3e-3;
    if (!cfg.is_explicit("batch_size")) cfg.batch_size = 4;
  }
  if (cfg.steps == 0) cfg.steps = gpu ? 30 : 60;
  // A chat session generates; evaluating the default corpus as well is asked for by --job both.
  if (cfg.chat && !cfg.is_explicit("job")) cfg.job = "generate";
  if (cfg.output_dir.empty()) {
    std::string m = cfg.model;
    auto slash = m.find_last_of('/');
    if (slash != std::string::npos) m = m.substr(slash + 1);
    if (m.size() > 5 && m.compare(m.size() - 5, 5, ".json") == 0) m = m.substr(0, m.size() - 5);
    cfg.output_dir = "runs/" + (m.empty() ? std::string("model") : m);
  }
}

int run_main(const char* prog, int (*body)(int, char**), int argc, char** argv) {
  try {
    return body(argc, argv);
  } catch (const config_error& e) {
    std::fprintf(stderr, "%s: %s\n", prog, e.what());
    return 2;
  } catch (const bug_error& e) {
    std::fprintf(stderr, "%s: %s\n", prog, e.what());
    return 1;
  } catch (const std::exception& e) {
    std::string msg = e.what();
    // libtorch messages carry a C++ backtrace after the first line; the first line is the cause.
    auto nl = msg.find('\n');
    std::fprintf(stderr, "%s: %s\n", prog, msg.substr(0, nl).c_str());
    return 1;
  }
}

}  // namespace ferry::cli
