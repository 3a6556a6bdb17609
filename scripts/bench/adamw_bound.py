"""Lower bound "CPU AdamW alone", Python fallback where build/bin/ferry-bench-adamw is missing:
PyTorch's fused CPU AdamW (torch._fused_adamw_, all threads) over --params fp32 parameters with
fp32 gradients, median of --reps after one warm-up. Writes {"ok", "ms", "gparam_s", "impl"}."""
import argparse
import json
import statistics
import sys
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", type=int, required=True)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", required=True)
    a = ap.parse_args()
    try:
        import torch
        n = a.params
        p = torch.full((n,), 0.01)
        g = torch.full((n,), 1e-3)
        m = torch.zeros(n)
        v = torch.zeros(n)
        step = torch.ones(())
        t = []
        for i in range(a.reps + 1):
            t0 = time.perf_counter()
            torch._fused_adamw_([p], [g], [m], [v], [], [step], lr=1e-5, beta1=0.9, beta2=0.999, weight_decay=0.01,
                                eps=1e-8, amsgrad=False, maximize=False)
            if i:
                t.append((time.perf_counter() - t0) * 1e3)
        ms = statistics.median(t)
        out = dict(ok=True, ms=ms, gparam_s=n / (ms / 1e3) / 1e9, impl="torch._fused_adamw_ fp32, %d threads" %
                   torch.get_num_threads())
    except Exception as e:
        out = dict(ok=False, error="%s: %s" % (type(e).__name__, e))
    with open(a.json, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
