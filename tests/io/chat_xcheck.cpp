// The C++ side of chat_template_parity.py: loads a .jsonl file of examples through ferry's example
// reader (example_set::load, no length limit) and prints, as one JSON object on stdout, the
// reader's notes and each example's token ids and trained flags, in line order.
//   chat_xcheck TOKENIZER CHAT_TEMPLATE TEMPLATE_DIR FILE.jsonl
// With a fifth argument "generation", each line's {"messages": [...]} is rendered as a generation
// prompt instead (render_generation_prompt, what ferry-infer --chat encodes) and the output is
// {"format": NAME, "prompts": [[ids], ...], "end_of_turn": [ids]}.
// A failure prints the error on stderr and exits 1.
#include <cstdio>
#include <exception>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "src/io/chat_template.h"
#include "src/io/examples.h"
#include "src/io/tokenizer.h"

int main(int argc, char** argv) {
  if (argc != 5 && !(argc == 6 && std::string(argv[5]) == "generation")) {
    std::fprintf(stderr, "usage: chat_xcheck TOKENIZER CHAT_TEMPLATE TEMPLATE_DIR FILE.jsonl [generation]\n");
    return 2;
  }
  try {
    auto tok = ferry::io::make_tokenizer(argv[1]);
    if (argc == 6) {
      namespace io = ferry::io;
      const std::string name = argv[2];
      const io::chat_format f =
          name == "auto" ? io::chat_format_from_checkpoint(argv[3]) : io::parse_chat_format(name, "CHAT_TEMPLATE");
      nlohmann::json out;
      out["format"] = io::chat_format_name(f);
      out["prompts"] = nlohmann::json::array();
      std::ifstream in(argv[4]);
      for (std::string line; std::getline(in, line);) {
        if (line.empty()) continue;
        std::vector<io::chat_message> messages;
        const nlohmann::json j = nlohmann::json::parse(line);
        for (const auto& m : j.at("messages"))
          messages.push_back({m.at("role").get<std::string>(), m.at("content").get<std::string>(), false});
        out["prompts"].push_back(io::encode_pieces(io::render_generation_prompt(f, messages), *tok).ids);
      }
      out["end_of_turn"] = nlohmann::json::array();
      for (const std::string& t : io::chat_end_of_turn(f)) out["end_of_turn"].push_back(tok->token_id(t));
      std::printf("%s\n", out.dump().c_str());
      return 0;
    }
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
