// Instruction and chat examples: template rendering rules and errors, the encoding of pieces into
// ids and trained flags (exact with the byte tokenizer, boundaries inside merged tokens with
// sentencepiece), the JSONL reader's errors and policies, best-fit packing against a reference,
// and the dataset's rows (labels, positions, padding, the split). Token-for-token parity with
// transformers is chat_template_parity.py.
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <random>
#include <set>

#include "src/common/error.h"
#include "src/io/chat_template.h"
#include "src/io/dataset.h"
#include "src/io/examples.h"
#include "tests/io/io_test_util.h"
#include "tests/io/sp_test_model.h"

namespace ferry::io {
namespace {
using test::scratch_dir;

std::vector<chat_message> convo(std::initializer_list<std::pair<const char*, const char*>> ms) {
  std::vector<chat_message> out;
  for (const auto& [r, c] : ms) out.push_back({r, c, true});
  return out;
}

TEST(chat_template, strip_is_pythons) {
  EXPECT_EQ(strip_py(" \t\n x y \r\f\v"), "x y");
  // U+00A0, U+2003, U+3000, U+0085 are whitespace to Python; U+200B (zero width space) is not.
  EXPECT_EQ(strip_py("\u00a0\u2003a\u3000\u0085"), "a");
  EXPECT_EQ(strip_py("\u200bb\u200b"), "\u200bb\u200b");
  EXPECT_EQ(strip_py("\u00e9\u00a0"), "\u00e9");  // C3 A9 then C2 A0: only the second goes
  EXPECT_EQ(strip_py("\u3000\u2028 "), "");
  EXPECT_EQ(strip_py(""), "");
}

TEST(chat_template, formats_and_matching) {
  for (const char* n : {"llama2", "llama3", "chatml", "zephyr"})
    EXPECT_STREQ(chat_format_name(parse_chat_format(n, "chat_template")), n);
  const std::string err = test::error_of<ferry::config_error>([] { parse_chat_format("mistral", "chat_template"); });
  EXPECT_NE(err.find("chat_template: chat template \"mistral\" is not one of llama2, llama3, chatml, zephyr"),
            std::string::npos)
      << err;
  // tokenizer_config.json files spell a newline inside a template's strings either way.
  const std::string chatml_escaped =
      "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
      "'\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
  std::string chatml_newlines = chatml_escaped;
  for (size_t p; (p = chatml_newlines.find("\\n")) != std::string::npos;) chatml_newlines.replace(p, 2, "\n");
  EXPECT_EQ(match_chat_template(chatml_escaped), chat_format::chat_chatml);
  EXPECT_EQ(match_chat_template("\n" + chatml_newlines + "  "), chat_format::chat_chatml);
  EXPECT_FALSE(match_chat_template(chatml_escaped.substr(1)).has_value());
  EXPECT_FALSE(match_chat_template("").has_value());
}

TEST(chat_template, auto_reads_tokenizer_config) {
  scratch_dir dir;
  EXPECT_ERROR_HAS(chat_format_from_checkpoint(dir.path()), "found no tokenizer_config.json in", "llama2, llama3");
  test::write_bytes(dir / "tokenizer_config.json", R"({"bos_token": "<s>"})");
  EXPECT_ERROR_HAS(chat_format_from_checkpoint(dir.path()), "tokenizer_config.json has no chat_template");
  test::write_bytes(dir / "tokenizer_config.json", R"({"chat_template": "{{ messages }}[INST]"})");
  EXPECT_ERROR_HAS(chat_format_from_checkpoint(dir.path()), "not one ferry renders exactly", "looks like llama2");
  test::write_bytes(dir / "tokenizer_config.json", R"({"chat_template": "{{ messages }}"})");
  const std::string e = test::error_of<ferry::config_error>([&] { chat_format_from_checkpoint(dir.path()); });
  EXPECT_EQ(e.find("looks like"), std::string::npos) << e;
  EXPECT_EQ(e.find('\n'), std::string::npos) << e;
}

TEST(chat_template, refused_conversations) {
  for (chat_format f : {chat_format::chat_llama2, chat_format::chat_llama3, chat_format::chat_chatml,
                        chat_format::chat_zephyr}) {
    EXPECT_ERROR_HAS(render_chat(f, convo({{"user", "a"}, {"tool", "b"}})), "message 1 has role \"tool\"");
    EXPECT_ERROR_HAS(render_chat(f, convo({{"system", "s"}, {"user", "a"}})), "no assistant message");
    EXPECT_ERROR_HAS(render_chat(f, convo({{"user", "a"}, {"assistant", ""}})), "assistant message 1 is empty");
    EXPECT_ERROR_HAS(render_chat(f, {}), "no messages");
  }
  EXPECT_ERROR_HAS(render_chat(chat_format::chat_llama2, convo({{"assistant", "a"}, {"user", "b"}})),
                   "alternate user/assistant", "message 0 is assistant");
  EXPECT_ERROR_HAS(render_chat(chat_format::chat_llama2, convo({{"user", "a"}, {"system", "s"}, {"assistant", "b"}})),
                   "message 1 is system");
  // The prompt's assistant turns are not trained: a conversation needs a trained one.
  auto prompt_only = convo({{"user", "a"}, {"assistant", "b"}});
  prompt_only[1].trained = false;
  EXPECT_ERROR_HAS(render_chat(chat_format::chat_chatml, prompt_only), "no assistant message to train on");
  EXPECT_ERROR_HAS(render_completion("p", "", true), "completion is empty");
}

// With the byte tokenizer every byte is one token, so the ids and flags follow the pieces exactly.
TEST(chat_template, byte_encoding_follows_the_pieces) {
  auto tok = make_tokenizer("byte");
  for (chat_format f : {chat_format::chat_llama2, chat_format::chat_zephyr}) {
    const auto pieces =
        render_chat(f, convo({{"system", "Be brief."}, {"user", " Hi "}, {"assistant", "Hello\n"}, {"user", "Bye"},
                              {"assistant", " Ciao"}}));
    std::vector<int32_t> ids;
    std::vector<uint8_t> trained;
    for (const chat_piece& p : pieces) {
      ASSERT_NE(p.kind, chat_piece::piece_special) << "llama2 and zephyr use only BOS/EOS as special tokens";
      if (p.kind == chat_piece::piece_text) {
        for (unsigned char c : p.text) ids.push_back(3 + c), trained.push_back(p.trained);
      } else {
        ids.push_back(p.kind == chat_piece::piece_bos ? 1 : 2);
        trained.push_back(p.trained);
      }
    }
    const encoded_example ex = encode_pieces(pieces, *tok);
    EXPECT_EQ(ex.ids, ids) << chat_format_name(f);
    EXPECT_EQ(ex.trained, trained) << chat_format_name(f);
    // What is trained: both answers and their EOS, nothing else.
    const std::string text = chat_text(pieces, "<s>", "</s>");
    std::string trained_text;
    for (const chat_piece& p : pieces)
      if (p.trained) trained_text += p.kind == chat_piece::piece_eos ? "</s>" : p.text;
    EXPECT_EQ(trained_text, f == chat_format::chat_llama2 ? " Hello </s> Ciao </s>" : "Hello\n</s> Ciao</s>")
        << text;
  }
}

TEST(chat_template, missing_special_tokens_name_token_and_tokenizer) {
  auto tok = make_tokenizer("byte");
  const auto c = convo({{"user", "a"}, {"assistant", "b"}});
  EXPECT_ERROR_HAS(encode_pieces(render_chat(chat_format::chat_chatml, c), *tok), "needs the token <|im_start|>",
                   "tokenizer byte has no such token");
  EXPECT_ERROR_HAS(encode_pieces(render_chat(chat_format::chat_llama3, c), *tok), "<|begin_of_text|>");
}

// A completion that starts inside a word: the token that straddles the boundary is trained, and
// the untrained tokens are exactly the prompt's own leading tokens.
TEST(chat_template, boundaries_inside_merged_tokens) {
  const std::string& d = test::sp_model_dir();
  ASSERT_FALSE(d.empty()) << "/usr/share/common-licenses is absent";
  auto tok = make_tokenizer(d);
  const std::string text = "This program is free software; you can redistribute it";
  int straddles = 0;
  for (size_t cut = 1; cut < text.size(); ++cut) {
    const encoded_example ex = encode_pieces(render_completion(text.substr(0, cut), text.substr(cut), true), *tok);
    const std::vector<int32_t> whole = tok->encode(text), prompt = tok->encode(text.substr(0, cut));
    ASSERT_EQ(ex.ids.size(), whole.size() + 2);
    EXPECT_EQ(ex.ids.front(), tok->bos_id());
    EXPECT_EQ(ex.ids.back(), tok->eos_id());
    EXPECT_TRUE(std::equal(whole.begin(), whole.end(), ex.ids.begin() + 1));
    size_t same = 0;
    while (same < prompt.size() && prompt[same] == whole[same]) ++same;
    straddles += same < prompt.size();
    for (size_t k = 0; k < ex.ids.size(); ++k)
      ASSERT_EQ(ex.trained[k], k >= 1 + same) << "cut " << cut << " token " << k;
  }
  EXPECT_GT(straddles, 10) << "cuts inside words should merge across the boundary";
}

// --- the JSONL reader -------------------------------------------------------------------------

example_options opts(int64_t max_length = 1 << 20) {
  example_options o;
  o.chat_template = "llama2";
  o.max_length = max_length;
  return o;
}

TEST(examples, line_errors_name_file_and_line) {
  scratch_dir dir;
  auto tok = make_tokenizer("byte");
  const std::string good = R"({"prompt": "p", "completion": "c"})";
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"{not json", "not valid JSON"},
      {R"({"prompt": "p"})", "neither \"messages\" nor \"prompt\" and \"completion\""},
      {R"({"text": "t"})", "a \"text\" line in a file of examples"},
      {R"({"prompt": 1, "completion": "c"})", "must both be strings or both be lists"},
      {R"({"prompt": "p", "completion": ""})", "completion is empty"},
      {R"({"messages": {"role": "user"}})", "\"messages\" is not a list of messages"},
      {R"({"messages": [{"role": "user"}]})", "message 0 is not an object with \"role\" and \"content\""},
      {R"({"messages": [{"role": "user", "content": null}]})", "\"content\" is not a string"},
      {R"({"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]})", "role \"bot\""},
      {R"({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]})",
       "alternate"},
      {"[1, 2]", "not a JSON object"},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    const std::string f = dir / ("bad" + std::to_string(i) + ".jsonl");
    test::write_bytes(f, good + "\n\n" + cases[i].first + "\n" + good + "\n");
    const std::string e = test::error_of<ferry::error>([&] { example_set::load({f}, *tok, opts(), false); });
    EXPECT_NE(e.find(f + ":3: "), std::string::npos) << e;
    EXPECT_NE(e.find(cases[i].second), std::string::npos) << e;
    EXPECT_NE(e.find("skip_invalid_examples"), std::string::npos) << e;
    EXPECT_EQ(e.find('\n'), std::string::npos) << e;
    // Skipping: counted, the first named, the good lines kept.
    example_options skip = opts();
    skip.skip_invalid = true;
    const example_set s = example_set::load({f}, *tok, skip, false);
    EXPECT_EQ(s.size(), 2);
    EXPECT_NE(s.notes().find("1 invalid lines skipped (first: " + f + ":3: "), std::string::npos) << s.notes();
  }
  // An unknown template is a run error, not a line error, even when skipping.
  const std::string f = dir / "chat.jsonl";
  test::write_bytes(f, R"({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})");
  example_options o = opts();
  o.chat_template = "chatml";
  o.skip_invalid = true;
  EXPECT_ERROR_HAS(example_set::load({f}, *tok, o, false), "needs the token <|im_start|>");
  o.chat_template = "auto";
  EXPECT_ERROR_HAS(example_set::load({f}, *tok, o, false), "chat_template=auto found no tokenizer_config.json");
  // Nothing usable at all.
  test::write_bytes(f, "{bad\n");
  EXPECT_ERROR_HAS(example_set::load({f}, *tok, o, false), "hold no usable example", "1 invalid");
}

