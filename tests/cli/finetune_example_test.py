#!/usr/bin/env python3
"""README's "Fine-tuning a checkpoint" example end to end, on a tiny checkpoint made here.

transformers writes a tiny LlamaForCausalLM into an HF directory together with a Llama-3-style
byte-level BPE tokenizer.json that `tokenizers` trains here on the shipped chat file (the Llama 3
special tokens; EOS <|end_of_text|>, so the chat's end of turn <|eot_id|> is another token) and a
tokenizer_config.json holding Llama 3's canonical chat template. No download. Then:

  1. ferry-train --init DIR with no tokenizer named trains on DIR's tokenizer.json: one step on a
     one-conversation file (chat_template auto, from DIR) has the loss transformers computes for
     that conversation tokenized by DIR's tokenizer with apply_chat_template, the prompt masked.
     Naming a tokenizer whose vocabulary differs from the model's (--tokenizer byte) is a one-line
     error (exit 2) naming the key and both sizes.
  2. README's ferry-train command (read from README.md, the model directory, output directory and
     binaries replaced, CPU-sized --set overrides appended: later values win) trains on
     configs/data/chat-sample.jsonl; the loss goes down.
  3. transformers loads the saved checkpoint; ferry-infer's evaluation loss of a conversation equals
     transformers' on the same checkpoint (the logits agree).
  4. README's ferry-infer --chat command on the saved checkpoint: its prompt has the token count of
     apply_chat_template(add_generation_prompt=True) with the same system message, and its greedy
     reply is transformers' greedy generate from those ids, stopping at <|eot_id|> or EOS. A copy of
     the checkpoint whose head favours <|eot_id|> must stop right after it.

Usage: finetune_example_test.py FERRY_TRAIN FERRY_INFER WORKDIR. Exits 0 on success, 1 on a
failure, 77 (skipped) when torch, transformers or tokenizers is missing.
"""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

SKIP = 77
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
try:
    import torch
    import transformers
    from safetensors.torch import load_file, save_file
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
except ImportError as e:  # reported as skipped by ctest, never as passed
    print(f"finetune_example_test skipped: {e}")
    sys.exit(SKIP)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHAT_FILE = os.path.join(ROOT, "configs", "data", "chat-sample.jsonl")
README = os.path.join(ROOT, "README.md")
# Llama 3's split pattern (tests/io/hf_tokenizer_ref.py builds the same layout).
SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
         r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# meta-llama/Meta-Llama-3-8B-Instruct's template (tests/io/chat_template_parity.py)
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
          "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
          "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# Appended to README's commands (a flag may appear once, so keys README sets go through --set,
# which applies in command-line order: the later value wins).
TRAIN_OVERRIDES = ["--device", "cpu", "--fp32", "--set", "steps=40", "--set", "max_length=128", "--set",
                   "learning_rate=3e-3", "--set", "warmup_steps=2", "--set", "eval_every=0"]
INFER_OVERRIDES = ["--device", "cpu", "--fp32", "--set", "max_new_tokens=24"]

failures = []


def check(cond, what):
    if not cond:
        failures.append(what)
        print("FAIL:", what)
    return cond


def run(cmd, expect_rc=0):
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=600, cwd=ROOT)
    if r.returncode != expect_rc:
        print(r.stdout[-3000:], r.stderr[-3000:])
    check(r.returncode == expect_rc, f"exit {r.returncode}, not {expect_rc}: {r.stderr.strip()[-300:]}")
    return r


def readme_commands():
    """The ferry-train and ferry-infer commands of README's fine-tuning example, as argument lists."""
    text = open(README).read()
    at = text.find("## Fine-tuning a checkpoint")
    block = re.search(r"```sh\n(.*?)```", text[at:], re.S) if at >= 0 else None
    if not block:
        return None, None
    lines, cur = [], ""
    for raw in block.group(1).splitlines():
        line = raw.split(" #")[0].rstrip() if not raw.lstrip().startswith("#") else ""
        cur += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            if cur.strip():
                lines.append(shlex.split(cur))
            cur = ""
    train = next((l for l in lines if l[0].endswith("/ferry-train")), None)
    infer = next((l for l in lines if l[0].endswith("/ferry-infer")), None)
    return train, infer


