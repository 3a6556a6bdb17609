#include "src/io/chat_template.h"

#include <filesystem>
#include <nlohmann/json.hpp>

#include "src/common/error.h"
#include "src/io/atomic_file.h"

namespace ferry::io {
namespace {

// The canonical templates as their model repositories' tokenizer_config.json hold them (after
// JSON decoding). Only the comparison in match_chat_template reads them; render_chat is the
// renderer.
constexpr const char* k_llama2_jinja =
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif "
    "%}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ "
    "raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if "
    "loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if "
    "message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] "
    "== 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}";
constexpr const char* k_llama3_jinja =
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% "
    "endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}";
constexpr const char* k_chatml_jinja =
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
constexpr const char* k_zephyr_jinja =
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\\n' + message['content'] + eos_token "
    "}}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\\n'  + message['content'] + eos_token }}\n{% "
    "endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}";

struct format_entry {
  chat_format format;
  const char* name;
  const char* jinja;
  const char* marker;  // a spelling only this format's templates contain, for "it looks like" hints
};
const format_entry k_formats[] = {
    {chat_format::chat_llama2, "llama2", k_llama2_jinja, "[INST]"},
    {chat_format::chat_llama3, "llama3", k_llama3_jinja, "<|start_header_id|>"},
    {chat_format::chat_chatml, "chatml", k_chatml_jinja, "<|im_start|>"},
    {chat_format::chat_zephyr, "zephyr", k_zephyr_jinja, "<|assistant|>"},
};

std::string normalize_jinja(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\\' && i + 1 < s.size() && s[i + 1] == 'n') {
      out.push_back('\n');
      ++i;
    } else {
      out.push_back(s[i]);
    }
  }
  const size_t b = out.find_first_not_of(" \t\r\n"), e = out.find_last_not_of(" \t\r\n");
  return b == std::string::npos ? std::string() : out.substr(b, e - b + 1);
}

// Length of the UTF-8 whitespace character Python's str.isspace() accepts at s[i], or 0.
size_t space_at(const std::string& s, size_t i) {
  const auto c = [&](size_t k) { return k < s.size() ? static_cast<unsigned char>(s[k]) : 0u; };
  const unsigned a = c(i);
  if ((a >= 0x09 && a <= 0x0d) || (a >= 0x1c && a <= 0x20)) return 1;
  if (a == 0xc2 && (c(i + 1) == 0x85 || c(i + 1) == 0xa0)) return 2;
  if (a == 0xe1 && c(i + 1) == 0x9a && c(i + 2) == 0x80) return 3;  // U+1680
  if (a == 0xe2 && c(i + 1) == 0x80) {
    const unsigned t = c(i + 2);
    if ((t >= 0x80 && t <= 0x8a) || t == 0xa8 || t == 0xa9 || t == 0xaf) return 3;  // U+2000-200A, 2028, 2029, 202F
  }
  if (a == 0xe2 && c(i + 1) == 0x81 && c(i + 2) == 0x9f) return 3;  // U+205F
  if (a == 0xe3 && c(i + 1) == 0x80 && c(i + 2) == 0x80) return 3;  // U+3000
  return 0;
}

// for_training: the conversation must have a non-empty trained assistant message.
void check_roles(const std::vector<chat_message>& messages, bool for_training) {
  FERRY_CHECK(!messages.empty(), "the conversation has no messages");
  bool any_trained = false;
  for (size_t i = 0; i < messages.size(); ++i) {
    const chat_message& m = messages[i];
    FERRY_CHECK(m.role == "system" || m.role == "user" || m.role == "assistant", "message ", i, " has role \"",
                m.role, "\"; the roles are system, user and assistant");
    if (for_training && m.role == "assistant" && m.trained) {
      FERRY_CHECK(!m.content.empty(), "assistant message ", i, " is empty; there is nothing to train on in it");
      any_trained = true;
    }
  }
  FERRY_CHECK(any_trained || !for_training, "the conversation has no assistant message to train on");
}

chat_piece text(std::string s, bool trained = false) { return {chat_piece::piece_text, std::move(s), trained}; }
chat_piece special(const char* s, bool trained = false) { return {chat_piece::piece_special, s, trained}; }
chat_piece bos() { return {chat_piece::piece_bos, "", false}; }
chat_piece eos(bool trained) { return {chat_piece::piece_eos, "", trained}; }

void render_llama2(const std::vector<chat_message>& ms, std::vector<chat_piece>& out) {
  size_t first = 0;
  std::string system;
  bool has_system = ms[0].role == "system";
  if (has_system) {
    system = ms[0].content;
    first = 1;
  }
  for (size_t i = first; i < ms.size(); ++i) {
    const chat_message& m = ms[i];
    const bool user_turn = (i - first) % 2 == 0;
    FERRY_CHECK(m.role == (user_turn ? "user" : "assistant"), "llama2 conversations alternate user/assistant after an ",
                "optional first system message; message ", i, " is ", m.role);
    std::string content = m.content;
    if (i == first && has_system) content = "<<SYS>>\n" + system + "\n<</SYS>>\n\n" + content;
    if (user_turn) {
      out.push_back(bos());
      out.push_back(text("[INST] " + strip_py(content) + " [/INST]"));
    } else {
      out.push_back(text(" " + strip_py(content) + " ", m.trained));
      out.push_back(eos(m.trained));
    }
  }
}