TEST(examples, long_examples_truncate_drop_or_stop) {
  scratch_dir dir;
  auto tok = make_tokenizer("byte");
  const std::string f = dir / "long.jsonl";
  // Byte tokenizer: BOS + prompt + completion + EOS.
  test::write_bytes(f, R"({"prompt": "ab", "completion": "cdefghij"})"
                       "\n"  // 12 tokens: too long for 8
                       R"({"prompt": "a", "completion": "b"})"
                       "\n"  // 4 tokens
                       R"({"prompt": "abcdefghij", "completion": "k"})"
                       "\n");  // 13 tokens; its completion is past 8
  example_options o = opts(8);
  const example_set t = example_set::load({f}, *tok, o, false);
  ASSERT_EQ(t.size(), 2);  // the third has nothing trained within 8 tokens
  EXPECT_EQ(t.length(0), 8);
  EXPECT_EQ(t.length(1), 4);
  EXPECT_EQ(std::vector<int32_t>(t.ids(0), t.ids(0) + 8), (std::vector<int32_t>{1, 3 + 'a', 3 + 'b', 3 + 'c',
                                                                                 3 + 'd', 3 + 'e', 3 + 'f', 3 + 'g'}));
  EXPECT_EQ(t.num_targets(), 5 + 2);  // c..g, and b + EOS
  EXPECT_NE(t.notes().find("2 examples longer than max_length 8 truncated (first: " + f + ":1)"), std::string::npos)
      << t.notes();
  EXPECT_NE(t.notes().find("1 examples with no trained token within max_length dropped (first: " + f + ":3)"),
            std::string::npos)
      << t.notes();
  o.long_examples = long_example_policy::long_drop;
  const example_set dr = example_set::load({f}, *tok, o, false);
  ASSERT_EQ(dr.size(), 1);
  EXPECT_EQ(dr.length(0), 4);
  EXPECT_NE(dr.notes().find("2 examples longer than max_length 8 dropped"), std::string::npos) << dr.notes();
  o.long_examples = long_example_policy::long_error;
  EXPECT_ERROR_HAS(example_set::load({f}, *tok, o, false), f + ":1: the example has 12 tokens, more than max_length 8");
}

