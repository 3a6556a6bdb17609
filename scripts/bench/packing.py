#!/usr/bin/env python3
"""Packing against padding (issue 16's goals): a prompt/completion JSONL whose example lengths
follow a log-normal spread (median --median tokens with the byte tokenizer: one token per byte),
trained three ways with the same model, placement and max_length:
  text    the same characters as plain text, cut into max_length rows (the unmasked reference step),
  packed  packing=true: examples packed into max_length rows (block-diagonal attention),
  padded  packing=false: one example per row, batch_size --padded-batch rows padded to the longest.
Prints step time, positions per step, trained tokens per step and trained tokens/s (medians over
the steps after --warmup), and the two ratios the issue names: packed step / text step at equal
positions, and packed / padded trained tokens per second.
  scripts/bench/packing.py [--shape 1b] [--offload none] [--dtype fp16] [--seq 4096] [--steps 12]
"""
import argparse
import json
import math
import os
import random
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ferrylib as fl  # noqa: E402

WORDS = ("the model reads a short answer and writes it back with care while every token of the prompt "
         "stays out of the loss so only the completion trains").split()


def text_of(rng, n):
    out = []
    while sum(len(w) + 1 for w in out) < n:
        out.append(rng.choice(WORDS))
    return " ".join(out)[:max(1, n)]


def write_data(d, n_examples, median, sigma, seed):
    rng = random.Random(seed)
    lens = []
    with open(os.path.join(d, "chat.jsonl"), "w") as f, open(os.path.join(d, "text.txt"), "w") as t:
        for _ in range(n_examples):
            n = max(16, min(4000, int(median * math.exp(rng.gauss(0, sigma)))))
            p = max(4, n // 3)
            prompt, completion = text_of(rng, p), text_of(rng, n - p)
            f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
            t.write(prompt + completion + "\n")
            lens.append(n)
    lens.sort()
    return lens[len(lens) // 2], sum(lens)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="1b")
    ap.add_argument("--offload", default="none")
    ap.add_argument("--dtype", default="fp16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--median", type=int, default=300)
    ap.add_argument("--sigma", type=float, default=0.7)
    ap.add_argument("--examples", type=int, default=3000)
    ap.add_argument("--padded-batch", type=int, default=8)
    ap.add_argument("--out", default=os.path.join(fl.ROOT, "out", "packing"))
    ap.add_argument("--timeout", type=int, default=900)
    a = ap.parse_args()
    train = fl.tool("ferry-train")
    if not train:
        sys.exit("packing.py: build ferry-train first (scripts/build.sh)")
    os.makedirs(a.out, exist_ok=True)
    med, total = write_data(a.out, a.examples, a.median, a.sigma, 1234)
    fl.ferry_log("data: %d examples, median %d tokens, %d tokens in all" % (a.examples, med, total))
    runs = [("text", os.path.join(a.out, "text.txt"), 1, {}),
            ("packed", os.path.join(a.out, "chat.jsonl"), 1, {"packing": "true"}),
            ("padded", os.path.join(a.out, "chat.jsonl"), a.padded_batch, {"packing": "false"})]
    got = {}
    for name, data, batch, extra in runs:
        out = os.path.join(a.out, name)
        shutil.rmtree(out, ignore_errors=True)
        sets = fl.train_run_sets(a.steps, a.seq, batch, data, out)
        sets.update(eval_fraction=0, **extra)
        cmd = fl.ferry_cmd(train, a.shape, a.device, a.offload, a.dtype, sets=sets, seed=1234)
        res = fl.run(cmd, a.timeout, os.path.join(a.out, name + ".log"))
        rows = [r for r in fl.read_metrics(os.path.join(out, "metrics.jsonl")) if "step_ms" in r][a.warmup:]
        if res["rc"] != 0 or not rows:
            sys.exit("packing.py: %s run failed: %s" % (name, fl.failure_reason(res, name)))
        ms = fl.median([r["step_ms"] for r in rows])
        pos = fl.median([r.get("tokens", a.seq * batch) for r in rows])
        trained = fl.median([r.get("trained_tokens", r.get("tokens", 0)) for r in rows])
        got[name] = dict(ms=ms, pos=pos, trained=trained, tps=fl.median([r.get("trained_tokens_per_s", 0) for r in rows]))
    table = [[k, "%.1f" % v["ms"], "%d" % v["pos"], "%d" % v["trained"], "%.0f" % v["tps"]] for k, v in got.items()]
    print("packing bench: %s, %s, %s, seq %d, median example %d tokens (%s, %s)" %
          (a.shape, a.offload, a.dtype, a.seq, med, fl.gpu_info() or "cpu", fl.git_commit()))
    print(fl.table(["run", "step ms", "positions/step", "trained/step", "trained tok/s"], table, markdown=True))
    t, p, d = got["text"], got["packed"], got["padded"]
    print("packed step / text step per position: %.3f" % ((p["ms"] / p["pos"]) / (t["ms"] / t["pos"])))
    print("packed / padded trained tokens per second: %.2f" % (p["tps"] / d["tps"]))


if __name__ == "__main__":
    main()
