#include "src/engine/weight_pool.h"

#include <ATen/ATen.h>

#include <cstring>
#include <limits>

#include "cpu_optim/adamw.h"
#include "src/common/error.h"
#include "src/engine/trace.h"
#include "src/model/embed_head.h"

namespace ferry::engine {

weight_pool::weight_pool(const model::llama_config& cfg, const engine_options& opt, backend& dev, param_store& store,
                         update_worker& worker, step_meter& meter)
    : cfg_(cfg), opt_(opt), dev_(dev), store_(store), worker_(worker), meter_(meter) {
  auto dev_opts = at::TensorOptions().dtype(opt.dtype).device(dev.device());
  resident_.resize(size_t(store.num_units()));
  for (int64_t u = 0; u < store.num_units(); ++u)
    if (unit_resident(opt, u, store.num_units())) resident_[size_t(u)] = at::empty({store.unit(u).numel}, dev_opts);
  if (opt.mode == offload_mode::offload_none) {
    all_resident_ = true;
    return;
  }
  const int64_t nslots = opt.mode == offload_mode::offload_blocked ? 1 : opt.prefetch + 1;
  for (int64_t i = 0; i < nslots; ++i) {
    blocks_.emplace_back();
    blocks_.back().buf = at::empty({cfg.block_params()}, dev_opts);
  }
  head_.buf = at::empty({cfg.head_slot_params()}, dev_opts);
  embed_in_ = dev.host_alloc(size_t(opt.max_batch * opt.max_seq * cfg.hidden_size) * c10::elementSize(opt.dtype));
}

weight_pool::~weight_pool() {
  if (embed_in_) dev_.host_free(embed_in_);
}

void weight_pool::refresh() {
  for (int64_t u = 0; u < int64_t(resident_.size()); ++u)
    if (is_resident(u)) resident_[size_t(u)].copy_(store_.shadow_tensor(u));
}

bool weight_pool::current(const slot& s) const {
  if (s.unit < 0 || s.version != worker_.queued_version(s.unit)) return false;
  return &s != &head_ || !cfg_.tie_word_embeddings || s.embed_version == worker_.queued_version(store_.embed_unit());
}

weight_pool::slot* weight_pool::find(int64_t u) {
  if (u == store_.head_unit()) return head_.unit == u && current(head_) ? &head_ : nullptr;
  for (auto& s : blocks_)
    if (s.unit == u && current(s)) return &s;
  return nullptr;
}

void weight_pool::load(int64_t u, const std::vector<int64_t>& uses, size_t at) {
  slot* target = nullptr;
  if (u == store_.head_unit()) {
    target = &head_;
  } else {
    size_t best = 0;
    for (auto& s : blocks_) {
      size_t next = std::numeric_limits<size_t>::max();
      if (current(s))
        for (size_t j = at; j < uses.size(); ++j)
          if (uses[j] == s.unit) {
            next = j;
            break;
          }
      if (!target || next > best) {
        target = &s;
        best = next;
      }
    }
    FERRY_ASSERT(best > at, "no free weight slot for unit ", u, " (prefetch window larger than the pool)");
  }
  // The host copy must hold this unit's latest update before it moves (and, for the head of a tied
  // model, the embedding's, whose matrix it copies as lm_head).
  const bool tied_head = u == store_.head_unit() && cfg_.tie_word_embeddings;
  const int64_t eu = store_.embed_unit();
  const double t_wait = trace::enabled() ? trace::now_ms() : 0;
  meter_.stall_ms += worker_.wait_updated(u);
  if (tied_head) meter_.stall_ms += worker_.wait_updated(eu);
  if (trace::enabled()) trace::record("wait_update", u, t_wait, trace::now_ms());
  meter_.shard_wait_ms += store_.await_shadow(u);
  if (tied_head) meter_.shard_wait_ms += store_.await_shadow(eu);
  if (target->released) dev_.wait(queue::queue_h2d, target->released);
  const size_t elem = c10::elementSize(opt_.dtype), bytes = size_t(store_.unit(u).numel) * elem;
  event_ptr t0 = meter_.timing ? dev_.record(queue::queue_h2d, true) : nullptr;
  dev_.copy_h2d(target->buf, store_.shadow(u), bytes);
  size_t moved = bytes;
  if (tied_head) {
    const size_t lm = size_t(cfg_.embed_params()) * elem;
    dev_.copy_h2d(target->buf.narrow(0, cfg_.hidden_size, cfg_.embed_params()), store_.shadow(eu), lm);
    moved += lm;
  }
  target->ready = dev_.record(queue::queue_h2d, meter_.timing);
  if (meter_.timing) meter_.h2d_timers.emplace_back(t0, target->ready);
  meter_.h2d_bytes += int64_t(moved);
  target->unit = u;
  target->version = worker_.queued_version(u);
  target->embed_version = tied_head ? worker_.queued_version(eu) : -1;
}

model::head_weights weight_pool::head_views(const at::Tensor& acquired) {
  if (!all_resident_ || !cfg_.tie_word_embeddings) return model::head_slot_views(acquired, cfg_);
  return {acquired, resident_[size_t(store_.embed_unit())].view({cfg_.vocab_size, cfg_.hidden_size})};
}

const at::Tensor& weight_pool::acquire(int64_t u, const std::vector<int64_t>& uses, size_t at) {
  if (is_resident(u)) return resident_[size_t(u)];
  if (!find(u)) load(u, uses, at);
  if (opt_.mode == offload_mode::offload_overlapped) {
    // The next `prefetch` uses of streamed units. Only units whose updates have run: waiting here
    // for a later unit's update would hold back the compute of this one (a deferred step's updates
    // run on behind the next forward).
    auto updated = [&](int64_t v) {
      return worker_.updated(v) && (v != store_.head_unit() || !cfg_.tie_word_embeddings ||
                                    worker_.updated(store_.embed_unit()));
    };
    int64_t ahead = 0;
    for (size_t j = at + 1; j < uses.size() && ahead < opt_.prefetch; ++j) {
      if (is_resident(uses[j])) continue;
      ++ahead;
      if (!find(uses[j]) && updated(uses[j])) load(uses[j], uses, at);
    }
  }
  slot* s = find(u);
  dev_.wait(queue::queue_compute, s->ready);
  dev_.debug_delay();
  return s->buf;
}

void weight_pool::release(int64_t u) {
  if (is_resident(u)) return;
  slot* s = find(u);
  FERRY_ASSERT(s, "release of unit ", u, ", which is not resident");
  s->released = dev_.record(queue::queue_compute);
}

// index_select's rows of the shadow into the staging, copied in parallel.
void weight_pool::gather(const at::Tensor& ids) {
  const int64_t eu = store_.embed_unit(), h = cfg_.hidden_size;
  const at::Tensor table = store_.shadow_tensor(eu).view({cfg_.vocab_size, h});
  cpu_optim::gather_rows(table.data_ptr(), size_t(h) * c10::elementSize(opt_.dtype), size_t(cfg_.vocab_size),
                         ids.data_ptr<int64_t>(), size_t(ids.numel()), embed_in_);
}

void weight_pool::stage_embed(const at::Tensor& ids) {
  FERRY_ASSERT(!all_resident_ && ids.dim() == 1 && ids.scalar_type() == at::kLong && ids.is_contiguous() &&
                   ids.numel() <= opt_.max_batch * opt_.max_seq,
               "weight_pool::stage_embed: ", ids.numel(), " ids for a staging of ", opt_.max_batch * opt_.max_seq);
  // The staging's last copy to the device is done before it is rewritten.
  if (embed_in_done_) embed_in_done_->synchronize();
  gather(ids);
  staged_ids_ = ids;
}

at::Tensor weight_pool::embed(const at::Tensor& tokens) {
  const int64_t eu = store_.embed_unit(), h = cfg_.hidden_size;
  if (all_resident_) return model::embed_forward(tokens.to(dev_.device()), resident_[size_t(eu)].view({cfg_.vocab_size, h}));
  at::Tensor tok = tokens.to(at::kLong).contiguous();
  FERRY_CHECK(tok.numel() <= opt_.max_batch * opt_.max_seq, "batch of ", tok.numel(), " tokens exceeds the planned ",
              opt_.max_batch, " x ", opt_.max_seq);
  const at::Tensor ids = tok.reshape({-1});
  const double t_wait = trace::enabled() ? trace::now_ms() : 0;
  meter_.stall_ms += worker_.wait_updated(eu);
  if (embed_rest_ >= 0) {
    // The rows outside the first part of a split update are current once its second part has run.
    const int64_t* id = ids.data_ptr<int64_t>();
    bool first = embed_first_ && !embed_first_->empty();
    for (int64_t i = 0; first && i < ids.numel(); ++i) first = (*embed_first_)[size_t(id[i])] != 0;
    if (!first) meter_.stall_ms += worker_.wait_updated(embed_rest_);
  }
  if (trace::enabled()) trace::record("wait_update", eu, t_wait, trace::now_ms());
  meter_.shard_wait_ms += store_.await_shadow(eu);
  const double t_rows = trace::enabled() ? trace::now_ms() : 0;
  // Rows the update thread staged for exactly these tokens (stage_embed) are only copied.
  const bool staged = staged_ids_.defined() && staged_ids_.numel() == ids.numel() &&
                      std::memcmp(staged_ids_.data_ptr<int64_t>(), ids.data_ptr<int64_t>(),
                                  size_t(ids.numel()) * sizeof(int64_t)) == 0;
  staged_ids_ = at::Tensor();
  if (!staged) {
    if (embed_in_done_) embed_in_done_->synchronize();
    gather(ids);
  }
  at::Tensor x = at::empty({tok.size(0), tok.size(1), h}, at::TensorOptions().dtype(opt_.dtype).device(dev_.device()));
  const size_t bytes = size_t(ids.numel() * h) * c10::elementSize(opt_.dtype);
  dev_.copy_h2d(x, embed_in_, bytes);
  embed_in_done_ = dev_.record(queue::queue_h2d);
  meter_.h2d_bytes += int64_t(bytes);
  dev_.wait(queue::queue_compute, embed_in_done_);
  if (trace::enabled()) trace::record("embed_rows", eu, t_rows, trace::now_ms());
  return x;
}

}  // namespace ferry::engine
