#include "src/checkpoint/checkpoint.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
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

namespace {
std::string step_name(int64_t step) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "checkpoint-%06lld", static_cast<long long>(step));
  return buf;
}

std::string export_dtype(at::ScalarType t) { return t == at::kBFloat16 ? "BF16" : t == at::kFloat ? "F32" : "F16"; }

// The per-unit tensors of compact moments (checkpoint.h).
std::string unit_tensor(int64_t u, const char* what) { return "optimizer.unit" + std::to_string(u) + what; }

// safetensors dtype and element size of exp_avg (m) and exp_avg_sq (v) in a compact kind.
struct compact_dtypes {
  const char* m;
  const char* v;
  size_t elem;
};
compact_dtypes compact_dtypes_of(engine::state_kind k) {
  return k == engine::state_kind::state_bf16 ? compact_dtypes{"BF16", "BF16", 2} : compact_dtypes{"I8", "U8", 1};
}

// The compact moments of every unit, as st_write_entry rows pointing into the leased views.
void add_compact_moments(std::vector<io::st_write_entry>& out, engine::state_kind kind,
                         const std::vector<std::unique_ptr<engine::state_lease>>& leases) {
  const compact_dtypes d = compact_dtypes_of(kind);
  for (size_t u = 0; u < leases.size(); ++u) {
    const engine::state_view& s = **leases[u];
    const int64_t n = s.n, blocks = int64_t(cpu_optim::quant_blocks(size_t(n)));
    out.push_back({unit_tensor(int64_t(u), ".exp_avg"), d.m, {n}, s.exp_avg, size_t(n) * d.elem});
    out.push_back({unit_tensor(int64_t(u), ".exp_avg_sq"), d.v, {n}, s.exp_avg_sq, size_t(n) * d.elem});
    if (kind == engine::state_kind::state_int8) {
      out.push_back({unit_tensor(int64_t(u), ".exp_avg.scale"), "F32", {blocks}, s.m_scale, size_t(blocks) * 4});
      out.push_back({unit_tensor(int64_t(u), ".exp_avg_sq.scale"), "F32", {blocks}, s.v_scale, size_t(blocks) * 4});
    }
  }
}

void fsync_tree(const fs::path& dir) {
  for (const auto& e : fs::directory_iterator(dir)) {
    if (!e.is_regular_file()) continue;
    int fd = ::open(e.path().c_str(), O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
      ::fsync(fd);
      ::close(fd);
    }
  }
  io::fsync_directory(dir.string());
}
}  // namespace

