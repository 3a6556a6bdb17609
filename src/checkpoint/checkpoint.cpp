#include "src/checkpoint/checkpoint.h"
#include "src/checkpoint/checkpoint_parts.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <numeric>
#include <cstring>
#include <memory>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "src/common/error.h"
#include "src/io/atomic_file.h"
#include "src/io/hf_checkpoint.h"
#include "src/io/hf_config.h"
#include "src/io/safetensors.h"

namespace ferry::checkpoint {
namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace parts;

namespace parts {
std::string step_name(int64_t step) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "checkpoint-%06lld", static_cast<long long>(step));
  return buf;
}

std::string export_dtype(at::ScalarType t) { return t == at::kBFloat16 ? "BF16" : t == at::kFloat ? "F32" : "F16"; }

std::string unit_tensor(int64_t u, const char* what) { return "optimizer.unit" + std::to_string(u) + what; }

compact_dtypes compact_dtypes_of(engine::state_kind k) {
  return k == engine::state_kind::state_bf16 ? compact_dtypes{"BF16", "BF16", 2} : compact_dtypes{"I8", "U8", 1};
}

unit_cursor::unit_cursor(engine::state_tier& tier, std::vector<int64_t> order, bool dirty)
    : tier_(tier), order_(std::move(order)), dirty_(dirty) {
  for (size_t k = 0; k < std::min(order_.size(), k_ahead); ++k) tier_.prefetch(order_[k]);
}

const engine::state_view& unit_cursor::at(int64_t u) {
  if (lease_ && unit_ == u) return **lease_;
  lease_.reset();
  while (pos_ < order_.size() && order_[pos_] != u) ++pos_;
  FERRY_ASSERT(pos_ < order_.size(), "unit_cursor: unit ", u, " out of the announced order");
  for (size_t k = pos_ + 1; k < std::min(order_.size(), pos_ + 1 + k_ahead); ++k) tier_.prefetch(order_[k]);
  lease_ = std::make_unique<engine::state_lease>(tier_, u, dirty_);
  unit_ = u;
  return **lease_;
}

std::vector<int64_t> sweep(const std::vector<int64_t>& units) {
  std::vector<int64_t> out;
  for (int64_t u : units)
    if (out.empty() || out.back() != u) out.push_back(u);
  return out;
}

std::vector<size_t> writer_order(const std::vector<io::st_write_entry>& entries) {
  std::vector<size_t> order(entries.size());
  std::iota(order.begin(), order.end(), size_t(0));
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return io::st_dtype_size(entries[a].dtype) > io::st_dtype_size(entries[b].dtype);
  });
  return order;
}

void hf_weight_entries(engine::param_store& store, const model::llama_config& cfg,
                       std::vector<io::named_f32>& weights, std::vector<int64_t>& units) {
  for (const auto& hf : io::llama_tensor_names(cfg)) {
    const engine::named_param* p = store.find(hf.first);
    FERRY_ASSERT(p != nullptr, "no parameter ", hf.first);
    weights.push_back({p->name, p->shape, nullptr});
    units.push_back(p->unit);
  }
}

const void* slice_data(const engine::state_view& s, const state_slice& x) {
  switch (x.array) {
    case state_array::master: return s.master + x.offset;
    case state_array::exp_avg: return x.offset == 0 ? s.exp_avg : static_cast<const float*>(s.exp_avg) + x.offset;
    case state_array::exp_avg_sq: return x.offset == 0 ? s.exp_avg_sq : static_cast<const float*>(s.exp_avg_sq) + x.offset;
    case state_array::m_scale: return s.m_scale;
    case state_array::v_scale: return s.v_scale;
  }
  return nullptr;
}

std::vector<int64_t> every_unit(const engine::param_store& store) {
  std::vector<int64_t> u(size_t(store.num_units()));
  std::iota(u.begin(), u.end(), int64_t(0));
  return u;
}

