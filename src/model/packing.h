#pragma once
// Packed rows: each row of a (B, T) micro-batch holds several sequences one after another (the
// examples packed by the dataset, and the padding after the last), each a run of positions
// 0, 1, 2, .... A token is rotated by its position in its run and attends only to the earlier
// tokens of its own run (block-diagonal causal attention), so a packed row computes what its
// sequences would compute one by one. (The mask is what makes them independent; RoPE depends only
// on the distance between positions, so restarting them changes rounding only, and makes the
// rotations those of the sequences run alone.) Built once per micro-batch; every block's forward
// keeps it in block_saved for the backward.
#include <ATen/core/Tensor.h>

#include <cstdint>

#include "src/model/rope.h"

namespace ferry::model {

struct packing {
  at::Tensor positions;   // (B, T) int64 on the compute device
  at::Tensor cos, sin;    // (B*T, D) fp32: the rotary rows of each token's position
  at::Tensor cu_seqlens;  // (runs + 1) int32 on the compute device: where each run starts in the
                          // B*T tokens laid end to end, then B*T (flash attention's varlen input)
  int64_t runs = 0;
  int64_t max_run = 0;    // the longest run
};

// Throws ferry::error with one line unless positions (B, T) (integers, CPU) is runs 0, 1, 2, ...
// in every row (a row starts at 0; each next position is 0 or one more) below max_pos.
void check_positions(const at::Tensor& positions, int64_t max_pos);
// positions (B, T) on the CPU, checked as above against the rope cache's rows.
packing make_packing(const at::Tensor& positions, const rope_cache& rope);

}  // namespace ferry::model
