#pragma once
// Chat templates ferry renders itself, and the encoding of a rendered conversation into tokens
// with a per-token "trained" flag.
//
// Each format renders exactly what transformers' apply_chat_template(messages, tokenize=True)
// renders with that format's canonical Jinja template (add_generation_prompt false), and encodes
// it the way a HF tokenizer encodes the rendered string: special tokens are looked up by their
// spelling, and the text between two special tokens is encoded as one string.
// tests/io/chat_template_parity.py holds the canonical templates and checks the ids token for token.
//
//   llama2  <s>[INST] <<SYS>>\nS\n<</SYS>>\n\nU [/INST] A </s><s>[INST] U2 [/INST] A2 </s>
//           (meta-llama/Llama-2-*-chat-hf; content stripped; strictly alternating user/assistant
//           after an optional first system message)
//   llama3  <|begin_of_text|><|start_header_id|>ROLE<|end_header_id|>\n\nC<|eot_id|>...
//           (meta-llama/Meta-Llama-3-8B-Instruct; content trimmed)
//   chatml  <|im_start|>ROLE\nC<|im_end|>\n...
//   zephyr  <|ROLE|>\nC</s>\n...  (HuggingFaceH4/zephyr-7b-beta: the role tags are text, </s> the
//           tokenizer's EOS)
// Trained: what the model generates after the prompt, that is the assistant's content and the
// token that ends its turn (</s>, <|eot_id|>, <|im_end|>; llama2: " A </s>", the spaces included);
// the role headers, the other messages and the separators after a turn are not.
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "src/io/tokenizer.h"

namespace ferry::io {

enum class chat_format { chat_llama2, chat_llama3, chat_chatml, chat_zephyr };

// "llama2" | "llama3" | "chatml" | "zephyr"; anything else is a config_error naming `source` (the
// key or file) and the valid values.
chat_format parse_chat_format(const std::string& name, const std::string& source);
const char* chat_format_name(chat_format f);
const char* chat_format_names();  // "llama2, llama3, chatml, zephyr"

// The format whose canonical Jinja template `jinja` is (compared after trimming the ends and
// reading the two characters \n inside the template as a newline, the two spellings found in
// tokenizer_config.json files), or nullopt.
std::optional<chat_format> match_chat_template(const std::string& jinja);
// chat_template=auto: the format of DIR/tokenizer_config.json's "chat_template". Throws a one-line
// config_error when the file or the key is missing or the template is not one ferry renders exactly
// (naming the format it resembles, if any, and the values chat_template accepts).
chat_format chat_format_from_checkpoint(const std::string& dir);

struct chat_message {
  std::string role;  // system | user | assistant
  std::string content;
  bool trained = true;  // for assistant messages: whether the loss counts them (a prompt's are not)
};

struct chat_piece {
  enum piece_kind { piece_text, piece_special, piece_bos, piece_eos };
  piece_kind kind = piece_text;
  std::string text;  // piece_text: the text; piece_special: the token's spelling
  bool trained = false;
};

// Renders a conversation. Throws ferry::error with a one-line reason (the caller adds file and
// line) for a conversation the format refuses: a role other than system/user/assistant, a llama2
// conversation whose roles do not alternate user/assistant after an optional first system message.
std::vector<chat_piece> render_chat(chat_format f, const std::vector<chat_message>& messages);
// The prompt of a reply: `messages` (usually ending in a user turn) rendered as transformers'
// apply_chat_template(messages, add_generation_prompt=True) renders them with the format's canonical
// template: the conversation, then what opens the assistant's turn (llama3
// <|start_header_id|>assistant<|end_header_id|>\n\n, chatml <|im_start|>assistant\n, zephyr
// <|assistant|>\n; llama2 nothing, its assistant turn starts after [/INST]). Nothing is trained.
// Throws as render_chat does for an unknown role or (llama2) roles that do not alternate; no
// assistant message is needed.
std::vector<chat_piece> render_generation_prompt(chat_format f, const std::vector<chat_message>& messages);
// The spellings of the tokens that end an assistant turn besides the tokenizer's EOS: llama3
// <|eot_id|>, chatml <|im_end|>; llama2 and zephyr end it with EOS itself (empty).
std::vector<std::string> chat_end_of_turn(chat_format f);

// A prompt/completion pair of strings, as TRL tokenizes one: BOS when with_bos (the tokenizer has
// one), the prompt, then the completion and EOS, trained. Throws for an empty completion.
std::vector<chat_piece> render_completion(const std::string& prompt, const std::string& completion, bool with_bos);

// The rendered string, BOS and EOS spelled as given (what the Jinja template renders).
std::string chat_text(const std::vector<chat_piece>& pieces, const std::string& bos, const std::string& eos);

struct encoded_example {
  std::vector<int32_t> ids;
  std::vector<uint8_t> trained;  // 1 where the token counts in the loss (as a target)
};

// Encodes rendered pieces. Consecutive text pieces are encoded as one string. Where the training
// flag changes inside such a run, the tokens of the run that equal the leading tokens of encoding
// its untrained part alone keep that part's flag and the rest take the next part's, so a token
// that straddles the boundary counts as trained (TRL counts prompt tokens the same way). Throws a
// one-line ferry::error naming the token and the tokenizer when a special token is not in the
// vocabulary, or when BOS/EOS are needed and the tokenizer has none.
encoded_example encode_pieces(const std::vector<chat_piece>& pieces, const tokenizer& tok);

// Python's str.strip() (Jinja's trim): removes leading and trailing Unicode whitespace.
std::string strip_py(const std::string& s);

}  // namespace ferry::io
