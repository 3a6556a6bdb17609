// The training loop on the host backend: schedules, exact resume, checkpoints and their errors.
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <unistd.h>

#include <csignal>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "src/cli/cli_options.h"
#include "src/cli/wiring.h"
#include "src/common/error.h"
#include "src/engine/engine.h"
#include "src/io/atomic_file.h"
#include "src/io/hf_text.h"
#include "src/io/tokenizer.h"
#include "tests/scratch_dir.h"
#include "src/checkpoint/checkpoint.h"
#include "src/train/lr_schedule.h"
#include "src/train/trainer.h"

namespace fs = std::filesystem;
using namespace ferry;

namespace {
// A scratch directory per test (tests/scratch_dir.h).
struct scratch_dir : ::ferry::test::scratch_dir {
  scratch_dir() : ::ferry::test::scratch_dir("ferry_train_test") {}
};

std::string write_corpus(const std::string& dir) {
  std::string p = dir + "/corpus.txt";
  std::ofstream f(p);
  for (int i = 0; i < 400; ++i) f << "ferry moves weights across the bus, line " << i << " of a small corpus.\n";
  return p;
}

io::run_config config_for(const std::string& dir, const std::string& corpus, int64_t steps) {
  io::run_config c = io::load_run_config("", {"model=tiny", "device=cpu", "dtype=fp32", "max_length=32",
                                              "batch_size=2", "learning_rate=0.003", "cpu_threads=2",
                                              "tensorboard=false", "log_every=100", "clip_grad=0.5",
                                              "data=" + corpus, "output_dir=" + dir + "/run",
                                              "steps=" + std::to_string(steps)});
  cli::resolve_auto(c, false);
  return c;
}

int run_train(const io::run_config& c) {
  model::llama_config mc = cli::resolve_model(c);
  return train::run_training(c, mc, cli::engine_options_for(c, mc), cli::data_options_for(c, mc));
}

std::vector<double> losses(const std::string& metrics) {
  std::vector<double> out;
  std::ifstream f(metrics);
  for (std::string line; std::getline(f, line);) out.push_back(nlohmann::json::parse(line)["loss"].get<double>());
  return out;
}
}  // namespace

TEST(lr_schedule, warmup_then_decay) {
  train::lr_schedule s{1.0, 10, 110, "cosine", 0.1};
  EXPECT_DOUBLE_EQ(s.at(1), 0.1);
  EXPECT_DOUBLE_EQ(s.at(10), 1.0);
  EXPECT_NEAR(s.at(60), 0.55, 1e-12);   // halfway through the decay: (1 + 0.1) / 2
  EXPECT_NEAR(s.at(110), 0.1, 1e-12);
  train::lr_schedule lin{1.0, 0, 100, "linear", 0.0};
  EXPECT_NEAR(lin.at(50), 0.5, 1e-12);
  train::lr_schedule k{2.0, 0, 100, "constant", 0.0};
  EXPECT_DOUBLE_EQ(k.at(77), 2.0);
}

TEST(trainer, loss_falls_and_final_checkpoint_is_written) {
  scratch_dir d;
  auto c = config_for(d.path, write_corpus(d.path), 12);
  ASSERT_EQ(run_train(c), 0);
  auto l = losses(c.output_dir + "/metrics.jsonl");
  ASSERT_EQ(l.size(), 12u);
  EXPECT_LT(l.back(), l.front() - 0.5) << "loss did not fall";
  EXPECT_TRUE(fs::is_regular_file(c.output_dir + "/latest"));
  EXPECT_TRUE(fs::is_regular_file(c.output_dir + "/checkpoint-000012/model.safetensors"));
  EXPECT_TRUE(fs::is_regular_file(c.output_dir + "/checkpoint-000012/optimizer.safetensors"));
  EXPECT_TRUE(fs::is_regular_file(c.output_dir + "/checkpoint-000012/config.json"));
}

