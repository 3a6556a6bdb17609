#pragma once
// The optimizer state tier: where each unit's fp32 master weights and AdamW moments live, and in
// what form. Everything above it (the engine's updates and fix-ups, checkpoints, the tests) reaches
// a unit's state only between acquire(u) and release(u); the planner asks it for bytes per
// parameter. cpu_optim keeps taking raw spans, which a view provides.
//
// Implementations: host memory (make_host_state), the master weights in fp32 and the moments in
// the tier's kind (fp32, bf16, or blockwise int8 codes: cpu_optim/adamw.h moments_kind); and files
// on a local disk (make_nvme_state, nvme_state.h: optimizer_state_on=nvme), streamed through a few
// host buffers: prefetch(u) reads ahead, acquire(u) waits for the read, release(u, dirty) writes
// behind.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "cpu_optim/adamw.h"

namespace ferry::engine {

// The run-config key optimizer_state. The master weights are fp32 in every kind.
enum class state_kind {
  state_fp32,  // master, exp_avg, exp_avg_sq in fp32: 12 B/param (4 without moments)
  state_bf16,  // exp_avg, exp_avg_sq in bf16 (stochastically rounded): 8 B/param
  state_int8,  // exp_avg int8 / exp_avg_sq uint8 codes and one fp32 scale per
               // cpu_optim::k_quant_block elements of a unit for each: 6 B/param + 8 B per block
};

state_kind parse_state_kind(const std::string& s);  // throws config_error naming the key and the valid kinds
const char* state_kind_name(state_kind k);            // "fp32", "bf16", "int8"
cpu_optim::moments_kind moments_kind_of(state_kind k);
// Exact host bytes of one unit of numel parameters in a tier of this kind: the fp32 master, plus
// the moments (cpu_optim::moments_bytes, int8 scales included) when `moments`.
int64_t state_bytes(state_kind k, bool moments, int64_t numel);
// Bytes per parameter for reports (fp32 12, bf16 8, int8 6 + 8/k_quant_block = 6.0039); the planner
// and the tier count state_bytes per unit.
double state_bytes_per_param(state_kind k, bool moments);

// Unit u's state while acquired. exp_avg / exp_avg_sq are null without optimizer state (an
// inference engine's tier holds only the master weights); their element type follows `moments`
// (f32: float; bf16: uint16_t bf16 bits; int8: int8_t m and uint8_t v codes with m_scale, v_scale
// of cpu_optim::quant_blocks(n) floats each, null in the other kinds).
struct state_view {
  float* master = nullptr;
  void* exp_avg = nullptr;
  void* exp_avg_sq = nullptr;
  float* m_scale = nullptr;
  float* v_scale = nullptr;
  cpu_optim::moments_kind moments = cpu_optim::moments_kind::f32;
  // The unit's stochastic-rounding stream (bf16): fixed per unit (unit index + 1), so a run and
  // its resumed continuation draw the same bits.
  uint64_t seed = 0;
  int64_t n = 0;
};

// The moments of a view as cpu_optim takes them (conversions: checkpoints, resuming with another kind).
cpu_optim::moments_ref moments_of(const state_view& s);
// The fp32 moments of an fp32 view; a bug (assert) for another kind.
float* exp_avg_f32(const state_view& s);
float* exp_avg_sq_f32(const state_view& s);

// A tier's disk traffic since the last take_io() (zero for the host tier): the step report's
// disk figures.
struct tier_io {
  double wait_ms = 0;        // time acquire() and flush() blocked on the disk or for a free buffer
  int64_t read_bytes = 0;    // reads issued
  int64_t write_bytes = 0;   // write-backs issued
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
  // Host memory the tier holds (what the planner charges it: state_bytes of every unit, or the
  // disk tier's buffers).
  virtual int64_t host_bytes() const = 0;
  // A hint that unit u will be acquired soon; calls come in the order the acquires will. A tier on
  // disk starts reading it into a free buffer (the host tier: nothing to do).
  virtual void prefetch(int64_t) {}
  // Blocks until every write-back has completed; throws ferry::error naming the file and unit when
  // one failed (the host tier: nothing to wait for).
  virtual void flush() {}
  // Whether a view stays valid after its release (the state lives in host memory for good): only
  // then may param_store hand out tensors that alias it.
  virtual bool in_memory() const { return true; }
  // Bytes the tier keeps on disk (0: none).
  virtual int64_t disk_bytes() const { return 0; }
  virtual tier_io take_io() { return {}; }
  // Files the tier created and removes when destroyed (a signal handler that exits at once removes
  // them itself).
  virtual std::vector<std::string> scratch_files() const { return {}; }
  // One line for the run's log: where the state lives and how it moves ("" for the host tier).
  virtual std::string describe() const { return ""; }
  void zero_moments();
};

// Zeroes the moments of one acquired unit: all-zero codes and scales are zero moments in every kind.
void zero_moments_of(const state_view& s);

// The master weights and the moments of `kind` in pageable host memory, 64-byte aligned, one buffer
// per array and unit; the moments start at zero.
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
