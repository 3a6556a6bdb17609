// The C++ side of chat_template_parity.py: loads a .jsonl file of examples through ferry's example
// reader (example_set::load, no length limit) and prints, as one JSON object on stdout, the
// reader's notes and each example's token ids and trained flags, in line order.
//   chat_xcheck TOKENIZER CHAT_TEMPLATE TEMPLATE_DIR FILE.jsonl
// A failure prints the error on stderr and exits 1.
#include <cstdio>
#include <exception>
#include <nlohmann/json.hpp>

#include "src/io/examples.h"
#include "src/io/tokenizer.h"

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: chat_xcheck TOKENIZER CHAT_TEMPLATE TEMPLATE_DIR FILE.jsonl\n");
    return 2;
  }
  try {
    auto tok = ferry::io::make_tokenizer(argv[1]);
    ferry::io::example_options opt;
    opt.chat_template = argv[2];
    opt.template_dir = argv[3];
    opt.max_length = int64_t(1) << 40;
    opt.long_examples = ferry::io::long_example_policy::long_error;
    const auto set = ferry::io::example_set::load({argv[4]}, *tok, opt, false);
    nlohmann::json out;
    out["notes"] = set.notes();
    out["examples"] = nlohmann::json::array();
    for (int64_t i = 0; i < set.size(); ++i) {
      nlohmann::json ex;
      ex["ids"] = std::vector<int32_t>(set.ids(i), set.ids(i) + set.length(i));
      ex["trained"] = std::vector<int>(set.trained(i), set.trained(i) + set.length(i));
      out["examples"].push_back(ex);
    }
    std::printf("%s\n", out.dump().c_str());
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
}
