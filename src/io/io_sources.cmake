# Included by src/io/CMakeLists.txt: the checkpoint, safetensors, tokenizer (sentencepiece and HF
# tokenizer.json) and dataset sources of ferry_io, and the ferry-tokenize tool (made by
# ferry_io_tools() once ferry_io exists).
set(FERRY_IO_SOURCES
  mapped_file.cpp
  half_convert.cpp
  safetensors.cpp
  hf_checkpoint.cpp
  tokenizer.cpp
  hf_text.cpp
  hf_regex.cpp
  hf_bpe.cpp
  hf_pipeline.cpp
  hf_tokenizer.cpp
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
    ${CMAKE_CURRENT_SOURCE_DIR}/hf_text.cpp
    ${CMAKE_CURRENT_SOURCE_DIR}/hf_regex.cpp
    ${CMAKE_CURRENT_SOURCE_DIR}/hf_bpe.cpp
    ${CMAKE_CURRENT_SOURCE_DIR}/hf_pipeline.cpp
    ${CMAKE_CURRENT_SOURCE_DIR}/hf_tokenizer.cpp
    ${CMAKE_CURRENT_SOURCE_DIR}/progress.cpp
    ${CMAKE_CURRENT_SOURCE_DIR}/token_stream.cpp)
  target_link_libraries(ferry-tokenize PRIVATE ferry::common nlohmann_json::nlohmann_json ferry_sentencepiece
                                               ferry_pcre2 TBB::tbb ferry_root_include ferry_warnings)
endfunction()
