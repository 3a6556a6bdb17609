# ferry_add_test(NAME name SOURCES ... LIBS ... [LABELS ...] [GPU] [NO_TORCH])
# One GoogleTest binary per suite, registered with ctest through gtest_discover_tests so each
# TEST is its own ctest entry. GPU suites get the label "gpu" and FERRY_TEST_CUDA=1
# (tests/cuda_suite.h); a GTEST_SKIP shows as skipped in ctest, never as passed, through the exit
# code alone: tests/gtest_main.cpp exits 77 when every test that ran was skipped, 1 on any failure
# (one after a skip too), and keeps gtest's "[  SKIPPED ]" out of the output: gtest_discover_tests
# adds a skip regex on it, and in ctest a matching skip regex overrides a failing exit code.
# A suite links ferry_gtest_main_aten, which seeds ATen's generators per test (a fixed draw for
# each test; FERRY_TEST_SEED picks others), unless it says NO_TORCH: a suite that does not load
# libtorch keeps the plain main and starts without it (libtorch's load costs seconds a process).
add_library(ferry_gtest_main STATIC ${PROJECT_SOURCE_DIR}/tests/gtest_main.cpp)
target_link_libraries(ferry_gtest_main PUBLIC GTest::gtest PRIVATE ferry_root_include)
add_library(ferry_gtest_main_aten STATIC ${PROJECT_SOURCE_DIR}/tests/gtest_main.cpp)
target_link_libraries(ferry_gtest_main_aten PUBLIC GTest::gtest ferry_torch PRIVATE ferry_root_include)
target_compile_definitions(ferry_gtest_main_aten PRIVATE FERRY_GTEST_SEEDS_ATEN=1)

function(ferry_add_test)
  cmake_parse_arguments(T "GPU;NO_TORCH" "NAME;TIMEOUT" "SOURCES;LIBS;LABELS" ${ARGN})
  add_executable(${T_NAME} ${T_SOURCES})
  if(T_NO_TORCH)
    set(main ferry_gtest_main)
  else()
    set(main ferry_gtest_main_aten)
  endif()
  target_link_libraries(${T_NAME} PRIVATE ${T_LIBS} GTest::gtest ${main} ferry_root_include ferry_warnings)
  set(labels ${T_LABELS})
  set(prefix "")
  if(T_GPU)
    list(APPEND labels gpu)
    set(prefix "cuda:")  # CPU and CUDA builds of one source share test names; keep them apart
    # tests/cuda_suite.h: k_cuda_suite, and FERRY_REQUIRE_DEVICE() skips where no device is usable
    target_compile_definitions(${T_NAME} PRIVATE FERRY_TEST_CUDA=1)
  else()
    list(APPEND labels cpu)
  endif()
  if(NOT T_TIMEOUT)
    set(T_TIMEOUT 600)
  endif()
  gtest_discover_tests(${T_NAME}
    TEST_PREFIX "${prefix}"
    NO_PRETTY_VALUES  # parameter values print as raw bytes (pointers): unstable test names
    PROPERTIES LABELS "${labels}" TIMEOUT ${T_TIMEOUT}
               SKIP_RETURN_CODE 77
    DISCOVERY_TIMEOUT 120
    WORKING_DIRECTORY ${PROJECT_SOURCE_DIR})
endfunction()

# ferry_add_output_test(NAME name RC code REGEX regex COMMAND cmd args...)
# A command-line test that passes when cmd exits with `code` and its output matches `regex` (POSIX
# extended, through tests/expect_output.sh): PASS_REGULAR_EXPRESSION alone ignores the exit code.
# An exit 77 stays 77, a skip only where the caller sets SKIP_RETURN_CODE 77.
function(ferry_add_output_test)
  cmake_parse_arguments(PARSE_ARGV 0 T "" "NAME;RC;REGEX" "COMMAND")
  add_test(NAME ${T_NAME} COMMAND ${PROJECT_SOURCE_DIR}/tests/expect_output.sh ${T_RC} "${T_REGEX}" -- ${T_COMMAND})
endfunction()
