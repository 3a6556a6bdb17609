#include "src/engine/param_store.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdlib>

#include "src/common/error.h"

namespace ferry::engine {
namespace {
float* alloc_f32(int64_t n) {
  void* p = nullptr;
  size_t bytes = static_cast<size_t>(n) * sizeof(float);
  FERRY_CHECK(posix_memalign(&p, 64, (bytes + 63) / 64 * 64) == 0, "cannot allocate ", bytes >> 20,
              " MiB of host memory for the optimizer state; train a smaller model or add memory");
  return static_cast<float*>(p);
}

bool is_norm(const std::string& name) { return name.find("norm") != std::string::npos; }
}  // namespace

param_store::param_store(const model::llama_config& cfg, at::ScalarType dtype, backend& dev, bool optimizer_state)
    : cfg_(cfg), dtype_(dtype), dev_(dev), optimizer_state_(optimizer_state) {
  units_.push_back({"", model::embed_layout(cfg), cfg.embed_params()});
  for (int64_t i = 0; i < cfg.num_hidden_layers; ++i)
    units_.push_back({"model.layers." + std::to_string(i) + ".", model::block_layout(cfg), cfg.block_params()});
  units_.push_back({"", model::head_layout(cfg), cfg.head_params()});

  const int64_t elem = static_cast<int64_t>(c10::elementSize(dtype));
  // One exact-size pinned block: shadows of every unit, then (with optimizer state) gradients of
  // units 1..L+1, each rounded up to 64 bytes so every buffer starts cache-line aligned.
  auto round64 = [](int64_t b) { return (b + 63) / 64 * 64; };
  int64_t total = 0;
  for (size_t u = 0; u < units_.size(); ++u) {
    total += round64(units_[u].numel * elem);
    if (u != 0 && optimizer_state_) total += round64(units_[u].numel * elem);
  }
  pinned_bytes_ = total;
  pinned_ = dev_.host_alloc(static_cast<size_t>(total));
  char* cursor = static_cast<char*>(pinned_);
  for (size_t u = 0; u < units_.size(); ++u) {
    int64_t n = units_[u].numel;
    master_.push_back(alloc_f32(n));
    m_.push_back(optimizer_state_ ? alloc_f32(n) : nullptr);
    v_.push_back(optimizer_state_ ? alloc_f32(n) : nullptr);
    shadow_.push_back(cursor);
    cursor += round64(n * elem);
    if (!optimizer_state_) {
      grad_.push_back(nullptr);
    } else if (u == 0) {
      grad_.push_back(alloc_f32(n));
    } else {
      grad_.push_back(cursor);
      cursor += round64(n * elem);
    }
  }
  for (size_t u = 0; u < units_.size(); ++u)
    for (const auto& s : units_[u].slots)
      named_.push_back({units_[u].prefix + s.name, s.shape, master_[u] + s.offset,
                        m_[u] ? m_[u] + s.offset : nullptr, v_[u] ? v_[u] + s.offset : nullptr});
  zero_moments();
}

param_store::~param_store() {
  for (size_t u = 0; u < units_.size(); ++u) {
    std::free(master_[u]);
    std::free(m_[u]);
    std::free(v_[u]);
  }
  if (!grad_.empty() && optimizer_state_) std::free(grad_[0]);
  if (pinned_) dev_.host_free(pinned_);
}

int64_t param_store::total_params() const {
  int64_t n = 0;
  for (const auto& u : units_) n += u.numel;
  return n;
}

int64_t param_store::host_bytes() const {
  return pinned_bytes_ + total_params() * 4 + (optimizer_state_ ? total_params() * 8 + units_[0].numel * 4 : 0);
}

static at::Tensor view_of(void* p, int64_t n, at::ScalarType t) {
  return at::from_blob(p, {n}, at::TensorOptions().dtype(t).device(at::kCPU));
}

void param_store::check_optimizer_state(const char* what) const {
  FERRY_CHECK(optimizer_state_, "the parameter store of an inference (forward_only) engine has no ", what,
              "; build the engine without forward_only to train or to save optimizer state");
}

at::Tensor param_store::master_tensor(int64_t u) const { return view_of(master_[u], units_[u].numel, at::kFloat); }
at::Tensor param_store::exp_avg_tensor(int64_t u) const {
  check_optimizer_state("AdamW moments");
  return view_of(m_[u], units_[u].numel, at::kFloat);
}
at::Tensor param_store::exp_avg_sq_tensor(int64_t u) const {
  check_optimizer_state("AdamW moments");
  return view_of(v_[u], units_[u].numel, at::kFloat);
}
at::Tensor param_store::shadow_tensor(int64_t u) const { return view_of(shadow_[u], units_[u].numel, dtype_); }
at::Tensor param_store::grad_tensor(int64_t u) const {
  check_optimizer_state("gradient buffers");
  return view_of(grad_[u], units_[u].numel, grad_dtype(u));
}

void param_store::init_random(uint64_t seed, double std) {
  // One task per unit, each with its own generator: the values do not depend on the thread count.
  // ATen's ops inside run single-threaded here (at::parallel_for does not nest).
  at::parallel_for(0, num_units(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      at::Generator gen = at::detail::createCPUGenerator(seed * 1000003ull + uint64_t(u));
      at::Tensor flat = master_tensor(u);
      for (const auto& s : units_[u].slots) {
        at::Tensor t = flat.narrow(0, s.offset, s.numel);
        if (is_norm(s.name)) t.fill_(1.0);
        else t.normal_(0.0, std, gen);
      }
    }
  });
  zero_moments();
  refresh_shadows();
}

void param_store::refresh_shadows() {
  for (int64_t u = 0; u < num_units(); ++u) shadow_tensor(u).copy_(master_tensor(u));
}

void param_store::zero_moments() {
  if (!optimizer_state_) return;
  for (int64_t u = 0; u < num_units(); ++u) {
    exp_avg_tensor(u).zero_();
    exp_avg_sq_tensor(u).zero_();
  }
}

std::vector<named_param> param_store::named_params() const { return named_; }

const named_param* param_store::find(const std::string& name) const {
  for (const auto& p : named_)
    if (p.name == name) return &p;
  return nullptr;
}

}  // namespace ferry::engine
