#include "src/train/trainer.h"

#include <ATen/ATen.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "src/common/error.h"
#include "src/common/proc_status.h"
#include "src/engine/engine.h"
#include "src/io/tensorboard.h"
#include "src/io/tokenizer.h"
#include "src/checkpoint/checkpoint.h"
#include "src/train/lr_schedule.h"

namespace ferry::train {
namespace {
std::atomic<int> g_stop_signal{0};
std::atomic<int> g_save_request{0};
// The state tier's scratch file (optimizer_state_on=nvme), which a second Ctrl-C removes before it
// exits at once (the normal and first-signal paths remove it when the engine is destroyed).
char g_scratch_file[4096];

extern "C" void on_signal(int sig) {
  if (sig == SIGUSR1) {
    g_save_request = 1;
    return;
  }
  if (g_stop_signal.load() == SIGINT && sig == SIGINT) {  // second Ctrl-C: at once
    if (g_scratch_file[0]) unlink(g_scratch_file);
    _exit(130);
  }
  g_stop_signal = sig;
}

void install_signals() {
  struct sigaction sa {};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGUSR1, &sa, nullptr);
}

double gib(int64_t b) { return double(b) / double(1ull << 30); }

std::string human(double v) {
  char buf[32];
  if (v >= 1e6) std::snprintf(buf, sizeof buf, "%.2fM", v / 1e6);
  else if (v >= 1e3) std::snprintf(buf, sizeof buf, "%.1fk", v / 1e3);
  else std::snprintf(buf, sizeof buf, "%.0f", v);
  return buf;
}
}  // namespace

double flops_per_token(const model::llama_config& c, int64_t seq) {
  double n = double(c.total_params() - c.embed_params());
  return 6.0 * n + 12.0 * double(c.num_hidden_layers) * double(c.hidden_size) * double(seq);
}

double peak_flops(const std::string& name, bool half) {
  if (!half) return 0;
  if (name.find("H100") != std::string::npos) return name.find("PCIe") != std::string::npos ? 756e12 : 989e12;
  if (name.find("H200") != std::string::npos) return 989e12;
  if (name.find("A100") != std::string::npos) return 312e12;
  if (name.find("4090") != std::string::npos) return 165.2e12;
  return 0;
}

