#include "src/train/lr_schedule.h"

#include <algorithm>
#include <cmath>

namespace ferry::train {

double lr_schedule::at(int64_t step) const {
  if (warmup > 0 && step <= warmup) return peak * double(step) / double(warmup);
  if (kind == "constant" || total <= warmup) return peak;
  double progress = std::clamp(double(step - warmup) / double(std::max<int64_t>(1, total - warmup)), 0.0, 1.0);
  double floor = peak * min_ratio;
  if (kind == "linear") return floor + (peak - floor) * (1.0 - progress);
  return floor + (peak - floor) * 0.5 * (1.0 + std::cos(M_PI * progress));  // cosine
}

}  // namespace ferry::train