def build_checkpoint(d):
    texts = []
    with open(CHAT_FILE) as f:
        for line in f:
            j = json.loads(line)
            texts += [m["content"] for m in j["messages"]] if "messages" in j else [j["prompt"], j["completion"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts + ["system", "user", "assistant"], trainers.BpeTrainer(
        vocab_size=600, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    os.makedirs(d)
    tok.save(os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
                   "eos_token": "<|end_of_text|>", "chat_template": LLAMA3}, f)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=tok.token_to_id("<|begin_of_text|>"), eos_token_id=tok.token_to_id("<|end_of_text|>"),
        initializer_range=0.05)
    torch.manual_seed(16)
    model = transformers.LlamaForCausalLM(cfg).float()
    model.save_pretrained(d, safe_serialization=True)
    return vocab


def hf_model(d):
    return transformers.LlamaForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()


def chat_ids(tok, messages, **kw):
    ids = tok.apply_chat_template(messages, tokenize=True, **kw)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def conversation_loss(model, tok, conv):
    """Mean cross-entropy over the assistant reply and its <|eot_id|> (the trained tokens)."""
    prompt = chat_ids(tok, conv[:-1], add_generation_prompt=True)
    ids = chat_ids(tok, conv)
    check(ids[:len(prompt)] == prompt, "the reference: the generation prompt is not a prefix of the conversation")
    labels = [-100] * len(prompt) + ids[len(prompt):]
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item()


def write_jsonl(path, lines):
    with open(path, "w") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")


def one_step_loss(train, hf_dir, data, out, extra=()):
    r = run([train, "--init", hf_dir, "--data", data, "--device", "cpu", "--fp32", "--steps", "1", "--max-length", "128",
             "--set", "eval_fraction=0", "--set", "learning_rate=1e-3", "--output-dir", out, *extra])
    if r.returncode != 0:
        return None
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, filter(str.strip, f)) if "loss" in r][0]["loss"]


def reply_ids(stdout):
    m = re.search(r"^ids 0: ([0-9 ]*)$", stdout, re.M)
    return [int(t) for t in m.group(1).split()] if m else None


