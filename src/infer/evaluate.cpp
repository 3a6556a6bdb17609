#include "src/infer/evaluate.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <vector>

#include "src/common/error.h"

namespace ferry::infer {

eval_result evaluate(engine::engine& e, const io::token_dataset& data, int64_t batches, int64_t batch_size) {
  FERRY_ASSERT(batches > 0 && batch_size > 0, "evaluate: batches and batch_size must be positive");
  const int64_t T = data.seq_len();
  eval_result r;
  r.from_train_split = data.num_eval() == 0;
  const int64_t available = r.from_train_split ? data.num_train() : data.num_eval();
  const int64_t n = std::min(batches * batch_size, available);
  FERRY_CHECK(n > 0, "the dataset has no sequences to evaluate; give more data or a smaller max_length");
  std::vector<int64_t> inputs(size_t(batch_size * T)), labels(inputs.size()), positions(inputs.size());
  const io::batch_rows out{inputs.data(), labels.data(), positions.data()};
  double loss_sum = 0;
  e.device().reset_memory_peak();
  auto t0 = std::chrono::steady_clock::now();
  for (int64_t first = 0; first < n; first += batch_size) {
    const int64_t rows = std::min(batch_size, n - first);
    const int64_t columns = r.from_train_split ? data.train_rows(first, rows, out) : data.eval_rows(first, rows, out);
    model::head_result hr = e.evaluate(engine::micro_batch::from_rows(
        inputs.data(), labels.data(), data.packed() ? positions.data() : nullptr, rows, T, columns));  // synchronises
    loss_sum += hr.loss_sum;
    r.tokens += hr.n_targets;
    r.sequences += rows;
  }
  r.ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  r.loss = loss_sum / double(std::max<int64_t>(r.tokens, 1));
  r.perplexity = std::exp(r.loss);
  r.gpu_alloc_peak = e.device().memory_stats().allocated_peak;
  return r;
}

}  // namespace ferry::infer
