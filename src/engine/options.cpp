#include "src/engine/options.h"

#include "src/common/error.h"

namespace ferry::engine {

offload_mode parse_offload_mode(const std::string& s) {
  if (s == "none") return offload_mode::offload_none;
  if (s == "blocked") return offload_mode::offload_blocked;
  if (s == "overlapped") return offload_mode::offload_overlapped;
  throw config_error("offload \"" + s + "\" is not one of none, blocked, overlapped");
}

const char* offload_mode_name(offload_mode m) {
  switch (m) {
    case offload_mode::offload_none: return "none";
    case offload_mode::offload_blocked: return "blocked";
    case offload_mode::offload_overlapped: return "overlapped";
  }
  return "?";
}

shadow_mode parse_shadow_mode(const std::string& s) {
  if (s == "auto") return shadow_mode::shadows_auto;
  if (s == "shared") return shadow_mode::shadows_shared;
  if (s == "gather") return shadow_mode::shadows_gather;
  throw config_error("dist_weights \"" + s + "\" is not one of auto, shared, gather");
}

speculate_mode parse_speculate_mode(const std::string& s) {
  if (s == "auto") return speculate_mode::speculate_auto;
  if (s == "on") return speculate_mode::speculate_on;
  if (s == "off") return speculate_mode::speculate_off;
  throw config_error("speculate \"" + s + "\" is not one of auto, on, off");
}

recompute_mode parse_recompute_mode(const std::string& s) {
  if (s == "none") return recompute_mode::recompute_none;
  if (s == "blocks") return recompute_mode::recompute_blocks;
  if (s == "auto") return recompute_mode::recompute_auto;
  throw config_error("activation_checkpointing \"" + s + "\" is not one of none, blocks, auto");
}

at::ScalarType parse_compute_dtype(const std::string& s) {
  if (s == "fp16") return at::kHalf;
  if (s == "bf16") return at::kBFloat16;
  if (s == "fp32") return at::kFloat;
  throw config_error("dtype \"" + s + "\" is not one of fp16, bf16, fp32");
}

void check_options(const engine_options& o) {
  FERRY_CONFIG_CHECK(o.forward_only || o.mode != offload_mode::offload_none || o.state == state_kind::state_fp32,
                     "optimizer_state=", state_kind_name(o.state),
                     " needs offload blocked or overlapped (offload none keeps fp32 AdamW moments on the GPU); "
                     "use optimizer_state=fp32 with offload none");
  FERRY_CONFIG_CHECK(!o.comm || o.comm->world() == 1 || o.forward_only || o.mode != offload_mode::offload_none,
                     "offload=none with ", o.comm ? o.comm->world() : 1,
                     " ranks: the partitioned optimizer runs on the host; use offload blocked or overlapped");
  if (o.forward_only || o.state_on != state_place::place_nvme) return;
  FERRY_CONFIG_CHECK(o.mode != offload_mode::offload_none,
                     "optimizer_state_on=nvme needs offload blocked or overlapped (offload none keeps the optimizer "
                     "state on the GPU)");
  FERRY_CONFIG_CHECK(!o.nvme.path.empty(), "optimizer_state_on=nvme needs nvme_path, a directory on a local disk");
}

}  // namespace ferry::engine