void fsync_tree(const std::string& dir) {
  for (const auto& e : fs::directory_iterator(dir)) {
    if (!e.is_regular_file()) continue;
    int fd = ::open(e.path().c_str(), O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
      ::fsync(fd);
      ::close(fd);
    }
  }
  io::fsync_directory(dir);
}

void write_trainer_state(const std::string& dir, engine::engine& e, const trainer_state& st) {
  json js;
  js["step"] = st.step;
  js["data_cursor"] = st.data_cursor;
  const engine::engine_state& es = e.state();
  js["loss_scale"] = es.scaler.scale;
  js["good_steps"] = es.scaler.good_steps;
  js["adam_steps"] = es.optimizer_steps;
  js["seed"] = st.seed;
  js["recent_fixes"] = es.recent_fixes;
  js["model_name"] = st.model_name;
  js["optimizer_state"] = engine::state_kind_name(e.params().state().kind());
  js["run_config"] = json::parse(st.run_config_json.empty() ? "{}" : st.run_config_json);
  io::write_file_atomic((fs::path(dir) / "trainer_state.json").string(), js.dump(2) + "\n");
}

trainer_state read_trainer_state(const std::string& dir, engine::engine_state& es) {
  json js;
  const std::string state_path = (fs::path(dir) / "trainer_state.json").string();
  try {
    js = json::parse(io::read_file(state_path));
  } catch (const json::exception& ex) {
    throw error(state_path + ": not a valid trainer state (" + ex.what() + ")");
  }
  trainer_state st;
  try {
    st.step = js.at("step").get<int64_t>();
    st.data_cursor = js.at("data_cursor").get<int64_t>();
    es.scaler.scale = js.at("loss_scale").get<double>();
    es.scaler.good_steps = js.at("good_steps").get<int64_t>();
    es.optimizer_steps = js.at("adam_steps").get<int64_t>();
    st.seed = js.at("seed").get<uint64_t>();
    es.recent_fixes = js.at("recent_fixes").get<std::vector<bool>>();
    st.model_name = js.value("model_name", "");
    st.optimizer_state = js.value("optimizer_state", "fp32");
  } catch (const json::exception& ex) {
    throw error(state_path + ": missing or malformed field (" + ex.what() + ")");
  }
  return st;
}

void copy_tokenizer(const std::string& dir, const std::string& tokenizer_model) {
  if (tokenizer_model.empty()) return;
  std::error_code ec;
  // A tokenizer.json keeps the tokenizer_config.json beside it (BOS/EOS come from there).
  const bool hf = fs::path(tokenizer_model).extension() == ".json";
  fs::copy_file(tokenizer_model, fs::path(dir) / (hf ? "tokenizer.json" : "tokenizer.model"),
                fs::copy_options::overwrite_existing);
  const fs::path config = fs::path(tokenizer_model).parent_path() / "tokenizer_config.json";
  if (hf && fs::is_regular_file(config, ec))
    fs::copy_file(config, fs::path(dir) / "tokenizer_config.json", fs::copy_options::overwrite_existing);
}

std::string commit(const std::string& tmp_dir, const std::string& output_dir, const std::string& name,
                   int64_t keep_last) {
  const fs::path final_dir = fs::path(output_dir) / name;
  fsync_tree(tmp_dir);
  io::remove_tree(final_dir.string());
  fs::rename(tmp_dir, final_dir);
  io::fsync_directory(output_dir);
  io::write_file_atomic((fs::path(output_dir) / "latest").string(), name + "\n");

  // Rotation, only now that the new checkpoint is committed.
  std::error_code ec;
  std::vector<std::string> all;
  for (const auto& d : fs::directory_iterator(output_dir, ec))
    if (d.is_directory() && d.path().filename().string().rfind("checkpoint-", 0) == 0) all.push_back(d.path().filename());
  std::sort(all.begin(), all.end());
  for (size_t i = 0; i + size_t(keep_last) < all.size(); ++i) io::remove_tree((fs::path(output_dir) / all[i]).string());
  return final_dir.string();
}
}  // namespace parts

