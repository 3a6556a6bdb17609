// ferry-infer: parse, validate, wire, run.
#include <cstdio>

#include "src/cli/cli_options.h"
#include "src/cli/wiring.h"
#include "src/engine/backend.h"
#include "src/infer/kv_cache.h"
#include "src/infer/runner.h"

namespace {
int infer_main(int argc, char** argv) {
  using namespace ferry;
  cli::cli_request req = cli::parse_cli(argc, argv, cli::tool::tool_infer);
  if (req.exit_now) return 0;
  cli::resolve_auto(req.cfg, engine::cuda_usable());
  model::llama_config mc = cli::resolve_model(req.cfg);
  engine::engine_options eo = cli::inference_options_for(req.cfg, mc);
  if (req.dry_run) {
    cli::print_dry_run(req.cfg, mc, eo);
    if (req.cfg.job == "generate" || req.cfg.job == "both")
      std::printf("generation KV cache (not in the plan): %.2f GiB for batch %lld x %lld positions\n",
                  double(infer::kv_cache_bytes(mc, req.cfg.batch_size, req.cfg.max_length,
                                               int64_t(c10::elementSize(eo.dtype)))) / double(1ull << 30),
                  (long long)req.cfg.batch_size, (long long)req.cfg.max_length);
    return 0;
  }
  const bool evaluates = req.cfg.job == "evaluate" || req.cfg.job == "both";
  io::data_options data;
  if (evaluates) data = cli::data_options_for(req.cfg, mc);
  return infer::run_inference(req.cfg, mc, eo, evaluates ? &data : nullptr, req.metrics_json);
}
}  // namespace

int main(int argc, char** argv) { return ferry::cli::run_main("ferry-infer", infer_main, argc, argv); }
