#include "src/io/token_stream.h"

#include <unistd.h>
#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>
#include <tbb/parallel_reduce.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string_view>

#include "src/common/error.h"
#include "src/io/atomic_file.h"
#include "src/io/progress.h"

namespace ferry::io {
namespace fs = std::filesystem;

namespace {

constexpr int32_t k_llmc_magic = 20240520;
constexpr size_t k_llmc_header = 256 * 4;
constexpr size_t k_piece = size_t(1) << 20;  // text documents above 4 pieces are encoded in ~1 MiB pieces
constexpr size_t k_batch = size_t(8) << 20;  // bytes of text encoded per parallel batch

bool has_llmc_magic(const std::string& path) {
  FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) return false;
  uint8_t b[4] = {0, 0, 0, 0};
  size_t n = std::fread(b, 1, 4, f);
  std::fclose(f);
  int32_t v = static_cast<int32_t>(b[0] | (b[1] << 8) | (b[2] << 16) | (static_cast<uint32_t>(b[3]) << 24));
  return n == 4 && v == k_llmc_magic;
}

input_kind classify(const fs::path& p) {
  if (has_llmc_magic(p.string())) return input_kind::input_llmc_tokens;
  const std::string ext = p.extension().string();
  if (ext == ".bin") return input_kind::input_nanogpt_tokens;
  if (ext == ".jsonl") return input_kind::input_jsonl;
  return input_kind::input_text;
}

uint32_t load_token(const uint8_t* p, int width) {
  if (width == 2) return static_cast<uint32_t>(p[0] | (p[1] << 8));
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

int64_t scan_max(const uint8_t* data, int64_t n, int width) {
  return tbb::parallel_reduce(
      tbb::blocked_range<int64_t>(0, n, 1 << 16), int64_t(-1),
      [&](const tbb::blocked_range<int64_t>& r, int64_t m) {
        for (int64_t i = r.begin(); i < r.end(); ++i) m = std::max<int64_t>(m, load_token(data + i * width, width));
        return m;
      },
      [](int64_t a, int64_t b) { return std::max(a, b); });
}

// A unit of text to encode; EOS follows it when it ends a document.
struct text_piece {
  std::string_view text;
  bool ends_document;
};

// Collects pieces, encodes them in parallel, and appends their tokens (in order) to `out`.
class piece_encoder {
 public:
  piece_encoder(const tokenizer& tok, int width, std::vector<uint8_t>& out, progress_bar& bar)
      : tok_(tok), width_(width), out_(out), bar_(bar) {}
  ~piece_encoder() = default;

  void add(std::string_view text, bool ends_document) {
    pieces_.push_back({text, ends_document});
    bytes_ += text.size();
  }
  void add_document(std::string_view doc) {
    if (doc.size() <= 4 * k_piece) {
      add(doc, true);
    } else {
      // Split long documents at line ends so that pieces encode in parallel.
      while (!doc.empty()) {
        size_t cut = doc.size() <= k_piece ? doc.size() : doc.find('\n', k_piece);
        cut = cut == std::string_view::npos ? doc.size() : cut + 1;
        add(doc.substr(0, cut), cut == doc.size());
        doc.remove_prefix(cut);
      }
    }
    if (bytes_ >= k_batch) flush();
  }
  void flush() {
    std::vector<std::vector<int32_t>> ids(pieces_.size());
    tbb::parallel_for(size_t(0), pieces_.size(), [&](size_t i) {
      ids[i] = tok_.encode(std::string(pieces_[i].text));
      bar_.add(static_cast<int64_t>(pieces_[i].text.size()));
    });
    const int32_t eos = tok_.eos_id();
    for (size_t i = 0; i < pieces_.size(); ++i) {
      if (pieces_[i].ends_document && eos >= 0) ids[i].push_back(eos);
      for (int32_t id : ids[i]) {
        max_id_ = std::max<int64_t>(max_id_, id);
        uint8_t b[4];
        std::memcpy(b, &id, 4);  // little-endian host (x86-64, aarch64)
        out_.insert(out_.end(), b, b + width_);
      }
    }
    pieces_.clear();
    owned_.clear();
    bytes_ = 0;
  }
  // Keeps a parsed JSON string alive until its batch is encoded.
  std::string_view keep(std::string s) {
    owned_.push_back(std::make_unique<std::string>(std::move(s)));
    return *owned_.back();
  }
  int64_t max_id() const { return max_id_; }

 private:
  const tokenizer& tok_;
  int width_;
  std::vector<uint8_t>& out_;
  progress_bar& bar_;
  std::vector<text_piece> pieces_;
  std::vector<std::unique_ptr<std::string>> owned_;
  size_t bytes_ = 0;
  int64_t max_id_ = -1;
};

void encode_jsonl(const mapped_file& f, piece_encoder& enc) {
  std::string_view all(reinterpret_cast<const char*>(f.data()), f.size());
  size_t line_no = 0;
  while (!all.empty()) {
    ++line_no;
    size_t nl = all.find('\n');
    std::string_view line = all.substr(0, nl);
    all.remove_prefix(nl == std::string_view::npos ? all.size() : nl + 1);
    if (line.find_first_not_of(" \t\r") == std::string_view::npos) continue;
    const std::string where = f.path() + ":" + std::to_string(line_no);
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception& e) {
      FERRY_CHECK(false, where, ": not valid JSON (", e.what(), "); each line of a .jsonl file must be one object");
    }
    FERRY_CHECK(j.is_object() && j.contains("text"), where, ": no \"text\" field; each line must be {\"text\": ...}");
    FERRY_CHECK(j["text"].is_string(), where, ": the \"text\" field is not a string");
    std::string text = j["text"].get<std::string>();
    if (!text.empty()) enc.add_document(enc.keep(std::move(text)));
  }
}

}  // namespace

