// Checkpoints of data-parallel ranks (checkpoint.h "Ranks"): every rank writes its shard of the
// masters and moments, rank 0 the HF weights (gathered from the ranks' masters), the trainer state
// and the manifest; the directory is committed only once every rank reported its part complete.
// Loading takes, for this rank's shard of each unit, the pieces of the saved shards that cover it,
// whatever world wrote them (a one-rank checkpoint is one piece per parameter).
#include <algorithm>
#include <cstring>
#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <numeric>

#include "src/checkpoint/checkpoint_parts.h"
#include "src/io/atomic_file.h"
#include "src/io/safetensors.h"

namespace ferry::checkpoint::parts {
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

constexpr const char* k_manifest_format = "ferry-sharded-v1";

std::string rank_file(int rank, int world) {
  char buf[96];
  std::snprintf(buf, sizeof buf, "optimizer-rank%05d-of-%05d.safetensors", rank, world);
  return buf;
}

// A rank file's tensors: unit<U>.master, .exp_avg, .exp_avg_sq (and int8's .exp_avg.scale,
// .exp_avg_sq.scale), each of the rank's shard of unit U.
std::string shard_tensor(int64_t u, const char* what) { return "unit" + std::to_string(u) + what; }

// Every rank says whether its part succeeded; returns how many did not (a collective on the
// engine's channel, idle after wait_updates: every rank calls it at the same points).
int64_t failed_ranks(engine::collectives& comm, bool ok) {
  at::Tensor t = at::tensor({ok ? 0.0 : 1.0}, at::kDouble);
  comm.all_reduce_sum(t, engine::comm_channel::channel_engine);
  return int64_t(t.item<double>() + 0.5);
}

// This rank's shard of every unit's state into its rank file (one unit leased at a time).
void write_rank_file(engine::param_store& store, const std::string& path) {
  engine::state_tier& tier = store.state();
  const engine::state_kind kind = tier.kind();
  std::vector<io::st_write_entry> entries;
  std::vector<state_slice> where;
  auto add = [&](int64_t u, const char* what, const char* dtype, int64_t n, size_t elem, state_array x) {
    entries.push_back({shard_tensor(u, what), dtype, {n}, nullptr, size_t(n) * elem});
    where.push_back({u, x, 0});
  };
  for (int64_t u = 0; u < store.num_units(); ++u) {
    const int64_t n = store.shard_numel(u);
    if (n == 0) continue;   // a unit smaller than the world leaves the last ranks nothing
    add(u, ".master", "F32", n, 4, state_array::master);
    if (kind == engine::state_kind::state_fp32) {
      add(u, ".exp_avg", "F32", n, 4, state_array::exp_avg);
      add(u, ".exp_avg_sq", "F32", n, 4, state_array::exp_avg_sq);
      continue;
    }
    const compact_dtypes d = compact_dtypes_of(kind);
    add(u, ".exp_avg", d.m, n, d.elem, state_array::exp_avg);
    add(u, ".exp_avg_sq", d.v, n, d.elem, state_array::exp_avg_sq);
    if (kind == engine::state_kind::state_int8) {
      const int64_t blocks = int64_t(cpu_optim::quant_blocks(size_t(n)));
      add(u, ".exp_avg.scale", "F32", blocks, 4, state_array::m_scale);
      add(u, ".exp_avg_sq.scale", "F32", blocks, 4, state_array::v_scale);
    }
  }
  std::vector<int64_t> units;
  for (size_t i : writer_order(entries)) units.push_back(where[i].unit);
  unit_cursor cursor(tier, sweep(units), false);
  io::write_safetensors_streamed(path, entries,
                                 {{"format", "ferry-optimizer-shard-v1"},
                                  {"rank", std::to_string(store.shards().rank)},
                                  {"world", std::to_string(store.shards().world)},
                                  {"optimizer_state", engine::state_kind_name(kind)}},
                                 [&](size_t i, const io::st_sink& sink) {
                                   sink(slice_data(cursor.at(where[i].unit), where[i]), entries[i].bytes);
                                 });
}

// The units' whole fp32 masters, gathered from the ranks' shards one unit at a time in a fixed
// order (every rank runs the same sequence of all-gathers): rank 0 asks at(u) while writing the
// HF weights, the others only finish(). Units the writer skips are still gathered. Into the
// store's collective scratch where it has one, else into a buffer of the widest unit held for the
// save (shared shadows with the gradients reduced on the device keep no scratch).
class master_gather {
 public:
  master_gather(engine::param_store& store, std::vector<int64_t> order)
      : store_(store), order_(std::move(order)), cursor_(store.state(), order_, false) {
    buf_ = store_.comm_scratch();
    if (!buf_) {
      int64_t widest = 0;
      for (int64_t u : order_) widest = std::max(widest, store_.shards().padded(store_.unit(u).numel));
      owned_ = at::empty({widest}, at::kFloat);
      buf_ = owned_.data_ptr<float>();
    }
  }
  const float* at(int64_t u) {
    if (pos_ > 0 && order_[pos_ - 1] == u) return buf_;
    while (pos_ < order_.size() && order_[pos_] != u) gather_next();
    FERRY_ASSERT(pos_ < order_.size(), "master_gather: unit ", u, " out of the announced order");
    gather_next();
    return buf_;
  }
  void finish() {
    while (pos_ < order_.size()) gather_next();
    cursor_.done();
  }

