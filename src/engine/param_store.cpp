#include "src/engine/param_store.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "src/common/error.h"
#include "src/engine/backend_util.h"

namespace ferry::engine {
namespace {
bool is_norm(const std::string& name) { return name.find("norm") != std::string::npos; }
}  // namespace

param_store::param_store(const model::llama_config& cfg, at::ScalarType dtype, backend& dev, bool optimizer_state,
                         state_kind kind, const nvme_options* nvme, std::shared_ptr<collectives> comm,
                         shadow_mode shadows, std::vector<bool> shard_grads)
    : cfg_(cfg), dtype_(dtype), dev_(dev), optimizer_state_(optimizer_state), comm_(std::move(comm)),
      shard_grads_(std::move(shard_grads)) {
  if (comm_) shards_ = {comm_->rank(), comm_->world()};
  units_.push_back({"", model::embed_layout(cfg), cfg.embed_params()});
  for (int64_t i = 0; i < cfg.num_hidden_layers; ++i)
    units_.push_back({"model.layers." + std::to_string(i) + ".", model::block_layout(cfg), cfg.block_params()});
  units_.push_back({"", model::head_layout(cfg), cfg.head_params()});
  std::vector<int64_t> numel;
  for (const auto& u : units_) numel.push_back(u.numel);
  FERRY_ASSERT(numel == unit_numels(cfg), "the units differ from param_store::unit_numels");
  shard_grads_.resize(units_.size(), false);
  // One rank may sum only the embedding's gradient on the device (embed_grad=device): its one
  // block is the whole table.
  FERRY_ASSERT(shards_.sharded() || std::find(shard_grads_.begin() + 1, shard_grads_.end(), true) == shard_grads_.end(),
               "shard_grads: one rank holds whole gradients but the embedding's");
  std::vector<int64_t> mine;
  for (int64_t n : numel) mine.push_back(shards_.count(n));
  state_ = nvme && optimizer_state ? make_nvme_state(mine, kind, optimizer_state, *nvme)
                                   : make_host_state(mine, kind, optimizer_state);

  const int64_t elem = static_cast<int64_t>(c10::elementSize(dtype));
  // Every buffer is rounded up to 64 bytes so each starts cache-line aligned.
  auto round64 = [](int64_t b) { return (b + 63) / 64 * 64; };
  int64_t shadow_bytes = 0, grad_bytes = 0;
  for (size_t u = 0; u < units_.size(); ++u) {
    shadow_bytes += round64(units_[u].numel * elem);
    if (u != 0 && optimizer_state_) grad_bytes += round64(host_grad_numel(int64_t(u)) * elem);
  }
  if (shards_.sharded() && shadows != shadow_mode::shadows_gather) {
    shared_ = comm_->share_host_memory(size_t(shadow_bytes), num_units());
    lockstep_ = std::getenv("FERRY_SHARED_LOCKSTEP") != nullptr;
    FERRY_CONFIG_CHECK(shared_ || shadows == shadow_mode::shadows_auto, "dist_weights=shared: the ", shards_.world,
                       " ranks are not all on one machine (LOCAL_WORLD_SIZE < WORLD_SIZE), so they cannot share ",
                       "their shadows; use dist_weights=auto or gather");
  }
  // The collectives' scratch, page-locked on CUDA: a CUDA run's process group stages its host
  // collectives through the device (src/dist/process_group.h), and copies from and into pinned
  // memory run at the link's rate. It holds a gathered unit (shadows not shared) or a block's
  // whole fp32 gradient reduced on the host (not in shard_grads); the embedding's gradient is
  // reduce-scattered in place, so shared shadows with every block reduced on the device need none.
  if (shards_.sharded()) {
    int64_t widest = 0;
    for (size_t u = 0; u < units_.size(); ++u)
      if (!shared_ || (u != 0 && !shard_grads_[u])) widest = std::max(widest, shards_.padded(units_[u].numel));
    if (widest > 0) scratch_ = static_cast<float*>(dev_.host_alloc(size_t(widest) * 4));
  }

  // One exact-size pinned block: shadows of every unit (unless shared), then (with optimizer
  // state) gradients of units 1..L+1 (grad_numel).
  const int64_t own = (shared_ ? 0 : shadow_bytes) + grad_bytes;
  pinned_bytes_ = own + (shared_ ? shadow_bytes : 0);
  pinned_ = dev_.host_alloc(static_cast<size_t>(own));
  char* shadow_cursor = static_cast<char*>(pinned_);
  if (shared_) {
    dev_.host_register(shared_->data(), size_t(shadow_bytes));
    shadow_cursor = static_cast<char*>(shared_->data());
  }
  char* grad_cursor = static_cast<char*>(pinned_) + (shared_ ? 0 : shadow_bytes);
  for (size_t u = 0; u < units_.size(); ++u) {
    int64_t n = units_[u].numel;
    shadow_.push_back(shadow_cursor);
    shadow_cursor += round64(n * elem);
    if (!optimizer_state_) {
      grad_.push_back(nullptr);
    } else if (u == 0) {
      // Sharded: page-locked; reduced on the device, this rank's shard of the sum; else padded with
      // zeros to the ranks' equal blocks, the reduce-scatter's input as it is (gradient_path::reduce).
      // One rank summing it on the device: page-locked, the whole table, the copy's target.
      if (shards_.sharded() || shard_grads_[0]) {
        const int64_t floats = host_embed_grad_floats();
        grad_.push_back(dev_.host_alloc(size_t(floats) * 4));
        std::memset(grad_.back(), 0, size_t(floats) * 4);
      } else {
        grad_.push_back(detail::alloc_floats(n, "the embedding's fp32 gradient"));
      }
    } else {
      grad_.push_back(grad_cursor);
      grad_cursor += round64(host_grad_numel(int64_t(u)) * elem);
    }
  }
  for (size_t u = 0; u < units_.size(); ++u)
    for (const auto& s : units_[u].slots) named_.push_back({units_[u].prefix + s.name, s.shape, int64_t(u), s.offset, s.numel});
}

param_store::~param_store() {
  if (scratch_) dev_.host_free(scratch_);
  if (!grad_.empty() && optimizer_state_) {
    if (shards_.sharded() || shard_grads_[0]) dev_.host_free(grad_[0]);
    else std::free(grad_[0]);
  }
  if (pinned_) dev_.host_free(pinned_);
  if (shared_) {
    dev_.host_unregister(shared_->data());
    shared_.reset();   // before comm_, which it waits through
  }
}

std::vector<int64_t> param_store::unit_numels(const model::llama_config& cfg) {
  std::vector<int64_t> n{cfg.embed_params()};
  n.insert(n.end(), size_t(cfg.num_hidden_layers), cfg.block_params());
  n.push_back(cfg.head_params());
  return n;
}

int64_t param_store::grad_numel(int64_t u) const {
  return u == head_unit() ? cfg_.head_slot_params() : units_[size_t(u)].numel;
}

int64_t param_store::host_grad_numel(int64_t u) const {
  return shard_grads_[size_t(u)] ? shard_numel(u) : grad_numel(u);
}

int64_t param_store::total_params() const {
  int64_t n = 0;
  for (const auto& u : units_) n += u.numel;
  return n;
}

int64_t param_store::host_embed_grad_floats() const {
  const int64_t n = units_[0].numel;
  if (!shards_.sharded()) return n;
  return shard_grads_[0] ? std::max<int64_t>(1, shards_.per(n)) : shards_.padded(n);
}

int64_t param_store::host_bytes() const {
  return pinned_bytes_ + state_->host_bytes() + (optimizer_state_ ? host_embed_grad_floats() * 4 : 0);
}

static at::Tensor view_of(void* p, int64_t n, at::ScalarType t) {
  return at::from_blob(p, {n}, at::TensorOptions().dtype(t).device(at::kCPU));
}

void param_store::check_optimizer_state(const char* what) const {
  FERRY_CHECK(optimizer_state_, "the parameter store of an inference (forward_only) engine has no ", what,
              "; build the engine without forward_only to train or to save optimizer state");
}

void param_store::check_in_memory(const char* what) const {
  FERRY_CHECK(state_->in_memory(), "param_store::", what, ": the optimizer state is on disk (optimizer_state_on=nvme), ",
              "where no tensor can alias it; read it through state() leases");
}

// The host tier's buffers stay where they are between acquire and release, so a view may outlive
// the lease (documented in the header: in-memory tiers only).
at::Tensor param_store::master_tensor(int64_t u) const {
  check_in_memory("master_tensor");
  state_lease s(*state_, u, true);
  return view_of(s->master, s->n, at::kFloat);
}
void param_store::check_fp32_moments() const {
  check_optimizer_state("AdamW moments");
  FERRY_CHECK(state_->kind() == state_kind::state_fp32, "the AdamW moments are fp32 tensors only with optimizer_state=fp32; "
              "this store keeps them as ", state_kind_name(state_->kind()), ": read them through state() (moments_of)");
}
at::Tensor param_store::exp_avg_tensor(int64_t u) const {
  check_fp32_moments();
  check_in_memory("exp_avg_tensor");
  state_lease s(*state_, u, true);
  return view_of(s->exp_avg, s->n, at::kFloat);
}
at::Tensor param_store::exp_avg_sq_tensor(int64_t u) const {
  check_fp32_moments();
  check_in_memory("exp_avg_sq_tensor");
  state_lease s(*state_, u, true);
  return view_of(s->exp_avg_sq, s->n, at::kFloat);
}
at::Tensor param_store::shadow_tensor(int64_t u) const { return view_of(shadow_[u], units_[u].numel, dtype_); }
at::Tensor param_store::grad_tensor(int64_t u) const {
  check_optimizer_state("gradient buffers");
  return view_of(grad_[u], shard_grads_[size_t(u)] ? shard_numel(u) : units_[u].numel, grad_dtype(u));
}

void param_store::init_random(uint64_t seed, double std, int64_t chunk) {
  FERRY_ASSERT(chunk >= 16 && chunk % 16 == 0, "init_random: chunk must be a positive multiple of 16");
  // One task per unit, each with its own generator: the values do not depend on the thread count.
  // ATen's ops inside run single-threaded here (at::parallel_for does not nest).
  for (int64_t u = 0; u < num_units(); ++u) state_->prefetch(u);
  at::parallel_for(0, num_units(), 1, [&](int64_t begin, int64_t end) {
    // A piece of at most 2 * chunk elements: the scratch of a sharded store's draws.
    at::Tensor piece = shards_.sharded() ? at::empty({2 * chunk}, at::kFloat) : at::Tensor();
    for (int64_t u = begin; u < end; ++u) {
      at::Generator gen = at::detail::createCPUGenerator(seed * 1000003ull + uint64_t(u));
      state_lease s(*state_, u, true);
      // Sharded: every rank draws the unit in the same order as one rank, up to the end of its
      // shard, and keeps the part in its shard [lo, hi) of the unit.
      const int64_t lo = shard_begin(u), hi = lo + shard_numel(u);
      at::Tensor mine = view_of(s->master, s->n, at::kFloat);
      for (const auto& slot : units_[u].slots) {
        if (slot.offset >= hi) break;   // the generator's later draws are no rank's concern here
        const int64_t pieces = std::max<int64_t>(1, slot.numel / chunk);
        for (int64_t k = 0; k < pieces; ++k) {
          const int64_t off = slot.offset + k * chunk;
          const int64_t len = k + 1 == pieces ? slot.offset + slot.numel - off : chunk;
          if (off >= hi) break;
          const bool keep = off + len > lo;
          at::Tensor t = shards_.sharded() ? piece.narrow(0, 0, len) : mine.narrow(0, off, len);
          if (is_norm(slot.name)) {
            if (keep) t.fill_(1.0);   // no draw: nothing before it needs to be skipped
          } else {
            t.normal_(0.0, std, gen);
          }
          if (shards_.sharded() && keep) {
            const int64_t a = std::max(off, lo), b = std::min(off + len, hi);
            mine.narrow(0, a - lo, b - a).copy_(t.narrow(0, a - off, b - a));
          }
        }
      }
      zero_moments_of(*s);
      refresh_shadow(u, *s);
    }
  });
  publish_shadows();   // sharded: the other ranks' shards, unit by unit in order (a collective)
}

// This rank's shard of the shadow (one rank: the whole unit) from the master in view s.
void param_store::refresh_shadow(int64_t u, const state_view& s) {
  shadow_tensor(u).narrow(0, shard_begin(u), shard_numel(u)).copy_(view_of(s.master, s.n, at::kFloat));
}

void param_store::refresh_shadows() {
  for (int64_t u = 0; u < num_units(); ++u) state_->prefetch(u);
  for (int64_t u = 0; u < num_units(); ++u) {
    state_lease s(*state_, u, false);
    refresh_shadow(u, *s);
  }
  publish_shadows();
}

void param_store::publish_shadows() {
  if (!shards_.sharded()) return;
  for (int64_t u = 0; u < num_units(); ++u) publish_shadow(u, comm_channel::channel_engine);
}

double param_store::await_shadow(int64_t u) { return shared_ ? shared_->wait_all(u) : 0.0; }

void param_store::publish_shadow(int64_t u, comm_channel c) {
  if (!shards_.sharded()) return;
  if (shared_) {
    // The update thread goes on to its next unit; a reader waits in await_shadow. The engine's
    // thread (start, load, resume) waits here, as no reader does after it.
    shared_->post(u);
    if (c == comm_channel::channel_engine || lockstep_) shared_->wait_all(u);
    return;
  }
  const int64_t n = units_[size_t(u)].numel, per = shards_.per(n), elem = int64_t(c10::elementSize(dtype_));
  // Bytes, so one path serves every compute dtype: this rank's shard (zero-padded to per elements),
  // gathered into the scratch, whose first n elements are the unit.
  at::Tensor mine = at::zeros({per * elem}, at::kByte);
  std::memcpy(mine.data_ptr(), static_cast<char*>(shadow_[size_t(u)]) + shard_begin(u) * elem,
              size_t(shard_numel(u) * elem));
  at::Tensor all = at::from_blob(scratch_, {shards_.padded(n) * elem}, at::kByte);
  comm_->all_gather(all, mine, c);
  std::memcpy(shadow_[size_t(u)], scratch_, size_t(n * elem));
}


std::vector<named_param> param_store::named_params() const { return named_; }

at::Tensor param_store::master_view(const named_param& p) const {
  FERRY_CHECK(!shards_.sharded(), "master_view(", p.name, ") on a sharded store (", shards_.world,
              " ranks): each rank holds only its shard of the unit");
  return master_tensor(p.unit).narrow(0, p.offset, p.numel).view(p.shape);
}

const named_param* param_store::find(const std::string& name) const {
  for (const auto& p : named_)
    if (p.name == name) return &p;
  return nullptr;
}

}  // namespace ferry::engine
