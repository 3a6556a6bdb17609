#!/usr/bin/env python3
"""HF parity of a tied-embedding model (tie_word_embeddings, as Llama 3.2 1B/3B ship) through
ferry's command-line tools, end to end.

transformers builds a tiny LlamaForCausalLM shaped like Llama 3.2 (tied embeddings, llama3 rope
scaling, 4 query heads per kv head, head_dim 16 at hidden 32) and saves it with save_pretrained,
which writes no lm_head.weight. One sequence of 33 random tokens (an llm.c token file of exactly
max_length + 1 tokens is one training sequence, and evaluation reads it whole) is the data. Then:

  1. ferry-infer --model DIR --job evaluate, in every offload mode: HF's loss on the sequence. The
     same from a copy of the checkpoint that also stores lm_head.weight equal to the embedding
     (transformers ties such a pair); a copy whose lm_head.weight differs is refused, naming
     tie_word_embeddings (transformers would untie it).
  2. ferry-train --init DIR, 3 steps on the sequence, in every offload mode: each step's loss and
     gradient norm are those of torch.optim.AdamW + clip_grad_norm_ on the HF model (the tied
     matrix is one parameter there too), and the fp32 master weights ferry saves are the PyTorch
     run's: ||dp_ferry - dp_torch|| / ||dp_torch|| below 1e-3 over the 3-step update.
  3. The checkpoint ferry saved has no lm_head.weight and says tie_word_embeddings; transformers
     loads it with lm_head tied to the embedding and the file's weights bit for bit, and its logits
     equal ferry's forward of the same checkpoint (ferry-model-check) within 1e-4.

fp32 throughout (TF32 off); --device cuda runs ferry on the GPU, the references stay on the CPU.
Exit codes: 0 pass, 1 mismatch or error, 77 skipped (no torch/transformers, or no CUDA device).
  hf_tied_cli_parity.py --train FERRY_TRAIN --infer FERRY_INFER --model-check FERRY_MODEL_CHECK --workdir DIR
                        [--device cpu|cuda]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

SKIP = 77
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "scripts", "bench"))
import ferrylib as fl  # noqa: E402

try:
    import torch
    import transformers
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
except ImportError as e:  # reported as skipped by ctest, never as passed
    print(f"hf_tied_cli_parity skipped: {e}")
    sys.exit(SKIP)

SEQ = 32          # max_length: the token file holds SEQ + 1 tokens
VOCAB = 320       # holds the byte tokenizer's 259 ids (ferry-infer checks it)
STEPS = 3
HP = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, clip=1.0)
MODES = ("none", "blocked", "overlapped")


def rel_err(a, b):
    a, b = a.double(), b.double()
    d = b.abs().max().item()
    return (a - b).abs().max().item() / (d if d > 0 else 1.0)


def make_model(seed):
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-5,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=32),
        tie_word_embeddings=True, initializer_range=0.1, bos_token_id=1, eos_token_id=2)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    return model


def run(cmd, failures, what, expect_ok=True):
    r = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=600)
    if (r.returncode == 0) != expect_ok:
        failures.append(f"{what}: exit {r.returncode}: {r.stderr.strip()[-400:]}")
        print("$ " + " ".join(cmd))
        print(r.stdout[-2000:], r.stderr[-2000:])
    return r


def file_names(path):
    with safe_open(path, framework="pt") as f:
        return set(f.keys())


def evaluate(args, model_dir, mode, work, failures, what):
    """ferry-infer's evaluation loss of the token file, or None."""
    out = os.path.join(work, "eval.json")
    cmd = [args.infer, "--model", model_dir, "--job", "evaluate", "--data", args.tokens,
           "--device", args.device, "--fp32", "--offload", mode, "--set", f"max_length={SEQ}", "--set", "batch_size=1",
           "--set", "eval_batches=1", "--set", "eval_fraction=0", "--metrics-json", out]
    if run(cmd, failures, what).returncode != 0:
        return None
    with open(out) as f:
        m = json.load(f)
    if m["evaluate"]["tokens"] != SEQ:
        failures.append(f"{what}: evaluated {m['evaluate']['tokens']} tokens, not the sequence's {SEQ}")
    return m["evaluate"]["loss"]


