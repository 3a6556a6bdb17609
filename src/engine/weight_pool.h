#pragma once
// The weight pool: where the device finds each unit's compute-dtype weights.
//   none          every unit resident on the device; acquire returns it at once
//   blocked       one block slot (+ the head's), each use copied in and waited for
//   overlapped    prefetch+1 block slots: the next `prefetch` uses of the schedule are copied ahead
//                 of the one computing where their updates have run (the others when acquired),
//                 and the slot to reuse is the one needed furthest ahead (the schedule is known,
//                 so this is Belady's choice)
// Offloaded with engine_options::resident_blocks: those blocks keep a device copy of their own,
// as in none (the device AdamW writes it), and never take a slot or a copy.
// A unit's device copy is current while its slot holds the version the update thread has queued
// for it (update_worker::queued_version); a load first waits for that update to have run on the
// host. The embedding never moves as a whole: its rows are gathered on the host from the shadow
// and sent as the layer input (embed). With tied embeddings the head slot holds the final norm and
// a copy of the embedding's matrix as lm_head, current while both units' versions are the ones it
// was loaded at; resident, the head reads the embedding's own device buffer.
// Later: "my shard in, then all-gather" for ranks that share the weights.
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "src/engine/backend.h"
#include "src/engine/options.h"
#include "src/engine/param_store.h"
#include "src/engine/step_meter.h"
#include "src/engine/update_worker.h"
#include "src/model/layout.h"
#include "src/model/llama_config.h"

namespace ferry::engine {

class weight_pool {
 public:
  weight_pool(const model::llama_config& cfg, const engine_options& opt, backend& dev, param_store& store,
              update_worker& worker, step_meter& meter);
  ~weight_pool();
  weight_pool(const weight_pool&) = delete;
  weight_pool& operator=(const weight_pool&) = delete;

  // Unit u's weights (flat, on the device) for use `at` of the schedule `uses`, with the compute
  // queue waiting for their copy. Queues the prefetch of the next uses. Call release(u) once the
  // compute work that reads them is queued.
  const at::Tensor& acquire(int64_t u, const std::vector<int64_t>& uses, size_t at);
  void release(int64_t u);
  // The final norm (h) and lm_head (V, h) in what acquire(head unit) returned; lm_head is the
  // embedding's matrix when the model ties them.
  model::head_weights head_views(const at::Tensor& acquired);

  // The embedding rows of tokens (B,T) as a (B,T,h) device tensor, the compute queue waiting for
  // them. Token ids must be in the vocabulary (the engine checks before the step changes state).
  at::Tensor embed(const at::Tensor& tokens);
  // The embedding's update in two parts (engine::train_step, engine_options::embed_rows_first):
  // the rows marked in *first (one byte per vocabulary row) are current once the embedding unit's
  // updates have run; the others also wait for unit rest_unit's (the second part). embed() of
  // tokens all marked waits only for the first part. Set once; the engine owns *first.
  void split_embedding(int64_t rest_unit, const std::vector<uint8_t>* first) {
    embed_rest_ = rest_unit;
    embed_first_ = first;
  }
  // The update thread, in that first part once its rows are current: gathers the rows of ids (the
  // next step's first micro-batch, int64, flat) into the staging, so that embed() of exactly those
  // tokens only copies them (the engine's thread then does not gather while the update thread
  // holds the cores). Every embed() consumes the staging; one of other tokens gathers its own.
  // The table must not change between the two (a fix-up does: the engine stages only steps that
  // stand).
  void stage_embed(const at::Tensor& ids);
  // Forgets staged rows (the table changed elsewhere: engine::params_changed).
  void unstage_embed() { staged_ids_ = at::Tensor(); }

  // Whether unit u has its own device copy (every unit in none mode; the resident blocks otherwise).
  bool is_resident(int64_t u) const { return size_t(u) < resident_.size() && resident_[size_t(u)].defined(); }
  // The device's compute-dtype copy of a resident unit (the device AdamW writes it).
  at::Tensor& resident(int64_t u) { return resident_[size_t(u)]; }
  // After the host weights changed (init, load, resume): resident copies are uploaded from the
  // shadows; slots are stale through the versions the caller bumped.
  void refresh();

 private:
  struct slot {
    at::Tensor buf;
    int64_t unit = -1;
    int64_t version = -1;
    int64_t embed_version = -1;   // the head slot of a tied model: the embedding's version in it
    event_ptr ready, released;
  };
  bool current(const slot& s) const;
  slot* find(int64_t u);
  void load(int64_t u, const std::vector<int64_t>& uses, size_t at);

  const model::llama_config& cfg_;
  const engine_options& opt_;
  backend& dev_;
  param_store& store_;
  update_worker& worker_;
  step_meter& meter_;
  std::vector<at::Tensor> resident_;   // none: every unit; offloaded: the resident blocks (else undefined)
  bool all_resident_ = false;          // none
  std::vector<slot> blocks_;           // blocked / overlapped
  slot head_;
  void gather(const at::Tensor& ids);   // the rows of ids into embed_in_
  at::Tensor staged_ids_;               // stage_embed's ids while embed_in_ holds their rows
  int64_t embed_rest_ = -1;                          // split_embedding
  const std::vector<uint8_t>* embed_first_ = nullptr;
  void* embed_in_ = nullptr;           // pinned staging of the gathered embedding rows (B*T*h)
  event_ptr embed_in_done_;
};

}  // namespace ferry::engine
