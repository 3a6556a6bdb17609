"""Chat-template parity: ferry's example reader against transformers' apply_chat_template.

For each format ferry renders (llama2, llama3, chatml, zephyr), the format's canonical Jinja
template (copied below from the model repositories named) goes into a HF tokenizer, and
apply_chat_template(messages, tokenize=True) must give token for token the ids ferry's reader
gives for the same {"messages": ...} line. The trained flags are checked against HF's
return_assistant_tokens_mask with the same template, its assistant turns wrapped in
{% generation %} (the wrapped template must render the same string). chat_template=auto must
recognise each canonical template from a tokenizer_config.json and name a look-alike it does not
render exactly. Generation prompts (ferry-infer --chat: the conversation up to each user turn)
must equal apply_chat_template(add_generation_prompt=True), and the end-of-turn token ferry stops
at must be the special token that closes a rendered assistant reply. The prompt/completion form is checked against TRL's way of tokenizing it (BOS +
prompt untrained, completion + EOS trained).

The tokenizer both sides load: a sentencepiece BPE model trained here on the system licences with
Llama's settings, the formats' special tokens as user-defined symbols; HF reads it as a legacy
LlamaTokenizer (vocab and merges from the model, the symbols as added special tokens). Every text
segment the conversations produce is first checked to encode identically in both (a precondition
that fails loudly, so a tokenizer difference is never reported as a template difference). Once
ferry reads tokenizer.json files, make_tokenizers() can return such a file for both sides.

Usage: chat_template_parity.py CHAT_XCHECK_BINARY. Exits 1 on any failure, 77 (ctest: skipped)
when sentencepiece, transformers or jinja2 is missing or the corpus is absent.
"""
import glob
import io
import json
import os
import re
import subprocess
import sys
import tempfile

try:
    import sentencepiece as spm
    from tokenizers import AddedToken
    from transformers import LlamaTokenizer
    from transformers.convert_slow_tokenizer import generate_merges
except ImportError as e:  # pragma: no cover
    print(f"skipped: {e}")
    sys.exit(77)

TOOL = sys.argv[1]
CORPUS = sorted(glob.glob("/usr/share/common-licenses/*"))
if not CORPUS:
    print("skipped: /usr/share/common-licenses is absent")
    sys.exit(77)

failures = []


def check(cond, what):
    if not cond:
        failures.append(what)
        print("FAIL:", what)
    return cond


# The canonical templates, as the named repositories' tokenizer_config.json hold them.
CANONICAL = {
    # meta-llama/Llama-2-7b-chat-hf
    "llama2": "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}",
    # meta-llama/Meta-Llama-3-8B-Instruct
    "llama3": "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
    # the ChatML template of the transformers chat-templating guide
    "chatml": "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    # HuggingFaceH4/zephyr-7b-beta
    "zephyr": "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}",
}

# The same templates with the trained part of each trained assistant turn in {% generation %}: what
# the model generates after the prompt (llama2: " A </s>" after " [/INST]"; the others the content
# and the end-of-turn token after the role header). A message with "train": false (a prompt's) is
# not marked. Checked to render what CANONICAL renders.
TRAINED = "message['role'] == 'assistant' and message['train'] is not defined"
MARKED = {
    "llama2": CANONICAL["llama2"].replace(
        "{{ ' '  + content.strip() + ' ' + eos_token }}",
        "{% if message['train'] is not defined %}{% generation %}{{ ' '  + content.strip() + ' ' + eos_token }}"
        "{% endgeneration %}{% else %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"),
    "llama3": "{% for message in messages %}{% if loop.index0 == 0 %}{{ bos_token }}{% endif %}"
              "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
              "{% if " + TRAINED + " %}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
              "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}",
    "chatml": "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
              "{% if " + TRAINED + " %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
              "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}",
    "zephyr": "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' }}"
              "{% if " + TRAINED + " %}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
              "{% else %}{{ message['content'] + eos_token }}{% endif %}{{ '\n' }}{% endfor %}",
}
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>"]
BOS = {"llama2": "<s>", "llama3": "<|begin_of_text|>", "chatml": "<s>", "zephyr": "<s>"}

CONVERSATIONS = [
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "What does the licence allow?"},
     {"role": "assistant", "content": "Copying, changing and sharing the program."}],
    [{"role": "user", "content": "  Name two conditions.\u00a0"},
     {"role": "assistant", "content": "Keep the notice.\nState your changes.  "},
     {"role": "user", "content": "And the warranty?\n\nBriefly."},
     {"role": "assistant", "content": "\u3000There is none, to the extent the law permits."}],
    [{"role": "user", "content": "Grüße aus Köln: 世界 🚂 — ok?"},
     {"role": "assistant", "content": "Ja. 2024 ist gut, 1/3 auch."}],
    [{"role": "system", "content": "Answer in one word."},
     {"role": "user", "content": "Free?"},
     {"role": "assistant", "content": "Yes"},
     {"role": "user", "content": "Really"}],
]
# {"prompt": [messages], "completion": [messages]}: the prompt's assistant turn is not trained.
PROMPT_COMPLETION_CHAT = (
    [{"role": "user", "content": "Say A."}, {"role": "assistant", "content": "A"}, {"role": "user", "content": "Now B."}],
    [{"role": "assistant", "content": "B, as asked."}])
