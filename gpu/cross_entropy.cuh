#pragma once
// Cross-entropy over one chunk of rows with an online softmax: one read of the logits for the
// row's max and sum of exponentials, one more read to write the gradient. Never materialises fp32
// logits. Labels equal to -100 are ignored (zero loss, zero gradient).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace ferry::gpu {

// logits (n, v) row-major; labels (n) int64. row_loss (n) fp32 scratch. loss_sum (1) fp32 gets
// the sum of row losses ADDED in a fixed order (deterministic). dlogits (n, v) or nullptr is
// overwritten with grad_scale * (softmax - onehot(label)); it may alias logits. A label outside
// [0, v) that is not -100 gives a NaN row loss and a NaN gradient row (visible in the loss).
template <typename T>
void cross_entropy_launch(float* loss_sum, float* row_loss, T* dlogits, const T* logits, const int64_t* labels,
                          int64_t n, int64_t v, float grad_scale, cudaStream_t stream);

}  // namespace ferry::gpu
