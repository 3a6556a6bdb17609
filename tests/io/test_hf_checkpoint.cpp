// HF checkpoints: write/read round trips in F32/BF16/F16, sharded and tied, validation against
// config.json, and the errors for a wrong shape, a missing tensor and a missing directory.
#include <gtest/gtest.h>

#include <filesystem>
#include <nlohmann/json.hpp>
#include <random>

#include "src/io/half_convert.h"
#include "src/io/hf_checkpoint.h"
#include "src/io/hf_config.h"
#include "src/io/safetensors.h"
#include "tests/io/io_test_util.h"
#include "tests/test_configs.h"

namespace ferry::io {
namespace {
namespace fs = std::filesystem;
using test::scratch_dir;

model::llama_config tiny_config(bool tied) {
  // vocab, hidden, intermediate, layers, heads, kv_heads, head_dim
  model::llama_config c = ::ferry::test::tiny_llama("tiny", {37, 16, 24, 2, 4, 2, 4});
  c.tie_word_embeddings = tied;
  return c;
}

struct model_weights {
  std::vector<std::pair<std::string, std::vector<int64_t>>> names;
  std::vector<std::vector<float>> data;
  std::vector<named_f32> views() const {
    std::vector<named_f32> v;
    for (size_t i = 0; i < names.size(); ++i) v.push_back({names[i].first, names[i].second, data[i].data()});
    return v;
  }
};

model_weights random_weights(const model::llama_config& cfg, uint32_t seed) {
  model_weights w;
  w.names = llama_tensor_names(cfg);
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (const auto& [name, shape] : w.names) {
    size_t n = 1;
    for (int64_t d : shape) n *= static_cast<size_t>(d);
    std::vector<float> v(n);
    for (auto& x : v) x = nd(rng);
    w.data.push_back(std::move(v));
  }
  return w;
}

float round_to(const std::string& dtype, float x) {
  if (dtype == "BF16") return bf16_to_f32(f32_to_bf16(x));
  if (dtype == "F16") return f16_to_f32(f32_to_f16(x));
  return x;
}

void expect_reads_back(const std::string& dir, const model_weights& w, const std::string& dtype) {
  hf_checkpoint_reader r(dir);
  r.validate_against_config();
  for (size_t i = 0; i < w.names.size(); ++i) {
    ASSERT_TRUE(r.contains(w.names[i].first));
    std::vector<float> got(w.data[i].size(), -1.f);
    r.read_f32(w.names[i].first, w.names[i].second, got.data());
    for (size_t j = 0; j < got.size(); ++j)
      ASSERT_EQ(got[j], round_to(dtype, w.data[i][j])) << w.names[i].first << "[" << j << "]";
  }
}

TEST(hf_checkpoint, tensor_names_follow_hf) {
  auto cfg = tiny_config(false);
  auto names = llama_tensor_names(cfg);
  ASSERT_EQ(names.size(), 1u + 9u * 2u + 2u);
  EXPECT_EQ(names.front().first, "model.embed_tokens.weight");
  EXPECT_EQ(names[2].first, "model.layers.0.self_attn.k_proj.weight");
  EXPECT_EQ(names[2].second, (std::vector<int64_t>{8, 16}));
  EXPECT_EQ(names[4].second, (std::vector<int64_t>{16, 16}));  // o_proj (hidden, q_dim)
  EXPECT_EQ(names.back().first, "lm_head.weight");
  int64_t total = 0;
  for (const auto& [n, s] : names) {
    int64_t k = 1;
    for (int64_t d : s) k *= d;
    total += k;
  }
  EXPECT_EQ(total, cfg.total_params());
  cfg.tie_word_embeddings = true;
  EXPECT_EQ(llama_tensor_names(cfg).back().first, "model.norm.weight");
}

class hf_round_trip : public ::testing::TestWithParam<std::string> {};

TEST_P(hf_round_trip, single_file) {
  scratch_dir dir;
  auto cfg = tiny_config(false);
  auto w = random_weights(cfg, 1);
  write_hf_checkpoint(dir.path(), cfg, w.views(), GetParam());
  EXPECT_TRUE(fs::exists(dir / "model.safetensors"));
  EXPECT_FALSE(fs::exists(dir / "model.safetensors.index.json"));
  expect_reads_back(dir.path(), w, GetParam());
  hf_checkpoint_reader r(dir.path());
  EXPECT_EQ(r.config().hidden_size, 16);
  EXPECT_EQ(r.config().num_key_value_heads, 2);
  EXPECT_EQ(r.config().torch_dtype, GetParam() == "F32" ? "float32" : GetParam() == "F16" ? "float16" : "bfloat16");
  safetensors_file f(dir / "model.safetensors");
  EXPECT_EQ(f.metadata().at("format"), "pt");
  EXPECT_EQ(f.tensors().front().dtype, GetParam());
}

INSTANTIATE_TEST_SUITE_P(dtypes, hf_round_trip, ::testing::Values("F32", "F16", "BF16"));

TEST(hf_checkpoint, sharded_round_trip_and_relayout) {
  scratch_dir dir;
  auto cfg = tiny_config(false);
  auto w = random_weights(cfg, 2);
  write_hf_checkpoint(dir.path(), cfg, w.views(), "F32", 4096);
  ASSERT_TRUE(fs::exists(dir / "model.safetensors.index.json"));
  auto index = nlohmann::json::parse(test::read_bytes(dir / "model.safetensors.index.json"));
  std::set<std::string> files;
  size_t total = 0;
  for (auto& [name, file] : index["weight_map"].items()) files.insert(file.get<std::string>());
  for (const auto& v : w.data) total += v.size() * 4;
  EXPECT_GT(files.size(), 2u);
  EXPECT_EQ(index["metadata"]["total_size"].get<size_t>(), total);
  for (const auto& f : files) {
    EXPECT_TRUE(fs::file_size(dir / f) <= 4096 + 2048) << f;  // header overhead only
    EXPECT_NE(f.find("-of-"), std::string::npos);
  }
  EXPECT_FALSE(fs::exists(dir / "model.safetensors"));
  expect_reads_back(dir.path(), w, "F32");

  // Rewriting unsharded into the same directory removes the old shards and index.
  auto w2 = random_weights(cfg, 3);
  write_hf_checkpoint(dir.path(), cfg, w2.views(), "BF16");
  EXPECT_FALSE(fs::exists(dir / "model.safetensors.index.json"));
  for (const auto& f : files) EXPECT_FALSE(fs::exists(dir / f)) << f;
  expect_reads_back(dir.path(), w2, "BF16");
}

TEST(hf_checkpoint, tied_embeddings) {
  scratch_dir dir;
  auto cfg = tiny_config(true);
  auto w = random_weights(cfg, 4);
  write_hf_checkpoint(dir.path(), cfg, w.views(), "F16");
  hf_checkpoint_reader r(dir.path());
  EXPECT_TRUE(r.config().tie_word_embeddings);
  EXPECT_FALSE(r.contains("lm_head.weight"));
  EXPECT_NO_THROW(r.validate_against_config());
  expect_reads_back(dir.path(), w, "F16");
}

TEST(hf_checkpoint, wrong_shape_error) {
  scratch_dir dir;
  auto cfg = tiny_config(false);
  auto w = random_weights(cfg, 5);
  write_hf_checkpoint(dir.path(), cfg, w.views(), "F32");
  hf_checkpoint_reader r(dir.path());
  std::vector<float> buf(64 * 16);
  EXPECT_ERROR_HAS(r.read_f32("model.embed_tokens.weight", {64, 16}, buf.data()), dir.path().c_str(),
                   "model.safetensors", "'model.embed_tokens.weight'", "[37, 16]", "expects [64, 16]");
  EXPECT_ERROR_HAS(r.read_f32("model.layers.7.mlp.up_proj.weight", {24, 16}, buf.data()),
                   "'model.layers.7.mlp.up_proj.weight'");
}

TEST(hf_checkpoint, validate_against_another_config) {
  scratch_dir dir;
  auto cfg = tiny_config(false);
  auto w = random_weights(cfg, 6);
  write_hf_checkpoint(dir.path(), cfg, w.views(), "F32");
  auto other = cfg;
  other.intermediate_size = 32;
  other.num_hidden_layers = 3;
  save_hf_config(other, dir / "config.json");
  hf_checkpoint_reader r(dir.path());
  EXPECT_ERROR_HAS(r.validate_against_config(), "does not match its config.json", "mlp.gate_proj.weight",
                   "[24, 16]", "[32, 16]", "more");
  // A tied config for an untied checkpoint (lm_head.weight there, and unlike the embedding): refused.
  auto tied = cfg;
  tied.tie_word_embeddings = true;
  save_hf_config(tied, dir / "config.json");
  EXPECT_ERROR_HAS(hf_checkpoint_reader(dir.path()).validate_against_config(), "tie_word_embeddings",
                   "lm_head.weight differs");
}

// A tied checkpoint that also stores lm_head.weight (some exporters write both): transformers ties
// them when the values are equal and unties them when they differ. ferry validates the first kind
// (also with lm_head in another dtype holding the same values) and refuses the second with one line
// that says what to change.
TEST(hf_checkpoint, tied_with_lm_head_beside_the_embedding) {
  auto tied = tiny_config(true);
  auto w = random_weights(tied, 9);
  const std::vector<float>& emb = w.data[0];
  ASSERT_EQ(w.names[0].first, "model.embed_tokens.weight");
  std::vector<float> emb_bf16(emb.size());
  for (size_t i = 0; i < emb.size(); ++i) emb_bf16[i] = round_to("BF16", emb[i]);
  auto write_with_lm = [&](const std::string& dir, const std::vector<float>& embed, const std::vector<float>& lm,
                           const char* lm_dtype) {
    // The embedding and lm_head as an untied checkpoint, then its config.json saying tied.
    auto untied = tiny_config(false);
    auto all = random_weights(untied, 9);
    all.data[0] = embed;
    all.data.back() = lm;
    write_hf_checkpoint(dir, untied, all.views(), "F32");
    if (std::string(lm_dtype) != "F32") {   // lm_head re-stored in lm_dtype
      std::vector<uint16_t> half(lm.size());
      convert_from_f32(lm.data(), lm.size(), lm_dtype, half.data());
      hf_checkpoint_reader r(dir);
      std::vector<st_write_entry> entries;
      std::vector<std::vector<float>> keep;
      for (const auto& [name, shape] : llama_tensor_names(untied)) {
        if (name == "lm_head.weight") {
          entries.push_back({name, lm_dtype, shape, half.data(), half.size() * 2});
          continue;
        }
        size_t n = 1;
        for (int64_t d : shape) n *= size_t(d);
        keep.emplace_back(n);
        r.read_f32(name, shape, keep.back().data());
        entries.push_back({name, "F32", shape, keep.back().data(), n * 4});
      }
      write_safetensors(dir + "/model.safetensors", entries, {{"format", "pt"}});
    }
    save_hf_config(tied, dir + "/config.json");
  };
  scratch_dir dir;
  write_with_lm(dir / "equal", emb, emb, "F32");
  EXPECT_NO_THROW(hf_checkpoint_reader(dir / "equal").validate_against_config());
  write_with_lm(dir / "equal_bf16", emb_bf16, emb_bf16, "BF16");
  EXPECT_NO_THROW(hf_checkpoint_reader(dir / "equal_bf16").validate_against_config());
  std::vector<float> other = emb;
  other[other.size() / 2] += 1.0f;
  write_with_lm(dir / "differ", emb, other, "F32");
  EXPECT_ERROR_HAS(hf_checkpoint_reader(dir / "differ").validate_against_config(), "tie_word_embeddings",
                   "lm_head.weight differs from model.embed_tokens.weight", "false", "config.json");
  write_with_lm(dir / "differ_bf16", emb, emb, "BF16");   // rounding to bf16 changes the values
  EXPECT_ERROR_HAS(hf_checkpoint_reader(dir / "differ_bf16").validate_against_config(), "differs");
}

TEST(hf_checkpoint, missing_pieces) {
  scratch_dir dir;
  EXPECT_ERROR_HAS(hf_checkpoint_reader(dir / "nope"), "does not exist");
  EXPECT_ERROR_HAS(hf_checkpoint_reader(dir.path()), "no config.json");
  auto cfg = tiny_config(false);
  save_hf_config(cfg, dir / "config.json");
  EXPECT_ERROR_HAS(hf_checkpoint_reader(dir.path()), "neither model.safetensors nor model.safetensors.index.json");
  auto w = random_weights(cfg, 7);
  write_hf_checkpoint(dir.path(), cfg, w.views(), "F32", 4096);
  auto index = nlohmann::json::parse(test::read_bytes(dir / "model.safetensors.index.json"));
  const std::string last = index["weight_map"]["lm_head.weight"].get<std::string>();
  fs::remove(dir / last);
  EXPECT_ERROR_HAS(hf_checkpoint_reader(dir.path()), "shard " + last + " is missing");
}

TEST(hf_checkpoint, corrupt_shard_names_file) {
  scratch_dir dir;
  auto cfg = tiny_config(false);
  auto w = random_weights(cfg, 8);
  write_hf_checkpoint(dir.path(), cfg, w.views(), "F32");
  std::string raw = test::read_bytes(dir / "model.safetensors");
  test::write_bytes(dir / "model.safetensors", raw.substr(0, raw.size() / 2));
  EXPECT_ERROR_HAS(hf_checkpoint_reader(dir.path()), "model.safetensors", "truncated");
}

}  // namespace
}  // namespace ferry::io
