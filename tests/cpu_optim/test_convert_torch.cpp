// fp16/bf16 rounding identical to PyTorch's `.to()` (and to c10::Half / c10::BFloat16), on every
// compiled target: ties, subnormals, overflow, infinities, NaN (any NaN counts as equal).
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <tbb/task_arena.h>

#include <cmath>
#include <random>

#include "tests/cpu_optim/test_util.h"

namespace ferry::cpu_optim::test {
namespace {

std::vector<float> values(size_t n) {
  std::vector<float> v = edge_values();
  std::mt19937 rng(draw_seed());
  std::uniform_int_distribution<uint32_t> bits;
  // Random bit patterns cover every class; dense values near the fp16 subnormal range too.
  while (v.size() < n / 2) v.push_back(half::f32_from_bits(bits(rng)));
  std::uniform_real_distribution<float> small(-1e-4f, 1e-4f);
  while (v.size() < n) v.push_back(small(rng));
  return v;
}

bool same(uint16_t a, uint16_t b, dtype t) {
  auto wide = [t](uint16_t x) { return t == dtype::dtype_f16 ? half::f16_to_f32(x) : half::bf16_to_f32(x); };
  return a == b || (std::isnan(wide(a)) && std::isnan(wide(b)));
}

using torch_convert_target = target_test;

TEST_P(torch_convert_target, narrowing_matches_torch_to) {
  const std::vector<float> v = values(200003);
  const int64_t n = static_cast<int64_t>(v.size());
  const at::Tensor src = at::from_blob(const_cast<float*>(v.data()), {n}, at::kFloat);
  for (dtype t : {dtype::dtype_f16, dtype::dtype_bf16}) {
    const at::Tensor want = src.to(t == dtype::dtype_f16 ? at::kHalf : at::kBFloat16).contiguous();
    const auto* w = static_cast<const uint16_t*>(want.data_ptr());
    std::vector<uint16_t> got(v.size());
    convert(v.data(), dtype::dtype_f32, got.data(), t, v.size());
    for (size_t i = 0; i < v.size(); ++i) {
      ASSERT_TRUE(same(got[i], w[i], t)) << dtype_name(t) << " of " << v[i] << " (bits " << std::hex
                                         << half::f32_bits(v[i]) << "): ours " << got[i] << " torch " << w[i];
    }
  }
}

TEST_P(torch_convert_target, widening_matches_torch_to) {
  std::vector<uint16_t> all(65536);
  for (size_t i = 0; i < all.size(); ++i) all[i] = static_cast<uint16_t>(i);
  for (dtype t : {dtype::dtype_f16, dtype::dtype_bf16}) {
    const at::Tensor src = at::from_blob(all.data(), {65536}, t == dtype::dtype_f16 ? at::kHalf : at::kBFloat16);
    const at::Tensor want = src.to(at::kFloat).contiguous();
    std::vector<float> got(all.size());
    convert(all.data(), t, got.data(), dtype::dtype_f32, all.size());
    const float* w = want.data_ptr<float>();
    for (size_t i = 0; i < all.size(); ++i) {
      ASSERT_TRUE(std::memcmp(&got[i], &w[i], 4) == 0 || (std::isnan(got[i]) && std::isnan(w[i])))
          << dtype_name(t) << " " << std::hex << all[i];
    }
  }
}

// scatter_add_rows against ATen's index_add_ of the rows in fp32: bit for bit, with repeated
// indices (added in row order), untouched rows, a width that is no multiple of any vector, and any
// thread count (distinct indices run in parallel).
TEST_P(torch_convert_target, scatter_add_rows_matches_index_add) {
  std::mt19937 rng(draw_seed());
  const int64_t table_rows = 97, width = 37, count = 1000;
  std::uniform_int_distribution<int64_t> pick(0, 40);   // many repeats; rows 41..96 untouched
  at::Tensor index = at::empty({count}, at::kLong);
  for (int64_t r = 0; r < count; ++r) index[r] = pick(rng);
  const at::Tensor base = at::randn({table_rows, width}, at::kFloat) * 3;
  for (at::ScalarType t : {at::kFloat, at::kHalf, at::kBFloat16}) {
    const at::Tensor rows = (at::randn({count, width}, at::kFloat) * 100).to(t).contiguous();
    const at::Tensor want = base.clone().index_add_(0, index, rows.to(at::kFloat));
    for (int threads : {1, 3}) {
      at::Tensor got = base.clone();
      tbb::task_arena arena(threads);
      arena.execute([&] {
        scatter_add_rows(rows.data_ptr(), t == at::kFloat ? dtype::dtype_f32 : t == at::kHalf ? dtype::dtype_f16
                                                                                           : dtype::dtype_bf16,
                         index.data_ptr<int64_t>(), size_t(count), size_t(width), got.data_ptr<float>(),
                         size_t(table_rows));
      });
      EXPECT_TRUE(at::equal(got, want)) << t << ", " << threads << " threads: max |diff| "
                                        << (got - want).abs().max().item<float>();
    }
  }
  // An index outside the table is refused before anything is written.
  at::Tensor got = base.clone();
  at::Tensor bad = index.clone();
  bad[count - 1] = table_rows;
  const at::Tensor rows = at::ones({count, width}, at::kFloat);
  EXPECT_THROW(scatter_add_rows(rows.data_ptr(), dtype::dtype_f32, bad.data_ptr<int64_t>(), size_t(count),
                                size_t(width), got.data_ptr<float>(), size_t(table_rows)),
               std::exception);
  EXPECT_TRUE(at::equal(got, base));
}

// gather_rows is index_select(0, index) of the table's rows (any row size: here half rows), with
// repeats, at 1 and 3 threads; an index outside the table is refused before anything is written.
TEST(gather_rows, matches_index_select) {
  std::mt19937 rng(draw_seed());
  const int64_t table_rows = 97, width = 37, count = 1000;
  std::uniform_int_distribution<int64_t> pick(0, table_rows - 1);
  at::Tensor index = at::empty({count}, at::kLong);
  for (int64_t r = 0; r < count; ++r) index[r] = pick(rng);
  const at::Tensor table = (at::randn({table_rows, width}, at::kFloat) * 3).to(at::kHalf).contiguous();
  const at::Tensor want = table.index_select(0, index);
  const size_t row_bytes = size_t(width) * 2;
  for (int threads : {1, 3}) {
    at::Tensor got = at::zeros({count, width}, at::kHalf);
    tbb::task_arena arena(threads);
    arena.execute([&] {
      gather_rows(table.data_ptr(), row_bytes, size_t(table_rows), index.data_ptr<int64_t>(), size_t(count),
                  got.data_ptr());
    });
    EXPECT_TRUE(at::equal(got, want)) << threads << " threads";
  }
  at::Tensor got = at::zeros({count, width}, at::kHalf);
  at::Tensor bad = index.clone();
  bad[count / 2] = -1;
  EXPECT_THROW(gather_rows(table.data_ptr(), row_bytes, size_t(table_rows), bad.data_ptr<int64_t>(), size_t(count),
                           got.data_ptr()),
               std::exception);
  EXPECT_TRUE(at::equal(got, at::zeros({count, width}, at::kHalf)));
}

INSTANTIATE_TEST_SUITE_P(targets, torch_convert_target, ::testing::ValuesIn(targets()));

TEST(half_scalar, matches_c10_constructors) {
  for (float f : values(100000)) {
    const c10::Half h(f);
    const c10::BFloat16 b(f);
    ASSERT_TRUE(same(half::f32_to_f16(f), h.x, dtype::dtype_f16)) << f;
    ASSERT_TRUE(same(half::f32_to_bf16(f), b.x, dtype::dtype_bf16)) << f;
  }
}

}  // namespace
}  // namespace ferry::cpu_optim::test