// --- packing ------------------------------------------------------------------------------------

// The reference: best-fit decreasing by a linear scan over the bins; among bins with equally
// little room, the one that last received an item earliest.
std::vector<std::vector<int64_t>> reference_bfd(const std::vector<int64_t>& len, int64_t cap) {
  std::vector<int64_t> order(len.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return len[a] > len[b]; });
  std::vector<std::vector<int64_t>> bins;
  std::vector<int64_t> room, stamp;
  int64_t now = 0;
  for (int64_t i : order) {
    int64_t best = -1;
    for (size_t b = 0; b < bins.size(); ++b) {
      if (room[b] < len[i]) continue;
      if (best < 0 || room[b] < room[size_t(best)] || (room[b] == room[size_t(best)] && stamp[b] < stamp[size_t(best)]))
        best = int64_t(b);
    }
    if (best < 0) {
      bins.emplace_back();
      room.push_back(cap);
      stamp.push_back(0);
      best = int64_t(bins.size()) - 1;
    }
    bins[size_t(best)].push_back(i);
    room[size_t(best)] -= len[i];
    stamp[size_t(best)] = ++now;
  }
  for (auto& b : bins) std::sort(b.begin(), b.end());
  return bins;
}

TEST(examples, best_fit_packing_matches_the_reference) {
  std::mt19937_64 rng(7);
  for (int trial = 0; trial < 50; ++trial) {
    const int64_t cap = 16 + int64_t(rng() % 200);
    std::vector<int64_t> len(1 + rng() % 300);
    for (auto& l : len) l = 1 + int64_t(rng() % uint64_t(trial % 2 ? cap : cap / 4 + 1));
    const auto bins = pack_best_fit(len, cap);
    std::vector<int> seen(len.size(), 0);
    int64_t total = 0;
    for (const auto& b : bins) {
      int64_t fill = 0;
      for (int64_t i : b) fill += len[size_t(i)], ++seen[size_t(i)];
      EXPECT_LE(fill, cap);
      total += fill;
    }
    EXPECT_TRUE(std::all_of(seen.begin(), seen.end(), [](int s) { return s == 1; }));
    EXPECT_EQ(total, std::accumulate(len.begin(), len.end(), int64_t(0)));
    EXPECT_EQ(bins, reference_bfd(len, cap)) << "trial " << trial;
  }
  EXPECT_ERROR_HAS(pack_best_fit({3, 9}, 8), "bug:", "outside [1, 8]");
}

