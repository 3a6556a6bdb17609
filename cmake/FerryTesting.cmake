# ferry_add_test(NAME name SOURCES ... LIBS ... [LABELS ...] [GPU])
# One GoogleTest binary per suite, registered with ctest through gtest_discover_tests so each
# TEST is its own ctest entry. GPU suites get the label "gpu"; a GTEST_SKIP inside them shows as
# skipped in ctest, never as passed (gtest prints "[  SKIPPED ]"; the regex avoids brackets, which
# CMake 4's generated test files do not quote).
function(ferry_add_test)
  cmake_parse_arguments(T "GPU" "NAME;TIMEOUT" "SOURCES;LIBS;LABELS" ${ARGN})
  add_executable(${T_NAME} ${T_SOURCES})
  target_link_libraries(${T_NAME} PRIVATE ${T_LIBS} GTest::gtest GTest::gtest_main ferry_root_include ferry_warnings)
  set(labels ${T_LABELS})
  set(prefix "")
  if(T_GPU)
    list(APPEND labels gpu)
    set(prefix "cuda:")  # CPU and CUDA builds of one source share test names; keep them apart
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
               SKIP_REGULAR_EXPRESSION "  SKIPPED "
    DISCOVERY_TIMEOUT 120
    WORKING_DIRECTORY ${PROJECT_SOURCE_DIR})
endfunction()