namespace {
// optimizer.safetensors' tensors (checkpoint.h) and where each one's bytes are: per parameter its
// fp32 master (and fp32 moments); per unit, after its parameters, the int8 scales; then per unit
// the compact codes. write_safetensors_streamed orders them by decreasing element size, which
// keeps each group in unit order: one sweep over the units for the F32 group and one for the codes.
void optimizer_entries(const engine::param_store& store, engine::state_kind kind, std::vector<io::st_write_entry>& out,
                       std::vector<state_slice>& where) {
  const bool fp32 = kind == engine::state_kind::state_fp32;
  const std::vector<engine::named_param> params = store.named_params();
  auto add = [&](std::string name, const char* dtype, std::vector<int64_t> shape, size_t bytes, state_slice x) {
    out.push_back({std::move(name), dtype, std::move(shape), nullptr, bytes});
    where.push_back(x);
  };
  for (size_t i = 0; i < params.size(); ++i) {
    const engine::named_param& p = params[i];
    const size_t bytes = size_t(p.numel) * 4;
    add(p.name, "F32", p.shape, bytes, {p.unit, state_array::master, p.offset});
    if (fp32) {
      add(p.name + ".exp_avg", "F32", p.shape, bytes, {p.unit, state_array::exp_avg, p.offset});
      add(p.name + ".exp_avg_sq", "F32", p.shape, bytes, {p.unit, state_array::exp_avg_sq, p.offset});
    }
    const bool unit_ends = i + 1 == params.size() || params[i + 1].unit != p.unit;
    if (kind == engine::state_kind::state_int8 && unit_ends) {
      const int64_t blocks = int64_t(cpu_optim::quant_blocks(size_t(store.unit(p.unit).numel)));
      add(unit_tensor(p.unit, ".exp_avg.scale"), "F32", {blocks}, size_t(blocks) * 4, {p.unit, state_array::m_scale, 0});
      add(unit_tensor(p.unit, ".exp_avg_sq.scale"), "F32", {blocks}, size_t(blocks) * 4, {p.unit, state_array::v_scale, 0});
    }
  }
  if (fp32) return;
  const compact_dtypes d = compact_dtypes_of(kind);
  for (int64_t u = 0; u < store.num_units(); ++u) {
    const int64_t n = store.unit(u).numel;
    add(unit_tensor(u, ".exp_avg"), d.m, {n}, size_t(n) * d.elem, {u, state_array::exp_avg, 0});
    add(unit_tensor(u, ".exp_avg_sq"), d.v, {n}, size_t(n) * d.elem, {u, state_array::exp_avg_sq, 0});
  }
}

}  // namespace

