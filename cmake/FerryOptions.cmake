# Build options and the INTERFACE targets every ferry target links for flags.
if(NOT CMAKE_BUILD_TYPE AND NOT CMAKE_CONFIGURATION_TYPES)
  set(CMAKE_BUILD_TYPE Release CACHE STRING "Build type" FORCE)
endif()

set(CMAKE_CXX_STANDARD 17)
set(CMAKE_CXX_STANDARD_REQUIRED ON)
set(CMAKE_CXX_EXTENSIONS OFF)
set(CMAKE_POSITION_INDEPENDENT_CODE ON)
set(CMAKE_EXPORT_COMPILE_COMMANDS ON)
set(CMAKE_RUNTIME_OUTPUT_DIRECTORY ${PROJECT_BINARY_DIR}/bin)

option(FERRY_BUILD_TESTS "Build the GoogleTest suites" ON)
option(FERRY_WERROR "Treat warnings as errors" OFF)
option(FERRY_NVTX "Emit NVTX ranges around engine phases (needs CUDA)" ON)
set(FERRY_CUDA "AUTO" CACHE STRING "Build gpu/ CUDA code: AUTO (when libtorch has CUDA and nvcc matches), ON, OFF")
set_property(CACHE FERRY_CUDA PROPERTY STRINGS AUTO ON OFF)

add_library(ferry_warnings INTERFACE)
add_library(ferry::warnings ALIAS ferry_warnings)
target_compile_options(ferry_warnings INTERFACE
  $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wno-unused-parameter>
  $<$<AND:$<COMPILE_LANGUAGE:CXX>,$<BOOL:${FERRY_WERROR}>>:-Werror>)

# Every target sees the repository root so includes read "src/model/block.h", "cpu_optim/adamw.h".
add_library(ferry_root_include INTERFACE)
target_include_directories(ferry_root_include INTERFACE ${PROJECT_SOURCE_DIR} ${PROJECT_BINARY_DIR}/generated)

execute_process(COMMAND git rev-parse --short=12 HEAD
  WORKING_DIRECTORY ${PROJECT_SOURCE_DIR} OUTPUT_VARIABLE FERRY_GIT_COMMIT
  OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
if(NOT FERRY_GIT_COMMIT)
  set(FERRY_GIT_COMMIT "unknown")
endif()
configure_file(${CMAKE_CURRENT_LIST_DIR}/version.h.in ${PROJECT_BINARY_DIR}/generated/ferry_version.h @ONLY)
