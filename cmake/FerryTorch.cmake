# libtorch, found in this order: Torch_DIR / CMAKE_PREFIX_PATH; the Python torch named by
# FERRY_PYTHON (scripts/setup.sh points it at the project's .venv when it made one); Debian's
# libtorch-dev as the last fallback (system paths).
# Torch's CUDA setup appends -gencode flags for every architecture it knows unless told otherwise;
# ferry's kernels target the RTX 4090 (8.9) and H100 (9.0).
if(NOT DEFINED ENV{TORCH_CUDA_ARCH_LIST} AND NOT TORCH_CUDA_ARCH_LIST)
  set(TORCH_CUDA_ARCH_LIST "8.9;9.0")
endif()
# FERRY_PYTHON: the Python that holds torch (and, for the parity tests, transformers): given on
# the command line (scripts/build.sh passes setup.sh's choice), else the project venv, else python3.
if(NOT FERRY_PYTHON)
  if(EXISTS ${PROJECT_SOURCE_DIR}/.venv/bin/python)
    set(FERRY_PYTHON ${PROJECT_SOURCE_DIR}/.venv/bin/python)
  else()
    find_program(FERRY_PYTHON NAMES python3 python)
  endif()
endif()

# Where the Python torch keeps its CMake files, when no Torch_DIR / CMAKE_PREFIX_PATH names one.
if(FERRY_PYTHON)
  execute_process(COMMAND ${FERRY_PYTHON} -c "import torch;print(torch.utils.cmake_prefix_path)"
    OUTPUT_VARIABLE _ferry_torch_prefix OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  if(_ferry_torch_prefix)
    list(APPEND CMAKE_PREFIX_PATH ${_ferry_torch_prefix})
  endif()
endif()
find_program(FERRY_NVCC nvcc HINTS ENV CUDA_HOME ENV CUDA_PATH /usr/local/cuda PATH_SUFFIXES bin)

# The install root of a libtorch laid out as <root>/share/cmake/Torch (a PyTorch wheel or the
# libtorch zip), or empty.
set(_ferry_torch_root "")
foreach(_p ${Torch_DIR} ${CMAKE_PREFIX_PATH})
  foreach(_sub "" Torch share/cmake/Torch)
    if(NOT _ferry_torch_root AND EXISTS "${_p}/${_sub}/TorchConfig.cmake")
      get_filename_component(_root "${_p}/${_sub}/../../.." ABSOLUTE)
      if(EXISTS "${_root}/include/ATen/ATen.h" AND EXISTS "${_root}/lib/libtorch_cpu.so")
        set(_ferry_torch_root "${_root}")
        set(_ferry_torch_config_dir "${_p}/${_sub}")
      endif()
    endif()
  endforeach()
endforeach()

# A libtorch built with CUDA (every Linux x86_64 PyTorch wheel on PyPI) cannot be configured
# through its own TorchConfig on a machine without the CUDA toolkit: Caffe2's cuda.cmake stops
# with "Your installed Caffe2 version uses CUDA but I cannot find the CUDA libraries". A CPU-only
# build needs none of that, so there ferry imports libtorch's CPU side itself: the headers,
# libtorch_cpu and libc10, and the definitions torch_cpu's own target carries.
set(FERRY_TORCH_CPU_SIDE OFF)
if(_ferry_torch_root AND EXISTS "${_ferry_torch_root}/lib/libc10_cuda.so" AND
   (FERRY_CUDA STREQUAL "OFF" OR NOT FERRY_NVCC))
  if(FERRY_CUDA STREQUAL "ON")
    message(FATAL_ERROR "FERRY_CUDA=ON but no nvcc was found (looked in PATH, $CUDA_HOME, /usr/local/cuda); "
                        "install the CUDA toolkit or pass -DFERRY_CUDA=OFF")
  endif()
  set(FERRY_TORCH_CPU_SIDE ON)
  set(Torch_DIR "${_ferry_torch_config_dir}")
  file(STRINGS "${_ferry_torch_config_dir}/TorchConfigVersion.cmake" _v REGEX "set\\(PACKAGE_VERSION ")
  string(REGEX REPLACE ".*\"(.*)\".*" "\\1" Torch_VERSION "${_v}")
  add_library(ferry_torch INTERFACE)
  target_include_directories(ferry_torch SYSTEM INTERFACE
    "${_ferry_torch_root}/include" "${_ferry_torch_root}/include/torch/csrc/api/include")
  target_compile_definitions(ferry_torch INTERFACE USE_DISTRIBUTED USE_C10D_GLOO USE_RPC USE_TENSORPIPE)
  # --no-as-needed as torch's own target does: static registrations in libtorch_cpu must load.
  target_link_libraries(ferry_torch INTERFACE
    "-Wl,--no-as-needed,${_ferry_torch_root}/lib/libtorch_cpu.so -Wl,--as-needed"
    "${_ferry_torch_root}/lib/libc10.so" Threads::Threads)
  target_link_options(ferry_torch INTERFACE "-Wl,-rpath,${_ferry_torch_root}/lib")
else()
  # Torch's CUDA config needs nvcc; point it at the toolkit when one is installed.
  if(NOT CMAKE_CUDA_COMPILER AND FERRY_NVCC AND NOT FERRY_CUDA STREQUAL "OFF")
    set(CMAKE_CUDA_COMPILER "${FERRY_NVCC}")
  endif()
  find_package(Torch REQUIRED CONFIG)
  # Torch's CMake adds flags we do not want everywhere (e.g. -D_GLIBCXX_USE_CXX11_ABI); keep them on
  # the torch target only. TORCH_LIBRARIES carries the include directories and definitions.
  add_library(ferry_torch INTERFACE)
  target_link_libraries(ferry_torch INTERFACE ${TORCH_LIBRARIES})
endif()
target_compile_options(ferry_torch INTERFACE $<$<COMPILE_LANGUAGE:CXX>:-Wno-unused-parameter>)

set(FERRY_TORCH_VERSION "${Torch_VERSION}")
set(FERRY_TORCH_HAS_CUDA OFF)
if(TARGET torch_cuda OR CAFFE2_USE_CUDA OR FERRY_TORCH_CPU_SIDE)
  set(FERRY_TORCH_HAS_CUDA ON)
endif()

set(FERRY_WITH_CUDA OFF)
if(NOT FERRY_TORCH_CPU_SIDE AND (FERRY_CUDA STREQUAL "ON" OR (FERRY_CUDA STREQUAL "AUTO" AND FERRY_TORCH_HAS_CUDA)))
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    enable_language(CUDA)
    if(NOT CMAKE_CUDA_ARCHITECTURES OR CMAKE_CUDA_ARCHITECTURES STREQUAL "52")
      # RTX 4090 (sm_89) and H100 (sm_90); override with -DCMAKE_CUDA_ARCHITECTURES=native.
      set(CMAKE_CUDA_ARCHITECTURES 89 90)
    endif()
    set(CMAKE_CUDA_STANDARD 17)
    set(CMAKE_CUDA_STANDARD_REQUIRED ON)
    set(FERRY_WITH_CUDA ON)
  elseif(FERRY_CUDA STREQUAL "ON")
    message(FATAL_ERROR "FERRY_CUDA=ON but no CUDA compiler was found; install the CUDA toolkit or pass -DFERRY_CUDA=OFF")
  endif()
endif()

# ferry_aten_target(target): link libtorch and give the target's C++ sources a precompiled
# <ATen/ATen.h>, so a 2-core build parses the ATen headers once rather than per file. Every target
# reuses one of two shared PCHs (each is ~350 MB; one per target filled CI's disk): GCC refuses a
# PCH built with another -fPIC/-fPIE setting, so libraries share a PIC one and executables a PIE one.
set(_ferry_pch_source ${PROJECT_BINARY_DIR}/generated/ferry_pch.cpp)
file(WRITE ${_ferry_pch_source} "// Owner of the shared ATen precompiled header (cmake/FerryTorch.cmake).\nint main() { return 0; }\n")
add_library(ferry_aten_pch_pic OBJECT ${_ferry_pch_source})
add_executable(ferry_aten_pch_pie ${_ferry_pch_source})
foreach(_owner ferry_aten_pch_pic ferry_aten_pch_pie)
  target_link_libraries(${_owner} PRIVATE ferry_torch)
  target_precompile_headers(${_owner} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:<ATen/ATen.h$<ANGLE-R>>)
  set_target_properties(${_owner} PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${PROJECT_BINARY_DIR}/pch)
endforeach()

function(ferry_aten_target target)
  target_link_libraries(${target} PUBLIC ferry_torch)
  get_target_property(_type ${target} TYPE)
  if(_type STREQUAL "EXECUTABLE")
    target_precompile_headers(${target} REUSE_FROM ferry_aten_pch_pie)
  else()
    target_precompile_headers(${target} REUSE_FROM ferry_aten_pch_pic)
  endif()
endfunction()
