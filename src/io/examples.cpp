#include "src/io/examples.h"

#include <tbb/parallel_for.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string_view>

#include "src/common/error.h"
#include "src/io/chat_template.h"
#include "src/io/mapped_file.h"
#include "src/io/progress.h"

namespace ferry::io {
namespace {
using json = nlohmann::json;

struct line_ref {
  size_t file;
  int64_t line_no;
  std::string_view text;
};

// One line, parsed and encoded (or why not).
struct line_result {
  encoded_example ex;
  std::string error;  // non-empty: the line is invalid
  bool chat = false;  // needed the chat template
};

std::vector<chat_message> parse_messages(const json& v, const char* key, bool trained) {
  FERRY_CHECK(v.is_array(), "\"", key, "\" is not a list of messages");
  std::vector<chat_message> out;
  for (size_t i = 0; i < v.size(); ++i) {
    const json& m = v[i];
    FERRY_CHECK(m.is_object() && m.contains("role") && m.contains("content"), "\"", key, "\" message ", i,
                " is not an object with \"role\" and \"content\"");
    FERRY_CHECK(m["role"].is_string(), "\"", key, "\" message ", i, ": \"role\" is not a string");
    FERRY_CHECK(m["content"].is_string(), "\"", key, "\" message ", i, ": \"content\" is not a string");
    out.push_back({m["role"].get<std::string>(), m["content"].get<std::string>(), trained});
  }
  return out;
}

// What a line asks for: a conversation, or a prompt/completion pair of strings.
struct parsed_line {
  std::vector<chat_message> messages;
  bool chat = false;
  std::string prompt, completion;
};

parsed_line parse_line(std::string_view text) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    FERRY_CHECK(false, "not valid JSON (", e.what(), ")");
  }
  FERRY_CHECK(j.is_object(), "not a JSON object");
  parsed_line p;
  if (j.contains("messages")) {
    p.chat = true;
    p.messages = parse_messages(j["messages"], "messages", true);
    return p;
  }
  FERRY_CHECK(j.contains("prompt") && j.contains("completion"),
              "neither \"messages\" nor \"prompt\" and \"completion\"", j.contains("text") ? " (a \"text\" line in a "
              "file of examples: a file holds one kind, decided by its first line)" : "");
  const json &pr = j["prompt"], &co = j["completion"];
  if (pr.is_string() && co.is_string()) {
    p.prompt = pr.get<std::string>();
    p.completion = co.get<std::string>();
    return p;
  }
  FERRY_CHECK(pr.is_array() && co.is_array(), "\"prompt\" and \"completion\" must both be strings or both be lists "
              "of messages");
  p.chat = true;
  p.messages = parse_messages(pr, "prompt", false);
  std::vector<chat_message> c = parse_messages(co, "completion", true);
  p.messages.insert(p.messages.end(), c.begin(), c.end());
  return p;
}

void split_lines(const mapped_file& f, size_t file, std::vector<line_ref>& out) {
  std::string_view all(reinterpret_cast<const char*>(f.data()), f.size());
  int64_t line_no = 0;
  while (!all.empty()) {
    ++line_no;
    const size_t nl = all.find('\n');
    std::string_view line = all.substr(0, nl);
    all.remove_prefix(nl == std::string_view::npos ? all.size() : nl + 1);
    if (line.find_first_not_of(" \t\r") != std::string_view::npos) out.push_back({file, line_no, line});
  }
}

bool has_target(const encoded_example& ex, size_t n) {
  for (size_t i = 1; i < n; ++i)
    if (ex.trained[i]) return true;
  return false;
}

}  // namespace

long_example_policy parse_long_example_policy(const std::string& name) {
  if (name == "truncate") return long_example_policy::long_truncate;
  if (name == "drop") return long_example_policy::long_drop;
  FERRY_CONFIG_CHECK(name == "error", "long_examples \"", name, "\" is not one of truncate, drop, error");
  return long_example_policy::long_error;
}

