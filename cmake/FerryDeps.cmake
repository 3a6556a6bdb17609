# Third-party packages. scripts/setup.sh installs them (apt) or unpacks an offline bundle into
# .deps/prefix; scripts/build.sh passes that prefix in CMAKE_PREFIX_PATH.
find_package(Threads REQUIRED)
find_package(TBB REQUIRED)
find_package(hwy REQUIRED)
find_package(nlohmann_json 3.9 REQUIRED)
find_package(Boost 1.71 REQUIRED COMPONENTS program_options)

# sentencepiece ships only a pkg-config file on Debian/Ubuntu; search the offline prefix too.
find_path(SENTENCEPIECE_INCLUDE_DIR sentencepiece_processor.h)
find_library(SENTENCEPIECE_LIBRARY sentencepiece)
if(SENTENCEPIECE_INCLUDE_DIR AND SENTENCEPIECE_LIBRARY)
  add_library(ferry_sentencepiece INTERFACE)
  target_include_directories(ferry_sentencepiece SYSTEM INTERFACE ${SENTENCEPIECE_INCLUDE_DIR})
  target_link_libraries(ferry_sentencepiece INTERFACE ${SENTENCEPIECE_LIBRARY})
  find_library(SENTENCEPIECE_TRAIN_LIBRARY sentencepiece_train)
  if(SENTENCEPIECE_TRAIN_LIBRARY)
    target_link_libraries(ferry_sentencepiece INTERFACE ${SENTENCEPIECE_TRAIN_LIBRARY})
    set(FERRY_HAVE_SENTENCEPIECE_TRAIN ON)
  endif()
  set(FERRY_HAVE_SENTENCEPIECE ON)
else()
  message(FATAL_ERROR "sentencepiece not found: run scripts/setup.sh (installs libsentencepiece-dev or unpacks the offline bundle)")
endif()

# PCRE2 (8-bit code units) runs the Unicode pre-tokenizer patterns of HF tokenizer.json files
# (src/io/hf_regex.cpp). Debian's libpcre2-dev; found like sentencepiece so the offline prefix works.
find_path(PCRE2_INCLUDE_DIR pcre2.h)
find_library(PCRE2_LIBRARY pcre2-8)
if(PCRE2_INCLUDE_DIR AND PCRE2_LIBRARY)
  add_library(ferry_pcre2 INTERFACE)
  target_include_directories(ferry_pcre2 SYSTEM INTERFACE ${PCRE2_INCLUDE_DIR})
  target_link_libraries(ferry_pcre2 INTERFACE ${PCRE2_LIBRARY})
  target_compile_definitions(ferry_pcre2 INTERFACE PCRE2_CODE_UNIT_WIDTH=8)
else()
  message(FATAL_ERROR "PCRE2 not found: run scripts/setup.sh (installs libpcre2-dev or unpacks the offline bundle)")
endif()

# liburing (the optimizer state tier on disk, src/engine/uring_io.cpp): pkg-config's liburing where
# pkg-config is installed, else (a clean machine, or the offline bundle's .deps/prefix, whose .pc
# names /usr) the header and library searched directly, as for sentencepiece.
find_package(PkgConfig QUIET)
if(PKG_CONFIG_FOUND)
  pkg_check_modules(PC_LIBURING QUIET liburing)
endif()
find_path(LIBURING_INCLUDE_DIR liburing.h HINTS ${PC_LIBURING_INCLUDE_DIRS})
find_library(LIBURING_LIBRARY uring HINTS ${PC_LIBURING_LIBRARY_DIRS})
if(LIBURING_INCLUDE_DIR AND LIBURING_LIBRARY)
  add_library(ferry_liburing INTERFACE)
  target_include_directories(ferry_liburing SYSTEM INTERFACE ${LIBURING_INCLUDE_DIR})
  target_link_libraries(ferry_liburing INTERFACE ${LIBURING_LIBRARY})
else()
  message(FATAL_ERROR "liburing not found: run scripts/setup.sh (installs liburing-dev or unpacks the offline bundle)")
endif()

if(FERRY_BUILD_TESTS)
  find_package(GTest REQUIRED)
  include(GoogleTest)
endif()