PROMPT_COMPLETIONS = [("The GNU General Public License is", " a free, copyleft license."),
                      ("Q: May I sell copies?\nA:", " Yes, you may charge a fee.")]


def make_tokenizers(d):
    """Returns (ferry tokenizer spec, a function giving a fresh HF tokenizer)."""
    buf = io.BytesIO()
    lines = (l for f in CORPUS for l in open(f, errors="ignore") if l.strip())
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines, model_writer=buf, vocab_size=1000, model_type="bpe", byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True, user_defined_symbols=SPECIALS, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2, max_sentence_length=16384)
    path = os.path.join(d, "tokenizer.model")
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    sp = spm.SentencePieceProcessor(model_file=path)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = generate_merges(vocab, {sp.id_to_piece(i): sp.get_score(i) for i in range(sp.get_piece_size())})

    def hf(bos="<s>"):
        t = LlamaTokenizer(vocab=vocab, merges=merges, legacy=True, add_prefix_space=True, add_bos_token=True)
        t.add_special_tokens({"additional_special_tokens": [AddedToken(s, normalized=False, special=True)
                                                            for s in SPECIALS]})
        t.bos_token = bos
        return t, sp

    return path, hf


def ferry(fmt, tmpl_dir, lines, d):
    src = os.path.join(d, "in.jsonl")
    with open(src, "w") as f:
        for l in lines:
            f.write(json.dumps(l) + "\n")
    r = subprocess.run([TOOL, tok_path, fmt, tmpl_dir, src], capture_output=True, text=True)
    return r.returncode, (json.loads(r.stdout) if r.returncode == 0 else r.stderr.strip())


def segments(text):
    """The text between the special tokens of a rendered string, as HF encodes them one by one."""
    return [s for s in re.split("|".join(re.escape(t) for t in SPECIALS + ["<s>", "</s>"]), text) if s]