bool jsonl_holds_examples(const std::string& path) {
  mapped_file f(path);
  std::string_view all(reinterpret_cast<const char*>(f.data()), f.size());
  while (!all.empty()) {
    const size_t nl = all.find('\n');
    std::string_view line = all.substr(0, nl);
    all.remove_prefix(nl == std::string_view::npos ? all.size() : nl + 1);
    if (line.find_first_not_of(" \t\r") == std::string_view::npos) continue;
    // A first line that does not parse is reported by whichever reader takes the file.
    const json j = json::parse(line, nullptr, /*allow_exceptions=*/false);
    return j.is_object() && (j.contains("messages") || j.contains("prompt"));
  }
  return false;
}

example_set example_set::load(const std::vector<std::string>& files, const tokenizer& tok, const example_options& opt,
                              bool progress) {
  FERRY_ASSERT(opt.max_length >= 2, "example max_length ", opt.max_length);
  std::vector<mapped_file> maps;
  std::vector<line_ref> lines;
  for (size_t i = 0; i < files.size(); ++i) {
    maps.emplace_back(files[i]);
    split_lines(maps.back(), i, lines);
  }
  auto where = [&](const line_ref& l) { return files[l.file] + ":" + std::to_string(l.line_no); };

  // Parse every line (in parallel); the chat format is resolved once, and only when a line needs it.
  std::vector<std::optional<parsed_line>> parsed(lines.size());
  std::vector<line_result> results(lines.size());
  tbb::parallel_for(size_t(0), lines.size(), [&](size_t i) {
    try {
      parsed[i] = parse_line(lines[i].text);
    } catch (const config_error&) {
      throw;
    } catch (const error& e) {
      results[i].error = e.what();
    }
  });
  // The tokens a template or the prompt/completion form needs must all be in the vocabulary: a
  // run-level error, found here with a probe rather than once per line.
  const bool with_bos = tok.bos_id() >= 0;
  std::optional<chat_format> format;
  bool probed_completion = false;
  for (size_t i = 0; i < lines.size() && !(format && probed_completion); ++i) {
    if (!parsed[i]) continue;
    if (parsed[i]->chat && !format) {
      format = opt.chat_template == "auto" ? chat_format_from_checkpoint(opt.template_dir)
                                           : parse_chat_format(opt.chat_template, "chat_template");
      encode_pieces(render_chat(*format, {{"user", "u"}, {"assistant", "a"}}), tok);
    } else if (!parsed[i]->chat && !probed_completion) {
      encode_pieces(render_completion("p", "c", with_bos), tok);
      probed_completion = true;
    }
  }

  progress_bar bar("encoding examples", static_cast<int64_t>(lines.size()), "lines",
                   progress && lines.size() > 1000 && ::isatty(2));
  tbb::parallel_for(size_t(0), lines.size(), [&](size_t i) {
    if (!parsed[i]) return;
    try {
      const parsed_line& p = *parsed[i];
      results[i].chat = p.chat;
      results[i].ex = encode_pieces(p.chat ? render_chat(*format, p.messages)
                                           : render_completion(p.prompt, p.completion, with_bos),
                                    tok);
    } catch (const config_error&) {
      throw;
    } catch (const error& e) {
      results[i].error = e.what();
    }
    bar.add(1);
  });
  bar.finish();

  example_set s;
  int64_t invalid = 0, truncated = 0, dropped_long = 0, untrained = 0;
  std::string first_invalid, first_truncated, first_untrained;
  for (size_t i = 0; i < lines.size(); ++i) {
    line_result& r = results[i];
    if (!r.error.empty()) {
      FERRY_CHECK(opt.skip_invalid, where(lines[i]), ": ", r.error, " (set skip_invalid_examples=true to skip such lines)");
      if (invalid++ == 0) first_invalid = where(lines[i]) + ": " + r.error;
      continue;
    }
    size_t n = r.ex.ids.size();
    if (static_cast<int64_t>(n) > opt.max_length) {
      FERRY_CHECK(opt.long_examples != long_example_policy::long_error, where(lines[i]), ": the example has ", n,
                  " tokens, more than max_length ", opt.max_length,
                  "; raise max_length or set long_examples=truncate or drop");
      if (opt.long_examples == long_example_policy::long_drop) {
        if (dropped_long++ == 0) first_truncated = where(lines[i]);
        continue;
      }
      if (truncated++ == 0) first_truncated = where(lines[i]);
      n = static_cast<size_t>(opt.max_length);
    }
    if (!has_target(r.ex, n)) {
      if (untrained++ == 0) first_untrained = where(lines[i]);
      continue;
    }
    for (size_t k = 0; k < n; ++k) {
      s.max_id_ = std::max<int64_t>(s.max_id_, r.ex.ids[k]);
      s.targets_ += k > 0 && r.ex.trained[k];
    }
    s.ids_.insert(s.ids_.end(), r.ex.ids.begin(), r.ex.ids.begin() + static_cast<std::ptrdiff_t>(n));
    s.trained_.insert(s.trained_.end(), r.ex.trained.begin(), r.ex.trained.begin() + static_cast<std::ptrdiff_t>(n));
    s.offsets_.push_back(static_cast<int64_t>(s.ids_.size()));
    r = line_result();  // frees the line's tokens
  }
  const std::string listed = files.empty() ? std::string("the data") : files.front() + (files.size() > 1 ? " and the "
                                                                                        "other files" : "");
  FERRY_CHECK(s.size() > 0, listed, " hold no usable example (", lines.size(), " lines, ", invalid, " invalid, ",
              dropped_long, " too long, ", untrained, " with nothing to train on within max_length)");

  auto note = [&](const std::string& n) { s.notes_ += (s.notes_.empty() ? "" : "; ") + n; };
  if (format) note(std::string("chat template ") + chat_format_name(*format));
  const std::string len = std::to_string(opt.max_length);
  if (truncated) note(std::to_string(truncated) + " examples longer than max_length " + len + " truncated (first: " +
                      first_truncated + ")");
  if (dropped_long) note(std::to_string(dropped_long) + " examples longer than max_length " + len + " dropped (first: " +
                         first_truncated + ")");
  if (untrained) note(std::to_string(untrained) + " examples with no trained token within max_length dropped (first: " +
                      first_untrained + ")");
  if (invalid) note(std::to_string(invalid) + " invalid lines skipped (first: " + first_invalid + ")");
  return s;
}