 private:
  void gather_next() {
    const int64_t u = order_[pos_++];
    const int64_t n = store_.unit(u).numel;
    const engine::shard_layout& l = store_.shards();
    at::Tensor mine = at::zeros({l.per(n)}, at::kFloat);
    std::memcpy(mine.data_ptr(), cursor_.at(u).master, size_t(store_.shard_numel(u)) * 4);
    at::Tensor all = at::from_blob(buf_, {l.padded(n)}, at::kFloat);
    store_.comm()->all_gather(all, mine, engine::comm_channel::channel_engine);
  }

  engine::param_store& store_;
  std::vector<int64_t> order_;
  unit_cursor cursor_;
  at::Tensor owned_;
  float* buf_ = nullptr;
  size_t pos_ = 0;
};

json manifest_of(const engine::param_store& store) {
  const int world = store.shards().world;
  json js;
  js["format"] = k_manifest_format;
  js["world_size"] = world;
  js["optimizer_state"] = engine::state_kind_name(store.state().kind());
  std::vector<int64_t> numel;
  for (int64_t u = 0; u < store.num_units(); ++u) numel.push_back(store.unit(u).numel);
  js["unit_numel"] = numel;
  json ranks = json::array();
  for (int r = 0; r < world; ++r) {
    const engine::shard_layout l{r, world};
    json units = json::array();
    for (int64_t n : numel) units.push_back({l.begin(n), l.count(n)});
    ranks.push_back({{"file", rank_file(r, world)}, {"units", units}});
  }
  js["ranks"] = ranks;
  return js;
}

}  // namespace

