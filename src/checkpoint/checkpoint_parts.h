#pragma once
// Pieces shared by the one-rank checkpoint (checkpoint.cpp) and the ranks' sharded one
// (sharded.cpp); internal to src/checkpoint.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "src/checkpoint/checkpoint.h"
#include "src/common/error.h"
#include "src/engine/engine.h"
#include "src/io/hf_checkpoint.h"

namespace ferry::checkpoint::parts {

// The ranks' manifest in a sharded checkpoint (checkpoint.h).
inline constexpr const char* k_manifest = "shards.json";

std::string step_name(int64_t step);                               // "checkpoint-000042"
std::string export_dtype(at::ScalarType t);                        // "BF16", "F32", "F16"
std::string unit_tensor(int64_t u, const char* what);              // "optimizer.unit<U><what>"

// safetensors dtype and element size of exp_avg (m) and exp_avg_sq (v) in a compact kind.
struct compact_dtypes {
  const char* m;
  const char* v;
  size_t elem;
};
compact_dtypes compact_dtypes_of(engine::state_kind k);

// Leases the tier's units one at a time for a pass in a known order (a file written or read tensor
// by tensor): at(u) keeps unit u leased while consecutive calls ask for it, releases it when another
// unit is asked for, and tells the tier which units come next, so a tier on disk reads them ahead.
// Holding one unit at a time is what lets a tier on disk checkpoint through a few buffers.
class unit_cursor {
 public:
  // order: the units in the order at() will ask for them (a unit may come back in a later sweep).
  unit_cursor(engine::state_tier& tier, std::vector<int64_t> order, bool dirty);
  const engine::state_view& at(int64_t u);
  void done() { lease_.reset(); }

 private:
  static constexpr size_t k_ahead = 16;   // hints queued ahead (the tier reads as many as it has buffers)
  engine::state_tier& tier_;
  std::vector<int64_t> order_;
  bool dirty_;
  size_t pos_ = 0;
  int64_t unit_ = -1;
  std::unique_ptr<engine::state_lease> lease_;
};

// Where the bytes of one tensor of an optimizer file are in a unit's state view (an offset into
// fp32 moments only: compact moments are written per unit or per shard, from their start).
enum class state_array { master, exp_avg, exp_avg_sq, m_scale, v_scale };
struct state_slice {
  int64_t unit;
  state_array array;
  int64_t offset;   // elements into the array
};
const void* slice_data(const engine::state_view& s, const state_slice& x);

// A sequence of units with consecutive repeats removed.
std::vector<int64_t> sweep(const std::vector<int64_t>& units);
// The order io::write_safetensors_streamed writes `entries` in (by decreasing element size, ties in
// the order given), as indexes into entries: the order a writer's unit sweep must follow.
std::vector<size_t> writer_order(const std::vector<io::st_write_entry>& entries);
// The HF weights a checkpoint writes, in io::llama_tensor_names' order (data filled in later by the
// writer), and the unit each belongs to.
void hf_weight_entries(engine::param_store& store, const model::llama_config& cfg,
                       std::vector<io::named_f32>& weights, std::vector<int64_t>& units);
std::vector<int64_t> every_unit(const engine::param_store& store);

// fsyncs every regular file of dir, then dir.
void fsync_tree(const std::string& dir);

// trainer_state.json of the engine's state and st into dir (kind: the moments' kind saved).
void write_trainer_state(const std::string& dir, engine::engine& e, const trainer_state& st);
// Reads dir/trainer_state.json into st and es; errors name the file.
trainer_state read_trainer_state(const std::string& dir, engine::engine_state& es);
// Copies the run's tokenizer file (and an HF tokenizer's config) into dir; "" copies nothing.
void copy_tokenizer(const std::string& dir, const std::string& tokenizer_model);

// Renames tmp_dir to output_dir/name, points output_dir/latest at it, removes the oldest
// checkpoints beyond keep_last. Returns the checkpoint directory.
std::string commit(const std::string& tmp_dir, const std::string& output_dir, const std::string& name,
                   int64_t keep_last);

// The checkpoint at dir (config.json, model.safetensors, opened as reader) has the engine's model
// shape (else a one-line error naming both), and its HF weights are complete.
void check_model(const io::hf_checkpoint_reader& reader, const std::string& dir, const engine::engine& e);

// The ranks' parts (sharded.cpp). save_ranks: every rank of e's comm writes its shard; rank 0 the
// rest; returns the committed directory on every rank.
std::string save_ranks(engine::engine& e, const trainer_state& st, const std::string& output_dir, int64_t keep_last,
                       const std::string& tokenizer_model);
// Loads the masters and moments that cover this rank's shards (any world, one rank included) from
// a sharded checkpoint (manifest present) or a one-rank one (optimizer.safetensors).
void load_pieces(engine::engine& e, const std::string& dir, engine::state_kind from);
// The HF weights of dir into this rank's shards.
void load_hf_shards(engine::engine& e, const io::hf_checkpoint_reader& reader);

}  // namespace ferry::checkpoint::parts
