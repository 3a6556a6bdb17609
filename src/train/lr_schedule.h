#pragma once
// Learning rate per optimizer step: linear warm-up from 0, then constant, cosine or linear decay
// to min_lr_ratio * peak at the last step.
#include <cstdint>
#include <string>

namespace ferry::train {

struct lr_schedule {
  double peak = 1e-5;
  int64_t warmup = 0;
  int64_t total = 1;
  std::string kind = "constant";  // constant | cosine | linear
  double min_ratio = 0.1;

  // step is 1-based (the step about to be taken).
  double at(int64_t step) const;
};

}  // namespace ferry::train
