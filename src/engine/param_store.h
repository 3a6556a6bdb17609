#pragma once
// The host parameter store: the units' layout and names, the compute-dtype shadow copy the device
// loads and the gradient buffer the device writes back (page-locked, 2 B + 2 B per param in
// fp16/bf16, allocated as one exact-size block), and the optimizer state tier (state_tier.h) that
// owns every parameter's fp32 master copy and AdamW moments (pageable host memory; 12 B/param with
// fp32 moments, 8 with bf16, about 6 with int8: engine_options::state; or a file on a local disk
// streamed through a few host buffers: nvme_state.h). Parameters are grouped in units, each one
// flat buffer streamed by one copy:
//   unit 0          the token embedding            ("model.embed_tokens.weight")
//   units 1..L      the decoder blocks             ("model.layers.<i>.*", layout.h order)
//   unit L+1        final norm + lm_head           ("model.norm.weight", "lm_head.weight"; tied: the norm)
// The embedding's gradient is accumulated on the host in fp32 (its rows are gathered and
// scattered on the host; the device never holds the embedding), so its grad buffer is fp32 and
// pageable.
// Tied embeddings (tie_word_embeddings): lm_head is the embedding's matrix, one parameter with one
// master copy and one set of moments in unit 0; unit L+1 holds only the final norm. The head's
// pinned gradient buffer still has room for the whole head slot (norm, then the (V, h) lm_head
// gradient, grad_numel): the device sends it back as one copy, and the update thread adds the
// matrix part into the embedding's fp32 gradient (gradient_path).
// Without optimizer state (an inference engine) the store holds only the fp32 master weights (what
// init and load write) and the pinned shadows: 4 B + 2 B per param in fp16/bf16. The tier then
// has no moments, grad is null, and the moment and gradient tensor accessors throw.
// Data-parallel ranks (engine_options::comm): the tier holds only this rank's shard of every unit
// (shard_layout: elements [shard_begin(u), shard_begin(u) + shard_numel(u)) of the unit's flat
// buffer), so the master weights and moments exist once over all ranks. Every rank's device streams
// whole shadows: with the ranks on one machine (shadow_mode shared; auto there) one set of shadows
// in shared memory that every rank maps and page-locks, where each rank writes its shard and
// publish_shadow waits for the others'; otherwise (gather) a whole set per rank, publish_shadow
// all-gathering the other ranks' shards.
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "src/engine/backend.h"
#include "src/engine/nvme_state.h"
#include "src/engine/collectives.h"
#include "src/engine/state_tier.h"
#include "src/model/layout.h"
#include "src/model/llama_config.h"

namespace ferry::engine {

struct unit_info {
  std::string prefix;                      // "model.layers.3." for a block, "" for embed/head
  std::vector<model::tensor_slot> slots;   // names relative to prefix
  int64_t numel = 0;
};

struct named_param {
  std::string name;                        // full HF name
  std::vector<int64_t> shape;
  int64_t unit = 0;                        // where its elements are in the unit's flat buffers
  int64_t offset = 0;
  int64_t numel = 0;
};

class param_store {
 public:
  // nvme: the optimizer state on disk (make_nvme_state) instead of host memory; inference stores
  // (no optimizer state) keep their master weights in host memory whatever it says.
  param_store(const model::llama_config& cfg, at::ScalarType compute_dtype, backend& dev,
              bool optimizer_state = true, state_kind kind = state_kind::state_fp32,
              const nvme_options* nvme = nullptr, std::shared_ptr<collectives> comm = nullptr,
              shadow_mode shadows = shadow_mode::shadows_auto, std::vector<bool> shard_grads = {});
  ~param_store();
  param_store(const param_store&) = delete;
  param_store& operator=(const param_store&) = delete;

  // The units' parameter counts in unit order (embedding, blocks, head): what the planner charges
  // the state tier for, without building a store.
  static std::vector<int64_t> unit_numels(const model::llama_config& cfg);

  int64_t num_units() const { return static_cast<int64_t>(units_.size()); }
  int64_t embed_unit() const { return 0; }
  int64_t block_unit(int64_t layer) const { return 1 + layer; }
  int64_t head_unit() const { return num_units() - 1; }
  const unit_info& unit(int64_t u) const { return units_[u]; }
  at::ScalarType compute_dtype() const { return dtype_; }
  int64_t total_params() const;
  bool has_optimizer_state() const { return optimizer_state_; }
  state_tier& state() const { return *state_; }

