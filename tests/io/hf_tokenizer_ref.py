"""Reference data for ferry's tokenizer.json reader (tests/io/test_hf_tokenizer.cpp), made with HF
`tokenizers` itself: no download. Trains small BPE tokenizers on the embedded corpus
(/usr/share/common-licenses) in the layouts in use -- Llama 3 (byte-level, its split regex,
ignore_merges, special tokens), GPT-2 (ByteLevel pre-tokenizer, "a b" merges, added tokens with
lstrip/rstrip/single_word), Llama 2 (Prepend + Replace normalizer, byte fallback), Mistral
(Metaspace "first"), unknown-token variants, and two that exercise the other components -- then
writes, per tokenizer, its tokenizer.json (and tokenizer_config.json where the layout has one)
and what tokenizers answers for encode(add_special_tokens=False), decode, token_to_id and BOS/EOS
on the test texts: every line and whole file of the corpus, hard cases, and seeded random lines.

Usage: hf_tokenizer_ref.py OUT_DIR. Reuses OUT_DIR when it was made by this script and tokenizers
version; otherwise builds it beside and renames it into place, under a lock so that test
processes started together build it once. Exits 77 (skipped) when tokenizers or the corpus is
missing.
"""
import fcntl
import hashlib
import json
import os
import random
import shutil
import sys
import time
import unicodedata

try:
    import tokenizers
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
except ImportError as e:  # pragma: no cover
    print(f"skipped: {e}")
    sys.exit(77)

CORPUS = "/usr/share/common-licenses"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
BYTE_PIECES = [f"<0x{b:02X}>" for b in range(256)]


