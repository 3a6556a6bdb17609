// ferry-tokenize: tokenizes text, JSONL or token files into one llm.c token file, ahead of
// training, with a progress bar on stderr. The file kinds are those of src/io/token_stream.h.
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "src/common/error.h"
#include "src/io/token_stream.h"
#include "src/io/tokenizer.h"

namespace {

const char* k_usage =
    "usage: ferry-tokenize [--tokenizer byte|PATH] [--vocab-limit N] --out FILE INPUT...\n"
    "\n"
    "Tokenizes INPUTs (text files, .jsonl with a \"text\" field, llm.c or nanoGPT token files, or\n"
    "directories of them, walked recursively in sorted order) into FILE in llm.c format (256 int32\n"
    "header, magic 20240520; uint16 tokens for vocabularies up to 65536, else uint32). Documents\n"
    "are separated by the tokenizer's EOS (nothing where it has none).\n"
    "\n"
    "  --tokenizer SPEC   'byte' (default: bytes as ids 3..258), an HF tokenizer.json (BPE: Llama 3,\n"
    "                     Mistral, ...), a sentencepiece tokenizer.model, or a directory holding\n"
    "                     either (tokenizer.json first)\n"
    "  --vocab-limit N    fail if the tokenizer or a token file has ids >= N (the model's vocab_size)\n"
    "  --out FILE         output token file (written atomically)\n";

int run(int argc, char** argv) {
  std::string tok_spec = "byte", out;
  int64_t vocab_limit = 0;
  std::vector<std::string> inputs;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&]() -> std::string {
      FERRY_CONFIG_CHECK(i + 1 < argc, a, " needs a value; see --help");
      return argv[++i];
    };
    if (a == "-h" || a == "--help") {
      std::fputs(k_usage, stdout);
      return 0;
    } else if (a == "--tokenizer") {
      tok_spec = value();
    } else if (a == "--out" || a == "-o") {
      out = value();
    } else if (a == "--vocab-limit") {
      std::string v = value();
      char* end = nullptr;
      vocab_limit = std::strtoll(v.c_str(), &end, 10);
      FERRY_CONFIG_CHECK(end && *end == 0 && vocab_limit >= 0, "--vocab-limit needs a non-negative integer, got ", v);
    } else if (a.size() > 1 && a[0] == '-') {
      FERRY_CONFIG_CHECK(false, "unknown option ", a, "; see --help");
    } else {
      inputs.push_back(a);
    }
  }
  FERRY_CONFIG_CHECK(!out.empty(), "--out FILE is required; see --help");
  FERRY_CONFIG_CHECK(!inputs.empty(), "no inputs given; see --help");

  auto files = ferry::io::list_inputs(inputs);
  bool needs_tokenizer = false;
  for (const auto& f : files)
    needs_tokenizer |= f.kind == ferry::io::input_kind::input_text || f.kind == ferry::io::input_kind::input_jsonl;
  auto tok = ferry::io::make_tokenizer(tok_spec);
  auto stream = ferry::io::token_stream::build(files, needs_tokenizer ? tok.get() : nullptr, vocab_limit);
  FERRY_CHECK(stream.size() > 0, "the inputs hold no text or tokens; nothing written to ", out);
  int64_t vocab = std::max<int64_t>(tok->vocab_size(), stream.max_id() + 1);
  ferry::io::write_llmc_token_file(out, stream, vocab);
  std::fprintf(stderr, "wrote %lld tokens from %zu files to %s (tokenizer %s)\n",
               static_cast<long long>(stream.size()), files.size(), out.c_str(), tok->name().c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return ferry::run_tool("ferry-tokenize", [&] { return run(argc, argv); });
}
