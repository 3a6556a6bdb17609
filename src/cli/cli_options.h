#pragma once
// Command-line parsing shared by ferry-train and ferry-infer (Boost.Program_options). Every flag
// is declared once in the table in cli_options.cpp and turns into a run-config override, so the
// precedence is always: built-in defaults < --config FILE < flags and --set, in that order.
#include <string>

#include "src/io/run_config.h"

namespace ferry::cli {

enum class tool { tool_train, tool_infer };

struct cli_request {
  io::run_config cfg;
  bool dry_run = false;
  std::string plan_json;  // --plan-json FILE: the memory plan as JSON (ferry-train), "" = none
  std::string metrics_json;  // --metrics-json FILE: the run's figures as JSON (ferry-infer), "" = none
  bool exit_now = false;  // --help / --version handled
};

// Parses argv. Throws ferry::config_error (one line, exit 2) on a bad flag or value.
cli_request parse_cli(int argc, char** argv, tool which);

// Resolves "auto" values for the machine at hand (model, dtype, steps, device, and the CPU
// profile of the embedded default, job generate for chat) for keys the user did not set.
void resolve_auto(io::run_config& cfg, bool cuda_available);

// Runs `body` and maps exceptions to exit codes: 0 ok, 2 config/usage errors, 1 other failures,
// each as one line on stderr prefixed with the program name.
int run_main(const char* prog, int (*body)(int, char**), int argc, char** argv);

}  // namespace ferry::cli
