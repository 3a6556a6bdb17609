// Config loading: every model config in configs/ loads; every kind of bad input gets a one-line
// error naming the source and key; precedence is defaults < JSON file < command line.
#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <fstream>

#include "src/common/error.h"
#include "src/io/hf_config.h"
#include "src/io/run_config.h"
#include "tests/scratch_dir.h"

namespace fs = std::filesystem;
using ferry::config_error;

namespace {
std::string temp_file(const std::string& name, const std::string& text) {
  fs::path p = fs::temp_directory_path() / ("ferry_test_cfg_" + std::to_string(::getpid()) + "_" + name);
  std::ofstream(p) << text;
  return p.string();
}

// Runs fn, expects a config_error whose message contains every needle and no newline.
template <typename F>
void expect_config_error(F fn, std::initializer_list<std::string> needles) {
  try {
    fn();
    FAIL() << "expected a config_error";
  } catch (const config_error& e) {
    std::string msg = e.what();
    EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
    for (const auto& n : needles) EXPECT_NE(msg.find(n), std::string::npos) << "missing '" << n << "' in: " << msg;
  }
}
}  // namespace

TEST(model_configs, every_file_in_configs_loads) {
  int n = 0;
  for (const auto& e : fs::directory_iterator(fs::path(ferry::io::configs_dir()) / "models")) {
    auto c = ferry::io::load_hf_config(e.path().string());
    EXPECT_GT(c.total_params(), 0) << e.path();
    EXPECT_EQ(c.hidden_size % 2, 0);
    ++n;
  }
  EXPECT_GE(n, 8);
}

TEST(model_configs, debug_is_exactly_the_request_shape) {
  auto c = ferry::io::load_hf_config("debug");
  EXPECT_EQ(c.hidden_size, 2048);
  EXPECT_EQ(c.intermediate_size, 4096);
  EXPECT_EQ(c.num_hidden_layers, 20);
  EXPECT_EQ(c.num_attention_heads, 2);
  EXPECT_EQ(c.num_key_value_heads, 2);
  EXPECT_EQ(c.head_dim, 1024);
  EXPECT_EQ(c.vocab_size, 32000);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-6);
  EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);
  EXPECT_FALSE(c.tie_word_embeddings);
}

TEST(model_configs, shapes_have_their_published_sizes) {
  // Parameter counts of the public models these shapes copy (rounded to 10M).
  EXPECT_NEAR(ferry::io::load_hf_config("1b").total_params() / 1e9, 1.10, 0.01);
  EXPECT_NEAR(ferry::io::load_hf_config("3b").total_params() / 1e9, 3.43, 0.01);
  EXPECT_NEAR(ferry::io::load_hf_config("7b").total_params() / 1e9, 6.74, 0.01);
  EXPECT_NEAR(ferry::io::load_hf_config("13b").total_params() / 1e9, 13.02, 0.01);
  EXPECT_NEAR(ferry::io::load_hf_config("65b").total_params() / 1e9, 65.29, 0.02);
}

TEST(model_configs, transformers_4_and_5_spellings) {
  auto v4 = ferry::io::parse_hf_config(R"({"model_type":"llama","hidden_size":64,"num_attention_heads":4,
      "torch_dtype":"bfloat16","rope_theta":500000.0})", "v4");
  auto v5 = ferry::io::parse_hf_config(R"({"model_type":"llama","hidden_size":64,"num_attention_heads":4,
      "dtype":"bfloat16","rope_parameters":{"rope_type":"default","rope_theta":500000.0}})", "v5");
  EXPECT_EQ(v4.torch_dtype, "bfloat16");
  EXPECT_EQ(v5.torch_dtype, "bfloat16");
  EXPECT_DOUBLE_EQ(v4.rope_theta, 500000.0);
  EXPECT_DOUBLE_EQ(v5.rope_theta, 500000.0);
}

