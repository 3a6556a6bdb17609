#include "src/engine/memory_plan.h"

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "src/engine/nvme_state.h"
#include "src/engine/param_store.h"
#include "src/model/attention.h"
#include "src/model/block.h"
#include "src/model/device_bytes.h"

namespace ferry::engine {

int64_t rotary_positions(const model::llama_config& cfg, const engine_options& opt) {
  return opt.max_positions > 0 ? opt.max_positions : std::max(opt.max_seq, cfg.max_position_embeddings);
}

int64_t state_host_bytes(const model::llama_config& cfg, state_kind kind, bool moments, const shard_layout& shards) {
  int64_t bytes = 0;
  // With ranks, rank 0's shard of each unit (the largest: ceil(n / world)).
  for (int64_t n : param_store::unit_numels(cfg)) bytes += state_bytes(kind, moments, shards.per(n));
  return bytes;
}

namespace {

// Fixed costs: the rotary tables (cos and sin, fp32, for every position the engine may see) and,
// on CUDA, the GEMM libraries' workspaces, which PyTorch allocates through the caching allocator:
// cuBLAS's (32 MiB on Hopper and Ada; measured on an H100 as a constant ~30 MiB gap on small
// shapes) and cuBLASLt's (1 MiB, taken by the first addmm that runs through cuBLASLt, seen in the
// allocator's history on an H100 at 2026-11-27).
int64_t fixed_bytes(const model::llama_config& cfg, const engine_options& opt, int64_t positions) {
  int64_t rope = 2 * model::device_charge(positions * cfg.head_dim * 4, opt.cuda);
  int64_t cublas = opt.cuda ? (int64_t(32) << 20) + (int64_t(1) << 20) : 0;
  return rope + cublas;
}

// An inference engine, every tensor charged as the device's allocator charges it (the plan is an
// upper bound that engine_forward_only.evaluate_equals_training_engine measures on CUDA): the
// weight buffers (one per unit resident, or the slots), one layer's input and output, the labels
// on the device for the whole evaluation, and the largest transient of: the embedding's token ids
// (resident), a block's forward (chunked, or in one pass when resident:
// model::block_forward_whole_bytes), the loss head's chunk (norm, logits, per-row losses) and its
// target count.
memory_plan plan_forward_only(const model::llama_config& cfg, const engine_options& opt, int64_t batch, int64_t seq) {
  memory_plan p;
  const int64_t e = static_cast<int64_t>(c10::elementSize(opt.dtype));
  const int64_t h = cfg.hidden_size, V = cfg.vocab_size, n = batch * seq;
  const int64_t params = cfg.total_params();
  auto c = [&](int64_t bytes) { return model::device_charge(bytes, opt.cuda); };
  if (opt.mode == offload_mode::offload_none) {
    p.weight_slots = c(cfg.embed_params() * e) + cfg.num_hidden_layers * c(cfg.block_params() * e) + c(cfg.head_params() * e);
  } else {
    int64_t slots = opt.mode == offload_mode::offload_blocked ? 1 : opt.prefetch + 1;
    p.weight_slots = slots * c(cfg.block_params() * e) + c(cfg.head_slot_params() * e);
  }
  p.activations = 2 * c(n * h * e);
  const model::attention_path path = model::attention_path_for(cfg, opt.dtype, opt.cuda);
  const int64_t block = opt.mode == offload_mode::offload_none
                            ? model::block_forward_whole_bytes(cfg, batch, seq, e, path)
                            : model::block_forward_inference_bytes(cfg, batch, seq, e, path);
  const int64_t tokens = opt.mode == offload_mode::offload_none ? c(n * 8) : 0;
  // The head, per chunk of rows: the fp32 loss sum, the normed rows and their logits, then the
  // cross-entropy's per-row losses (CUDA) or its ATen composition's fp32 logits and row vectors.
  const int64_t rows = std::min<int64_t>(opt.ce_chunk, n);
  const int64_t a = e == 8 ? 8 : 4;
  const int64_t ce = opt.cuda ? c(rows * 4) : 2 * c(rows * V * a) + 8 * c(rows * 8);
  const int64_t norm = model::rmsnorm_forward_bytes(rows, h, e, opt.cuda);
  const int64_t head = c(4) + std::max({norm, c(rows * h * e) + c(rows * V * e) + ce, c(n) + c(8)});
  const int64_t labels = c(n * 8);
  p.workspace = labels + std::max({tokens, block, head}) + fixed_bytes(cfg, opt, std::max(seq, rotary_positions(cfg, opt)));
  p.device_total = p.weight_slots + p.activations + p.workspace;

  p.state = opt.state;
  p.host_master = state_host_bytes(cfg, opt.state, false);
  p.host_pinned = params * e;     // the shadows (none mode: the copies params_changed uploads)
  p.host_other = n * h * e;       // embedding staging
  p.host_total = p.host_master + p.host_pinned + p.host_other;
  return p;
}

}  // namespace

int64_t activation_bytes(const model::llama_config& cfg, int64_t batch, int64_t seq, int64_t elem_size,
                         int64_t recomputed, int64_t group) {
  const int64_t L = cfg.num_hidden_layers, c = std::min(std::max<int64_t>(recomputed, 0), L);
  const int64_t g = std::max<int64_t>(group, 1);
  const int64_t S = model::block_saved_bytes(cfg, batch, seq, elem_size), I = batch * seq * cfg.hidden_size * elem_size;
  // At the start of the backward, for each of the group's g micro-batches: L - c saved sets (each
  // holding its block's input) and c + 1 hidden states (the checkpointed inputs and the gradient
  // of the last output). When every block is recomputed, the first recompute's saved set holds its
  // input already, beside the other L g - 1 inputs and the g gradients; with some blocks not
  // recomputed, a recompute happens only after their saved sets are gone, so the start of the
  // backward is the peak.
  if (c == L && L > 0) return (L + 1) * g * I - I + S;
  return g * ((L - c) * S + (c + 1) * I);
}

memory_plan plan_memory(const model::llama_config& cfg, const engine_options& opt, int64_t batch, int64_t seq,
                        int64_t grad_accum, const plan_what_if& what_if, int64_t device_bytes) {
  if (opt.forward_only) return plan_forward_only(cfg, opt, batch, seq);
  const int64_t cap = device_bytes > 0 ? device_bytes : gib_bytes(opt.gpu_mem_limit_gib);
  // On CUDA the plan must fit with k_allocator_slack of the cap to spare (memory_plan.h).
  const int64_t target = opt.cuda ? cap - int64_t(double(cap) * k_allocator_slack) : cap;
  if (opt.resident_blocks < 0) {
    // auto: the plan without resident blocks decides the rest; they then take what memory is left.
    engine_options none_resident = opt;
    none_resident.resident_blocks = 0;
    const memory_plan base = plan_memory(cfg, none_resident, batch, seq, grad_accum, what_if, device_bytes);
    if (cap <= 0 || opt.mode == offload_mode::offload_none) return base;
    engine_options fixed = opt;
    fixed.embed_grad = base.embed_grad_device ? embed_grad_place::embed_grad_device : embed_grad_place::embed_grad_host;
    if (shards_of(opt).sharded()) fixed.embed_grad = opt.embed_grad;   // ranks: dist_reduce decides, as in base
    plan_what_if w = what_if;
    w.micro_group = base.micro_group;
    w.recompute_blocks = base.recompute_blocks;
    for (int64_t n = cfg.num_hidden_layers; n > 0; --n) {
      fixed.resident_blocks = n;
      const memory_plan p = plan_memory(cfg, fixed, batch, seq, grad_accum, w, device_bytes);
      if (p.device_total <= target) return p;
    }
    return base;
  }
  if (opt.embed_grad == embed_grad_place::embed_grad_auto) {
    // auto: the table on the device where resolve_embed_grad allows it, if that plan fits the cap
    // with the group the host's plan runs (the table must not cost a smaller group); else the host.
    // It may cost recomputed blocks: the embedding is the next forward's first unit, and its sum
    // on the host sits on the step's tail (1b at grad_accum 4: 353 against 363 ms a step), where a
    // recomputed block costs one block's forward again (1b has 22; this trade is not measured).
    engine_options host = opt;
    host.embed_grad = embed_grad_place::embed_grad_host;
    const memory_plan on_host = plan_memory(cfg, host, batch, seq, grad_accum, what_if, device_bytes);
    const engine_options dev = resolve_embed_grad(opt, cfg.tie_word_embeddings, cfg.embed_params());
    if (dev.embed_grad != embed_grad_place::embed_grad_device) return on_host;
    const memory_plan on_dev = plan_memory(cfg, dev, batch, seq, grad_accum, what_if, device_bytes);
    const bool fits = cap <= 0 || on_dev.device_total <= target;
    return fits && on_dev.micro_group == on_host.micro_group ? on_dev : on_host;
  }
  const bool offloaded = opt.mode != offload_mode::offload_none;
  // The group asked for (engine_options::micro_group, or the what-if's): 0 = auto.
  const int64_t asked_group = what_if.micro_group > 0 ? what_if.micro_group : opt.micro_group;
  if (asked_group <= 0 && offloaded && grad_accum > 1) {
    // The largest group that fits (each size with its own recomputation), else one by one.
    plan_what_if w = what_if;
    for (int64_t g = grad_accum; g > 1; --g) {
      w.micro_group = g;
      memory_plan p = plan_memory(cfg, opt, batch, seq, grad_accum, w, device_bytes);
      if (cap <= 0 || p.device_total <= target) return p;
    }
    w.micro_group = 1;
    return plan_memory(cfg, opt, batch, seq, grad_accum, w, device_bytes);
  }
  if (what_if.recompute_blocks < 0 && opt.recompute == recompute_mode::recompute_auto) {
    // The fewest recomputed blocks whose plan fits; all of them when none does (the engine then
    // refuses the run, naming the bytes), with the slack to spare; a plan that fits only without
    // it is taken when none fits with it.
    plan_what_if w = what_if;
    int64_t fits_without_slack = -1;
    for (int64_t c = 0; c <= cfg.num_hidden_layers; ++c) {
      w.recompute_blocks = c;
      memory_plan p = plan_memory(cfg, opt, batch, seq, grad_accum, w, device_bytes);
      if (cap <= 0 || p.device_total <= target) return p;
      if (fits_without_slack < 0 && p.device_total <= cap) fits_without_slack = c;
    }
    w.recompute_blocks = fits_without_slack >= 0 ? fits_without_slack : cfg.num_hidden_layers;
    return plan_memory(cfg, opt, batch, seq, grad_accum, w, device_bytes);
  }
  memory_plan p;
  // The embedding's gradient summed on the device (the ranks' reduce-scatter, or embed_grad=device).
  const bool embed_dev = unit_reduced_on_device(opt, cfg.tie_word_embeddings, 0, cfg.num_hidden_layers + 2);
  p.embed_grad_device = embed_dev;
  const int64_t e = static_cast<int64_t>(c10::elementSize(opt.dtype));
  const int64_t L = cfg.num_hidden_layers, h = cfg.hidden_size, V = cfg.vocab_size;
  const int64_t n = batch * seq;
  // The head slot holds the norm and lm_head (tied: a copy of the embedding's matrix); the
  // parameters (tied: lm_head counted once, in the embedding) are what the host and none mode keep.
  const int64_t block = cfg.block_params(), head = cfg.head_slot_params(), embed = cfg.embed_params();
  const int64_t params = cfg.total_params();
  // The head's pinned gradient holds a whole head slot (param_store::grad_numel): with tied
  // embeddings its lm_head part beside the parameters.
  const int64_t tied_grad = cfg.head_slot_params() - cfg.head_params();
  p.micro_group = offloaded ? std::clamp<int64_t>(asked_group > 0 ? asked_group : grad_accum, 1,
                                                   std::max<int64_t>(grad_accum, 1))
                            : 1;

  if (opt.mode == offload_mode::offload_none) {
    p.weight_slots = params * e;
    p.grad_slots = params * e;
    p.optimizer = state_host_bytes(cfg, state_kind::state_fp32, true);   // the device AdamW keeps fp32
  } else {
    int64_t slots = opt.mode == offload_mode::offload_blocked ? 1 : opt.prefetch + 1;
    p.weight_slots = (slots * block + head) * e;
    p.grad_slots = (2 * block + head) * e;
    const shard_layout sh = shards_of(opt);
    const int64_t nu = cfg.num_hidden_layers + 2;
    if (unit_reduced_on_device(opt, cfg.tie_word_embeddings, 1, nu)) {
      // The slots padded to the ranks' equal blocks, and each slot's reduce-scattered shard
      // (gradient_path): the head's only when untied.
      const bool head_too = unit_reduced_on_device(opt, cfg.tie_word_embeddings, nu - 1, nu);
      p.grad_slots = (2 * (sh.padded(block) + sh.per(block)) +
                      (head_too ? sh.padded(head) + sh.per(head) : head)) * e;
    }
    // The embedding's fp32 gradient, padded, and its reduce-scattered block (gradient_path); one
    // rank (embed_grad=device): the table alone.
    if (embed_dev)
      p.grad_slots += (sh.sharded() ? sh.padded(embed) + sh.per(embed) : embed) * 4;
    // A group's fp32 gradient sum of the unit whose backward runs (gradient_path::fold).
    if (p.micro_group > 1) p.grad_slots += std::max(block, head) * 4;
    // Resident blocks (engine_options::resident_blocks): their weights, gradients and fp32 state.
    p.resident_blocks = std::min(opt.resident_blocks, L);
    const int64_t resident = p.resident_blocks * block;
    p.weight_slots += resident * e;
    p.grad_slots += resident * e;
    p.optimizer = resident * 12;
  }
  p.recompute_blocks = what_if.recompute_blocks >= 0 ? std::min(what_if.recompute_blocks, L)
                       : opt.recompute == recompute_mode::recompute_blocks ? L
                                                                            : 0;
  p.activations = activation_bytes(cfg, batch, seq, e, p.recompute_blocks, p.micro_group);

  // Transients: attention scores and probabilities where no fused kernel applies (head_dim > 256
  // or the CPU path), the MLP's recomputed product and gradients, one chunk of logits with its
  // gradient, plus a few (N, h) activation gradients.
  int64_t scores = cfg.head_dim > 256 || !opt.cuda ? batch * cfg.num_attention_heads * seq * seq * (4 + e) : 0;
  int64_t mlp = n * 4 * cfg.intermediate_size * e;
  int64_t logits = std::min<int64_t>(opt.ce_chunk, n) * V * (4 + e);
  p.workspace = std::max({scores, mlp, logits}) + 4 * n * h * e +
                fixed_bytes(cfg, opt, std::max(seq, rotary_positions(cfg, opt)));
  p.device_total = p.weight_slots + p.grad_slots + p.optimizer + p.activations + p.workspace;

  // The state tier's bytes (state_tier.h), unit by unit as it allocates them: master weights, then
  // what the moments add.
  // offload none: the host tier is fp32 like the device's state (check_options refuses another kind).
  p.state = opt.mode == offload_mode::offload_none ? state_kind::state_fp32 : what_if.state.value_or(opt.state);
  const shard_layout shards = shards_of(opt);
  p.host_master = state_host_bytes(cfg, p.state, false, shards);
  p.host_moments = state_host_bytes(cfg, p.state, true, shards) - p.host_master;
  // On disk (nvme_state.h): the file holds every unit's block, the host only the buffers.
  p.state_on_disk = opt.mode != offload_mode::offload_none &&
                    what_if.state_on_disk.value_or(opt.state_on == state_place::place_nvme);
  if (p.state_on_disk) {
    // With ranks, this rank's tier file and buffers hold rank 0's (the largest) shards.
    std::vector<int64_t> numel;
    for (int64_t n : param_store::unit_numels(cfg)) numel.push_back(shards.per(n));
    p.host_master = p.host_moments = 0;
    p.host_state_buffers = nvme_buffer_bytes(numel, p.state, true, opt.nvme.buffers);
    p.disk_state = nvme_file_bytes(numel, p.state, true);
  }
  p.host_pinned = opt.mode == offload_mode::offload_none ? 0 : params * e + (params - embed + tied_grad) * e;
  // The embedding's fp32 gradient, the pinned staging of its input rows (one) and of its input
  // gradient (one per micro-batch of a group: gradient_path::send_embed), and the fp32 accumulation
  // buffers when a step has more than one group (gradient_path::begin_step).
  // Summed on the device, the embedding's input gradient is not staged.
  p.host_other = embed * 4 + (1 + (embed_dev ? 0 : p.micro_group)) * n * h * e +
                 (grad_accum > p.micro_group ? (params - embed - p.resident_blocks * block) * 4 : 0);
  if (embed_dev && !shards.sharded()) {   // one rank: the fp32 gradient is page-locked, a copy's target
    p.host_pinned += embed * 4;
    p.host_other -= embed * 4;
  }
  if (shards.sharded() && !opt.forward_only) {
    // Each unit's summed fp32 gradient shard (16-element aligned, gradient_path), and the padded
    // fp32 unit the reduce-scatter reads and the all-gather writes (param_store::comm_scratch) of
    // the widest unit that needs one: any unit where the shadows may be gathered (dist_weights
    // auto may turn out so), else the blocks and head reduced on the host. Page-locked, as a CUDA
    // run's collectives stage them through the device; so is the embedding's fp32 gradient, padded
    // to the ranks' blocks and reduced in place (reduced on the device: only this rank's block). A
    // unit reduce-scattered on the device keeps only this rank's shard of its half gradient on the
    // host (param_store::host_grad_numel; rank 0's, the largest).
    int64_t widest = 0;
    const bool gathered = opt.shadows != shadow_mode::shadows_shared;
    const std::vector<int64_t> numels = param_store::unit_numels(cfg);
    for (size_t u = 0; u < numels.size(); ++u) {
      const int64_t un = numels[u];
      const bool dev = unit_reduced_on_device(opt, cfg.tie_word_embeddings, int64_t(u), int64_t(numels.size()));
      p.host_pinned += ((dev ? 1 : std::max<int64_t>(1, shards.per(un))) + 15) / 16 * 16 * 4;
      if (dev && u != 0) p.host_pinned -= (un - shards.per(un)) * e;
      if (gathered || (u != 0 && !dev)) widest = std::max(widest, shards.padded(un));
    }
    p.host_pinned += widest * 4;
    if (opt.mode != offload_mode::offload_none) {
      p.host_pinned += (embed_dev ? std::max<int64_t>(1, shards.per(embed)) : shards.padded(embed)) * 4;
      p.host_other -= embed * 4;
    }
  }
  if (opt.mode == offload_mode::offload_none) p.host_pinned = params * e + (params - embed + tied_grad) * e;  // init/checkpoint copies
  p.host_total = p.host_master + p.host_moments + p.host_state_buffers + p.host_pinned + p.host_other;
  return p;
}

std::string plan_misfit(const memory_plan& p, const model::llama_config& cfg, const engine_options& opt,
                        int64_t device_bytes) {
  auto mib = [](int64_t b) { return std::to_string(b >> 20); };
  std::string why;
  if (device_bytes > 0 && p.device_total > device_bytes)
    why = "model " + cfg.name + " at batch " + std::to_string(opt.max_batch) + " x " + std::to_string(opt.max_seq) +
          " tokens needs " + mib(p.device_total) + " MiB of GPU memory but " + mib(device_bytes) +
          " MiB are usable; lower max_length or batch_size, use --offload overlapped, activation_checkpointing=auto, "
          "or a smaller model";
  const int64_t host_cap = gib_bytes(opt.host_mem_limit_gib);
  if (why.empty() && host_cap > 0 && p.host_total > host_cap)
    why = "model " + cfg.name + " needs " + mib(p.host_total) + " MiB of host memory (" +
          (p.state_on_disk ? "nvme buffers " + mib(p.host_state_buffers)
                           : "fp32 master " + mib(p.host_master) + " + moments " + mib(p.host_moments)) +
          " + pinned " + mib(p.host_pinned) + " + other " + mib(p.host_other) + ") but host_mem_limit_gib allows " +
          mib(host_cap) + " MiB; train a smaller model or raise the limit" +
          (p.state_on_disk ? ", or lower nvme_buffers" : ", or put the optimizer state on disk (optimizer_state_on=nvme)");
  return why;
}

std::string memory_plan::describe() const {
  auto gib = [](int64_t b) { return double(b) / double(1ull << 30); };
  std::string recompute_note;
  if (recompute_blocks > 0) recompute_note += std::to_string(recompute_blocks) + " blocks recomputed";
  if (micro_group > 1)
    recompute_note += (recompute_note.empty() ? "" : ", ") + std::to_string(micro_group) + " micro-batches at once";
  if (!recompute_note.empty()) recompute_note = " (" + recompute_note + ")";
  const std::string resident_note =
      resident_blocks > 0 ? " (" + std::to_string(resident_blocks) + " resident blocks)" : "";
  char buf[1024];
  std::snprintf(buf, sizeof buf,
                "device  %8.2f GiB = weight slots %.2f + gradient slots %.2f + optimizer %.2f%s + activations %.2f%s + workspace %.2f\n",
                gib(device_total), gib(weight_slots), gib(grad_slots), gib(optimizer), resident_note.c_str(), gib(activations),
                recompute_note.c_str(), gib(workspace));
  std::string s = buf;
  if (state_on_disk) {
    std::snprintf(buf, sizeof buf,
                  "host    %8.2f GiB = nvme buffers %.2f + pinned %.2f + other %.2f\n"
                  "disk    %8.2f GiB = fp32 master + moments on nvme_path (%lld bytes)",
                  gib(host_total), gib(host_state_buffers), gib(host_pinned), gib(host_other), gib(disk_state),
                  (long long)disk_state);
  } else {
    std::snprintf(buf, sizeof buf, "host    %8.2f GiB = fp32 master %.2f + moments %.2f + pinned %.2f + other %.2f",
                  gib(host_total), gib(host_master), gib(host_moments), gib(host_pinned), gib(host_other));
  }
  return s + buf;
}

}  // namespace ferry::engine