def corpus_docs():
    docs = []
    for name in sorted(os.listdir(CORPUS)):
        path = os.path.join(CORPUS, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                docs.append(f.read().decode("utf-8", errors="replace"))
    return docs


# ---- test texts ----

HARD = [
    "", " ", "  ", "\n", "\n\n\n", "\r\n", "\t", "\t\t x", " \t \n ", "a" + " " * 50 + "b", "x\n \n  \n   y",
    "word   ", "   word", "\n" * 30, " " * 1000, "\t" * 40 + "end", "a\r\rb\r\n\r\nc", "line one\nline two\n",
    "Hello world", "HELLO WORLD", "hello,world!", "it's they're we've I'm you'll he'd", "IT'S THEY'RE WE'VE I'M",
    "don\u2019t won\u2019t (curly)", "'s's's 'll'll", "x'\u017f x'S x'\u212a 'T 'D", "rock'n'roll", "''quoted''",
    "12345678901234567890", "3.14159 2,718 1e10 0x1F -42 +7", "\u0661\u0662\u0663 \u0664\u0665\u0666",
    "\u2460\u2461\u2462 \u00b2\u00b3 \u00bd \u216b", "1 22 333 4444 55555 666666",
    "\U0001f600", "\U0001f44d\U0001f3fd", "\U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466",
    "\U0001f3f3\ufe0f\u200d\U0001f308", "\U0001f1fa\U0001f1f3\U0001f1eb\U0001f1f7", "\u2764\ufe0f",
    "\U0001f9d1\U0001f3ff\u200d\U0001f680 astronaut", "a\U0001f44bb", "e\u0301 n\u0303 \u00f1",
    "Z\u0351\u0300\u0360a\u0335\u0348l\u0336g\u0489o", "\u0915\u094d\u0937", "\u0627\u0644\u0652\u0639\u064e\u0631\u064e\u0628\u0650\u064a\u0651\u064e\u0629",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8\u3001\u6f22\u5b57\u3068\u304b\u306a\u3002",
    "\u4e2d\u6587\u5b57\u7b26\u6d4b\u8bd5\uff0c\u6807\u70b9\u7b26\u53f7\uff01", "\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8\uc785\ub2c8\ub2e4",
    "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645! \u0647\u0630\u0627 \u0646\u0635 \u0639\u0631\u0628\u064a.",
    "\u05e9\u05dc\u05d5\u05dd \u05e2\u05d5\u05dc\u05dd",
    "\u0928\u092e\u0938\u094d\u0924\u0947 \u0926\u0941\u0928\u093f\u092f\u093e, \u092f\u0939 \u0939\u093f\u0902\u0926\u0940 \u092a\u093e\u0920 \u0939\u0948\u0964",
    "\u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35\u0e0a\u0e32\u0e27\u0e42\u0e25\u0e01", "\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440!",
    "\u0393\u03b5\u03b9\u03ac \u03c3\u03bf\u03c5 \u039a\u03cc\u03c3\u03bc\u03b5",
    "\u00a0nbsp\u00a0 \u00a0", "\u3000ideographic\u3000space", "\u2028line\u2029para", "\u200bzero\u200bwidth",
    "\ufeffBOM", "\u180emongolian\u180e", "\u0085NEL\u0085", "soft\u00adhyphen", "\u1680ogham\u2000\u2001\u200a",
    "\u202fnarrow\u205fmath", "\U0001d400\U0001d401 math bold", "\U000e0041 tag char", "\ue000 private use",
    "\U0010fffd plane 16", "\x00 nul \x01\x1f", "\x7f del", "\u2066bidi\u2069", "\u01c4\u01c5\u01c6 titlecase",
    "\ufb01 ligature", "\u00df \u1e9e", "\x1c\x1d\x1e\x1f separators", "\u0009\u000b\u000c vt ff",
    "<|eot_id|>", "Hi<|eot_id|>there", "<|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>",
    "<|begin_of_text|><|begin_of_text|>", "<|eot_id", "<<|eot_id|>>", " <|eot_id|> ", "<|reserved_special_token_1|>",
    "<s>Hello</s>", "<s> Hello </s>", "</s></s>", "[INST] hi [/INST] ok", "a <mask> b", "a   <mask>b", " <mask>",
    "<r>   x", "<r>\n\ny", "License Licensed License. xLicense License_ \u00e9License License\u0301",
    "<|endoftext|>", "x<|endoftext|>y", "GNU gnu GNUs <unk> <0x41>", "hello<tool>world <tool> ",
    "\tindented\n\t\tcode(x)  # comment", "def f(x):\n    return x**2  # square\n\n\n",
    "https://www.gnu.org/licenses/gpl-3.0.html?x=1&y=2#frag", "user@example.com C:\\path\\file.txt",
    "THE the ThE tHe theme other the.the", "xxx xx x axxb", "Mixed: caf\u00e9 na\u00efve \u0645\u0631\u062d\u0628\u0627 \u65e5\u672c 123 \U0001f600 \u00a0\t\n end",
]

# Byte strings that are not all valid UTF-8: truncated, overlong, surrogate, out of range, stray.
LOSSY = [b"\xff", b"a\xe2\x82b", b"\xed\xa0\x80", b"\xf0\x9f\x98", b"\xc0\xaf", b"\xf4\x90\x80\x80",
         b"\xe0\x80\xaf", b"ok", b"\xf0\x9f\x98\x80\x80", b"\xc3", b"a\xc3(b", b"\x80\x80 x", b"\xe2\x82\xac\xe2\x82",
         b"<|eot_id|>\xfe<|eot_id|>", b"\xf8\x88\x80\x80\x80", b"\xef\xbf\xbd"]

ASCII_WORDS = ["the", "The", "license", "Licensee", "software", "GNU", "copyright", "warranty", "it's", "we're",
               "you'll", "I'd", "NOT", "free", "distribute", "x", "a", "Program", "--", "(c)", "\"quoted\"",
               "e.g.", "...", "foo_bar", "CamelCase", "snake_case", "<tag>", "</tag>", "&amp;", "#1"]
SPACES = [" ", "  ", "   ", "\t", "\n", "\r\n", "\n\n", " \n", "\u00a0", "\u3000", "\u2028", "\u2009", "\u180e",
          "\u0085", " " * 9, "\t\t", "\n \n"]
SCRIPTS = ["\u65e5\u672c\u8a9e", "\u6f22\u5b57", "\u4e2d\u6587", "\ud55c\uad6d\uc5b4", "\u0627\u0644\u0639\u0631\u0628\u064a\u0629",
           "\u0939\u093f\u0928\u094d\u0926\u0940", "\u0e44\u0e17\u0e22", "\u0440\u0443\u0441\u0441\u043a\u0438\u0439",
           "\u03b5\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac", "\u05e2\u05d1\u05e8\u05d9\u05ea", "\u10e5\u10d0\u10e0\u10d7\u10e3\u10da\u10d8",
           "\u1200\u1208\u1218", "\u0d2e\u0d32\u0d2f\u0d3e\u0d33\u0d02", "T\u00fcrk\u00e7e", "\u00c5ngstr\u00f6m", "na\u00efve"]
EMOJI = ["\U0001f600", "\U0001f44d\U0001f3fd", "\U0001f468\u200d\U0001f469\u200d\U0001f467", "\U0001f1ef\U0001f1f5",
         "\u2764\ufe0f", "\U0001f3f3\ufe0f\u200d\u26a7\ufe0f", "\U0001f9d1\u200d\U0001f4bb", "\u263a", "\U0001f4a9"]
MARKS = ["\u0301", "\u0300", "\u0303", "\u0308", "\u0327", "\u20dd", "\u0489", "\u093f", "\u0652", "\u3099"]


def assigned_code_points():
    # Assigned in Unicode 14.0 (PCRE2 10.42's tables; Python 3.11's unicodedata is 14.0 too), not
    # surrogates: a code point assigned later may be a letter to tokenizers' Oniguruma and
    # unassigned to PCRE2 (a documented limit). Punctuation newer than Unicode 3.2 is left out
    # too: tokenizers' Punctuation pre-tokenizer uses the unicode_categories crate's old tables.
    out = []
    for cp in range(0x110000):
        if 0xD800 <= cp < 0xE000:
            continue
        cat = unicodedata.category(chr(cp))
        if cat == "Cn" or (cat.startswith("P") and not unicodedata.ucd_3_2_0.category(chr(cp)).startswith("P")):
            continue
        out.append(cp)
    return out


def fuzz_lines(n, specials, seed=1234):
    rng = random.Random(seed)
    pool = assigned_code_points() if unicodedata.unidata_version.startswith("14.") else None
    lines = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 14)):
            k = rng.random()
            if k < 0.28:
                parts.append(rng.choice(ASCII_WORDS))
            elif k < 0.45:
                parts.append(rng.choice(SPACES))
            elif k < 0.53:
                parts.append("".join(rng.choice("0123456789") for _ in range(rng.randint(1, 9))))
            elif k < 0.62:
                parts.append(rng.choice(SCRIPTS))
            elif k < 0.68:
                parts.append(rng.choice(EMOJI))
            elif k < 0.73:
                parts.append(rng.choice("aeiouAEIOU") + rng.choice(MARKS))
            elif k < 0.79:
                parts.append(rng.choice(specials))
            elif k < 0.85:
                parts.append(rng.choice(["'s", "'S", "'t", "'re", "'VE", "'m", "'ll", "'d", "'x", "\u2019s", "'\u017f"]))
            elif k < 0.93 and pool:
                parts.append("".join(chr(rng.choice(pool)) for _ in range(rng.randint(1, 4))))
            else:
                parts.append(rng.choice(".,;:!?()[]{}<>/\\|@#$%^&*-_=+~`\"'"))
        lines.append("".join(parts))
    return lines


