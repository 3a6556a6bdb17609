#!/usr/bin/env python3
"""Loads a ferry checkpoint directory with HF transformers and prints the loss of a short text.

    python3 scripts/check_hf_load.py runs/debug/checkpoint-000030 [--device cuda]

Exit 0 when the checkpoint loads as LlamaForCausalLM and the loss is finite. The text is encoded
with ferry's byte tokenizer (id = byte + 3), which is what the embedded default trains with.
"""
import argparse
import math
import sys

import torch
from transformers import LlamaForCausalLM

TEXT = ("Permission is hereby granted, free of charge, to any person obtaining a copy of this "
        "software and associated documentation files, to deal in the Software without restriction.")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    model = LlamaForCausalLM.from_pretrained(args.dir, torch_dtype=torch.float32).to(args.device).eval()
    ids = torch.tensor([[1] + [b + 3 for b in TEXT.encode()]], device=args.device)
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    print(f"transformers loaded {args.dir}: {sum(p.numel() for p in model.parameters()) / 1e9:.3f} B params, "
          f"loss on a licence sentence {loss:.4f}")
    return 0 if math.isfinite(loss) else 1


if __name__ == "__main__":
    sys.exit(main())
