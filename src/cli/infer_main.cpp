// ferry-infer: parse, validate, wire, run.
#include "src/cli/cli_options.h"
#include "src/cli/wiring.h"
#include "src/engine/backend.h"
#include "src/infer/runner.h"

namespace {
int infer_main(int argc, char** argv) {
  using namespace ferry;
  cli::cli_request req = cli::parse_cli(argc, argv, cli::tool::tool_infer);
  if (req.exit_now) return 0;
  cli::resolve_auto(req.cfg, engine::cuda_usable());
  model::llama_config mc = cli::resolve_model(req.cfg);
  engine::engine_options eo = cli::engine_options_for(req.cfg, mc);
  if (req.dry_run) {
    cli::print_dry_run(req.cfg, mc, eo);
    return 0;
  }
  const bool evaluates = req.cfg.job == "evaluate" || req.cfg.job == "both";
  io::data_options data;
  if (evaluates) data = cli::data_options_for(req.cfg, mc);
  return infer::run_inference(req.cfg, mc, eo, evaluates ? &data : nullptr);
}
}  // namespace

int main(int argc, char** argv) { return ferry::cli::run_main("ferry-infer", infer_main, argc, argv); }