// Llama 3.1's rope scaling as both transformers versions spell it, and back out through
// save_hf_config (transformers reads what ferry writes: tests/parity/hf_parity.py's gqa_llama3).
TEST(model_configs, llama3_rope_scaling) {
  const char* v4 = R"({"rope_theta":500000.0,"rope_scaling":{"rope_type":"llama3","factor":32.0,
      "low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}})";
  const char* v5 = R"({"rope_parameters":{"rope_type":"llama3","rope_theta":500000.0,"factor":32.0,
      "low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}})";
  for (const char* text : {v4, v5}) {
    auto c = ferry::io::parse_hf_config(text, "f.json");
    EXPECT_EQ(c.rope_type, "llama3");
    EXPECT_DOUBLE_EQ(c.rope_theta, 500000.0);
    EXPECT_DOUBLE_EQ(c.rope_factor, 32.0);
    EXPECT_DOUBLE_EQ(c.rope_high_freq_factor, 4.0);
    EXPECT_EQ(c.rope_original_max_positions, 8192);
  }
  auto c = ferry::io::parse_hf_config(v5, "f.json");
  ferry::test::scratch_dir d("llama3_rope");
  ferry::io::save_hf_config(c, d.path + "/config.json");
  auto back = ferry::io::load_hf_config(d.path + "/config.json");
  EXPECT_EQ(back.rope_type, "llama3");
  EXPECT_DOUBLE_EQ(back.rope_factor, 32.0);
  EXPECT_DOUBLE_EQ(back.rope_low_freq_factor, 1.0);
  EXPECT_EQ(back.rope_original_max_positions, 8192);
}

TEST(model_configs, bad_inputs) {
  using ferry::io::parse_hf_config;
  expect_config_error([] { parse_hf_config("{not json", "f.json"); }, {"f.json", "not valid JSON"});
  expect_config_error([] { parse_hf_config(R"({"hidden_size":"big"})", "f.json"); }, {"f.json", "hidden_size", "integer"});
  expect_config_error([] { parse_hf_config(R"({"hidden_size":-4})", "f.json"); }, {"hidden_size", ">= 1"});
  expect_config_error([] { parse_hf_config(R"({"model_type":"gpt2"})", "f.json"); }, {"gpt2", "llama"});
  expect_config_error([] { parse_hf_config(R"({"num_attention_heads":32,"num_key_value_heads":5})", "f.json"); },
                      {"num_key_value_heads", "multiple"});
  expect_config_error([] { parse_hf_config(R"({"rope_scaling":{"rope_type":"yarn","factor":4}})", "f.json"); },
                      {"rope_scaling", "yarn"});
  expect_config_error([] { parse_hf_config(R"({"rope_scaling":{"rope_type":"llama3","factor":8}})", "f.json"); },
                      {"rope_scaling", "llama3", "low_freq_factor"});
  expect_config_error([] { parse_hf_config(R"({"rope_parameters":{"rope_type":"linear"}})", "f.json"); },
                      {"rope_parameters", "factor"});
  expect_config_error([] { parse_hf_config(R"({"torch_dtype":"int8"})", "f.json"); }, {"int8", "float16"});
  expect_config_error([] { ferry::io::load_hf_config("no-such-model"); }, {"no-such-model", "debug", "tiny"});
  expect_config_error([] { ferry::io::load_hf_config("/nonexistent/config.json"); }, {"/nonexistent/config.json"});
}

TEST(run_config, defaults_are_the_requests_values) {
  ferry::io::run_config c;
  EXPECT_EQ(c.batch_size, 1);
  EXPECT_DOUBLE_EQ(c.learning_rate, 1e-5);
  EXPECT_EQ(c.max_length, 4096);
  EXPECT_DOUBLE_EQ(c.weight_decay, 0.01);
  EXPECT_DOUBLE_EQ(c.clip_grad, 1.0);
  EXPECT_EQ(c.offload, "overlapped");
}