def main():
    if len(sys.argv) != 4:
        print(__doc__)
        return 2
    train_bin, infer_bin, work = sys.argv[1:]
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    hf_dir = os.path.join(work, "tiny-llama3")
    vocab = build_checkpoint(hf_dir)
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    check(eot != tok.eos_token_id, "the test tokenizer's EOS is <|eot_id|>: the end-of-turn stop would go unchecked")
    model0 = hf_model(hf_dir)

    # 1. --init DIR tokenizes with DIR's tokenizer.json; a named tokenizer of another size is refused.
    conv = [{"role": "user", "content": "How many letters are in the word compass?"},
            {"role": "assistant", "content": "The word compass has 7 letters."}]
    one = os.path.join(work, "one.jsonl")
    write_jsonl(one, [{"messages": conv}])
    want = conversation_loss(model0, tok, conv)
    got = one_step_loss(train_bin, hf_dir, one, os.path.join(work, "one_step"))
    if got is not None:
        print(f"--init's tokenizer: first-step loss {got:.6f}, transformers {want:.6f}")
        check(abs(got - want) <= 1e-4 * want, f"first-step loss {got} != transformers' {want} with DIR's tokenizer")
    r = run([train_bin, "--init", hf_dir, "--data", one, "--tokenizer", "byte", "--device", "cpu", "--steps", "1",
             "--output-dir", os.path.join(work, "bad_tok")], expect_rc=2)
    msg = r.stderr.strip()
    print(f"named tokenizer of another size: {msg}")
    check(len(msg.splitlines()) == 1 and "tokenizer=byte" in msg and "259" in msg and str(vocab) in msg,
          f"want one line naming tokenizer=byte, 259 and {vocab}: {msg!r}")

    # 2. README's training command on the shipped chat file.
    train, infer = readme_commands()
    if not check(train is not None and infer is not None, "README has no fine-tuning example with both commands"):
        return 1
    init = train[train.index("--init") + 1]
    out_dir = train[train.index("--output-dir") + 1]
    check(train[train.index("--data") + 1] == "configs/data/chat-sample.jsonl", "README trains on another file")

    def local(args, binary, overrides):
        args = [binary] + [a.replace(init, hf_dir).replace(out_dir, os.path.join(work, "runs")) for a in args[1:]]
        return args + overrides

    runs = os.path.join(work, "runs")
    r = run(local(train, train_bin, TRAIN_OVERRIDES), expect_rc=0)
    if r.returncode != 0:
        return 1
    with open(os.path.join(runs, "metrics.jsonl")) as f:
        losses = [json.loads(l)["loss"] for l in f if l.strip() and "loss" in json.loads(l)]
    head, tail = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    print(f"README's training: {len(losses)} steps, loss {head:.3f} (first 3) -> {tail:.3f} (last 5)")
    check(len(losses) == 40 and tail < 0.7 * head, f"the loss did not go down: {losses}")
    ckpt = os.path.join(runs, "checkpoint-%06d" % len(losses))

    # 3. transformers loads the checkpoint; ferry-infer's evaluation loss equals transformers'.
    model = hf_model(ckpt)
    tok_ckpt = transformers.AutoTokenizer.from_pretrained(ckpt)
    check(tok_ckpt.get_vocab() == tok.get_vocab(), "the checkpoint's tokenizer is not the one trained on")
    want = conversation_loss(model, tok, conv)
    metrics = os.path.join(work, "eval.json")
    if run([infer_bin, "--model", ckpt, "--job", "evaluate", "--data", one, "--device", "cpu", "--fp32",
            "--set", "eval_fraction=0", "--set", "eval_batches=1", "--set", "batch_size=1",
            "--max-length", "128", "--metrics-json", metrics]).returncode == 0:
        with open(metrics) as f:
            got = json.load(f)["evaluate"]["loss"]
        print(f"the saved checkpoint: ferry-infer loss {got:.6f}, transformers {want:.6f}")
        check(abs(got - want) <= 1e-4 * want, f"ferry-infer's loss {got} != transformers' {want} on the checkpoint")

    # 4. README's ferry-infer --chat command: transformers' prompt and greedy reply.
    infer_cmd = [a.replace(out_dir, runs) for a in infer]
    infer_cmd = [re.sub(r"checkpoint-\d{6}", os.path.basename(ckpt), a) for a in infer_cmd]
    system = infer_cmd[infer_cmd.index("--system") + 1] if "--system" in infer_cmd else None
    prompt = infer_cmd[infer_cmd.index("--prompt") + 1]
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    want_prompt = chat_ids(tok, messages, add_generation_prompt=True)
    stops = [tok.eos_token_id, eot]

    def chat_run(model_dir, hf):
        cmd = [infer_bin] + [a.replace(ckpt, model_dir) for a in infer_cmd[1:]] + INFER_OVERRIDES + [
            "--metrics-json", os.path.join(work, "chat.json")]
        r = run(cmd)
        if r.returncode != 0:
            return None, None
        with open(os.path.join(work, "chat.json")) as f:
            g = json.load(f)["generate"]
        check(g["prompt_tokens"] == len(want_prompt),
              f"--chat prompt has {g['prompt_tokens']} tokens, apply_chat_template {len(want_prompt)}")
        got = reply_ids(r.stdout)
        with torch.no_grad():
            out = hf.generate(torch.tensor([want_prompt]), max_new_tokens=24, do_sample=False, eos_token_id=stops,
                              pad_token_id=tok.eos_token_id)
        return got, out[0, len(want_prompt):].tolist()

    got, ref = chat_run(ckpt, model)
    if got is not None:
        print(f"--chat reply ids {got}\n transformers     {ref}\n text {tok.decode(got)!r}")
        check(got == ref, "ferry-infer --chat's greedy reply differs from transformers' generate")
    # A head that answers <|eot_id|> first: the reply stops right there.
    eot_dir = os.path.join(work, "eot-first")
    shutil.copytree(ckpt, eot_dir)
    w = load_file(os.path.join(eot_dir, "model.safetensors"))
    w["lm_head.weight"] = torch.zeros_like(w["lm_head.weight"])
    w["lm_head.weight"][eot] = 1.0
    w["model.norm.weight"] = torch.ones_like(w["model.norm.weight"])
    save_file(w, os.path.join(eot_dir, "model.safetensors"), metadata={"format": "pt"})
    with torch.no_grad():
        h = hf_model(eot_dir)
        first = h(input_ids=torch.tensor([want_prompt])).logits[0, -1]
    if first[eot] <= 0:  # the hidden state sums negative: flip the row so that <|eot_id|> wins
        w["lm_head.weight"][eot] = -1.0
        save_file(w, os.path.join(eot_dir, "model.safetensors"), metadata={"format": "pt"})
        h = hf_model(eot_dir)
    got, ref = chat_run(eot_dir, h)
    if got is not None:
        print(f"a head favouring <|eot_id|>: ferry {got}, transformers {ref}")
        check(ref == [eot] and got == [eot], f"--chat did not stop at <|eot_id|> ({eot}): ferry {got}, HF {ref}")

    if failures:
        print(f"FAILED ({len(failures)}):\n  " + "\n  ".join(failures))
        return 1
    print("finetune_example_test: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