std::string save_ranks(engine::engine& e, const trainer_state& st, const std::string& output_dir, int64_t keep_last,
                       const std::string& tokenizer_model) {
  engine::param_store& store = e.params();
  engine::collectives& comm = *store.comm();
  const int rank = comm.rank(), world = comm.world();
  const bool lead = rank == 0;
  const std::string name = step_name(st.step);
  const std::string tmp_dir = (fs::path(output_dir) / ("." + name + ".tmp")).string();
  bool ok = true;
  std::string why;
  auto attempt = [&](auto&& fn) {
    if (!ok) return;
    try {
      fn();
    } catch (const std::exception& ex) {
      ok = false;
      why = ex.what();
    }
  };
  // After each phase: every rank learns whether all succeeded; none commits otherwise.
  auto agree = [&](const char* phase) {
    const int64_t failed = failed_ranks(comm, ok);
    if (failed == 0) return;
    if (lead) io::remove_tree(tmp_dir);
    if (!ok) throw error("checkpoint " + name + " not written (" + phase + "): " + why);
    throw error("checkpoint " + name + " not written: " + std::to_string(failed) + " other rank(s) failed to " + phase +
                " (their lines say why)");
  };
  try {
    if (lead)
      attempt([&] {
        std::error_code ec;
        fs::create_directories(output_dir, ec);
        FERRY_CHECK(!ec, "cannot create the output directory ", output_dir, ": ", ec.message());
        io::remove_tree(tmp_dir);
        fs::create_directories(tmp_dir, ec);
        FERRY_CHECK(!ec, "cannot create ", tmp_dir, ": ", ec.message());
      });
    agree("prepare its directory");
    // Each rank its shard file (the output directory is shared by the ranks).
    attempt([&] { write_rank_file(store, (fs::path(tmp_dir) / rank_file(rank, world)).string()); });
    // The HF weights from the gathered masters: rank 0 writes, every rank gathers.
    std::vector<io::named_f32> weights;
    std::vector<int64_t> weight_units;
    hf_weight_entries(store, e.config(), weights, weight_units);
    master_gather gather(store, sweep(weight_units));
    if (lead)
      attempt([&] {
        io::write_hf_checkpoint(tmp_dir, e.config(), weights, export_dtype(e.options().dtype), size_t(5) << 30,
                                [&](const io::named_f32& t) {
                                  const engine::named_param* p = store.find(t.name);
                                  return gather.at(p->unit) + p->offset;
                                });
        write_trainer_state(tmp_dir, e, st);
        copy_tokenizer(tmp_dir, tokenizer_model);
        io::write_file_atomic((fs::path(tmp_dir) / k_manifest).string(), manifest_of(store).dump(1) + "\n");
      });
    gather.finish();   // every file was fsynced as it was committed (io::atomic_file)
    agree("write its part");
    // Every part is on disk: rank 0 commits, and says whether it did.
    std::string dir;
    if (lead) attempt([&] { dir = commit(tmp_dir, output_dir, name, keep_last); });
    agree("commit");
    return (fs::path(output_dir) / name).string();
  } catch (...) {
    // A rank that died or stopped answering (the collective throws naming it): nothing committed.
    if (lead) io::remove_tree(tmp_dir);
    throw;
  }
}