std::vector<std::vector<int64_t>> pack_best_fit(const std::vector<int64_t>& lengths, int64_t capacity) {
  std::vector<int64_t> order(lengths.size());
  for (size_t i = 0; i < order.size(); ++i) {
    FERRY_ASSERT(lengths[i] >= 1 && lengths[i] <= capacity, "pack_best_fit: length ", lengths[i], " of item ", i,
                 " is outside [1, ", capacity, "]");
    order[i] = static_cast<int64_t>(i);
  }
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return lengths[size_t(a)] > lengths[size_t(b)]; });
  std::vector<std::vector<int64_t>> bins;
  std::multimap<int64_t, size_t> room;  // free space -> bin of the bins not full; equal rooms: oldest entry first
  for (int64_t i : order) {
    const int64_t len = lengths[size_t(i)];
    auto it = room.lower_bound(len);
    size_t bin;
    int64_t left;
    if (it == room.end()) {
      bin = bins.size();
      bins.emplace_back();
      left = capacity - len;
    } else {
      bin = it->second;
      left = it->first - len;
      room.erase(it);
    }
    bins[bin].push_back(i);
    if (left > 0) room.emplace(left, bin);
  }
  for (auto& b : bins) std::sort(b.begin(), b.end());
  return bins;
}

}  // namespace ferry::io
