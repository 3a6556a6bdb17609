#!/usr/bin/env python3
"""Greedy continuations of ferry-infer against HF transformers generate on the same checkpoint.

A random LlamaForCausalLM (debug-like but smaller: GQA, 4 layers) is saved with save_pretrained;
ferry-infer generates greedily from three prompts of different lengths in one batch (byte
tokenizer: BOS=1, byte b -> 3+b), once per offload mode, and HF generate runs the same prompts
(left-padded, with the attention mask) on CUDA. Token ids must agree.

fp32 (TF32 off on both sides): every row's ids must be identical. fp16: each row must agree on
its first 8 tokens, unless the two picks at the first difference are a near-tie of the fp32 model
(logits within 0.05 + 0.5% of the largest logit, about what fp16 rounding moves a logit by);
after a legitimate flip the continuations differ by construction.

Exit codes: 0 pass, 1 mismatch or error, 77 skipped (no torch/transformers or no CUDA device).
"""
import argparse
import os
import re
import subprocess
import sys

SKIP = 77
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
try:
    import torch
    import transformers
except ImportError as e:
    print(f"hf_generate_parity skipped: {e}")
    sys.exit(SKIP)

PROMPTS = ["Hello", "The quick brown fox jumps", "ab"]
NEW_TOKENS = 24


def encode(text):
    return [1] + [3 + b for b in text.encode("utf-8")]


def make_model(seed):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0,
        tie_word_embeddings=False, initializer_range=0.15, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = transformers.LlamaForCausalLM(cfg).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    return model


def fp32_margin(model, prompt, prefix, a, b):
    """|logit(a) - logit(b)| of the fp32 model after prompt + prefix, and the largest |logit|."""
    ids = torch.tensor([encode(prompt) + list(prefix)])
    with torch.no_grad():
        logits = model.float()(input_ids=ids).logits[0, -1]
    return abs(logits[a] - logits[b]).item(), logits.abs().max().item()


def hf_generate(model, dtype, device):
    m = model.to(device=device, dtype=dtype).eval()
    rows = [encode(p) for p in PROMPTS]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    with torch.no_grad():
        out = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                         eos_token_id=2, pad_token_id=0)
    model.to(device="cpu", dtype=torch.float32)
    result = []
    for row in out[:, width:].tolist():
        cut = []
        for t in row:
            cut.append(t)
            if t == 2:
                break
        result.append(cut)
    return result


def ferry_generate(args, model_dir, dtype_flag, mode):
    prompt_file = os.path.join(args.workdir, "prompts.txt")
    with open(prompt_file, "w") as f:
        f.write("\n".join(PROMPTS) + "\n")
    cmd = [args.tool, "--model", model_dir, "--job", "generate", "--prompt-file", prompt_file, "--batch-size",
           str(len(PROMPTS)), "--max-new-tokens", str(NEW_TOKENS), "--device", args.device, dtype_flag, "--offload", mode,
           "--max-length", "256", "--set", "temperature=0"]
    r = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", errors="replace")
    if r.returncode != 0:
        print(" ".join(cmd))
        print(r.stdout, r.stderr)
        raise SystemExit(1)
    ids = {}
    for line in r.stdout.splitlines():
        m = re.match(r"^ids (\d+): ?(.*)$", line)
        if m:
            ids[int(m.group(1))] = [int(t) for t in m.group(2).split()]
    return [ids.get(i, []) for i in range(len(PROMPTS))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tool", required=True, help="ferry-infer binary")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--device", default="cuda", help="cuda (the test); cpu runs the fp32 check only, for development")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("hf_generate_parity skipped: no CUDA device")
        return SKIP
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    os.makedirs(args.workdir, exist_ok=True)
    model_dir = os.path.join(args.workdir, "model")
    model = make_model(1234)
    model.save_pretrained(model_dir, safe_serialization=True)

    failures = 0
    variants = [("--fp32", torch.float32, True)]
    if args.device == "cuda":
        variants.append(("--fp16", torch.float16, False))
    for dtype_flag, dtype, strict in variants:
        ref = hf_generate(model, dtype, args.device)
        for mode in ("none", "blocked", "overlapped"):
            got = ferry_generate(args, model_dir, dtype_flag, mode)
            for b, (g, h) in enumerate(zip(got, ref)):
                same = 0
                while same < min(len(g), len(h)) and g[same] == h[same]:
                    same += 1
                ok = g == h if strict else same >= min(8, len(h))
                if not ok and not strict and same < min(len(g), len(h)):
                    margin, scale = fp32_margin(model, PROMPTS[b], h[:same], g[same], h[same])
                    ok = margin <= 0.05 + 0.005 * scale
                    print(f"  first difference at token {same}: fp32 logit margin {margin:.4f} "
                          f"(near-tie bound {0.05 + 0.005 * scale:.4f})")
                print(f"{dtype_flag[2:]} {mode:10s} row {b}: {same}/{len(h)} tokens agree {'ok' if ok else 'MISMATCH'}")
                if not ok:
                    print(f"  ferry: {g}\n  hf:    {h}")
                    failures += 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