def torch_training(model, ids):
    """Losses, grad norms and final parameters (by name) of STEPS AdamW steps on ids."""
    opt = torch.optim.AdamW(model.parameters(), lr=HP["lr"], betas=HP["betas"], eps=HP["eps"],
                            weight_decay=HP["weight_decay"])
    losses, norms = [], []
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), HP["clip"]).item())
        losses.append(loss.item())
        opt.step()
    return losses, norms, {n: p.detach().clone() for n, p in model.named_parameters()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", required=True, help="ferry-train")
    ap.add_argument("--infer", required=True, help="ferry-infer")
    ap.add_argument("--model-check", required=True, help="ferry-model-check")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("hf_tied_cli_parity skipped: no CUDA device")
        return SKIP
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    failures = []

    model = make_model(1234)
    hf_dir = os.path.join(args.workdir, "hf")
    model.save_pretrained(hf_dir, safe_serialization=True)
    if "lm_head.weight" in file_names(os.path.join(hf_dir, "model.safetensors")):
        failures.append("transformers saved lm_head.weight for a tied model: the test would not load a tied file")
    args.tokens = fl.write_tokens(os.path.join(args.workdir, "tokens.bin"), SEQ + 1, VOCAB, seed=7)
    with open(args.tokens, "rb") as f:
        f.seek(1024)
        raw = f.read()
    ids = torch.tensor([[int.from_bytes(raw[2 * i:2 * i + 2], "little") for i in range(SEQ + 1)]])
    with torch.no_grad():
        hf_loss = model(input_ids=ids, labels=ids).loss.item()

    # 1. evaluation of the HF checkpoint, and of copies that also store lm_head.weight
    for mode in MODES:
        loss = evaluate(args, hf_dir, mode, args.workdir, failures, f"ferry-infer {mode}")
        if loss is not None:
            e = abs(loss - hf_loss) / hf_loss
            print(f"evaluate {mode:10s}: ferry {loss:.7f}, HF {hf_loss:.7f} (relative difference {e:.2e})")
            if e > 1e-5:
                failures.append(f"ferry-infer {mode}: loss {loss} != HF {hf_loss}")
    weights = load_file(os.path.join(hf_dir, "model.safetensors"))
    for name, lm in (("both_equal", weights["model.embed_tokens.weight"].clone()),
                     ("both_differ", weights["model.embed_tokens.weight"] * 1.01)):
        d = os.path.join(args.workdir, name)
        shutil.copytree(hf_dir, d)
        save_file(dict(weights, **{"lm_head.weight": lm.contiguous()}), os.path.join(d, "model.safetensors"),
                  metadata={"format": "pt"})
        if name == "both_equal":
            loss = evaluate(args, d, "overlapped", args.workdir, failures, "ferry-infer, lm_head.weight equal")
            print(f"evaluate with lm_head.weight equal to the embedding: {loss}")
            if loss is not None and abs(loss - hf_loss) / hf_loss > 1e-5:
                failures.append(f"lm_head.weight equal to the embedding: loss {loss} != HF {hf_loss}")
        else:
            cmd = [args.infer, "--model", d, "--job", "evaluate", "--data", args.tokens,
                   "--device", args.device, "--fp32", "--set", f"max_length={SEQ}", "--set", "eval_fraction=0"]
            r = run(cmd, failures, "ferry-infer, lm_head.weight differing", expect_ok=False)
            msg = r.stderr.strip()
            print(f"lm_head.weight differing: exit {r.returncode}: {msg}")
            if "tie_word_embeddings" not in msg or len(msg.splitlines()) != 1:
                failures.append(f"lm_head.weight differing: want one line naming tie_word_embeddings, got: {msg}")

    # 2. training from the HF checkpoint against torch.optim.AdamW on the HF model
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    want_losses, want_norms, want = torch_training(make_model(1234), ids)
    for mode in MODES:
        out = os.path.join(args.workdir, "train_" + mode)
        cmd = [args.train, "--set", "init=" + hf_dir, "--data", args.tokens, "--device",
               args.device, "--fp32", "--offload", mode, "--set", f"max_length={SEQ}", "--set", "batch_size=1",
               "--set", f"steps={STEPS}", "--set", f"learning_rate={HP['lr']}", "--set", "lr_schedule=constant",
               "--set", "warmup_steps=0", "--set", f"beta1={HP['betas'][0]}", "--set", f"beta2={HP['betas'][1]}",
               "--set", f"eps={HP['eps']}", "--set", f"weight_decay={HP['weight_decay']}", "--set",
               f"clip_grad={HP['clip']}", "--set", "eval_fraction=0", "--set", "output_dir=" + out]
        if mode == "overlapped":
            cmd += ["--set", "speculate=on"]
        if run(cmd, failures, f"ferry-train {mode}").returncode != 0:
            continue
        with open(os.path.join(out, "metrics.jsonl")) as f:
            recs = [json.loads(line) for line in f if line.strip()]
        for k, (rec, wl, wn) in enumerate(zip(recs, want_losses, want_norms)):
            el, en = abs(rec["loss"] - wl) / wl, abs(rec["grad_norm"] - wn) / wn
            print(f"train {mode:10s} step {k + 1}: loss {rec['loss']:.7f} vs {wl:.7f} ({el:.1e}), "
                  f"grad norm {rec['grad_norm']:.6f} vs {wn:.6f} ({en:.1e})")
            if el > 1e-4 or en > 1e-4:
                failures.append(f"ferry-train {mode} step {k + 1}: loss {rec['loss']} / grad norm {rec['grad_norm']} "
                                f"vs torch {wl} / {wn}")
        ckpt = os.path.join(out, "checkpoint-%06d" % STEPS)
        master = load_file(os.path.join(ckpt, "optimizer.safetensors"))
        num = den = 0.0
        for n, p in want.items():
            dp_f, dp_t = master[n].double() - init[n].double(), p.double() - init[n].double()
            num += (dp_f - dp_t).pow(2).sum().item()
            den += dp_t.pow(2).sum().item()
        ue = (num / den) ** 0.5
        print(f"train {mode:10s}: update relative error {ue:.2e} against torch.optim.AdamW")
        if ue > 1e-3:
            failures.append(f"ferry-train {mode}: the 3-step update differs from torch's by {ue:.3g} (relative)")

        # 3. the saved checkpoint in transformers, and ferry's forward of it
        names = file_names(os.path.join(ckpt, "model.safetensors"))
        with open(os.path.join(ckpt, "config.json")) as f:
            saved_cfg = json.load(f)
        if "lm_head.weight" in names or any("lm_head" in n for n in file_names(os.path.join(ckpt, "optimizer.safetensors"))):
            failures.append(f"{mode}: ferry saved lm_head for a tied model")
        if saved_cfg.get("tie_word_embeddings") is not True:
            failures.append(f"{mode}: ferry's config.json does not say tie_word_embeddings")
        back = transformers.LlamaForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32,
                                                             attn_implementation="eager")
        if back.lm_head.weight.data_ptr() != back.model.embed_tokens.weight.data_ptr():
            failures.append(f"{mode}: transformers did not tie lm_head to the embedding of ferry's checkpoint")
        saved = load_file(os.path.join(ckpt, "model.safetensors"))
        differ = [n for n, p in back.named_parameters() if not torch.equal(p, saved[n])]
        if differ:
            failures.append(f"{mode}: transformers' weights differ from ferry's file: {differ[:3]}")
        moved = (saved["model.embed_tokens.weight"] - init["model.embed_tokens.weight"]).abs().max().item()
        if moved == 0:
            failures.append(f"{mode}: training did not move the tied matrix")
        with torch.no_grad():
            hf_logits = back(input_ids=ids).logits
        tok_file = os.path.join(args.workdir, "tokens.txt")
        with open(tok_file, "w") as f:
            f.write(" ".join(str(t) for t in ids[0].tolist()) + "\n")
        ferry_out = os.path.join(out, "ferry_forward.safetensors")
        cmd = [args.model_check, "--model", ckpt, "--tokens", tok_file, "--out", ferry_out,
               "--dtype", "f32", "--device", args.device]
        if run(cmd, failures, f"ferry-model-check on the {mode} checkpoint").returncode == 0:
            e = rel_err(load_file(ferry_out)["logits"], hf_logits)
            print(f"checkpoint {mode:10s}: transformers' logits vs ferry's, relative error {e:.2e}")
            if e > 1e-4:
                failures.append(f"{mode}: transformers' logits of ferry's checkpoint differ by {e:.3g}")
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        return 1
    print("hf_tied_cli_parity: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