# ---- tokenizers in the layouts in use ----

def from_json(j):
    return Tokenizer.from_str(json.dumps(j))


def string_merges(j):
    for a, b in j["model"]["merges"]:
        assert " " not in a and " " not in b
    j["model"]["merges"] = [f"{a} {b}" for a, b in j["model"]["merges"]]
    return j


def frequent_unmerged_words(tok, docs, k):
    # Pre-tokens of the corpus that are not vocabulary entries: added to the vocabulary without
    # merges, they are reachable only through ignore_merges.
    counts = {}
    for d in docs:
        for piece, _ in tok.pre_tokenizer.pre_tokenize_str(d):
            counts[piece] = counts.get(piece, 0) + 1
    vocab = tok.get_vocab()
    cands = sorted((c, w) for w, c in counts.items() if w not in vocab and len(w) >= 3)
    return [w for _, w in reversed(cands)][:k]


def llama3(docs):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=1200, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    j = json.loads(tok.to_str())
    extra = frequent_unmerged_words(tok, docs, 40)
    for w in extra:
        j["model"]["vocab"][w] = len(j["model"]["vocab"])
    j["model"]["ignore_merges"] = True
    tok = from_json(j)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in LLAMA3_SPECIALS])
    bot = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                                      special_tokens=[("<|begin_of_text|>", bot)])])
    config = {"bos_token": "<|begin_of_text|>",
              "eos_token": {"__type": "AddedToken", "content": "<|eot_id|>", "lstrip": False, "normalized": False,
                            "rstrip": False, "single_word": False}}
    return json.loads(tok.to_str()), config, ("<|begin_of_text|>", "<|eot_id|>")