// Prompt/completion data, one example per row and packed: every step's trained_tokens is the
// number of labels the dataset gave it that are not -100 (only completions and their EOS), rows
// are cut after the longest, and the loss falls.
TEST(trainer, instruction_data_reports_trained_tokens_per_step) {
  for (bool packing : {false, true}) {
  SCOPED_TRACE(packing ? "packed" : "padded");
  scratch_dir d;
  const std::string data = d.path + "/sft.jsonl";
  {
    std::ofstream f(data);
    for (int i = 0; i < 60; ++i)
      f << R"({"prompt": "question )" << i << R"( of many:", "completion": " answer )" << (i % 3) << R"(."})" << "\n";
  }
  auto c = config_for(d.path, data, 10);
  c.grad_accum = 2;
  c.max_length = packing ? 72 : 48;  // 31 or 32 tokens each: padded rows are cut to 32 columns, two fit packed
  c.packing = packing;
  ASSERT_EQ(run_train(c), 0);
  model::llama_config mc = cli::resolve_model(c);
  const io::token_dataset ds = io::token_dataset::open(cli::data_options_for(c, mc));
  ASSERT_TRUE(ds.has_examples());
  const int64_t B = c.batch_size, T = c.max_length;
  std::vector<int64_t> in(size_t(B * T)), lab(in.size()), pos(in.size());
  std::ifstream f(c.output_dir + "/metrics.jsonl");
  int64_t cursor = 0, steps = 0;
  std::vector<double> loss;
  for (std::string line; std::getline(f, line); ++steps) {
    const auto m = nlohmann::json::parse(line);
    int64_t trained = 0, tokens = 0;
    for (int64_t a = 0; a < c.grad_accum; ++a, cursor += B) {
      const int64_t cols = ds.train_rows(cursor, B, {in.data(), lab.data(), pos.data()});
      tokens += B * cols;
      for (int64_t b = 0; b < B; ++b)
        for (int64_t t = 0; t < T; ++t) trained += lab[size_t(b * T + t)] != -100;
    }
    EXPECT_EQ(m["trained_tokens"].get<int64_t>(), trained) << "step " << steps + 1;
    EXPECT_EQ(m["tokens"].get<int64_t>(), tokens) << "step " << steps + 1;
    EXPECT_LT(tokens, c.grad_accum * B * T) << "padding past the longest row is not run";
    EXPECT_GT(trained, packing ? c.grad_accum * B * 11 : 0) << "packed rows hold more than one example (11 targets each)";
    loss.push_back(m["loss"].get<double>());
    // The process's resident memory after the step: the model's state is anonymous memory.
    EXPECT_GT(m["host_rss_anon"].get<int64_t>(), 1 << 20) << "step " << steps + 1;
    EXPECT_GT(m["host_rss_file"].get<int64_t>(), 0) << "step " << steps + 1;
    EXPECT_GE(m["host_rss_shmem"].get<int64_t>(), 0) << "step " << steps + 1;
  }
  ASSERT_EQ(steps, 10);
  EXPECT_EQ(ds.packed(), packing);
  EXPECT_LT(loss.back(), loss.front() - 0.5) << "loss did not fall";
  }
}

TEST(trainer, resume_continues_exactly_as_the_uninterrupted_run) {
  scratch_dir d;
  std::string corpus = write_corpus(d.path);
  auto full = config_for(d.path + "/a", corpus, 8);
  fs::create_directories(d.path + "/a");
  ASSERT_EQ(run_train(full), 0);
  auto ref = losses(full.output_dir + "/metrics.jsonl");

  fs::create_directories(d.path + "/b");
  auto first = config_for(d.path + "/b", corpus, 4);
  ASSERT_EQ(run_train(first), 0);
  auto second = config_for(d.path + "/b", corpus, 8);
  second.resume = "latest";
  ASSERT_EQ(run_train(second), 0);
  auto got = losses(second.output_dir + "/metrics.jsonl");
  ASSERT_EQ(got.size(), ref.size());
  for (size_t i = 0; i < ref.size(); ++i) EXPECT_EQ(got[i], ref[i]) << "step " << i + 1;
}

TEST(trainer, keep_last_rotates_only_committed_checkpoints) {
  scratch_dir d;
  auto c = config_for(d.path, write_corpus(d.path), 6);
  c.save_every = 2;
  c.keep_last = 2;
  ASSERT_EQ(run_train(c), 0);
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(c.output_dir))
    if (e.path().filename().string().rfind("checkpoint-", 0) == 0) names.push_back(e.path().filename());
  std::sort(names.begin(), names.end());
  EXPECT_EQ(names, (std::vector<std::string>{"checkpoint-000004", "checkpoint-000006"}));
}