std::string save_checkpoint(engine::engine& e, const trainer_state& st, const std::string& output_dir, int64_t keep_last,
                            const std::string& tokenizer_model) {
  FERRY_CHECK(e.params().has_optimizer_state(), "save_checkpoint: an inference (forward_only) engine has no ",
              "optimizer state to save; checkpoints are written by training engines");
  e.wait_updates();
  if (e.params().shards().sharded()) return save_ranks(e, st, output_dir, keep_last, tokenizer_model);
  std::error_code ec;
  fs::create_directories(output_dir, ec);
  FERRY_CHECK(!ec, "cannot create the output directory ", output_dir, ": ", ec.message());
  const std::string name = step_name(st.step);
  const fs::path tmp_dir = fs::path(output_dir) / ("." + name + ".tmp");
  io::remove_tree(tmp_dir.string());
  fs::create_directories(tmp_dir, ec);
  FERRY_CHECK(!ec, "cannot create ", tmp_dir.string(), ": ", ec.message());
  try {
    // The tier's state unit by unit in each file's order (a tier on disk holds only a few units).
    auto& store = e.params();
    engine::state_tier& tier = store.state();
    const engine::state_kind kind = tier.kind();
    std::vector<io::named_f32> weights;
    std::vector<int64_t> weight_units;
    hf_weight_entries(store, e.config(), weights, weight_units);
    std::vector<io::st_write_entry> optim;
    std::vector<state_slice> where;
    optimizer_entries(store, kind, optim, where);
    std::vector<int64_t> optim_units;
    for (size_t i : writer_order(optim)) optim_units.push_back(where[i].unit);
    model::llama_config cfg = e.config();
    {
      unit_cursor cursor(tier, sweep(weight_units), false);
      io::write_hf_checkpoint(tmp_dir.string(), cfg, weights, export_dtype(e.options().dtype), size_t(5) << 30,
                              [&](const io::named_f32& t) {
                                const engine::named_param* p = store.find(t.name);
                                return cursor.at(p->unit).master + p->offset;
                              });
    }
    {
      unit_cursor cursor(tier, sweep(optim_units), false);
      io::write_safetensors_streamed((tmp_dir / "optimizer.safetensors").string(), optim,
                                     {{"format", "ferry-optimizer-v1"}}, [&](size_t i, const io::st_sink& sink) {
                                       sink(slice_data(cursor.at(where[i].unit), where[i]), optim[i].bytes);
                                     });
    }
    write_trainer_state(tmp_dir.string(), e, st);
    copy_tokenizer(tmp_dir.string(), tokenizer_model);
    return commit(tmp_dir.string(), output_dir, name, keep_last);
  } catch (...) {
    io::remove_tree(tmp_dir.string());
    throw;
  }
}

std::string resolve_checkpoint(const std::string& spec, const std::string& output_dir) {
  std::error_code ec;
  if (spec == "latest") {
    fs::path latest = fs::path(output_dir) / "latest";
    FERRY_CONFIG_CHECK(fs::is_regular_file(latest, ec), "resume=latest but ", latest.string(),
                       " does not exist; train once with this output_dir, or pass a checkpoint directory");
    std::string name = io::read_file(latest.string());
    name.erase(name.find_last_not_of(" \n\r\t") + 1);
    fs::path dir = fs::path(output_dir) / name;
    FERRY_CONFIG_CHECK(fs::is_directory(dir, ec), latest.string(), " names ", name, ", which does not exist");
    return dir.string();
  }
  FERRY_CONFIG_CHECK(fs::is_directory(spec, ec), "resume: checkpoint directory ", spec, " does not exist");
  return spec;
}

namespace parts {
void check_model(const io::hf_checkpoint_reader& reader, const std::string& dir, const engine::engine& e) {
  const auto& c = reader.config();
  const auto& m = e.config();
  FERRY_CHECK(c.hidden_size == m.hidden_size && c.num_hidden_layers == m.num_hidden_layers &&
                  c.intermediate_size == m.intermediate_size && c.vocab_size == m.vocab_size &&
                  c.num_attention_heads == m.num_attention_heads && c.num_key_value_heads == m.num_key_value_heads,
              "checkpoint ", dir, " has another shape (hidden ", c.hidden_size, ", layers ", c.num_hidden_layers,
              ", vocab ", c.vocab_size, ") than the model being trained (hidden ", m.hidden_size, ", layers ",
              m.num_hidden_layers, ", vocab ", m.vocab_size, "); use the checkpoint's config.json as --model-config");
  FERRY_CHECK(c.tie_word_embeddings == m.tie_word_embeddings, "checkpoint ", dir,
              c.tie_word_embeddings ? " ties lm_head to the embedding (tie_word_embeddings=true) but the model being trained has its own lm_head"
                                    : " has its own lm_head.weight but the model being trained ties it to the embedding (tie_word_embeddings=true)",
              "; use the checkpoint's config.json as --model-config");
  reader.validate_against_config();
}
}  // namespace parts