def gpt2(docs):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=1000, show_progress=False, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_tokens([AddedToken("<mask>", lstrip=True, special=True, normalized=False),
                    AddedToken("<r>", rstrip=True, special=False, normalized=False),
                    AddedToken("License", single_word=True, special=False, normalized=False),
                    AddedToken("GNU", special=False, normalized=True)])
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    return string_merges(json.loads(tok.to_str())), None, (None, "<|endoftext|>")


def sentencepiece_style(docs, vocab_size=1100):
    # Trained on words split at the metaspace, as sentencepiece trains; the layouts below then
    # encode whole texts as one piece (no pre-tokenizer), as the converted Llama 2 files do.
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=True)
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                      special_tokens=["<unk>", "<s>", "</s>"] + BYTE_PIECES))
    j = json.loads(tok.to_str())
    # Byte pieces are plain vocabulary entries in Llama 2's file, not added tokens.
    j["added_tokens"] = [t for t in j["added_tokens"] if t["content"] not in BYTE_PIECES]
    j["pre_tokenizer"] = None
    j["model"]["byte_fallback"] = True
    j["model"]["fuse_unk"] = True
    j["decoder"] = json.loads(decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                                 decoders.Fuse(), decoders.Strip(" ", 1, 0)]).__getstate__())
    return j


def llama2(docs):
    j = sentencepiece_style(docs)
    tok = from_json(j)
    tok.add_tokens([AddedToken("<tool>", special=False, normalized=True)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return json.loads(tok.to_str()), {"bos_token": "<s>", "eos_token": "</s>"}, ("<s>", "</s>")


def mistral(docs):
    j = sentencepiece_style(docs)
    j["normalizer"] = None
    j["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False}
    j["decoder"] = json.loads(decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(
        replacement="\u2581", prepend_scheme="first", split=False)]).__getstate__())
    tok = from_json(j)
    tok.add_special_tokens([AddedToken("[INST]", special=True, normalized=False),
                            AddedToken("[/INST]", special=True, normalized=False)])
    tok.add_tokens([AddedToken("<tool>", special=False, normalized=False)])
    return string_merges(json.loads(tok.to_str())), None, ("<s>", "</s>")


def unknown(docs, fuse):
    j = sentencepiece_style(docs)
    j["model"]["byte_fallback"] = False
    j["model"]["fuse_unk"] = fuse
    j["post_processor"] = json.loads(processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> $B", special_tokens=[("<s>", 1), ("</s>", 2)]).__getstate__())
    return j, None, ("<s>", "</s>")


def unknown_dropped(docs):
    j = sentencepiece_style(docs)
    j["model"]["byte_fallback"] = False
    j["model"]["unk_token"] = None
    j["added_tokens"] = []
    return j, {"bos_token": None, "eos_token": None}, (None, None)


def splits(docs):
    # Split behaviours, String and Regex patterns with empty matches and anchors, Digits,
    # Punctuation, Metaspace "always" with splitting; Strip and Replace normalizers.
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.Strip(left=True, right=False),
                                           normalizers.Replace(Regex(r"[0-9]{5,}"), "#"),
                                           normalizers.Replace(Regex(r"\s{3,}"), "\t")])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\s+|^\h"), behavior="merged_with_previous"),
        pre_tokenizers.Split(Regex(r"(?i:the)|x+|(?=q)"), behavior="isolated"),
        pre_tokenizers.Split(".", behavior="merged_with_next"),
        pre_tokenizers.Split(Regex(r"\w+$"), behavior="contiguous", invert=True),
        pre_tokenizers.Digits(individual_digits=False),
        pre_tokenizers.Punctuation(behavior="contiguous"),
        pre_tokenizers.Metaspace(replacement="_", prepend_scheme="always", split=True)])
    tok.decoder = decoders.Sequence([decoders.Metaspace(replacement="_", prepend_scheme="always"), decoders.Strip(" ", 1, 0)])
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=900, show_progress=False, special_tokens=["[UNK]"]))
    return json.loads(tok.to_str()), None, (None, None)