TEST(run_config, precedence_defaults_file_command_line) {
  std::string f = temp_file("prec.json", R"({"learning_rate": 0.002, "steps": 7, "offload": "blocked"})");
  auto c = ferry::io::load_run_config(f, {"steps=9"});
  EXPECT_DOUBLE_EQ(c.learning_rate, 0.002);  // file over default
  EXPECT_EQ(c.steps, 9);                     // command line over file
  EXPECT_EQ(c.offload, "blocked");
  EXPECT_EQ(c.max_length, 4096);             // default where neither says
  EXPECT_TRUE(c.is_explicit("steps"));
  EXPECT_FALSE(c.is_explicit("max_length"));
  std::remove(f.c_str());
}

TEST(run_config, bad_inputs_name_file_key_and_what_is_valid) {
  std::string f1 = temp_file("unknown.json", R"({"learning_rat": 0.1})");
  expect_config_error([&] { ferry::io::load_run_config(f1, {}); }, {f1, "unknown key", "learning_rat", "learning_rate"});
  std::string f2 = temp_file("type.json", R"({"batch_size": "four"})");
  expect_config_error([&] { ferry::io::load_run_config(f2, {}); }, {f2, "batch_size", "integer"});
  std::string f3 = temp_file("range.json", R"({"beta2": 1.0})");
  expect_config_error([&] { ferry::io::load_run_config(f3, {}); }, {f3, "beta2", "[0, 1)"});
  std::string f4 = temp_file("choice.json", R"({"offload": "sometimes"})");
  expect_config_error([&] { ferry::io::load_run_config(f4, {}); }, {"offload", "none, blocked, overlapped"});
  std::string f5 = temp_file("notjson.json", "{");
  expect_config_error([&] { ferry::io::load_run_config(f5, {}); }, {f5, "not valid JSON"});
  expect_config_error([] { ferry::io::load_run_config("", {"batch_size=0"}); }, {"--set batch_size=0", "batch_size"});
  expect_config_error([] { ferry::io::load_run_config("", {"nokey"}); }, {"key=value"});
  expect_config_error([] { ferry::io::load_run_config("", {"clip_grad=abc"}); }, {"clip_grad", "number"});
  for (auto* f : {&f1, &f2, &f3, &f4, &f5}) std::remove(f->c_str());
}

TEST(run_config, to_json_round_trips) {
  ferry::io::run_config c = ferry::io::load_run_config("", {"steps=11", "data=a.txt,b.txt", "tensorboard=false"});
  ferry::io::run_config d;
  ferry::io::apply_json(d, ferry::io::to_json(c), "round trip");
  EXPECT_EQ(d.steps, 11);
  EXPECT_EQ(d.data, "a.txt,b.txt");
  EXPECT_FALSE(d.tensorboard);
}

// optimizer_state: fp32 by default; bf16 and int8 from a file or --set; anything else is one line
// naming the key and the valid kinds. (offload none with a compact kind is refused by the engine's
// check_options: engine_state_tier.compact_kinds_need_offload and the CLI test cli_none_compact_state.)
TEST(run_config, optimizer_state_key) {
  EXPECT_EQ(ferry::io::run_config().optimizer_state, "fp32");
  EXPECT_EQ(ferry::io::load_run_config("", {"optimizer_state=int8"}).optimizer_state, "int8");
  std::string f = temp_file("state.json", R"({"optimizer_state": "bf16"})");
  EXPECT_EQ(ferry::io::load_run_config(f, {}).optimizer_state, "bf16");
  expect_config_error([] { ferry::io::load_run_config("", {"optimizer_state=int4"}); },
                      {"--set optimizer_state=int4", "optimizer_state", "fp32, bf16, int8"});
  std::string g = temp_file("state_bad.json", R"({"optimizer_state": "fp16"})");
  expect_config_error([&] { ferry::io::load_run_config(g, {}); }, {g, "optimizer_state", "fp32, bf16, int8"});
  for (auto* p : {&f, &g}) std::remove(p->c_str());
}
