#include "src/engine/options.h"

#include <algorithm>
#include <string>

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

embed_grad_place parse_embed_grad_place(const std::string& s) {
  if (s == "auto") return embed_grad_place::embed_grad_auto;
  if (s == "host") return embed_grad_place::embed_grad_host;
  if (s == "device") return embed_grad_place::embed_grad_device;
  throw config_error("embed_grad \"" + s + "\" is not one of auto, host, device");
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
  FERRY_CONFIG_CHECK(o.update_part >= 0, "update_part=", o.update_part,
                     ": expected a count of parameters per part of an update, or 0 (each unit in one piece)");
  FERRY_CONFIG_CHECK(o.forward_only || o.mode != offload_mode::offload_none || o.state == state_kind::state_fp32,
                     "optimizer_state=", state_kind_name(o.state),
                     " needs offload blocked or overlapped (offload none keeps fp32 AdamW moments on the GPU); "
                     "use optimizer_state=fp32 with offload none");
  FERRY_CONFIG_CHECK(!o.comm || o.comm->world() == 1 || o.forward_only || o.mode != offload_mode::offload_none,
                     "offload=none with ", o.comm ? o.comm->world() : 1,
                     " ranks: the partitioned optimizer runs on the host; use offload blocked or overlapped");
  FERRY_CONFIG_CHECK(o.forward_only || o.micro_group <= 1 || o.mode != offload_mode::offload_none,
                     "micro_batch_group=", o.micro_group,
                     " needs offload blocked or overlapped (offload none keeps its gradients on the GPU and adds "
                     "each micro-batch in place); use micro_batch_group=0 or 1 with offload none");
  FERRY_CONFIG_CHECK(o.forward_only || o.micro_group <= std::max<int64_t>(o.grad_accum, 1),
                     "micro_batch_group=", o.micro_group, " exceeds grad_accum=", o.grad_accum,
                     ": a group holds at most one step's micro-batches; use at most ", o.grad_accum,
                     " or 0 (auto)");
  if (o.resident_blocks != 0) {
    const std::string k = "resident_blocks=" + std::to_string(o.resident_blocks);
    FERRY_CONFIG_CHECK(o.resident_blocks >= -1, k,
                       ": expected a count of blocks kept on the GPU, 0 for none, -1 for as many as fit");
    FERRY_CONFIG_CHECK(!o.forward_only, k, " applies to training (an inference engine keeps no optimizer state)");
    FERRY_CONFIG_CHECK(o.mode != offload_mode::offload_none, k,
                       " needs offload blocked or overlapped (offload none keeps every block on the GPU)");
    FERRY_CONFIG_CHECK(!o.comm || o.comm->world() == 1, k, " with ", o.comm ? o.comm->world() : 1,
                       " ranks: each rank updates only its shard of a unit on the host; use resident_blocks=0");
    FERRY_CONFIG_CHECK(o.state == state_kind::state_fp32 && o.state_on == state_place::place_host, k,
                       " needs optimizer_state=fp32 and optimizer_state_on=host (the device AdamW keeps fp32 moments, "
                       "downloaded to host memory for checkpoints); got optimizer_state=",
                       state_kind_name(o.state), (o.state_on == state_place::place_nvme ? ", optimizer_state_on=nvme" : ""));
  }
  if (o.forward_only || o.state_on != state_place::place_nvme) return;
  FERRY_CONFIG_CHECK(o.mode != offload_mode::offload_none,
                     "optimizer_state_on=nvme needs offload blocked or overlapped (offload none keeps the optimizer "
                     "state on the GPU)");
  FERRY_CONFIG_CHECK(!o.nvme.path.empty(), "optimizer_state_on=nvme needs nvme_path, a directory on a local disk");
}

void check_resident_blocks(const engine_options& o, int64_t layers, const std::string& model) {
  FERRY_CONFIG_CHECK(o.resident_blocks <= layers, "resident_blocks=", o.resident_blocks, " exceeds the ", layers,
                     " blocks of model ", model, "; use 0 to ", layers);
}

engine_options resolve_embed_grad(engine_options o, bool tied, int64_t embed_params) {
  const bool training = !o.forward_only && o.mode != offload_mode::offload_none;
  if (o.embed_grad == embed_grad_place::embed_grad_device) {
    FERRY_CONFIG_CHECK(!tied, "embed_grad=device: the model ties its embeddings (tie_word_embeddings), whose ",
                       "gradient is summed on the host from both uses; use embed_grad=auto or host");
    FERRY_CONFIG_CHECK(o.forward_only || o.mode != offload_mode::offload_none,
                       "embed_grad=device needs offload blocked or overlapped (offload none keeps every gradient "
                       "on the GPU); use embed_grad=auto with offload none");
  }
  if (o.embed_grad == embed_grad_place::embed_grad_auto)
    o.embed_grad = o.cuda && training && !tied && !shards_of(o).sharded() && embed_params * 4 <= (int64_t(1) << 30)
                       ? embed_grad_place::embed_grad_device
                       : embed_grad_place::embed_grad_host;
  return o;
}

}  // namespace ferry::engine