def words(docs):
    # Whitespace, WhitespaceSplit, CharDelimiterSplit and Digits; subword prefix and suffix.
    tok = Tokenizer(models.BPE(unk_token="[UNK]", continuing_subword_prefix="##", end_of_word_suffix="</w>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.CharDelimiterSplit("-"),
                                                 pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)])
    tok.decoder = decoders.BPEDecoder(suffix="</w>")
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=900, show_progress=False, special_tokens=["[UNK]"],
                                                      continuing_subword_prefix="##", end_of_word_suffix="</w>"))
    tok.add_special_tokens([AddedToken("[SEP]", special=True, normalized=False, single_word=True, lstrip=True, rstrip=True)])
    return json.loads(tok.to_str()), None, (None, None)


# ---- reference outputs ----

def char_to_byte_offsets(s):
    offs, b = [], 0
    for ch in s:
        offs.append(b)
        b += len(ch.encode("utf-8"))
    offs.append(b)
    return offs


REGEX_PATTERNS = [LLAMA3_SPLIT, GPT2_SPLIT, r"\s", r"\s+", r"\S+", r"\w+", r"\W+", r"[\w\s]+", r"[^\s\p{L}\p{N}]+",
                  r"\h+", r"^a", r"a$", r"^", r".", r"x*", r"", r"(?=b)|x", r"(?i:'s|'t|'re|'ve|'m|'ll|'d)", r"(?i)k",
                  r"\p{N}{1,3}", r"\d+", r"\p{L}+|\p{M}+", r"[\r\n]+", r"\s+(?!\S)", r" ?\p{L}+"]
REGEX_TEXTS = ["a\na", "aab\nxxbxa", "x'\u017f x'S x'\u212a 'LL 'Re", "\u00a0\u3000\u180e\u2028\u0085\x1c\u200b x",
               "Hello,  world!\n\n\tfoo_bar 123 \u00b2\u00b3 \u0661\u0662 caf\u00e9 e\u0301",
               "\u65e5\u672c \U0001f468\u200d\U0001f469 \u0915\u094d\u0937 \u05e9\u05dc\u05d5\u05dd", "", "abc",
               "   trailing   ", "K\u212ak", "\u24b6\u2160\u2070_\u203f\u00aa"]


def regex_cases():
    cases = []
    for p in REGEX_PATTERNS:
        iso = pre_tokenizers.Split(Regex(p), behavior="isolated")
        rem = pre_tokenizers.Split(Regex(p), behavior="removed")
        for t in REGEX_TEXTS:
            b = char_to_byte_offsets(t)
            unmatched = {o for _, o in rem.pre_tokenize_str(t)}
            spans = [[b[o[0]], b[o[1]], o not in unmatched] for _, o in iso.pre_tokenize_str(t)]
            cases.append({"pattern": p, "text": t, "spans": spans})
    return cases


def reference(tok, texts, probes, docs):
    ids = [tok.encode(t, add_special_tokens=False).ids for t in texts]
    decoded = [tok.decode(i) for i in ids]
    rng = random.Random(99)
    n = tok.get_vocab_size(with_added_tokens=True)
    decode_cases = [[rng.randrange(n) for _ in range(rng.randint(1, 12))] for _ in range(300)]
    t0 = time.perf_counter()
    for d in docs:
        tok.encode(d, add_special_tokens=False)
    seconds = time.perf_counter() - t0
    return {"ids": ids, "decoded": decoded, "decode_cases": decode_cases,
            "decode_expected": [tok.decode(c) for c in decode_cases],
            "probes": {p: (-1 if tok.token_to_id(p) is None else tok.token_to_id(p)) for p in probes},
            "vocab_size": n, "tokenizers_mb_per_s": sum(len(d.encode()) for d in docs) / 1e6 / seconds}