TEST(trainer, bad_checkpoints_give_clear_errors_and_damage_nothing) {
  scratch_dir d;
  std::string corpus = write_corpus(d.path);
  auto c = config_for(d.path, corpus, 2);
  ASSERT_EQ(run_train(c), 0);
  std::string ckpt = c.output_dir + "/checkpoint-000002";
  auto size_before = fs::file_size(ckpt + "/optimizer.safetensors");

  // truncated optimizer state
  std::string broken = d.path + "/broken";
  fs::create_directories(broken);
  for (const auto& e : fs::directory_iterator(ckpt)) fs::copy_file(e.path(), broken + "/" + e.path().filename().string());
  fs::resize_file(broken + "/optimizer.safetensors", size_before / 2);
  auto r = c;
  r.resume = broken;
  r.steps = 3;
  try {
    run_train(r);
    FAIL() << "resumed from a truncated checkpoint";
  } catch (const ferry::error& e) {
    EXPECT_NE(std::string(e.what()).find("optimizer.safetensors"), std::string::npos) << e.what();
  }

  // a checkpoint of another shape
  try {
    model::llama_config mc = cli::resolve_model(c);
    mc.num_hidden_layers = 2;  // tiny has 4
    engine::engine e(mc, cli::engine_options_for(c, mc));
    checkpoint::load_checkpoint(e, ckpt);
    FAIL() << "loaded a checkpoint of another shape";
  } catch (const ferry::error& e) {
    EXPECT_NE(std::string(e.what()).find("another shape"), std::string::npos) << e.what();
  }
  EXPECT_EQ(fs::file_size(ckpt + "/optimizer.safetensors"), size_before);

  // resume=latest without a checkpoint
  auto none = config_for(d.path + "/empty", corpus, 2);
  fs::create_directories(d.path + "/empty");
  none.resume = "latest";
  EXPECT_THROW(run_train(none), ferry::config_error);
}

TEST(trainer, full_disk_during_save_keeps_the_previous_checkpoint) {
  scratch_dir d;
  auto c = config_for(d.path, write_corpus(d.path), 2);
  ASSERT_EQ(run_train(c), 0);
  std::string latest_before = io::read_file(c.output_dir + "/latest");

  // RLIMIT_FSIZE makes writes past the limit fail with EFBIG, as a full disk would.
  model::llama_config mc = cli::resolve_model(c);
  engine::engine e(mc, cli::engine_options_for(c, mc));
  e.params().init_random(1, 0.02);
  e.params_changed();
  checkpoint::trainer_state st;
  st.step = 3;
  struct rlimit old_limit;
  getrlimit(RLIMIT_FSIZE, &old_limit);
  auto old_handler = std::signal(SIGXFSZ, SIG_IGN);
  struct rlimit small = old_limit;
  small.rlim_cur = 4096;
  setrlimit(RLIMIT_FSIZE, &small);
  bool threw = false;
  try {
    checkpoint::save_checkpoint(e, st, c.output_dir, 2);
  } catch (const ferry::error&) {
    threw = true;
  }
  setrlimit(RLIMIT_FSIZE, &old_limit);
  std::signal(SIGXFSZ, old_handler);
  EXPECT_TRUE(threw);
  EXPECT_EQ(io::read_file(c.output_dir + "/latest"), latest_before);
  EXPECT_FALSE(fs::exists(c.output_dir + "/checkpoint-000003"));
  EXPECT_TRUE(fs::is_regular_file(c.output_dir + "/checkpoint-000002/model.safetensors"));
}

TEST(trainer, subword_tokenizer_is_trained_once_on_the_default_corpus_and_saved) {
  scratch_dir d;
  ::setenv("XDG_CACHE_HOME", (d.path + "/cache").c_str(), 1);
  auto c = config_for(d.path, write_corpus(d.path), 2);
  c.tokenizer = "spm:500";
  ASSERT_EQ(run_train(c), 0);
  EXPECT_TRUE(fs::is_regular_file(d.path + "/cache/ferry/common-licenses-spm500.model"));
  EXPECT_TRUE(fs::is_regular_file(c.output_dir + "/checkpoint-000002/tokenizer.model"));
  auto bad = c;
  bad.tokenizer = "spm:abc";
  EXPECT_THROW(run_train(bad), ferry::config_error);
  ::unsetenv("XDG_CACHE_HOME");
}