int run_training(const io::run_config& cfg, const model::llama_config& mc, const engine::engine_options& eo,
                 const io::data_options& dopt) {
  namespace fs = std::filesystem;
  const int64_t B = cfg.batch_size, T = cfg.max_length;
  // Data-parallel ranks (eo.comm): every rank runs the same loop on its share of each global
  // batch (io::rank_cursor); rank 0 alone prints and writes metrics.
  const int rank = eo.comm ? eo.comm->rank() : 0, world = eo.comm ? eo.comm->world() : 1;
  const bool lead = rank == 0;
  if (!lead) {
    // Only rank 0 talks: the other ranks' stdout goes nowhere (their errors still reach stderr).
    FERRY_CHECK(std::freopen("/dev/null", "w", stdout), "cannot silence rank ", rank, "'s stdout");
  }
  io::token_dataset data = io::token_dataset::open(dopt);
  if (const io::example_set* ex = data.examples()) {
    std::printf("data: %lld examples, %lld tokens (%lld trained), %lld training / %lld evaluation sequences of up "
                "to %lld tokens, %s\n",
                (long long)ex->size(), (long long)ex->num_tokens(), (long long)ex->num_targets(),
                (long long)data.num_train(), (long long)data.num_eval(), (long long)T,
                data.packed() ? "packed" : "one example each, padded");
    if (!ex->notes().empty()) std::printf("data: %s\n", ex->notes().c_str());
  } else {
    std::printf("data: %lld tokens, %lld training / %lld evaluation sequences of %lld tokens\n",
                (long long)data.num_tokens(), (long long)data.num_train(), (long long)data.num_eval(), (long long)T);
  }

  engine::engine e(mc, eo);
  std::printf("model %s: %.3f B parameters, %lld layers; offload %s, %s on %s\n", mc.name.c_str(),
              double(mc.total_params()) / 1e9, (long long)mc.num_hidden_layers, engine::offload_mode_name(eo.mode),
              cfg.dtype.c_str(), e.device().name().c_str());
  std::printf("memory plan:\n%s\n", e.plan().describe().c_str());
  const std::string tier_line = e.params().state().describe();
  if (!tier_line.empty()) std::printf("%s\n", tier_line.c_str());
  for (const auto& f : e.params().state().scratch_files())
    if (f.size() < sizeof g_scratch_file) std::snprintf(g_scratch_file, sizeof g_scratch_file, "%s", f.c_str());
  if (world > 1)
    std::printf("ranks: %d (batch %lld per rank, global batch %lld), optimizer state partitioned\n", world,
                (long long)B, (long long)(B * world));

  checkpoint::trainer_state st;
  st.seed = cfg.seed;
  st.model_name = mc.name;
  st.run_config_json = io::to_json(cfg);
  if (!cfg.resume.empty()) {
    std::string dir = checkpoint::resolve_checkpoint(cfg.resume, cfg.output_dir);
    checkpoint::trainer_state loaded = checkpoint::load_checkpoint(e, dir);
    st.step = loaded.step;
    st.data_cursor = loaded.data_cursor;
    const char* kind = engine::state_kind_name(e.params().state().kind());
    if (loaded.optimizer_state != kind)
      std::printf("resume: optimizer state %s in %s converted to %s\n", loaded.optimizer_state.c_str(), dir.c_str(), kind);
    std::printf("resumed from %s at step %lld\n", dir.c_str(), (long long)st.step);
  } else if (!cfg.init.empty()) {
    checkpoint::load_hf_weights(e, cfg.init);
    e.params_changed();
    std::printf("initialised from %s\n", cfg.init.c_str());
  } else {
    e.params().init_random(cfg.seed, mc.initializer_range);
    e.params_changed();
  }

  std::error_code ec;
  fs::create_directories(cfg.output_dir, ec);
  FERRY_CHECK(!ec, "cannot create output_dir ", cfg.output_dir, ": ", ec.message());
  const std::string metrics_path = cfg.metrics.empty() ? cfg.output_dir + "/metrics.jsonl" : cfg.metrics;
  std::ofstream metrics;
  if (lead) metrics.open(metrics_path, std::ios::app);
  FERRY_CHECK(!lead || metrics.good(), "cannot write ", metrics_path, "; check output_dir");
  std::unique_ptr<io::tensorboard_writer> tb;
  if (cfg.tensorboard && lead) tb = std::make_unique<io::tensorboard_writer>(cfg.output_dir + "/tensorboard");
  // The resolved tokenizer file (spm:N has become a path by now) travels with each checkpoint; a
  // directory stands for its tokenizer.json, else its tokenizer.model, as make_tokenizer reads it.
  std::string sp_model;
  if (dopt.tokenizer != "byte")
    sp_model = fs::is_regular_file(dopt.tokenizer, ec) ? dopt.tokenizer : io::checkpoint_tokenizer_file(dopt.tokenizer);

  lr_schedule sched{cfg.learning_rate, cfg.warmup_steps, cfg.steps, cfg.lr_schedule, cfg.min_lr_ratio};
  const double fpt = flops_per_token(mc, T);
  const double peak = peak_flops(e.device().name(), eo.dtype != at::kFloat);
  const bool tty = isatty(STDERR_FILENO);
  install_signals();

  // With ranks every rank saves (its shard; rank 0 the rest: checkpoint.h), so every rank must
  // decide the same: the signals are summed over the ranks with the step's token count below.
  auto save = [&](const char* why) {
    std::string dir = checkpoint::save_checkpoint(e, st, cfg.output_dir, cfg.keep_last, sp_model);
    std::printf("checkpoint (%s): %s\n", why, dir.c_str());
  };

  // (B, T) rows as the dataset writes them; positions reach the engine only for packed rows.
  std::vector<int64_t> inputs(size_t(B * T)), labels(size_t(B * T)), positions(size_t(B * T));
  const io::batch_rows rows{inputs.data(), labels.data(), positions.data()};
  auto micro_batch_of = [&](int64_t rows_used, int64_t columns) {
    return engine::micro_batch::from_rows(inputs.data(), labels.data(), data.packed() ? positions.data() : nullptr,
                                          rows_used, T, columns);
  };

  auto evaluate = [&]() {
    double loss = 0;
    int64_t n = 0;
    int64_t sequences = std::min<int64_t>(cfg.eval_batches * B, data.num_eval());
    for (int64_t i = 0; i < sequences; ++i) {
      auto r = e.evaluate(micro_batch_of(1, data.eval_rows(i, 1, rows)));
      loss += r.loss_sum;
      n += r.n_targets;
    }
    return n ? loss / double(n) : std::nan("");
  };

  int exit_code = 0;
  bool first_record = true;
  // One step's micro-batches from the data cursor `at`, which moves past them; tokens: the positions
  // they run, padding included.
  struct step_batches {
    std::vector<engine::micro_batch> micro;
    int64_t tokens = 0;
  };
  auto read_step = [&](int64_t& at) {
    step_batches sb;
    for (int64_t a = 0; a < cfg.grad_accum; ++a) {
      const int64_t columns = data.train_rows(io::rank_cursor(at, B, rank), B, rows);
      at += B * world;
      sb.micro.push_back(micro_batch_of(B, columns));
      sb.tokens += B * columns;
    }
    return sb;
  };
  // The next step's batches are read one step ahead, so the engine can make their embedding rows
  // current first (train_step's `next`); st.data_cursor stays the position after the step trained.
  int64_t read_cursor = st.data_cursor;
  step_batches next;
  if (st.step < cfg.steps) next = read_step(read_cursor);
  while (st.step < cfg.steps) {
    step_batches cur = std::move(next);
    next = step_batches{};
    if (st.step + 1 < cfg.steps) next = read_step(read_cursor);
    const std::vector<engine::micro_batch>& micro = cur.micro;
    int64_t step_tokens = cur.tokens;
    double lr = sched.at(st.step + 1);
    engine::step_result r = e.train_step(micro, lr, next.micro.empty() ? nullptr : &next.micro);
    st.data_cursor += int64_t(micro.size()) * B * world;
    ++st.step;
    // This step's save request and stop signal, taken once here (a signal arriving later counts
    // at the next step), so that with ranks every rank acts on the same sums.
    int save_requests = g_save_request.exchange(0);
    const int local_sig = g_stop_signal.load();
    int stop_int = local_sig == SIGINT, stop_term = local_sig != 0 && local_sig != SIGINT;
    if (world > 1) {
      // The positions every rank ran (padding differs per rank), and the ranks' signals.
      at::Tensor t = at::tensor({double(step_tokens), double(save_requests), double(stop_int), double(stop_term)},
                                at::kDouble);
      eo.comm->all_reduce_sum(t, engine::comm_channel::channel_engine);
      const double* sum = t.data_ptr<double>();
      step_tokens = int64_t(sum[0]);
      save_requests = int(sum[1] + 0.5);
      stop_int = int(sum[2] + 0.5);
      stop_term = int(sum[3] + 0.5);
    }

    double tok_s = double(step_tokens) / (r.step_ms / 1e3);
    double mfu = peak > 0 ? tok_s * fpt / peak : 0;
    nlohmann::json m;
    m["step"] = st.step;
    m["loss"] = r.loss;
    m["lr"] = lr;
    m["grad_norm"] = std::isfinite(r.grad_norm) ? nlohmann::json(r.grad_norm) : nlohmann::json(nullptr);
    m["clip_coef"] = r.clip_coef;
    m["loss_scale"] = r.loss_scale;
    m["skipped"] = r.skipped;
    m["rollbacks"] = r.rollbacks;
    m["undo_log_bytes"] = r.undo_log_bytes;
    m["speculated"] = r.speculated;
    m["tokens"] = step_tokens;
    m["trained_tokens"] = r.n_targets;
    m["tokens_per_s"] = tok_s;
    m["trained_tokens_per_s"] = double(r.n_targets) / (r.step_ms / 1e3);
    m["mfu"] = mfu;
    m["step_ms"] = r.step_ms;
    m["h2d_bytes"] = r.h2d_bytes;
    m["d2h_bytes"] = r.d2h_bytes;
    m["h2d_ms"] = r.h2d_ms;
    m["d2h_ms"] = r.d2h_ms;
    m["cpu_adam_ms"] = r.cpu_adam_ms;
    m["cpu_tasks_ms"] = r.cpu_tasks_ms;
    m["stall_ms"] = r.stall_update_ms;
    m["tail_ms"] = r.tail_ms;
    m["updates_pending"] = r.updates_pending;
    m["embed_rows_first"] = r.embed_rows_first;
    if (e.params().shadows_shared()) m["shard_wait_ms"] = r.shard_wait_ms;
    if (eo.state_on == engine::state_place::place_nvme) {
      m["disk_wait_ms"] = r.disk_wait_ms;
      m["disk_read_bytes"] = r.disk_read_bytes;
      m["disk_write_bytes"] = r.disk_write_bytes;
    }
    m["gpu_alloc_peak"] = r.gpu_alloc_peak;
    m["gpu_reserved_peak"] = r.gpu_reserved_peak;
    // The process's resident memory after the step by kind: anonymous (the state, pinned buffers,
    // heaps), shmem (the shadows the ranks of a machine share, NCCL's shared buffers), file (the
    // mapped libraries).
    const std::vector<int64_t> rss = proc_status_bytes({"RssAnon", "RssShmem", "RssFile"});
    m["host_rss_anon"] = rss[0];
    m["host_rss_shmem"] = rss[1];
    m["host_rss_file"] = rss[2];
    m["data_cursor"] = st.data_cursor;
    if (first_record) {
      // The run's constants, once per process (a resumed run appends its own, which may differ).
      const engine::state_kind kind = e.params().state().kind();
      m["optimizer_state"] = engine::state_kind_name(kind);
      m["state_bytes_per_param"] = engine::state_bytes_per_param(kind, true);
      m["optimizer_state_on"] = engine::state_place_name(eo.state_on);
      first_record = false;
    }
    if (cfg.eval_every > 0 && st.step % cfg.eval_every == 0) {
      double el = evaluate();
      m["eval_loss"] = el;
      m["eval_ppl"] = std::exp(el);
    }
    if (lead) {
      metrics << m.dump() << "\n";
      metrics.flush();
    }
    if (tb) {
      std::vector<std::pair<std::string, double>> sc = {{"train/loss", r.loss}, {"train/lr", lr},
                                                        {"train/tokens_per_s", tok_s}, {"train/step_ms", r.step_ms},
                                                        {"train/trained_tokens", double(r.n_targets)},
                                                        {"train/loss_scale", r.loss_scale}};
      if (std::isfinite(r.grad_norm)) sc.push_back({"train/grad_norm", r.grad_norm});
      if (m.contains("eval_loss")) sc.push_back({"eval/loss", m["eval_loss"].get<double>()});
      tb->add_scalars(st.step, sc);
      tb->flush();
    }
    if (st.step % cfg.log_every == 0 || st.step == cfg.steps) {
      if (tty) std::fprintf(stderr, "\r\033[K");
      std::printf("step %lld/%lld | loss %.4f | lr %.2e | gnorm %.3f%s | scale %g%s | %s tok/s | %s trained",
                  (long long)st.step, (long long)cfg.steps, r.loss, lr, r.grad_norm, r.clip_coef < 1 ? " (clipped)" : "",
                  r.loss_scale, r.skipped ? " | SKIPPED (overflow)" : "", human(tok_s).c_str(),
                  human(double(r.n_targets)).c_str());
      if (mfu > 0) std::printf(" | MFU %.1f%%", 100 * mfu);
      std::printf(" | %.0f ms | gpu %.2f GiB", r.step_ms, gib(r.gpu_alloc_peak));
      if (r.h2d_bytes)
        std::printf(" | h2d %.2f GB %.0f ms, d2h %.2f GB %.0f ms, adam %.0f ms, stall %.0f ms%s", r.h2d_bytes / 1e9,
                    r.h2d_ms, r.d2h_bytes / 1e9, r.d2h_ms, r.cpu_adam_ms, r.stall_update_ms,
                    r.rollbacks ? " | rollback" : "");
      if (eo.state_on == engine::state_place::place_nvme)
        std::printf(" | disk read %.2f GB, write %.2f GB, wait %.0f ms", r.disk_read_bytes / 1e9,
                    r.disk_write_bytes / 1e9, r.disk_wait_ms);
      if (m.contains("eval_loss")) std::printf(" | eval %.4f", m["eval_loss"].get<double>());
      std::printf("\n");
      std::fflush(stdout);
    }
    if (tty) {
      int width = 30, done = int(width * st.step / cfg.steps);
      std::fprintf(stderr, "\r[%s%s] %lld/%lld", std::string(size_t(done), '#').c_str(),
                   std::string(size_t(width - done), '.').c_str(), (long long)st.step, (long long)cfg.steps);
    }
    if (save_requests > 0) save("SIGUSR1");
    if (cfg.save_every > 0 && st.step % cfg.save_every == 0 && st.step < cfg.steps) save("periodic");
    if (stop_int > 0 || stop_term > 0) {
      save(stop_int > 0 ? "SIGINT" : "SIGTERM");
      exit_code = stop_int > 0 ? 130 : 143;
      break;
    }
  }
  if (tty) std::fprintf(stderr, "\n");
  e.wait_updates();
  if (exit_code == 0 && cfg.save_final) save("final");
  return exit_code;
}

}  // namespace ferry::train