namespace {

// A saved piece of one unit's state: elements [begin, begin + count) of the unit's flat buffers.
struct piece {
  int64_t begin = 0, count = 0;
  const float* master = nullptr;   // count floats, or null (the masters come in other pieces)
  cpu_optim::moments_ref moments;  // n = count; m null: no moments in this piece
  std::vector<float> scales;       // int8: the scales, copied (aligned)
};

// The moments of a piece's tensors named m_name, v_name (and the int8 scales), checked.
void moments_piece(piece& p, const io::safetensors_file& f, engine::state_kind kind, const std::string& m_name,
                   const std::string& v_name, const std::string& m_scale, const std::string& v_scale) {
  const int64_t n = p.count;
  const bool f32 = kind == engine::state_kind::state_fp32;
  const compact_dtypes d = f32 ? compact_dtypes{"F32", "F32", 4} : compact_dtypes_of(kind);
  auto tensor = [&](const std::string& name, const char* dtype, int64_t len) {
    const io::st_tensor_info* t = f.find(name);
    FERRY_CHECK(t != nullptr, f.path(), ": missing tensor ", name, " of the ", engine::state_kind_name(kind),
                " optimizer state (a checkpoint of another model, or a damaged file?)");
    FERRY_CHECK(t->dtype == dtype && t->shape == std::vector<int64_t>{len}, f.path(), ": tensor ", name,
                " is not ", dtype, " of ", len, " elements as this model's state needs");
    return const_cast<void*>(f.data(*t));   // moments_ref's fields are not const; only read
  };
  p.moments.kind = engine::moments_kind_of(kind);
  p.moments.n = size_t(n);
  p.moments.m = tensor(m_name, d.m, n);
  p.moments.v = tensor(v_name, d.v, n);
  if (kind == engine::state_kind::state_int8) {
    const int64_t blocks = int64_t(cpu_optim::quant_blocks(size_t(n)));
    p.scales.assign(size_t(2 * blocks), 0.0f);
    std::memcpy(p.scales.data(), tensor(m_scale, "F32", blocks), size_t(blocks) * 4);
    std::memcpy(p.scales.data() + blocks, tensor(v_scale, "F32", blocks), size_t(blocks) * 4);
    p.moments.m_scale = p.scales.data();
    p.moments.v_scale = p.scales.data() + blocks;
  }
}

const float* master_piece(const io::safetensors_file& f, const std::string& name, const std::vector<int64_t>& shape) {
  const io::st_tensor_info* t = f.find(name);
  FERRY_CHECK(t != nullptr, f.path(), ": missing tensor ", name, " (a checkpoint of another model, or a damaged file?)");
  FERRY_CHECK(t->dtype == "F32" && t->shape == shape, f.path(), ": tensor ", name,
              " has the wrong dtype or shape for this model");
  return static_cast<const float*>(f.data(*t));
}

// Fills this rank's shard [b, b + c) of unit u (the acquired view s) from the pieces: masters
// copied; moments copied bit for bit when one piece of the tier's kind is exactly the shard or the
// kind is elementwise (fp32, bf16: decoding and encoding again is exact), otherwise decoded to fp32
// and encoded into the tier's kind (int8 at another world: its blocks start at other elements).
void fill_shard(const std::vector<piece>& pieces, int64_t u, int64_t b, int64_t c, const engine::state_view& s,
                const std::string& what) {
  auto overlap = [&](const piece& p, int64_t& lo, int64_t& hi) {
    lo = std::max(b, p.begin);
    hi = std::min(b + c, p.begin + p.count);
    return lo < hi;
  };
  int64_t covered = 0, lo = 0, hi = 0;
  for (const piece& p : pieces)
    if (p.master && overlap(p, lo, hi)) {
      std::memcpy(s.master + (lo - b), p.master + (lo - p.begin), size_t(hi - lo) * 4);
      covered += hi - lo;
    }
  FERRY_CHECK(covered == c, what, ": the saved master weights cover ", covered, " of the ", c, " elements of unit ", u,
              " this rank loads (a damaged checkpoint?)");
  const cpu_optim::moments_ref dst = engine::moments_of(s);
  for (const piece& p : pieces)
    if (p.moments.m && p.moments.kind == dst.kind && p.begin == b && p.count == c) {
      const size_t elem = dst.kind == cpu_optim::moments_kind::f32 ? 4 : dst.kind == cpu_optim::moments_kind::bf16 ? 2 : 1;
      std::memcpy(dst.m, p.moments.m, size_t(c) * elem);
      std::memcpy(dst.v, p.moments.v, size_t(c) * elem);
      if (dst.m_scale) {
        const size_t blocks = cpu_optim::quant_blocks(size_t(c));
        std::memcpy(dst.m_scale, p.moments.m_scale, blocks * 4);
        std::memcpy(dst.v_scale, p.moments.v_scale, blocks * 4);
      }
      return;
    }
  const bool f32 = dst.kind == cpu_optim::moments_kind::f32;
  std::vector<float> m32(f32 ? 0 : size_t(c)), v32(f32 ? 0 : size_t(c));
  float* m = f32 ? static_cast<float*>(dst.m) : m32.data();
  float* v = f32 ? static_cast<float*>(dst.v) : v32.data();
  covered = 0;
  std::vector<float> pm, pv;
  for (const piece& p : pieces) {
    if (!p.moments.m || !overlap(p, lo, hi)) continue;
    const float* sm = static_cast<const float*>(p.moments.m);
    const float* sv = static_cast<const float*>(p.moments.v);
    if (p.moments.kind != cpu_optim::moments_kind::f32) {
      pm.resize(size_t(p.count));
      pv.resize(size_t(p.count));
      cpu_optim::decode_moments(p.moments, pm.data(), pv.data());
      sm = pm.data();
      sv = pv.data();
    }
    std::memcpy(m + (lo - b), sm + (lo - p.begin), size_t(hi - lo) * 4);
    std::memcpy(v + (lo - b), sv + (lo - p.begin), size_t(hi - lo) * 4);
    covered += hi - lo;
  }
  FERRY_CHECK(covered == c, what, ": the saved moments cover ", covered, " of the ", c, " elements of unit ", u,
              " this rank loads (a damaged checkpoint?)");
  if (!f32) cpu_optim::encode_moments(m, v, dst);
}

// The saved world's shards: the manifest, checked against the model, and every rank file opened.
struct saved_shards {
  std::vector<std::unique_ptr<io::safetensors_file>> files;
  std::vector<std::vector<std::pair<int64_t, int64_t>>> ranges;   // [rank][unit] (begin, count)
};

saved_shards open_shards(const std::string& dir, const engine::param_store& store, engine::state_kind kind) {
  const std::string path = (fs::path(dir) / k_manifest).string();
  saved_shards out;
  try {
    const json js = json::parse(io::read_file(path));
    FERRY_CHECK(js.at("format").get<std::string>() == k_manifest_format, path, ": format '",
                js.at("format").get<std::string>(), "', expected ", k_manifest_format);
    const int world = js.at("world_size").get<int>();
    const std::string state = js.at("optimizer_state").get<std::string>();
    FERRY_CHECK(state == engine::state_kind_name(kind), path, ": optimizer_state ", state,
                " but trainer_state.json says ", engine::state_kind_name(kind));
    const auto numel = js.at("unit_numel").get<std::vector<int64_t>>();
    bool same = int64_t(numel.size()) == store.num_units();
    for (size_t u = 0; same && u < numel.size(); ++u) same = numel[u] == store.unit(int64_t(u)).numel;
    FERRY_CHECK(same, path, ": the units' sizes are not this model's (a checkpoint of another model?)");
    const json& ranks = js.at("ranks");
    FERRY_CHECK(world >= 1 && int(ranks.size()) == world, path, ": world_size ", world, " but ", ranks.size(),
                " ranks listed");
    for (int r = 0; r < world; ++r) {
      const std::string file = (fs::path(dir) / ranks[size_t(r)].at("file").get<std::string>()).string();
      std::error_code ec;
      FERRY_CHECK(fs::is_regular_file(file, ec), file, ": missing; ", path, " names it as rank ", r, "'s shard of ",
                  world, " (an incomplete copy of the checkpoint?)");
      auto units = ranks[size_t(r)].at("units").get<std::vector<std::pair<int64_t, int64_t>>>();
      FERRY_CHECK(int64_t(units.size()) == store.num_units(), path, ": rank ", r, " lists ", units.size(),
                  " units, the model has ", store.num_units());
      for (size_t u = 0; u < units.size(); ++u)
        FERRY_CHECK(units[u].first >= 0 && units[u].second >= 0 && units[u].first + units[u].second <= numel[u], path,
                    ": rank ", r, "'s range of unit ", u, " is outside the unit");
      out.files.push_back(std::make_unique<io::safetensors_file>(file));
      out.ranges.push_back(std::move(units));
    }
  } catch (const json::exception& ex) {
    throw error(path + ": not a valid manifest of a sharded checkpoint (" + ex.what() + ")");
  }
  return out;
}

}  // namespace