std::vector<input_file> list_inputs(const std::vector<std::string>& paths) {
  FERRY_CONFIG_CHECK(!paths.empty(), "no training data given; pass text, JSONL or token files or directories");
  std::vector<input_file> out;
  for (const auto& p : paths) {
    std::error_code ec;
    auto st = fs::status(p, ec);
    FERRY_CHECK(fs::exists(st), "data path ", p, " does not exist");
    if (fs::is_directory(st)) {
      std::vector<fs::path> files;
      for (auto it = fs::recursive_directory_iterator(p, fs::directory_options::follow_directory_symlink);
           it != fs::recursive_directory_iterator(); ++it) {
        const std::string name = it->path().filename().string();
        if (!name.empty() && name[0] == '.') {
          if (it->is_directory()) it.disable_recursion_pending();
          continue;
        }
        if (it->is_regular_file()) files.push_back(it->path());
      }
      FERRY_CHECK(!files.empty(), "data directory ", p, " holds no files");
      std::sort(files.begin(), files.end());
      for (const auto& f : files) out.push_back({f.string(), classify(f)});
    } else {
      FERRY_CHECK(fs::is_regular_file(st), "data path ", p, " is not a regular file or directory");
      out.push_back({p, classify(p)});
    }
  }
  return out;
}

void token_stream::append(const uint8_t* data, int64_t length, int width) {
  if (length == 0) return;
  segments_.push_back({size_, length, data, width});
  size_ += length;
}

