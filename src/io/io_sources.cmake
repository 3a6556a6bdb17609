# Included by src/io/CMakeLists.txt: the checkpoint, safetensors, tokenizer and dataset sources of
# ferry_io, and the ferry-tokenize tool (made by ferry_io_tools() once ferry_io exists).
set(FERRY_IO_SOURCES
  mapped_file.cpp
  half_convert.cpp
  safetensors.cpp
  hf_checkpoint.cpp
  tokenizer.cpp
  progress.cpp
  token_stream.cpp
  chat_template.cpp
  examples.cpp
  dataset.cpp)
set(FERRY_IO_TOOLS ferry-tokenize)

function(ferry_io_tools)
  # Built from its few sources rather than linking ferry_io: without libtorch (which ferry_io
  # carries) the tool starts in milliseconds instead of seconds.
  add_executable(ferry-tokenize
    ${CMAKE_CURRENT_SOURCE_DIR}/tools/tokenize_main.cpp
    ${CMAKE_CURRENT_SOURCE_DIR}/atomic_file.cpp
    ${CMAKE_CURRENT_SOURCE_DIR}/mapped_file.cpp
    ${CMAKE_CURRENT_SOURCE_DIR}/tokenizer.cpp
    ${CMAKE_CURRENT_SOURCE_DIR}/progress.cpp
    ${CMAKE_CURRENT_SOURCE_DIR}/token_stream.cpp)
  target_link_libraries(ferry-tokenize PRIVATE ferry::common nlohmann_json::nlohmann_json ferry_sentencepiece
                                               TBB::tbb ferry_root_include ferry_warnings)
endfunction()