void render_llama3(const std::vector<chat_message>& ms, std::vector<chat_piece>& out) {
  out.push_back(special("<|begin_of_text|>"));
  for (const chat_message& m : ms) {
    const bool t = m.role == "assistant" && m.trained;
    out.push_back(special("<|start_header_id|>"));
    out.push_back(text(m.role));
    out.push_back(special("<|end_header_id|>"));
    out.push_back(text("\n\n"));
    out.push_back(text(strip_py(m.content), t));
    out.push_back(special("<|eot_id|>", t));
  }
}

void render_chatml(const std::vector<chat_message>& ms, std::vector<chat_piece>& out) {
  for (const chat_message& m : ms) {
    const bool t = m.role == "assistant" && m.trained;
    out.push_back(special("<|im_start|>"));
    out.push_back(text(m.role + "\n"));
    out.push_back(text(m.content, t));
    out.push_back(special("<|im_end|>", t));
    out.push_back(text("\n"));
  }
}

void render_zephyr(const std::vector<chat_message>& ms, std::vector<chat_piece>& out) {
  for (const chat_message& m : ms) {
    const bool t = m.role == "assistant" && m.trained;
    out.push_back(text("<|" + m.role + "|>\n"));
    out.push_back(text(m.content, t));
    out.push_back(eos(t));
    out.push_back(text("\n"));
  }
}

// Appends the tokens of one run of text pieces: the run is encoded as one string; flags change
// where the encoding stops agreeing with the encoding of the text before the boundary.
void encode_run(const std::vector<const chat_piece*>& run, const tokenizer& tok, encoded_example& out) {
  std::string all;
  for (const chat_piece* p : run) all += p->text;
  if (all.empty()) return;
  const std::vector<int32_t> ids = tok.encode(all);
  std::vector<uint8_t> flags(ids.size(), run.front()->trained);
  size_t chars = 0, from = 0;  // flags[from..] take the current piece's flag
  for (size_t k = 0; k < run.size(); ++k) {
    if (k > 0 && run[k]->trained != run[k - 1]->trained) {
      const std::vector<int32_t> before = tok.encode(all.substr(0, chars));
      size_t same = 0;
      while (same < before.size() && same < ids.size() && before[same] == ids[same]) ++same;
      from = std::max(from, same);
      std::fill(flags.begin() + static_cast<std::ptrdiff_t>(from), flags.end(), run[k]->trained);
    }
    chars += run[k]->text.size();
  }
  out.ids.insert(out.ids.end(), ids.begin(), ids.end());
  out.trained.insert(out.trained.end(), flags.begin(), flags.end());
}

}  // namespace

chat_format parse_chat_format(const std::string& name, const std::string& source) {
  for (const format_entry& f : k_formats)
    if (name == f.name) return f.format;
  throw config_error(source + ": chat template \"" + name + "\" is not one of " + chat_format_names());
}

const char* chat_format_name(chat_format f) {
  for (const format_entry& e : k_formats)
    if (e.format == f) return e.name;
  FERRY_ASSERT(false, "chat_format_name: unknown format");
  return "";
}

const char* chat_format_names() { return "llama2, llama3, chatml, zephyr"; }

std::optional<chat_format> match_chat_template(const std::string& jinja) {
  const std::string s = normalize_jinja(jinja);
  for (const format_entry& f : k_formats)
    if (s == normalize_jinja(f.jinja)) return f.format;
  return std::nullopt;
}

chat_format chat_format_from_checkpoint(const std::string& dir) {
  const std::string path = (std::filesystem::path(dir) / "tokenizer_config.json").string();
  std::error_code ec;
  FERRY_CONFIG_CHECK(!dir.empty() && std::filesystem::is_regular_file(path, ec),
                     "chat_template=auto found no tokenizer_config.json",
                     dir.empty() ? std::string(" (no init checkpoint or tokenizer directory)") : " in " + dir,
                     "; set chat_template to one of ", chat_format_names());
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read_file(path));
  } catch (const nlohmann::json::exception& e) {
    throw config_error(path + ": not valid JSON (" + e.what() + ")");
  }
  std::string jinja;
  if (j.is_object() && j.contains("chat_template") && j["chat_template"].is_string()) {
    jinja = j["chat_template"].get<std::string>();
  } else if (j.is_object() && j.contains("chat_template") && j["chat_template"].is_array()) {
    for (const auto& t : j["chat_template"])  // [{"name": "default", "template": ...}, ...]
      if (t.is_object() && t.value("name", "") == "default" && t.contains("template") && t["template"].is_string())
        jinja = t["template"].get<std::string>();
  }
  FERRY_CONFIG_CHECK(!jinja.empty(), path, " has no chat_template; set chat_template to one of ", chat_format_names());
  if (auto f = match_chat_template(jinja)) return *f;
  std::string like;
  for (const format_entry& f : k_formats)
    if (jinja.find(f.marker) != std::string::npos) like = f.name;
  throw config_error(path + ": its chat_template is not one ferry renders exactly" +
                     (like.empty() ? std::string()
                                   : " (it looks like " + like + "; set chat_template=" + like +
                                         " to train with ferry's " + like + " rendering)") +
                     "; set chat_template to one of " + chat_format_names());
}