void load_hf_weights(engine::engine& e, const std::string& dir) {
  io::hf_checkpoint_reader reader(dir);
  check_model(reader, dir, e);
  auto& store = e.params();
  if (store.shards().sharded()) return load_hf_shards(e, reader);
  const std::vector<engine::named_param> params = store.named_params();   // grouped by unit
  unit_cursor cursor(store.state(), every_unit(store), true);
  for (const auto& p : params) reader.read_f32(p.name, p.shape, cursor.at(p.unit).master + p.offset);
}

namespace {

// The checkpoint's fp32 moments of unit u, gathered from its per-parameter tensors into m, v
// (numel of the unit each).
void read_f32_moments(const io::safetensors_file& opt, const engine::param_store& store, int64_t u, float* m,
                      float* v) {
  for (const auto& p : store.named_params()) {
    if (p.unit != u) continue;
    for (auto [suffix, dst] : {std::pair<const char*, float*>{".exp_avg", m + p.offset}, {".exp_avg_sq", v + p.offset}}) {
      const io::st_tensor_info* t = opt.find(p.name + suffix);
      FERRY_CHECK(t != nullptr, opt.path(), ": missing tensor ", p.name + suffix, " (a checkpoint of another model?)");
      FERRY_CHECK(t->dtype == "F32" && t->shape == p.shape, opt.path(), ": tensor ", p.name + suffix,
                  " has the wrong dtype or shape for this model");
      std::memcpy(dst, opt.data(*t), size_t(p.numel) * 4);
    }
  }
}

// One tensor of unit u's compact moments, checked against the dtype and length it must have.
const io::st_tensor_info& compact_tensor(const io::safetensors_file& opt, int64_t u, const char* what,
                                         const char* dtype, int64_t n, const char* kind) {
  const std::string name = unit_tensor(u, what);
  const io::st_tensor_info* t = opt.find(name);
  FERRY_CHECK(t != nullptr, opt.path(), ": missing tensor ", name, " of the ", kind,
              " optimizer state its trainer_state.json names (a checkpoint of another model?)");
  FERRY_CHECK(t->dtype == dtype && t->shape == std::vector<int64_t>{n}, opt.path(), ": tensor ", name, " is ", t->dtype,
              " of ", t->shape.size() == 1 ? t->shape[0] : -1, " elements; this model's ", kind, " state needs ", dtype,
              " of ", n);
  return *t;
}

// Unit u's moments as the checkpoint holds them in a compact kind: the codes in the mapped file;
// the int8 scales copied into `scales` (2 x blocks floats, aligned).
cpu_optim::moments_ref read_compact_moments(const io::safetensors_file& opt, engine::state_kind kind, int64_t u,
                                            int64_t n, std::vector<float>& scales) {
  const compact_dtypes d = compact_dtypes_of(kind);
  const char* name = engine::state_kind_name(kind);
  cpu_optim::moments_ref r;
  r.kind = engine::moments_kind_of(kind);
  r.n = size_t(n);
  // decode_moments only reads: the const of the mapped file is dropped for moments_ref's fields.
  r.m = const_cast<void*>(opt.data(compact_tensor(opt, u, ".exp_avg", d.m, n, name)));
  r.v = const_cast<void*>(opt.data(compact_tensor(opt, u, ".exp_avg_sq", d.v, n, name)));
  if (kind == engine::state_kind::state_int8) {
    const int64_t blocks = int64_t(cpu_optim::quant_blocks(size_t(n)));
    scales.assign(size_t(2 * blocks), 0.0f);
    std::memcpy(scales.data(), opt.data(compact_tensor(opt, u, ".exp_avg.scale", "F32", blocks, name)), size_t(blocks) * 4);
    std::memcpy(scales.data() + blocks, opt.data(compact_tensor(opt, u, ".exp_avg_sq.scale", "F32", blocks, name)),
                size_t(blocks) * 4);
    r.m_scale = scales.data();
    r.v_scale = scales.data() + blocks;
  }
  return r;
}

// Unit u's moments from the checkpoint (kind `from`) into the acquired view s of the engine's tier:
// bytes copied when the kinds agree, otherwise decoded to fp32 and encoded into the tier's kind.
void load_unit_moments(const io::safetensors_file& opt, const engine::param_store& store, engine::state_kind from,
                       int64_t u, const engine::state_view& s) {
  const engine::state_kind to = store.state().kind();
  const cpu_optim::moments_ref dst = engine::moments_of(s);
  const size_t n = size_t(s.n);
  std::vector<float> scales;
  if (from == engine::state_kind::state_fp32 && to == engine::state_kind::state_fp32) {
    read_f32_moments(opt, store, u, engine::exp_avg_f32(s), engine::exp_avg_sq_f32(s));
    return;
  }
  if (from == to) {
    const cpu_optim::moments_ref src = read_compact_moments(opt, from, u, s.n, scales);
    const size_t elem = compact_dtypes_of(from).elem;
    std::memcpy(dst.m, src.m, n * elem);
    std::memcpy(dst.v, src.v, n * elem);
    if (from == engine::state_kind::state_int8) {
      const size_t blocks = cpu_optim::quant_blocks(n);
      std::memcpy(dst.m_scale, src.m_scale, blocks * 4);
      std::memcpy(dst.v_scale, src.v_scale, blocks * 4);
    }
    return;
  }
  std::vector<float> m32(n), v32(n);
  if (from == engine::state_kind::state_fp32) {
    read_f32_moments(opt, store, u, m32.data(), v32.data());
  } else {
    cpu_optim::decode_moments(read_compact_moments(opt, from, u, s.n, scales), m32.data(), v32.data());
  }
  cpu_optim::encode_moments(m32.data(), v32.data(), dst);
}

}  // namespace

