#pragma once
// The optimizer state tier: where each unit's fp32 master weights and AdamW moments live, and in
// what form. Everything above it (the engine's updates and fix-ups, checkpoints, the tests) reaches
// a unit's state only between acquire(u) and release(u); the planner asks it for bytes per
// parameter. cpu_optim keeps taking raw spans, which a view provides.
//
// Implementations: host memory in fp32 (make_host_state, today's). The compact kinds (bf16 and
// int8 moments) and a tier on local disk plug in behind the same calls: a view then carries the
// moments' form, and acquire reads ahead / release writes behind.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace ferry::engine {

enum class state_kind {
  state_fp32,  // master, exp_avg, exp_avg_sq in fp32: 12 B/param (4 without moments)
};

state_kind parse_state_kind(const std::string& s);  // throws config_error naming the valid kinds
const char* state_kind_name(state_kind k);
// Host bytes per parameter a tier of this kind keeps (master, plus the moments when `moments`).
int64_t state_bytes_per_param(state_kind k, bool moments);

// Unit u's state while acquired. exp_avg / exp_avg_sq are null without optimizer state (an
// inference engine's tier holds only the master weights).
struct state_view {
  float* master = nullptr;
  float* exp_avg = nullptr;
  float* exp_avg_sq = nullptr;
  int64_t n = 0;
};

class state_tier {
 public:
  virtual ~state_tier() = default;
  virtual state_kind kind() const = 0;
  virtual bool has_moments() const = 0;
  virtual int64_t num_units() const = 0;
  // Unit u's state, valid until the matching release(u). Different units may be acquired from
  // different threads at once; one unit by one holder at a time.
  virtual state_view acquire(int64_t u) = 0;
  // dirty: the holder changed the state (a tier with a backing store writes it back).
  virtual void release(int64_t u, bool dirty) = 0;
  // Host memory the tier holds (what the planner charges it: state_bytes_per_param x params).
  virtual int64_t host_bytes() const = 0;
  void zero_moments();
};

// fp32 master and moments in pageable host memory, 64-byte aligned, one buffer per array and unit.
std::unique_ptr<state_tier> make_host_state(const std::vector<int64_t>& unit_numel, state_kind kind, bool moments);

// Scoped acquire/release of one unit.
class state_lease {
 public:
  state_lease(state_tier& t, int64_t u, bool dirty) : tier_(t), unit_(u), dirty_(dirty), view_(t.acquire(u)) {}
  ~state_lease() { tier_.release(unit_, dirty_); }
  state_lease(const state_lease&) = delete;
  state_lease& operator=(const state_lease&) = delete;
  const state_view& operator*() const { return view_; }
  const state_view* operator->() const { return &view_; }

 private:
  state_tier& tier_;
  int64_t unit_;
  bool dirty_;
  state_view view_;
};

}  // namespace ferry::engine