with tempfile.TemporaryDirectory() as d:
    tok_path, hf_tokenizer = make_tokenizers(d)
    for fmt in ["llama2", "llama3", "chatml", "zephyr"]:
        tok, sp = hf_tokenizer(BOS[fmt])
        cases = [(c, c) for c in CONVERSATIONS]
        pr, co = PROMPT_COMPLETION_CHAT
        cases.append(([dict(m, train=False) for m in pr] + co, {"prompt": pr, "completion": co}))
        want = []
        for marked, _ in cases:
            plain = [{"role": m["role"], "content": m["content"]} for m in marked]
            text = tok.apply_chat_template(plain, chat_template=CANONICAL[fmt], tokenize=False)
            check(tok.apply_chat_template(marked, chat_template=MARKED[fmt], tokenize=False) == text,
                  f"{fmt}: the generation-marked template renders differently")
            for s in segments(text):  # precondition: the two tokenizers agree on every segment
                check(tok(s, add_special_tokens=False).input_ids == sp.encode(s),
                      f"{fmt}: HF and sentencepiece encode {s!r} differently (tokenizer, not template)")
            ids = tok.apply_chat_template(plain, chat_template=CANONICAL[fmt], tokenize=True)
            if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
                ids = ids["input_ids"]
            mask = tok.apply_chat_template(marked, chat_template=MARKED[fmt], tokenize=True, return_dict=True,
                                           return_assistant_tokens_mask=True)
            check(list(mask["input_ids"]) == list(ids), f"{fmt}: the marked template's ids differ")
            want.append((list(ids), list(mask["assistant_masks"]), text))
        lines = [c if "prompt" in c else {"messages": c} for _, c in cases]
        rc, got = ferry(fmt, "", lines, d)
        if not check(rc == 0, f"{fmt}: ferry failed: {got}"):
            continue
        check(got["notes"] == f"chat template {fmt}", f"{fmt}: notes {got['notes']!r}")
        before = len(failures)
        for k, (ids, mask, text) in enumerate(want):
            ex = got["examples"][k]
            if not check(ex["ids"] == ids, f"{fmt} conversation {k}: ids differ\n  HF    {ids}\n  ferry {ex['ids']}"
                         f"\n  text  {text!r}"):
                continue
            check(ex["trained"] == mask, f"{fmt} conversation {k}: trained flags differ from HF's assistant mask\n"
                  f"  HF    {mask}\n  ferry {ex['trained']}")
        if len(failures) == before:
            print(f"{fmt}: {len(want)} conversations, {sum(len(w[0]) for w in want)} tokens, ids and trained flags equal")

        # ferry-infer --chat's prompts: the conversation up to a user turn with the generation prompt,
        # as apply_chat_template(add_generation_prompt=True) renders them; the end-of-turn token.
        gen_cases = [c[:k + 1] for c in CONVERSATIONS for k in range(len(c)) if c[k]["role"] == "user"]
        gen_cases.append([{"role": "user", "content": "Hi"}])
        want_gen = []
        for c in gen_cases:
            ids = tok.apply_chat_template(c, chat_template=CANONICAL[fmt], add_generation_prompt=True, tokenize=True)
            if hasattr(ids, "keys"):
                ids = ids["input_ids"]
            want_gen.append(list(ids))
            text = tok.apply_chat_template(c, chat_template=CANONICAL[fmt], add_generation_prompt=True, tokenize=False)
            for s in segments(text):
                check(tok(s, add_special_tokens=False).input_ids == sp.encode(s),
                      f"{fmt} generation prompt: HF and sentencepiece encode {s!r} differently")
        src = os.path.join(d, "gen.jsonl")
        with open(src, "w") as f:
            for c in gen_cases:
                f.write(json.dumps({"messages": c}) + "\n")
        r = subprocess.run([TOOL, tok_path, fmt, "", src, "generation"], capture_output=True, text=True)
        if check(r.returncode == 0, f"{fmt}: chat_xcheck generation failed: {r.stderr.strip()}"):
            got_gen = json.loads(r.stdout)
            before = len(failures)
            for k, ids in enumerate(want_gen):
                check(got_gen["prompts"][k] == ids, f"{fmt} generation prompt {k}: ids differ\n  HF    {ids}\n"
                      f"  ferry {got_gen['prompts'][k]}")
            # The end of an assistant turn: the token a rendered reply ends its content with.
            reply = tok.apply_chat_template(gen_cases[-1] + [{"role": "assistant", "content": "Yes"}],
                                            chat_template=CANONICAL[fmt], tokenize=True)
            if hasattr(reply, "keys"):
                reply = reply["input_ids"]
            end = [t for t in reply[len(want_gen[-1]):] if t in (tok.eos_token_id, *tok.all_special_ids)][:1]
            want_end = [] if end == [tok.eos_token_id] else end
            check(got_gen["end_of_turn"] == want_end,
                  f"{fmt}: end of turn {got_gen['end_of_turn']}, the rendered reply ends with {end}")
            if len(failures) == before:
                print(f"{fmt}: {len(gen_cases)} generation prompts equal, end of turn {end}")

        # chat_template=auto: the canonical template from tokenizer_config.json.
        tdir = os.path.join(d, "ckpt-" + fmt)
        os.makedirs(tdir)
        with open(os.path.join(tdir, "tokenizer_config.json"), "w") as f:
            json.dump({"chat_template": CANONICAL[fmt], "bos_token": BOS[fmt]}, f)
        rc, auto = ferry("auto", tdir, lines, d)
        check(rc == 0 and auto == got, f"{fmt}: chat_template=auto does not give the {fmt} rendering: {auto}")

    # A template ferry does not render exactly: a one-line error naming what it resembles.
    odir = os.path.join(d, "ckpt-other")
    os.makedirs(odir)
    with open(os.path.join(odir, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": "{{ bos_token }}" + CANONICAL["llama3"]}, f)
    rc, err = ferry("auto", odir, [{"messages": CONVERSATIONS[0]}], d)
    check(rc == 1 and "looks like llama3" in err and "llama2, llama3, chatml, zephyr" in err and "\n" not in err,
          f"unknown template: {err!r}")

    # {"prompt": str, "completion": str}: TRL's tokenization (BOS + prompt, then completion + EOS trained).
    tok, sp = hf_tokenizer()
    rc, got = ferry("auto", "", [{"prompt": p, "completion": c} for p, c in PROMPT_COMPLETIONS], d)
    if check(rc == 0, f"prompt/completion: ferry failed: {got}"):
        for k, (p, c) in enumerate(PROMPT_COMPLETIONS):
            prompt_ids = tok(p).input_ids
            ids = tok(p + c).input_ids + [tok.eos_token_id]
            mask = [0] * len(prompt_ids) + [1] * (len(ids) - len(prompt_ids))
            check(prompt_ids[0] == tok.bos_token_id and ids[:len(prompt_ids)] == prompt_ids,
                  f"prompt/completion {k}: the reference is not BOS + a prefix")
            ex = got["examples"][k]
            check(ex["ids"] == ids and ex["trained"] == mask,
                  f"prompt/completion {k}:\n  TRL   {ids} {mask}\n  ferry {ex['ids']} {ex['trained']}")
        print(f"prompt/completion: {len(PROMPT_COMPLETIONS)} examples checked")

if failures:
    print(f"{len(failures)} failures")
    sys.exit(1)
print("chat template parity: all equal")