trainer_state load_checkpoint(engine::engine& e, const std::string& dir) {
  FERRY_CHECK(e.params().has_optimizer_state(), "load_checkpoint: an inference (forward_only) engine cannot resume ",
              "training state; load its weights with load_hf_weights");
  engine::engine_state es;
  trainer_state st = read_trainer_state(dir, es);
  engine::state_kind from;
  try {
    from = engine::parse_state_kind(st.optimizer_state);
  } catch (const config_error& ex) {
    throw error((fs::path(dir) / "trainer_state.json").string() + ": " + ex.what());
  }
  check_model(io::hf_checkpoint_reader(dir), dir, e);   // the fp32 masters come from below
  auto& store = e.params();
  std::error_code ec;
  if (store.shards().sharded() || fs::exists(fs::path(dir) / k_manifest, ec)) {
    // Ranks, or a checkpoint written by ranks: each rank takes the pieces that cover its shards.
    load_pieces(e, dir, from);
  } else {
    const std::string opt_path = (fs::path(dir) / "optimizer.safetensors").string();
    io::safetensors_file opt(opt_path);
    const std::vector<engine::named_param> params = store.named_params();   // grouped by unit
    // Unit by unit: its fp32 masters, then its moments, within one lease.
    unit_cursor cursor(store.state(), every_unit(store), true);
    for (size_t i = 0; i < params.size(); ++i) {
      const engine::named_param& p = params[i];
      const engine::state_view& s = cursor.at(p.unit);
      const io::st_tensor_info* t = opt.find(p.name);
      FERRY_CHECK(t != nullptr, opt_path, ": missing tensor ", p.name, " (a checkpoint of another model?)");
      FERRY_CHECK(t->dtype == "F32" && t->shape == p.shape, opt_path, ": tensor ", p.name,
                  " has the wrong dtype or shape for this model");
      std::memcpy(s.master + p.offset, opt.data(*t), size_t(p.numel) * 4);
      if (i + 1 == params.size() || params[i + 1].unit != p.unit) load_unit_moments(opt, store, from, p.unit, s);
    }
    cursor.done();
  }
  e.state() = es;
  e.params_changed();
  return st;
}

}  // namespace ferry::checkpoint
