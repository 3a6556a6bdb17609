#pragma once
// SwiGLU on the fused gate/up projection output: y = silu(gate) * up, computed in fp32, stored in
// the input dtype. gate_up (..., 2I): gate is [0, I), up is [I, 2I).
#include <ATen/core/Tensor.h>

namespace ferry::model {

at::Tensor swiglu_forward(const at::Tensor& gate_up);   // (..., I)
// dy (..., I); d_gate_up (..., 2I) contiguous, overwritten with [dgate | dup].
void swiglu_backward(const at::Tensor& dy, const at::Tensor& gate_up, at::Tensor& d_gate_up);

at::Tensor swiglu_forward_aten(const at::Tensor& gate_up);
void swiglu_backward_aten(const at::Tensor& dy, const at::Tensor& gate_up, at::Tensor& d_gate_up);

}  // namespace ferry::model
