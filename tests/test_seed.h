#pragma once
// Seeds for the tests' random inputs: the same in every run, so a failure can be drawn again.
// FERRY_TEST_SEED (a count, default 1) is the base; each test mixes in its full name (and a
// salt, for a test that draws several seeds), so tests draw apart from each other and a test
// alone draws what it draws in its whole binary. Another FERRY_TEST_SEED draws other inputs.
// Used by the seeded test main (tests/gtest_main.cpp: ATen's generators) and by the cpu_optim
// suites' std::mt19937 seeds (tests/cpu_optim/test_util.h).
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>

#include "src/common/env.h"

namespace ferry::test {

// FERRY_TEST_SEED, or 1 where it is unset or empty. A value that env_integer refuses ends the
// process with exit 2 and its one line, which names the variable (before any test runs).
inline uint64_t base_seed() {
  const char* v = std::getenv("FERRY_TEST_SEED");
  if (!v || !*v) return 1;
  try {
    return static_cast<uint64_t>(env_integer("FERRY_TEST_SEED", v, 0, std::numeric_limits<long>::max(),
                                             "the seed of the tests' random inputs"));
  } catch (const config_error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    std::exit(2);
  }
}

// FNV-1a of "suite.name", and of salt where it is not 0, over the base.
inline uint64_t test_seed(const ::testing::TestInfo& t, uint64_t base, uint64_t salt = 0) {
  uint64_t h = 1469598103934665603ull ^ base;
  auto mix = [&h](unsigned char c) { h = (h ^ c) * 1099511628211ull; };
  for (const char* p = t.test_suite_name(); *p; ++p) mix(static_cast<unsigned char>(*p));
  mix('.');
  for (const char* p = t.name(); *p; ++p) mix(static_cast<unsigned char>(*p));
  if (salt != 0)
    for (int i = 0; i < 8; ++i) mix(static_cast<unsigned char>(salt >> (8 * i)));
  return h;
}

}  // namespace ferry::test