std::string strip_py(const std::string& s) {
  size_t b = 0, e = s.size();
  for (size_t n; b < e && (n = space_at(s, b)) > 0;) b += n;
  while (e > b) {
    size_t k = e - 1;  // the start of the last UTF-8 character
    while (k > b && (static_cast<unsigned char>(s[k]) & 0xc0) == 0x80) --k;
    if (space_at(s, k) != e - k) break;
    e = k;
  }
  return s.substr(b, e - b);
}

std::vector<chat_piece> render_chat(chat_format f, const std::vector<chat_message>& messages) {
  check_roles(messages, true);
  std::vector<chat_piece> out;
  switch (f) {
    case chat_format::chat_llama2: render_llama2(messages, out); break;
    case chat_format::chat_llama3: render_llama3(messages, out); break;
    case chat_format::chat_chatml: render_chatml(messages, out); break;
    case chat_format::chat_zephyr: render_zephyr(messages, out); break;
  }
  return out;
}

std::vector<chat_piece> render_generation_prompt(chat_format f, const std::vector<chat_message>& messages) {
  check_roles(messages, false);
  std::vector<chat_message> untrained = messages;
  for (chat_message& m : untrained) m.trained = false;
  std::vector<chat_piece> out;
  switch (f) {
    case chat_format::chat_llama2: render_llama2(untrained, out); break;
    case chat_format::chat_llama3:
      render_llama3(untrained, out);
      out.push_back(special("<|start_header_id|>"));
      out.push_back(text("assistant"));
      out.push_back(special("<|end_header_id|>"));
      out.push_back(text("\n\n"));
      break;
    case chat_format::chat_chatml:
      render_chatml(untrained, out);
      out.push_back(special("<|im_start|>"));
      out.push_back(text("assistant\n"));
      break;
    case chat_format::chat_zephyr:
      render_zephyr(untrained, out);
      out.push_back(text("<|assistant|>\n"));
      break;
  }
  return out;
}

std::vector<std::string> chat_end_of_turn(chat_format f) {
  switch (f) {
    case chat_format::chat_llama3: return {"<|eot_id|>"};
    case chat_format::chat_chatml: return {"<|im_end|>"};
    case chat_format::chat_llama2:
    case chat_format::chat_zephyr: return {};
  }
  return {};
}

std::vector<chat_piece> render_completion(const std::string& prompt, const std::string& completion, bool with_bos) {
  FERRY_CHECK(!completion.empty(), "the completion is empty; there is nothing to train on");
  std::vector<chat_piece> out;
  if (with_bos) out.push_back(bos());
  out.push_back(text(prompt));
  out.push_back(text(completion, true));
  out.push_back(eos(true));
  return out;
}

std::string chat_text(const std::vector<chat_piece>& pieces, const std::string& bos_text, const std::string& eos_text) {
  std::string s;
  for (const chat_piece& p : pieces)
    s += p.kind == chat_piece::piece_bos ? bos_text : p.kind == chat_piece::piece_eos ? eos_text : p.text;
  return s;
}

encoded_example encode_pieces(const std::vector<chat_piece>& pieces, const tokenizer& tok) {
  encoded_example out;
  std::vector<const chat_piece*> run;
  auto flush = [&] {
    encode_run(run, tok, out);
    run.clear();
  };
  for (const chat_piece& p : pieces) {
    if (p.kind == chat_piece::piece_text) {
      if (!p.text.empty()) run.push_back(&p);
      continue;
    }
    flush();
    int32_t id = -1;
    if (p.kind == chat_piece::piece_special) {
      id = tok.token_id(p.text);
      FERRY_CHECK(id >= 0, "the chat template needs the token ", p.text, " but tokenizer ", tok.name(),
                  " has no such token; use the checkpoint's own tokenizer or another chat_template");
    } else {
      const bool is_bos = p.kind == chat_piece::piece_bos;
      id = is_bos ? tok.bos_id() : tok.eos_id();
      FERRY_CHECK(id >= 0, "the example needs ", is_bos ? "a BOS" : "an EOS", " token but tokenizer ", tok.name(),
                  " has none");
    }
    out.ids.push_back(id);
    out.trained.push_back(p.trained);
  }
  flush();
  return out;
}

}  // namespace ferry::io