def differing(tok_a, tok_b, texts):
    return sum(tok_a.encode(t, add_special_tokens=False).ids != tok_b.encode(t, add_special_tokens=False).ids for t in texts)


def build(out):
    docs = corpus_docs()
    lines = [l for d in docs for l in d.split("\n")]
    specials = LLAMA3_SPECIALS + ["<s>", "</s>", "<unk>", "<mask>", "<r>", "[INST]", "[/INST]", "<tool>", "[SEP]",
                                  "<|endoftext|>", "License", "GNU"]
    texts = lines + docs + HARD + fuzz_lines(5000, specials)
    os.makedirs(out)
    lossy = []
    for raw in LOSSY:
        try:
            raw.decode("utf-8")
            valid = True
        except UnicodeDecodeError:
            valid = False
        lossy.append({"bytes": list(raw), "text": raw.decode("utf-8", errors="replace"), "valid": valid})
    with open(os.path.join(out, "texts.json"), "w") as f:
        json.dump({"texts": texts, "corpus_lines": len(lines), "documents": len(docs), "lossy": lossy}, f)
    with open(os.path.join(out, "regex_cases.json"), "w") as f:
        json.dump(regex_cases(), f)
    variants = {"llama3": llama3(docs), "gpt2": gpt2(docs), "llama2": llama2(docs), "mistral": mistral(docs),
                "unk_fused": unknown(docs, True), "unk_split": unknown(docs, False),
                "unk_dropped": unknown_dropped(docs), "splits": splits(docs), "words": words(docs)}
    for name, (j, config, (bos, eos)) in variants.items():
        d = os.path.join(out, name)
        os.makedirs(d)
        with open(os.path.join(d, "tokenizer.json"), "w") as f:
            json.dump(j, f, ensure_ascii=False)
        if config is not None:
            with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
                json.dump(config, f)
        tok = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
        vocab = sorted(tok.get_vocab(with_added_tokens=True))
        probes = vocab[:: max(1, len(vocab) // 60)] + specials + ["", "zzqqzz", "<0x0A>", "\u2581the", "\u0120the"]
        ref = reference(tok, texts, probes, docs)
        ref["bos"] = -1 if bos is None else tok.token_to_id(bos)
        ref["eos"] = -1 if eos is None else tok.token_to_id(eos)
        # Evidence that the texts exercise what the layout is about: the C++ test requires > 0.
        sensitivity = {}
        if name == "llama3":
            plain = dict(j)
            plain["model"] = dict(j["model"], ignore_merges=False)
            sensitivity["ignore_merges"] = differing(tok, from_json(plain), texts)
        if name in ("llama3", "gpt2", "llama2", "mistral", "words"):
            raw = Tokenizer.from_str(json.dumps(j))
            raw.encode_special_tokens = True
            sensitivity["special_tokens_in_text"] = differing(tok, raw, texts)
        ref["sensitivity"] = sensitivity
        with open(os.path.join(d, "expected.json"), "w") as f:
            json.dump(ref, f)


def main():
    out = os.path.abspath(sys.argv[1])
    if not os.path.isdir(CORPUS):
        print(f"skipped: the corpus {CORPUS} is absent")
        sys.exit(77)
    with open(__file__, "rb") as f:
        key = hashlib.sha256(f.read() + tokenizers.__version__.encode()).hexdigest()
    stamp = os.path.join(out, "key")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(stamp) and open(stamp).read() == key:
            return
        tmp = f"{out}.tmp.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        build(tmp)
        with open(os.path.join(tmp, "key"), "w") as f:
            f.write(key)
        old = f"{out}.old.{os.getpid()}"
        if os.path.exists(out):
            os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)


if __name__ == "__main__":
    main()