void load_pieces(engine::engine& e, const std::string& dir, engine::state_kind from) {
  engine::param_store& store = e.params();
  std::error_code ec;
  const bool sharded = fs::exists(fs::path(dir) / k_manifest, ec);
  saved_shards saved;
  std::unique_ptr<io::safetensors_file> one;   // a one-rank checkpoint's optimizer.safetensors
  if (sharded) saved = open_shards(dir, store, from);
  else one = std::make_unique<io::safetensors_file>((fs::path(dir) / "optimizer.safetensors").string());
  const std::vector<engine::named_param> params = store.named_params();
  unit_cursor cursor(store.state(), every_unit(store), true);
  for (int64_t u = 0; u < store.num_units(); ++u) {
    const int64_t b = store.shard_begin(u), c = store.shard_numel(u);
    const engine::state_view& s = cursor.at(u);
    if (c == 0) continue;
    std::vector<piece> pieces;
    std::string what;
    if (sharded) {
      what = (fs::path(dir) / k_manifest).string();
      for (size_t r = 0; r < saved.files.size(); ++r) {
        const auto [pb, pc] = saved.ranges[r][size_t(u)];
        if (pc == 0 || pb >= b + c || pb + pc <= b) continue;
        const io::safetensors_file& f = *saved.files[r];
        piece p;
        p.begin = pb;
        p.count = pc;
        p.master = master_piece(f, shard_tensor(u, ".master"), {pc});
        moments_piece(p, f, from, shard_tensor(u, ".exp_avg"), shard_tensor(u, ".exp_avg_sq"),
                      shard_tensor(u, ".exp_avg.scale"), shard_tensor(u, ".exp_avg_sq.scale"));
        pieces.push_back(std::move(p));
      }
    } else {
      // One rank's file: the masters (and fp32 moments) per parameter, compact moments per unit.
      what = one->path();
      for (const engine::named_param& q : params) {
        if (q.unit != u || q.offset >= b + c || q.offset + q.numel <= b) continue;
        piece p;
        p.begin = q.offset;
        p.count = q.numel;
        p.master = master_piece(*one, q.name, q.shape);
        if (from == engine::state_kind::state_fp32) {
          // Per-parameter fp32 moments carry the parameter's shape: checked as such, then flat.
          master_piece(*one, q.name + ".exp_avg", q.shape);
          master_piece(*one, q.name + ".exp_avg_sq", q.shape);
          p.moments.kind = cpu_optim::moments_kind::f32;
          p.moments.n = size_t(q.numel);
          p.moments.m = const_cast<float*>(master_piece(*one, q.name + ".exp_avg", q.shape));
          p.moments.v = const_cast<float*>(master_piece(*one, q.name + ".exp_avg_sq", q.shape));
        }
        pieces.push_back(std::move(p));
      }
      if (from != engine::state_kind::state_fp32) {
        piece p;
        p.count = store.unit(u).numel;
        moments_piece(p, *one, from, unit_tensor(u, ".exp_avg"), unit_tensor(u, ".exp_avg_sq"),
                      unit_tensor(u, ".exp_avg.scale"), unit_tensor(u, ".exp_avg_sq.scale"));
        pieces.push_back(std::move(p));
      }
    }
    fill_shard(pieces, u, b, c, s, what);
  }
  cursor.done();
}

void load_hf_shards(engine::engine& e, const io::hf_checkpoint_reader& reader) {
  engine::param_store& store = e.params();
  std::vector<float> whole;
  unit_cursor cursor(store.state(), every_unit(store), true);
  for (const engine::named_param& p : store.named_params()) {   // grouped by unit
    const int64_t b = store.shard_begin(p.unit), c = store.shard_numel(p.unit);
    const engine::state_view& s = cursor.at(p.unit);
    const int64_t lo = std::max(b, p.offset), hi = std::min(b + c, p.offset + p.numel);
    if (lo >= hi) continue;
    whole.resize(size_t(p.numel));
    reader.read_f32(p.name, p.shape, whole.data());
    std::memcpy(s.master + (lo - b), whole.data() + (lo - p.offset), size_t(hi - lo) * 4);
  }
  cursor.done();
}

}  // namespace ferry::checkpoint::parts