std::string save_checkpoint(engine::engine& e, const trainer_state& st, const std::string& output_dir, int64_t keep_last,
                            const std::string& tokenizer_model) {
  FERRY_CHECK(e.params().has_optimizer_state(), "save_checkpoint: an inference (forward_only) engine has no ",
              "optimizer state to save; checkpoints are written by training engines");
  e.wait_updates();
  std::error_code ec;
  fs::create_directories(output_dir, ec);
  FERRY_CHECK(!ec, "cannot create the output directory ", output_dir, ": ", ec.message());
  const std::string name = step_name(st.step);
  const fs::path final_dir = fs::path(output_dir) / name;
  const fs::path tmp_dir = fs::path(output_dir) / ("." + name + ".tmp");
  io::remove_tree(tmp_dir.string());
  fs::create_directories(tmp_dir, ec);
  FERRY_CHECK(!ec, "cannot create ", tmp_dir.string(), ": ", ec.message());
  try {
    // The tier's state of every unit, held while it is written (the host tier hands out its own
    // buffers; a tier on disk reads each unit in).
    auto& store = e.params();
    std::vector<std::unique_ptr<engine::state_lease>> leases;
    for (int64_t u = 0; u < store.num_units(); ++u)
      leases.push_back(std::make_unique<engine::state_lease>(store.state(), u, false));
    const engine::state_kind kind = store.state().kind();
    std::vector<io::named_f32> weights;
    std::vector<io::st_write_entry> optim;
    for (const auto& p : store.named_params()) {
      const engine::state_view& s = **leases[size_t(p.unit)];
      const size_t bytes = size_t(p.numel) * 4;
      weights.push_back({p.name, p.shape, s.master + p.offset});
      optim.push_back({p.name, "F32", p.shape, s.master + p.offset, bytes});
      if (kind != engine::state_kind::state_fp32) continue;
      optim.push_back({p.name + ".exp_avg", "F32", p.shape, engine::exp_avg_f32(s) + p.offset, bytes});
      optim.push_back({p.name + ".exp_avg_sq", "F32", p.shape, engine::exp_avg_sq_f32(s) + p.offset, bytes});
    }
    if (kind != engine::state_kind::state_fp32) add_compact_moments(optim, kind, leases);
    model::llama_config cfg = e.config();
    io::write_hf_checkpoint(tmp_dir.string(), cfg, weights, export_dtype(e.options().dtype));
    io::write_safetensors((tmp_dir / "optimizer.safetensors").string(), optim, {{"format", "ferry-optimizer-v1"}});
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
    js["optimizer_state"] = engine::state_kind_name(kind);
    js["run_config"] = json::parse(st.run_config_json.empty() ? "{}" : st.run_config_json);
    io::write_file_atomic((tmp_dir / "trainer_state.json").string(), js.dump(2) + "\n");
    if (!tokenizer_model.empty()) {
      // A tokenizer.json keeps the tokenizer_config.json beside it (BOS/EOS come from there).
      const bool hf = fs::path(tokenizer_model).extension() == ".json";
      fs::copy_file(tokenizer_model, tmp_dir / (hf ? "tokenizer.json" : "tokenizer.model"),
                    fs::copy_options::overwrite_existing);
      const fs::path config = fs::path(tokenizer_model).parent_path() / "tokenizer_config.json";
      if (hf && fs::is_regular_file(config, ec))
        fs::copy_file(config, tmp_dir / "tokenizer_config.json", fs::copy_options::overwrite_existing);
    }
    fsync_tree(tmp_dir);
    io::remove_tree(final_dir.string());
    fs::rename(tmp_dir, final_dir);
    io::fsync_directory(output_dir);
  } catch (...) {
    io::remove_tree(tmp_dir.string());
    throw;
  }
  io::write_file_atomic((fs::path(output_dir) / "latest").string(), name + "\n");

  // Rotation, only now that the new checkpoint is committed.
  std::vector<std::string> all;
  for (const auto& d : fs::directory_iterator(output_dir, ec))
    if (d.is_directory() && d.path().filename().string().rfind("checkpoint-", 0) == 0) all.push_back(d.path().filename());
  std::sort(all.begin(), all.end());
  for (size_t i = 0; i + size_t(keep_last) < all.size(); ++i) io::remove_tree((fs::path(output_dir) / all[i]).string());
  return final_dir.string();
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

void load_hf_weights(engine::engine& e, const std::string& dir) {
  io::hf_checkpoint_reader reader(dir);
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
  auto& store = e.params();
  for (const auto& p : store.named_params()) {
    engine::state_lease s(store.state(), p.unit, true);
    reader.read_f32(p.name, p.shape, s->master + p.offset);
  }
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

// The checkpoint's moments (kind `from`) into the engine's tier: bytes copied when the kinds agree,
// otherwise decoded to fp32 and encoded into the tier's kind.
void load_moments(const io::safetensors_file& opt, engine::param_store& store, engine::state_kind from) {
  const engine::state_kind to = store.state().kind();
  std::vector<float> m32, v32, scales;
  for (int64_t u = 0; u < store.num_units(); ++u) {
    engine::state_lease s(store.state(), u, true);
    const cpu_optim::moments_ref dst = engine::moments_of(*s);
    const size_t n = size_t(s->n);
    if (from == engine::state_kind::state_fp32 && to == engine::state_kind::state_fp32) {
      read_f32_moments(opt, store, u, engine::exp_avg_f32(*s), engine::exp_avg_sq_f32(*s));
      continue;
    }
    if (from == to) {
      const cpu_optim::moments_ref src = read_compact_moments(opt, from, u, s->n, scales);
      const size_t elem = compact_dtypes_of(from).elem;
      std::memcpy(dst.m, src.m, n * elem);
      std::memcpy(dst.v, src.v, n * elem);
      if (from == engine::state_kind::state_int8) {
        const size_t blocks = cpu_optim::quant_blocks(n);
        std::memcpy(dst.m_scale, src.m_scale, blocks * 4);
        std::memcpy(dst.v_scale, src.v_scale, blocks * 4);
      }
      continue;
    }
    m32.resize(n);
    v32.resize(n);
    if (from == engine::state_kind::state_fp32) {
      read_f32_moments(opt, store, u, m32.data(), v32.data());
    } else {
      cpu_optim::decode_moments(read_compact_moments(opt, from, u, s->n, scales), m32.data(), v32.data());
    }
    cpu_optim::encode_moments(m32.data(), v32.data(), dst);
  }
}

}  // namespace

trainer_state load_checkpoint(engine::engine& e, const std::string& dir) {
  FERRY_CHECK(e.params().has_optimizer_state(), "load_checkpoint: an inference (forward_only) engine cannot resume ",
              "training state; load its weights with load_hf_weights");
  json js;
  const std::string state_path = (fs::path(dir) / "trainer_state.json").string();
  try {
    js = json::parse(io::read_file(state_path));
  } catch (const json::exception& ex) {
    throw error(state_path + ": not a valid trainer state (" + ex.what() + ")");
  }
  trainer_state st;
  engine::engine_state es;
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
  engine::state_kind from;
  try {
    from = engine::parse_state_kind(st.optimizer_state);
  } catch (const config_error& ex) {
    throw error(state_path + ": " + ex.what());
  }

  load_hf_weights(e, dir);  // validates shape and files; overwritten below by the fp32 masters
  const std::string opt_path = (fs::path(dir) / "optimizer.safetensors").string();
  io::safetensors_file opt(opt_path);
  auto& store = e.params();
  for (const auto& p : store.named_params()) {
    engine::state_lease s(store.state(), p.unit, true);
    const io::st_tensor_info* t = opt.find(p.name);
    FERRY_CHECK(t != nullptr, opt_path, ": missing tensor ", p.name, " (a checkpoint of another model?)");
    FERRY_CHECK(t->dtype == "F32" && t->shape == p.shape, opt_path, ": tensor ", p.name,
                " has the wrong dtype or shape for this model");
    std::memcpy(s->master + p.offset, opt.data(*t), size_t(p.numel) * 4);
  }
  load_moments(opt, store, from);
  e.state() = es;
  e.params_changed();
  return st;
}

}  // namespace ferry::checkpoint