  void* shadow(int64_t u) const { return shadow_[u]; }    // compute dtype, what the device loads
  void* grad(int64_t u) const { return grad_[u]; }        // compute dtype (fp32 for unit 0)
  // Elements of unit u's device gradient slot: the unit's, except the head's, which holds a whole
  // head slot (cfg.head_slot_params(): with tied embeddings the lm_head gradient after the norm's).
  int64_t grad_numel(int64_t u) const;
  // Elements of grad(u) on the host: grad_numel(u), or this rank's shard_numel(u) for a unit whose
  // gradient is reduce-scattered on the device (the constructor's shard_grads; only its shard of the
  // sum comes to the host: engine_options::reduce_on_device).
  int64_t host_grad_numel(int64_t u) const;
  // Whether unit u is one of the constructor's shard_grads (its host gradient holds only the shard).
  bool grad_sharded(int64_t u) const { return shard_grads_[size_t(u)]; }
  const model::llama_config& config() const { return cfg_; }
  // This rank's share of every unit (one rank: the whole unit).
  const shard_layout& shards() const { return shards_; }
  int64_t shard_begin(int64_t u) const { return shards_.begin(units_[size_t(u)].numel); }
  int64_t shard_numel(int64_t u) const { return shards_.count(units_[size_t(u)].numel); }
  // Sharded: after this rank wrote its shard of shadow(u), fills the rest from the other ranks (a
  // collective on channel c: every rank calls it for the same units in the same order). Shared
  // shadows (their memory is this one): marks this rank's shard written; on the engine's channel
  // it also waits until every rank has written theirs, on the update thread's it returns at once
  // and a reader of shadow(u) calls await_shadow(u) first (environment FERRY_SHARED_LOCKSTEP: the
  // update thread waits too, as before the split; for measuring).
  void publish_shadow(int64_t u, comm_channel c);
  // Shared shadows: waits until every rank has published unit u as often as this rank has (so
  // shadow(u) holds the unit this rank's updates made); the milliseconds waited. Otherwise 0.
  double await_shadow(int64_t u);
  // Whether the shadows are the machine's one shared set (shadow_mode shared).
  bool shadows_shared() const { return shared_ != nullptr; }
  // Sharded: fp32 scratch of shards_.padded(numel) elements of the widest unit that needs it, for
  // the collectives of one unit at a time (the update thread's reduce-scatter and all-gather, or
  // the engine's thread while the update thread is idle): every unit when the shadows are
  // gathered, else the units 1..L+1 not in shard_grads (reduced on the host); null when none
  // does. The embedding's fp32 gradient is padded to shards_.padded(numel) with zeros and needs
  // no scratch.
  float* comm_scratch() const { return scratch_; }
  collectives* comm() const { return comm_.get(); }
  at::ScalarType grad_dtype(int64_t u) const { return u == embed_unit() ? at::kFloat : dtype_; }

  // CPU tensors aliasing the buffers above (1-D, numel of the unit; the master and moments: of
  // this rank's shard; the gradient: shard_numel for a shard_grads unit). The master and moment tensors
  // alias the tier's memory and so exist only for a tier that keeps its state in host memory
  // (state_tier::in_memory; tests, inference); the engine and checkpoints go through state(), and
  // a tier on disk throws here. The moment tensors exist only for fp32 moments
  // (optimizer_state=fp32; other kinds throw: read them through state()).
  at::Tensor master_tensor(int64_t u) const;
  at::Tensor shadow_tensor(int64_t u) const;
  at::Tensor grad_tensor(int64_t u) const;
  at::Tensor exp_avg_tensor(int64_t u) const;
  at::Tensor exp_avg_sq_tensor(int64_t u) const;

  // HF initialisation: normal(0, std) for matrices and the embedding, ones for norms; moments
  // zeroed; shadows refreshed. Deterministic for a seed (each unit has its own generator, whatever
  // the thread count); units are drawn in parallel, each within one lease of its state. A slot is
  // drawn in pieces of `chunk` elements (a multiple of 16; the last piece takes the remainder), which
  // gives the same values as drawing it whole; a sharded store draws a unit only up to the end of
  // its shard, through one piece of scratch per thread, never the whole unit.
  static constexpr int64_t k_init_chunk = int64_t(1) << 20;
  void init_random(uint64_t seed, double std, int64_t chunk = k_init_chunk);
  // Master -> shadow for every unit (after init, load or resume).
  void refresh_shadows();

  // Every parameter by HF name, in HF order, with its place in its unit.
  std::vector<named_param> named_params() const;
  // nullptr when the name is not a parameter of this model.
  const named_param* find(const std::string& name) const;
  // The parameter's fp32 master values, shaped (a view into master_tensor(p.unit)); one rank only
  // (a sharded store holds part of each unit).
  at::Tensor master_view(const named_param& p) const;

  // Page-locked bytes this process allocated or registered (shared shadows included: each rank
  // maps them, though the machine holds them once).
  int64_t pinned_bytes() const { return pinned_bytes_; }
  int64_t host_bytes() const;   // pageable + pinned

 private:
  model::llama_config cfg_;
  at::ScalarType dtype_;
  backend& dev_;
  bool optimizer_state_;
  std::vector<unit_info> units_;
  std::unique_ptr<state_tier> state_;
  std::vector<void*> shadow_, grad_;
  void* pinned_ = nullptr;
  int64_t pinned_bytes_ = 0;
  std::vector<named_param> named_;
  std::shared_ptr<collectives> comm_;
  shard_layout shards_;
  float* scratch_ = nullptr;
  std::unique_ptr<shared_host_block> shared_;   // the shared shadows, or null
  bool lockstep_ = false;                        // FERRY_SHARED_LOCKSTEP (publish_shadow)
  std::vector<bool> shard_grads_;               // per unit: grad() holds only this rank's shard

  // Floats of the embedding's fp32 host gradient: the unit; sharded, padded to the ranks' blocks
  // (reduced on the host, in place) or this rank's block (reduced on the device).
  int64_t host_embed_grad_floats() const;
  void check_optimizer_state(const char* what) const;
  void check_fp32_moments() const;
  void check_in_memory(const char* what) const;
  void refresh_shadow(int64_t u, const state_view& s);
  // Sharded: publish_shadow of every unit in order on the engine's channel (one rank: nothing).
  void publish_shadows();
};

}  // namespace ferry::engine
