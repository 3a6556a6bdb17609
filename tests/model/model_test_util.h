#pragma once
// Shared by the src/model suites. Each suite is compiled twice: for CPU (label cpu) and, with
// FERRY_TEST_CUDA=1, for CUDA (label gpu). Every check computes ferry's result on the suite's
// device in the dtype under test and compares it with a libtorch-autograd reference run in fp64
// on the CPU from the same (already rounded) inputs.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "src/model/llama_config.h"
#include "tests/cuda_suite.h"
#include "tests/test_configs.h"

namespace ferry::model::test {

// MODEL_SUITE(x) names the GoogleTest suite x on CPU and x_gpu on CUDA, so ctest entries differ.
#if defined(FERRY_TEST_CUDA) && FERRY_TEST_CUDA
#define MODEL_SUITE(name) name##_gpu
#else
#define MODEL_SUITE(name) name
#endif
using ::ferry::test::k_cuda_suite;

inline at::Device test_device() { return k_cuda_suite ? at::Device(at::kCUDA) : at::Device(at::kCPU); }

// The dtypes each suite checks: CPU covers fp64 (exact-ish reference check), fp32 and both halves;
// CUDA covers the compute dtypes.
inline std::vector<at::ScalarType> test_dtypes() {
  if (k_cuda_suite) return {at::kFloat, at::kHalf, at::kBFloat16};
  return {at::kDouble, at::kFloat, at::kHalf, at::kBFloat16};
}

// Norm-wise relative tolerance: max|a - e| <= tol * max|e|. Half-precision values carry 2^-11
// (fp16) or 2^-8 (bf16) rounding at every stored intermediate.
inline double tolerance(at::ScalarType t, double scale = 1.0) {
  switch (t) {
    case at::kDouble: return 1e-10 * scale;
    case at::kFloat: return 1e-5 * scale;
    case at::kHalf: return 1e-2 * scale;
    default: return 4e-2 * scale;
  }
}

inline double rel_err(const at::Tensor& actual, const at::Tensor& expected) {
  at::Tensor a = actual.detach().to(at::kCPU, at::kDouble);
  at::Tensor e = expected.detach().to(at::kCPU, at::kDouble);
  double denom = e.abs().max().item<double>();
  double num = (a - e).abs().max().item<double>();
  return num / (denom > 0 ? denom : 1.0);
}

// Norm-wise relative error: ||a - e||_2 / ||e||_2 over all elements.
inline double fro_err(const at::Tensor& actual, const at::Tensor& expected) {
  at::Tensor a = actual.detach().to(at::kCPU, at::kDouble);
  at::Tensor e = expected.detach().to(at::kCPU, at::kDouble);
  const double denom = e.norm().item<double>();
  return (a - e).norm().item<double>() / (denom > 0 ? denom : 1.0);
}

#define FERRY_EXPECT_CLOSE(actual, expected, tol, what)                                                  \
  do {                                                                                                   \
    ASSERT_EQ((actual).sizes(), (expected).sizes()) << (what);                                           \
    double ferry_err_ = ::ferry::model::test::rel_err((actual), (expected));                             \
    EXPECT_LE(ferry_err_, (tol)) << (what) << ": relative error " << ferry_err_ << " > " << (tol);     \
  } while (0)

// Random fp64 CPU values rounded through dtype t, so reference and implementation see the same inputs.
inline at::Tensor rnd(std::vector<int64_t> shape, at::ScalarType t, double scale = 1.0) {
  return (at::randn(shape, at::TensorOptions().dtype(at::kDouble)) * scale).to(t).to(at::kDouble);
}
// A copy on the device and in the dtype under test (always a copy: ops write in place).
inline at::Tensor dev(const at::Tensor& ref, at::ScalarType t) {
  return ref.to(test_device(), t, /*non_blocking=*/false, /*copy=*/true).contiguous();
}
// A leaf for the autograd reference.
inline at::Tensor leaf(const at::Tensor& ref) { return ref.clone().requires_grad_(true); }

inline std::string dtype_name(at::ScalarType t) { return std::string(c10::toString(t)); }

// Tiny shapes for whole-model checks: odd hidden and intermediate sizes, head_dim not a power of 2.
inline llama_config tiny_config(int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t layers = 2) {
  // vocab, hidden, intermediate, layers, heads, kv_heads, head_dim, max_positions, rms_norm_eps
  return ::ferry::test::tiny_llama("test", {37, 22, 29, layers, heads, kv_heads, head_dim, 64, 1e-5});
}

}  // namespace ferry::model::test
