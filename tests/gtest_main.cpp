// The main of every GoogleTest suite (cmake/FerryTesting.cmake). ctest runs one TEST per process,
// and the exit code alone says how it went: 0 passed, 77 skipped (SKIP_RETURN_CODE: every test
// that ran called GTEST_SKIP, e.g. a CUDA suite without a device), anything else failed.
//
// gtest_discover_tests gives every test a SKIP_REGULAR_EXPRESSION on gtest's "[  SKIPPED ]", and
// a match overrides the exit code in ctest: a process that skipped and then failed (a global
// environment's TearDown, a non-zero exit at teardown) would count as skipped. So skips are
// printed without those words; everything else is gtest's own printer.
//
// Suites that load libtorch get this main built with FERRY_GTEST_SEEDS_ATEN (cmake/FerryTesting.cmake):
// every test starts from ATen's generators seeded with its own seed, a hash of its full name and
// FERRY_TEST_SEED (default 1), so its random inputs are the same in every process, alone or in a
// whole binary (tests/test_seed.h). libtorch seeds its CPU generator from the OS otherwise, and a
// test whose tolerance a rare draw exceeds failed once in dozens of runs, with inputs nobody could
// draw again. In every build a failed test prints the FERRY_TEST_SEED that draws its inputs again;
// another value draws others.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdio>
#include <memory>

#include "tests/test_seed.h"

#if defined(FERRY_GTEST_SEEDS_ATEN) && FERRY_GTEST_SEEDS_ATEN
#include <ATen/Context.h>
#endif

namespace {

using namespace ::testing;

class skip_wording_printer : public TestEventListener {
 public:
  explicit skip_wording_printer(TestEventListener* gtest_printer) : inner_(gtest_printer) {}

  void OnTestEnd(const TestInfo& t) override {
    if (!t.result()->Skipped()) return inner_->OnTestEnd(t);
    std::printf("skipped: %s.%s (%lld ms)\n", t.test_suite_name(), t.name(), static_cast<long long>(t.result()->elapsed_time()));
  }
  void OnTestIterationEnd(const UnitTest& u, int iteration) override {
    if (u.skipped_test_count() == 0) return inner_->OnTestIterationEnd(u, iteration);
    std::printf("[==========] %d tests from %d test suites ran. (%lld ms total)\n", u.test_to_run_count(),
                u.test_suite_to_run_count(), static_cast<long long>(u.elapsed_time()));
    std::printf("[  PASSED  ] %d tests.\n", u.successful_test_count());
    for_each_test(u, [](const TestInfo& t) {
      if (t.result()->Skipped()) std::printf("skipped: %s.%s\n", t.test_suite_name(), t.name());
    });
    for_each_test(u, [](const TestInfo& t) {
      if (t.result()->Failed()) std::printf("[  FAILED  ] %s.%s\n", t.test_suite_name(), t.name());
    });
    if (u.ad_hoc_test_result().Failed()) std::printf("[  FAILED  ] outside any test (environment or teardown)\n");
    std::fflush(stdout);
  }

  void OnTestProgramStart(const UnitTest& u) override { inner_->OnTestProgramStart(u); }
  void OnTestIterationStart(const UnitTest& u, int i) override { inner_->OnTestIterationStart(u, i); }
  void OnEnvironmentsSetUpStart(const UnitTest& u) override { inner_->OnEnvironmentsSetUpStart(u); }
  void OnEnvironmentsSetUpEnd(const UnitTest& u) override { inner_->OnEnvironmentsSetUpEnd(u); }
  void OnTestSuiteStart(const TestSuite& s) override { inner_->OnTestSuiteStart(s); }
  void OnTestStart(const TestInfo& t) override { inner_->OnTestStart(t); }
  void OnTestDisabled(const TestInfo& t) override { inner_->OnTestDisabled(t); }
  void OnTestPartResult(const TestPartResult& r) override { inner_->OnTestPartResult(r); }
  void OnTestSuiteEnd(const TestSuite& s) override { inner_->OnTestSuiteEnd(s); }
  void OnEnvironmentsTearDownStart(const UnitTest& u) override { inner_->OnEnvironmentsTearDownStart(u); }
  void OnEnvironmentsTearDownEnd(const UnitTest& u) override { inner_->OnEnvironmentsTearDownEnd(u); }
  void OnTestProgramEnd(const UnitTest& u) override { inner_->OnTestProgramEnd(u); }
#ifndef GTEST_REMOVE_LEGACY_TEST_CASEAPI_
  void OnTestCaseStart(const TestCase& c) override { inner_->OnTestCaseStart(c); }
  void OnTestCaseEnd(const TestCase& c) override { inner_->OnTestCaseEnd(c); }
#endif

 private:
  template <class F>
  static void for_each_test(const UnitTest& u, F f) {
    for (int i = 0; i < u.total_test_suite_count(); ++i) {
      const TestSuite& s = *u.GetTestSuite(i);
      for (int j = 0; j < s.total_test_count(); ++j)
        if (s.GetTestInfo(j)->should_run()) f(*s.GetTestInfo(j));
    }
  }

  std::unique_ptr<TestEventListener> inner_;
};

// Seeds ATen's generators at each test's start (the aten build) and, after a failed test, prints
// what draws its random inputs again (every build: cpu_optim's suites draw from tests/test_seed.h).
class seed_listener : public EmptyTestEventListener {
 public:
  seed_listener() : base_(::ferry::test::base_seed()) {}
  void OnTestStart(const TestInfo& t) override {
#if defined(FERRY_GTEST_SEEDS_ATEN) && FERRY_GTEST_SEEDS_ATEN
    at::manual_seed(::ferry::test::test_seed(t, base_));
#else
    (void)t;
#endif
  }
  void OnTestEnd(const TestInfo& t) override {
    if (!t.result()->Failed()) return;
    std::printf("%s.%s: FERRY_TEST_SEED=%llu draws its random inputs again", t.test_suite_name(), t.name(),
                static_cast<unsigned long long>(base_));
#if defined(FERRY_GTEST_SEEDS_ATEN) && FERRY_GTEST_SEEDS_ATEN
    std::printf(" (ATen seed %llu)", static_cast<unsigned long long>(::ferry::test::test_seed(t, base_)));
#endif
    std::printf("\n");
    std::fflush(stdout);
  }

 private:
  uint64_t base_;
};

}  // namespace

int main(int argc, char** argv) {
  InitGoogleTest(&argc, argv);
  TestEventListeners& listeners = UnitTest::GetInstance()->listeners();
  if (TestEventListener* gtest_printer = listeners.default_result_printer()) {
    listeners.Release(gtest_printer);
    listeners.Append(new skip_wording_printer(gtest_printer));
  }
  listeners.Append(new seed_listener);
  const int rc = RUN_ALL_TESTS();
  const UnitTest& run = *UnitTest::GetInstance();
  if (rc == 0 && run.test_to_run_count() > 0 && run.skipped_test_count() == run.test_to_run_count()) return 77;
  return rc;
}