// A tokenizer.json named by its directory goes into each checkpoint with its tokenizer_config.json,
// and the checkpoint directory then reads as the same tokenizer (EOS from the config).
TEST(trainer, tokenizer_json_is_saved_with_its_config) {
  scratch_dir d;
  nlohmann::json vocab = nlohmann::json::object();  // byte-level: byte b is id b, no merges
  for (int b = 0; b < 256; ++b) {
    std::string piece;
    io::hf::utf8_append(piece, io::hf::byte_char(static_cast<uint8_t>(b)));
    vocab[piece] = b;
  }
  nlohmann::json tok = {{"version", "1.0"},
                        {"added_tokens", {{{"id", 256}, {"content", "<|end|>"}, {"special", true}, {"normalized", false}}}},
                        {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}}},
                        {"decoder", {{"type", "ByteLevel"}}},
                        {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", nlohmann::json::array()}}}};
  fs::create_directories(d.path + "/tok");
  io::write_file_atomic(d.path + "/tok/tokenizer.json", tok.dump());
  io::write_file_atomic(d.path + "/tok/tokenizer_config.json", R"({"eos_token": "<|end|>"})");
  auto c = config_for(d.path, write_corpus(d.path), 2);
  c.tokenizer = d.path + "/tok";
  ASSERT_EQ(run_train(c), 0);
  const std::string ckpt = c.output_dir + "/checkpoint-000002";
  EXPECT_EQ(io::read_file(ckpt + "/tokenizer.json"), tok.dump());
  EXPECT_FALSE(fs::exists(ckpt + "/tokenizer.model"));
  auto saved = io::make_tokenizer(ckpt);
  EXPECT_EQ(saved->eos_id(), 256);
  EXPECT_EQ(saved->encode("héllo <|end|>"), io::make_tokenizer(d.path + "/tok")->encode("héllo <|end|>"));
}

// optimizer_state: metrics.jsonl's first record of each process names the kind and its host bytes
// per parameter; resuming an fp32 checkpoint with int8 converts the moments with one line saying so,
// and the run goes on (its losses near the fp32 run's).
TEST(trainer, resume_with_another_optimizer_state_converts_and_metrics_name_it) {
  scratch_dir d;
  std::string corpus = write_corpus(d.path);
  auto full = config_for(d.path + "/a", corpus, 6);
  fs::create_directories(d.path + "/a");
  ASSERT_EQ(run_train(full), 0);
  const auto ref = losses(full.output_dir + "/metrics.jsonl");

  fs::create_directories(d.path + "/b");
  auto first = config_for(d.path + "/b", corpus, 3);
  ASSERT_EQ(run_train(first), 0);
  auto second = config_for(d.path + "/b", corpus, 6);
  second.resume = "latest";
  second.optimizer_state = "int8";
  testing::internal::CaptureStdout();
  const int rc = run_train(second);
  std::fflush(stdout);
  const std::string out = testing::internal::GetCapturedStdout();
  ASSERT_EQ(rc, 0) << out;
  EXPECT_NE(out.find("resume: optimizer state fp32 in " + second.output_dir + "/checkpoint-000003 converted to int8\n"),
            std::string::npos) << out;

  std::vector<nlohmann::json> rows;
  std::ifstream f(second.output_dir + "/metrics.jsonl");
  for (std::string line; std::getline(f, line);) rows.push_back(nlohmann::json::parse(line));
  ASSERT_EQ(rows.size(), 6u);
  for (size_t i = 0; i < rows.size(); ++i) {
    const bool first_of_process = i == 0 || i == 3;
    EXPECT_EQ(rows[i].contains("optimizer_state"), first_of_process) << "record " << i;
    EXPECT_EQ(rows[i].contains("state_bytes_per_param"), first_of_process) << "record " << i;
  }
  EXPECT_EQ(rows[0]["optimizer_state"], "fp32");
  EXPECT_EQ(rows[0]["state_bytes_per_param"].get<double>(), 12.0);
  EXPECT_EQ(rows[3]["optimizer_state"], "int8");
  EXPECT_EQ(rows[3]["state_bytes_per_param"].get<double>(), 6.0 + 8.0 / 2048);
  for (size_t i = 0; i < 3; ++i) EXPECT_EQ(rows[i]["loss"].get<double>(), ref[i]) << "step " << i + 1;
  for (size_t i = 3; i < 6; ++i) EXPECT_NEAR(rows[i]["loss"].get<double>(), ref[i], 0.02 * ref[i]) << "step " << i + 1;
}