token_stream token_stream::build(const std::vector<input_file>& inputs, const tokenizer* tok, int64_t vocab_limit,
                                 bool progress) {
  token_stream s;
  int64_t text_bytes = 0;
  for (const auto& in : inputs) {
    if (in.kind == input_kind::input_text || in.kind == input_kind::input_jsonl) {
      FERRY_ASSERT(tok != nullptr, "text input ", in.path, " but no tokenizer");
      std::error_code ec;
      text_bytes += static_cast<int64_t>(fs::file_size(in.path, ec));
    }
  }
  if (tok != nullptr && vocab_limit > 0) {
    FERRY_CONFIG_CHECK(tok->vocab_size() <= vocab_limit, "tokenizer ", tok->name(), " has ", tok->vocab_size(),
                       " tokens but the model's vocabulary has only ", vocab_limit,
                       "; use a model with vocab_size >= ", tok->vocab_size(), " or a smaller tokenizer");
  }
  const int text_width = tok != nullptr && tok->vocab_size() > 65536 ? 4 : 2;
  progress_bar bar("tokenizing", text_bytes, "B", progress && text_bytes > 0 && ::isatty(2));

  for (const auto& in : inputs) {
    mapped_file f(in.path);
    if (in.kind == input_kind::input_llmc_tokens || in.kind == input_kind::input_nanogpt_tokens) {
      const uint8_t* data = f.data();
      int width = 2;
      int64_t count = 0;
      if (in.kind == input_kind::input_llmc_tokens) {
        FERRY_CHECK(f.size() >= k_llmc_header, in.path, ": llm.c token file is shorter than its 1024-byte header");
        int32_t h[3];
        std::memcpy(h, f.data(), sizeof h);
        FERRY_CHECK(h[1] == 1 || h[1] == 2, in.path, ": llm.c token file version ", h[1],
                    " is not 1 (uint16) or 2 (uint32)");
        FERRY_CHECK(h[2] >= 0, in.path, ": llm.c token count ", h[2], " is negative");
        width = h[1] == 1 ? 2 : 4;
        count = h[2];
        const size_t want = k_llmc_header + static_cast<size_t>(count) * static_cast<size_t>(width);
        FERRY_CHECK(f.size() == want, in.path, ": llm.c header announces ", count, " tokens (", want,
                    " bytes) but the file has ", f.size(), " bytes; it is truncated or corrupt");
        data += k_llmc_header;
      } else {
        FERRY_CHECK(f.size() % 2 == 0, in.path, ": a headerless uint16 token file (nanoGPT .bin) must have an even "
                                                "size, this one has ", f.size(), " bytes");
        count = static_cast<int64_t>(f.size() / 2);
      }
      int64_t m = scan_max(data, count, width);
      FERRY_CONFIG_CHECK(vocab_limit <= 0 || m < vocab_limit, in.path, " contains token id ", m,
                         " but the model's vocabulary has only ", vocab_limit,
                         " entries; it was tokenized for another model");
      s.max_id_ = std::max(s.max_id_, m);
      s.append(data, count, width);
      s.maps_.push_back(std::move(f));
      continue;
    }
    std::vector<uint8_t> tokens;
    piece_encoder enc(*tok, text_width, tokens, bar);
    if (in.kind == input_kind::input_jsonl) {
      encode_jsonl(f, enc);
    } else if (f.size() > 0) {
      enc.add_document(std::string_view(reinterpret_cast<const char*>(f.data()), f.size()));
    }
    enc.flush();
    s.max_id_ = std::max(s.max_id_, enc.max_id());
    tokens.shrink_to_fit();
    s.owned_.push_back(std::move(tokens));
    s.append(s.owned_.back().data(), static_cast<int64_t>(s.owned_.back().size() / text_width), text_width);
  }
  bar.finish();
  return s;
}

void token_stream::read(int64_t begin, int64_t n, int64_t* out) const {
  FERRY_ASSERT(size_ > 0, "read from an empty token stream");
  int64_t pos = begin % size_;
  auto seg = std::upper_bound(segments_.begin(), segments_.end(), pos,
                              [](int64_t p, const segment& sg) { return p < sg.start; }) -
             1;
  while (n > 0) {
    int64_t off = pos - seg->start;
    int64_t m = std::min(n, seg->length - off);
    const uint8_t* p = seg->data + off * seg->width;
    for (int64_t i = 0; i < m; ++i) out[i] = load_token(p + i * seg->width, seg->width);
    out += m;
    n -= m;
    pos += m;
    if (++seg == segments_.end()) {
      seg = segments_.begin();
      pos = 0;
    }
  }
}

void write_llmc_token_file(const std::string& path, const token_stream& s, int64_t vocab_size, bool progress) {
  FERRY_CHECK(s.size() <= INT32_MAX, "cannot write ", path, ": ", s.size(),
              " tokens exceed the llm.c format's int32 count; tokenize the inputs into several files");
  const int width = vocab_size > 65536 ? 4 : 2;
  int32_t header[256] = {};
  header[0] = k_llmc_magic;
  header[1] = width == 2 ? 1 : 2;
  header[2] = static_cast<int32_t>(s.size());
  atomic_file out(path);
  out.write(header, sizeof header);
  progress_bar bar("writing", s.size(), "tokens", progress && ::isatty(2));
  constexpr int64_t k_chunk = int64_t(1) << 20;
  std::vector<int64_t> ids(static_cast<size_t>(k_chunk));
  std::vector<uint8_t> bytes(static_cast<size_t>(k_chunk) * width);
  for (int64_t b = 0; b < s.size(); b += k_chunk) {
    int64_t m = std::min(k_chunk, s.size() - b);
    s.read(b, m, ids.data());
    for (int64_t i = 0; i < m; ++i) {
      uint32_t v = static_cast<uint32_t>(ids[i]);
      std::memcpy(bytes.data() + i * width, &v, static_cast<size_t>(width));
    }
    out.write(bytes.data(), static_cast<size_t>(m * width));
    bar.add(m);
  }
  out.commit();
  bar.finish();
}

}  // namespace ferry::io
