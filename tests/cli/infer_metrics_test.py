#!/usr/bin/env python3
"""ferry-infer --metrics-json on the tiny shape (host backend): evaluate and generate in one run,
then the JSON must hold both jobs with the token counts that were asked for (64 sequences, a quarter
held out: more than the 3 x 2 evaluated), tokens/s above zero, and a loss near ln(vocab) (random
weights). Three prompts at batch 2 make two generate batches,
so the totals are sums. Greedy decoding of these prompts with seed 1234 produces no EOS within 8
tokens, so every prompt gets all 8 new tokens (a change there shows as a count mismatch).
  infer_metrics_test.py FERRY_INFER WORKDIR
Standard library only; exit 0 pass, 1 fail (one line per failed check).
"""
import json
import math
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "scripts", "bench"))
import ferrylib as fl  # noqa: E402

SEQ, BATCH, EVAL_BATCHES, NEW = 32, 2, 3, 8
PROMPTS = ["The quick brown fox", "jumps over", "the lazy dog."]


def main():
    infer, work = sys.argv[1], sys.argv[2]
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    vocab = fl.model_config("tiny")["vocab_size"]
    data = fl.write_tokens(os.path.join(work, "tokens.bin"), 64 * (SEQ + 1), vocab)
    prompts = os.path.join(work, "prompts.txt")
    with open(prompts, "w") as f:
        f.write("\n".join(PROMPTS) + "\n")
    metrics = os.path.join(work, "metrics.json")
    cmd = [infer, "--model-config", "tiny", "--device", "cpu", "--fp32", "--offload", "overlapped", "--seed", "1234",
           "--job", "both", "--data", data, "--tokenizer", "byte", "--prompt-file", prompts, "--max-new-tokens",
           str(NEW), "--set", "max_length=%d" % SEQ, "--set", "batch_size=%d" % BATCH, "--set",
           "eval_batches=%d" % EVAL_BATCHES, "--set", "eval_fraction=0.25", "--metrics-json", metrics]
    print("$ " + " ".join(cmd), flush=True)
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                       timeout=300)
    print(p.stdout)
    if p.returncode != 0:
        print("FAIL: ferry-infer exit %d" % p.returncode)
        return 1
    with open(metrics) as f:
        m = json.load(f)
    print(json.dumps(m, indent=1))
    leftovers = [x for x in os.listdir(work) if x.startswith("metrics.json.")]
    ev, gen = m.get("evaluate") or {}, m.get("generate") or {}
    n_seq = EVAL_BATCHES * BATCH
    prompt_tokens = sum(len(s.encode()) + 1 for s in PROMPTS)   # byte tokenizer, plus BOS
    checks = [
        ("top-level keys", all(k in m for k in ("model", "params", "offload", "dtype", "device", "job", "batch_size"))),
        ("model tiny, fp32, overlapped, job both", (m.get("model"), m.get("dtype"), m.get("offload"), m.get("job"))
         == ("tiny", "fp32", "overlapped", "both")),
        ("params = configs/models/tiny.json's", m.get("params") == fl.llama_params(fl.model_config("tiny"))),
        ("evaluate sequences = eval_batches x batch_size", ev.get("sequences") == n_seq),
        ("evaluate seq_len = max_length", ev.get("seq_len") == SEQ),
        ("evaluate tokens = sequences x seq_len", ev.get("tokens") == n_seq * SEQ),
        ("evaluate loss near ln(vocab) for random weights", abs(ev.get("loss", 0) - math.log(vocab)) < 0.5),
        ("evaluate perplexity = exp(loss)", math.isclose(ev.get("perplexity", 0), math.exp(ev.get("loss", 0)),
                                                         rel_tol=1e-9)),
        ("evaluate tokens_per_s > 0 and = tokens / ms", ev.get("tokens_per_s", 0) > 0 and math.isclose(
            ev["tokens_per_s"], ev["tokens"] / (ev["ms"] / 1e3), rel_tol=1e-9)),
        ("evaluate gpu_alloc_peak 0 on the host backend", ev.get("gpu_alloc_peak") == 0),
        ("generate prompts", gen.get("prompts") == len(PROMPTS)),
        ("generate max_new_tokens", gen.get("max_new_tokens") == NEW),
        ("generate prompt_tokens", gen.get("prompt_tokens") == prompt_tokens),
        ("generate new_tokens = prompts x max_new_tokens", gen.get("new_tokens") == len(PROMPTS) * NEW),
        ("generate steps: NEW - 1 decode passes per batch", gen.get("steps") == 2 * (NEW - 1)),
        ("generate tokens_per_s > 0", gen.get("tokens_per_s", 0) > 0),
        ("generate tokens_per_s = new_tokens / (prefill + decode)", gen.get("tokens_per_s", 0) > 0 and math.isclose(
            gen["tokens_per_s"], gen["new_tokens"] / ((gen["prefill_ms"] + gen["decode_ms"]) / 1e3), rel_tol=1e-9)),
        ("generate kv_cache_bytes > 0", gen.get("kv_cache_bytes", 0) > 0),
        ("no temporary file left", not leftovers),
    ]
    bad = [name for name, ok in checks if not ok]
    for name in bad:
        print("FAIL: " + name)
    print("%d of %d checks passed" % (len(checks) - len(bad), len(checks)))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