// --- the dataset's rows -------------------------------------------------------------------------

TEST(examples, dataset_rows_packed_and_padded) {
  scratch_dir dir;
  const std::string f = dir / "sft.jsonl";
  std::string lines;
  const int n = 40;
  for (int i = 0; i < n; ++i)  // BOS + prompt (1..5 bytes) + completion (1..7 bytes) + EOS
    lines += R"({"prompt": ")" + std::string(size_t(1 + i % 5), char('a' + i % 26)) + R"(", "completion": ")" +
             std::string(size_t(1 + i % 7), char('A' + i % 26)) + "\"}\n";
  test::write_bytes(f, lines);
  for (bool packing : {false, true}) {
    data_options o;
    o.paths = {f};
    o.seq_len = 24;
    o.eval_fraction = 0.1;
    o.packing = packing;
    const token_dataset d = token_dataset::open(o);
    ASSERT_TRUE(d.has_examples());
    EXPECT_EQ(d.packed(), packing);
    const example_set& ex = *d.examples();
    ASSERT_EQ(ex.size(), n);
    // Every example lands in exactly one sequence: rebuild them from the rows' position runs.
    const int64_t T = d.seq_len(), rows = d.num_train() + d.num_eval();
    std::vector<int64_t> in(size_t(rows * T)), lab(in.size()), pos(in.size());
    const batch_rows all{in.data(), lab.data(), pos.data()};
    d.train_rows(0, d.num_train(), all);
    const batch_rows tail{in.data() + d.num_train() * T, lab.data() + d.num_train() * T,
                          pos.data() + d.num_train() * T};
    const int64_t cols = d.eval_rows(0, d.num_eval(), tail);
    EXPECT_EQ(cols % 8, 0);
    std::multiset<std::vector<int64_t>> found, want;
    int64_t eval_examples = 0;
    for (int64_t r = 0; r < rows; ++r) {
      int64_t runs = 0;
      for (int64_t t = 0; t < T;) {
        ASSERT_EQ(pos[size_t(r * T + t)], 0) << "a run starts at position 0";
        int64_t e = t + 1;
        while (e < T && pos[size_t(r * T + e)] == e - t) ++e;
        std::vector<int64_t> run(in.begin() + r * T + t, in.begin() + r * T + e);
        const bool padding = lab[size_t(r * T + t)] == -100 && std::all_of(run.begin(), run.end(), [](int64_t v) {
                               return v == 2;
                             });
        if (!padding || e < T) {
          found.insert(run);
          ++runs;
          eval_examples += r >= d.num_train();
          // labels: the next token where it is trained, -100 at the run's end.
          for (int64_t k = t; k < e; ++k)
            EXPECT_EQ(lab[size_t(r * T + k)], k + 1 < e && in[size_t(r * T + k + 1)] >= 3 + 'A' &&
                                                          in[size_t(r * T + k + 1)] <= 3 + 'Z'
                                                      ? in[size_t(r * T + k + 1)]
                                                  : k + 1 < e && k + 1 == e - 1 ? 2  // the trained EOS
                                                                                : -100)
                << "row " << r << " col " << k;
        }
        t = e;
      }
      EXPECT_TRUE(packing || runs == 1) << "unpacked rows hold one example";
    }
    for (int64_t i = 0; i < n; ++i) want.insert(std::vector<int64_t>(ex.ids(i), ex.ids(i) + ex.length(i)));
    EXPECT_EQ(found, want);
    EXPECT_EQ(eval_examples, 4) << "examples are held out whole: round(40 * 0.1)";
    if (packing) {
      EXPECT_LT(d.num_train() + d.num_eval(), n / 2) << "short examples share rows";
    }
  }
}

TEST(examples, text_and_examples_do_not_mix) {
  scratch_dir dir;
  test::write_bytes(dir / "a.jsonl", R"({"prompt": "p", "completion": "c"})" "\n");
  test::write_bytes(dir / "b.txt", "plain text");
  data_options o;
  o.paths = {dir.path()};
  o.seq_len = 8;
  EXPECT_ERROR_HAS(token_dataset::open(o), "mixes instruction/chat examples", "a.jsonl", "b.txt");
}

}  // namespace
}  // namespace ferry::io
