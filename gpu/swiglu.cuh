#pragma once
// Fused SwiGLU: y = silu(gate) * up in fp32, stored as T. gate_up (n, 2i) row-major holds gate in
// columns [0, i) and up in [i, 2i) (the fused gate/up projection's output).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace ferry::gpu {

// y (n, i).
template <typename T>
void swiglu_forward_launch(T* y, const T* gate_up, int64_t n, int64_t i, cudaStream_t stream);

// d_gate_up (n, 2i) overwritten with [dgate | dup]; it may alias gate_up (each element is read
// before it is written, by the same thread).
template <typename T>
void swiglu_backward_launch(T* d_gate_up, const T* dy, const T* gate_up, int64_t n, int64_t i, cudaStream_t stream);

}  // namespace ferry::gpu
