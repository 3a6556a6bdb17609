#include "src/engine/state_tier.h"

#include <cstdlib>
#include <cstring>

#include "src/common/error.h"
#include "src/engine/backend_util.h"

namespace ferry::engine {

state_kind parse_state_kind(const std::string& s) {
  if (s == "fp32") return state_kind::state_fp32;
  throw config_error("optimizer_state: unknown kind '" + s + "' (valid: fp32)");
}

const char* state_kind_name(state_kind k) {
  switch (k) {
    case state_kind::state_fp32: return "fp32";
  }
  return "?";
}

int64_t state_bytes_per_param(state_kind k, bool moments) {
  switch (k) {
    case state_kind::state_fp32: return moments ? 12 : 4;
  }
  return 12;
}

void state_tier::zero_moments() {
  if (!has_moments()) return;
  for (int64_t u = 0; u < num_units(); ++u) {
    state_lease s(*this, u, true);
    std::memset(s->exp_avg, 0, size_t(s->n) * 4);
    std::memset(s->exp_avg_sq, 0, size_t(s->n) * 4);
  }
}

namespace {

class host_state final : public state_tier {
 public:
  host_state(const std::vector<int64_t>& numel, state_kind kind, bool moments) : kind_(kind), moments_(moments) {
    FERRY_ASSERT(kind == state_kind::state_fp32, "host state tier: kind ", state_kind_name(kind), " not built");
    for (int64_t n : numel) {
      state_view v;
      v.n = n;
      v.master = detail::alloc_floats(n, "the fp32 master weights");
      if (moments) {
        v.exp_avg = detail::alloc_floats(n, "the AdamW moments");
        v.exp_avg_sq = detail::alloc_floats(n, "the AdamW moments");
      }
      units_.push_back(v);
      bytes_ += n * state_bytes_per_param(kind, moments);
    }
    zero_moments();
  }
  ~host_state() override {
    for (auto& v : units_) {
      std::free(v.master);
      std::free(v.exp_avg);
      std::free(v.exp_avg_sq);
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
