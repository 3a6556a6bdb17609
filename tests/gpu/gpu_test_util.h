#pragma once
// Shared helpers of the gpu/ suites (FERRY_REQUIRE_DEVICE() from tests/cuda_suite.h skips without a
// device): dtype-aware comparison against a float64 reference, judged relative to how far the ATen
// composition in the same dtype lands.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <string>

#include "gpu/ops.h"
#include "tests/cuda_suite.h"

// Without FERRY_TEST_CUDA, FERRY_REQUIRE_DEVICE() would not skip and a machine without a device would fail.
static_assert(::ferry::test::k_cuda_suite, "the gpu suites are CUDA suites: register them with ferry_add_test(... GPU)");

namespace ferry::gpu::testing {

inline const at::ScalarType k_dtypes[] = {at::kFloat, at::kHalf, at::kBFloat16};

inline std::string dtype_name(at::ScalarType dt) {
  return dt == at::kFloat ? "fp32" : dt == at::kHalf ? "fp16" : "bf16";
}

inline at::TensorOptions cuda(at::ScalarType dt) { return at::TensorOptions().device(at::kCUDA).dtype(dt); }

// ||a - ref|| / ||ref|| in float64.
inline double rel_err(const at::Tensor& a, const at::Tensor& ref) {
  const at::Tensor r = ref.to(at::kDouble).cpu(), d = a.to(at::kDouble).cpu() - r;
  return d.norm().item<double>() / std::max(r.norm().item<double>(), 1e-300);
}

// Error floor per dtype: about the relative norm error of rounding a tensor to that dtype, a few times over.
inline double floor_for(at::ScalarType dt) {
  return dt == at::kFloat ? 2e-6 : dt == at::kHalf ? 2e-3 : 1.6e-2;
}

// ferry's result must be as close to the float64 reference as ATen's own composition in the same
// dtype (within `factor`), or under the dtype's floor.
inline void expect_close(const at::Tensor& ferry, const at::Tensor& aten, const at::Tensor& ref64,
                         at::ScalarType dt, const char* what, double factor = 2.0) {
  ASSERT_EQ(ferry.sizes(), ref64.sizes()) << what;
  const double e_f = rel_err(ferry, ref64);
  const double e_a = aten.defined() ? rel_err(aten, ref64) : 0.0;
  EXPECT_LE(e_f, std::max(factor * e_a, floor_for(dt)))
      << what << " (" << dtype_name(dt) << "): ferry rel err " << e_f << ", ATen rel err " << e_a;
  EXPECT_TRUE(at::isfinite(ferry).all().item<bool>()) << what << ": non-finite values";
}

}  // namespace ferry::gpu::testing
