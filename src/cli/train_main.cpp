// ferry-train: parse, validate, wire, run.
#include <ATen/Context.h>

#include "src/cli/cli_options.h"
#include "src/cli/wiring.h"
#include "src/engine/backend.h"
#include "src/train/trainer.h"

namespace {
int train_main(int argc, char** argv) {
  using namespace ferry;
  cli::cli_request req = cli::parse_cli(argc, argv, cli::tool::tool_train);
  if (req.exit_now) return 0;
  cli::resolve_auto(req.cfg, engine::cuda_usable());
  model::llama_config mc = cli::resolve_model(req.cfg);
  engine::engine_options eo = cli::engine_options_for(req.cfg, mc);
  if (!req.plan_json.empty()) cli::write_plan_json(req.plan_json, req.cfg, mc, eo);
  if (req.dry_run) {
    cli::print_dry_run(req.cfg, mc, eo);
    return 0;
  }
  io::data_options data = cli::data_options_for(req.cfg, mc);
  return train::run_training(req.cfg, mc, eo, data);
}
}  // namespace

int main(int argc, char** argv) { return ferry::cli::run_main("ferry-train", train_main, argc, argv); }
