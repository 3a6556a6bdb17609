#include "src/engine/state_tier.h"

#include <cstdlib>
#include <cstring>

#include "src/common/error.h"
#include "src/engine/backend_util.h"

namespace ferry::engine {

state_kind parse_state_kind(const std::string& s) {
  if (s == "fp32") return state_kind::state_fp32;
  if (s == "bf16") return state_kind::state_bf16;
  if (s == "int8") return state_kind::state_int8;
  throw config_error("optimizer_state: unknown kind '" + s + "' (valid: fp32, bf16, int8)");
}

const char* state_kind_name(state_kind k) {
  switch (k) {
    case state_kind::state_fp32: return "fp32";
    case state_kind::state_bf16: return "bf16";
    case state_kind::state_int8: return "int8";
  }
  return "?";
}

cpu_optim::moments_kind moments_kind_of(state_kind k) {
  switch (k) {
    case state_kind::state_fp32: return cpu_optim::moments_kind::f32;
    case state_kind::state_bf16: return cpu_optim::moments_kind::bf16;
    case state_kind::state_int8: return cpu_optim::moments_kind::int8;
  }
  return cpu_optim::moments_kind::f32;
}

int64_t state_bytes(state_kind k, bool moments, int64_t numel) {
  return 4 * numel + (moments ? int64_t(cpu_optim::moments_bytes(moments_kind_of(k), size_t(numel))) : 0);
}

double state_bytes_per_param(state_kind k, bool moments) {
  const int64_t n = int64_t(cpu_optim::k_quant_block) << 10;   // whole blocks: the per-block scales amortised
  return double(state_bytes(k, moments, n)) / double(n);
}

cpu_optim::moments_ref moments_of(const state_view& s) {
  cpu_optim::moments_ref r;
  r.kind = s.moments;
  r.m = s.exp_avg;
  r.v = s.exp_avg_sq;
  r.m_scale = s.m_scale;
  r.v_scale = s.v_scale;
  r.n = size_t(s.n);
  return r;
}

float* exp_avg_f32(const state_view& s) {
  FERRY_ASSERT(s.moments == cpu_optim::moments_kind::f32, "fp32 moments asked of a ",
               cpu_optim::moments_kind_name(s.moments), " state view");
  return static_cast<float*>(s.exp_avg);
}

float* exp_avg_sq_f32(const state_view& s) {
  FERRY_ASSERT(s.moments == cpu_optim::moments_kind::f32, "fp32 moments asked of a ",
               cpu_optim::moments_kind_name(s.moments), " state view");
  return static_cast<float*>(s.exp_avg_sq);
}

void zero_moments_of(const state_view& s) {
  if (!s.exp_avg) return;
  const size_t n = size_t(s.n), blocks = cpu_optim::quant_blocks(n);
  switch (s.moments) {
    case cpu_optim::moments_kind::f32:
      std::memset(s.exp_avg, 0, n * 4);
      std::memset(s.exp_avg_sq, 0, n * 4);
      break;
    case cpu_optim::moments_kind::bf16:
      std::memset(s.exp_avg, 0, n * 2);
      std::memset(s.exp_avg_sq, 0, n * 2);
      break;
    case cpu_optim::moments_kind::int8:
      std::memset(s.exp_avg, 0, n);
      std::memset(s.exp_avg_sq, 0, n);
      std::memset(s.m_scale, 0, blocks * 4);
      std::memset(s.v_scale, 0, blocks * 4);
      break;
  }
}

// All-zero codes and scales are zero moments in every kind (cpu_optim/adamw.h).
void state_tier::zero_moments() {
  if (!has_moments()) return;
  for (int64_t u = 0; u < num_units(); ++u) prefetch(u);
  for (int64_t u = 0; u < num_units(); ++u) {
    state_lease s(*this, u, true);
    zero_moments_of(*s);
  }
}

namespace {

class host_state final : public state_tier {
 public:
  host_state(const std::vector<int64_t>& numel, state_kind kind, bool moments) : kind_(kind), moments_(moments) {
    const cpu_optim::moments_kind mk = moments_kind_of(kind);
    // bytes per element of each moment array
    const size_t elem = mk == cpu_optim::moments_kind::f32 ? 4 : mk == cpu_optim::moments_kind::bf16 ? 2 : 1;
    for (size_t u = 0; u < numel.size(); ++u) {
      const int64_t n = numel[u];
      state_view v;
      v.n = n;
      v.moments = mk;
      v.seed = uint64_t(u) + 1;
      v.master = detail::alloc_floats(n, "the fp32 master weights");
      if (moments) {
        v.exp_avg = detail::alloc_bytes(size_t(n) * elem, "the AdamW moments");
        v.exp_avg_sq = detail::alloc_bytes(size_t(n) * elem, "the AdamW moments");
        if (mk == cpu_optim::moments_kind::int8) {
          const int64_t blocks = int64_t(cpu_optim::quant_blocks(size_t(n)));
          v.m_scale = detail::alloc_floats(blocks, "the AdamW moments' scales");
          v.v_scale = detail::alloc_floats(blocks, "the AdamW moments' scales");
        }
      }
      units_.push_back(v);
      bytes_ += state_bytes(kind, moments, n);
    }
    zero_moments();
  }
  ~host_state() override {
    for (auto& v : units_) {
      std::free(v.master);
      std::free(v.exp_avg);
      std::free(v.exp_avg_sq);
      std::free(v.m_scale);
      std::free(v.v_scale);
    }
  }
  state_kind kind() const override { return kind_; }
  bool has_moments() const override { return moments_; }
  int64_t num_units() const override { return int64_t(units_.size()); }
  state_view acquire(int64_t u) override { return units_.at(size_t(u)); }
  void release(int64_t, bool) override {}
  int64_t host_bytes() const override { return bytes_; }

 private:
  state_kind kind_;
  bool moments_;
  std::vector<state_view> units_;
  int64_t bytes_ = 0;
};

}  // namespace

std::unique_ptr<state_tier> make_host_state(const std::vector<int64_t>& unit_numel, state_kind kind, bool moments) {
  return std::make_unique<host_state>(unit_numel, kind, moments);
}

}  // namespace ferry::engine
