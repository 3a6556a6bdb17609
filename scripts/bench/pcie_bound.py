"""Lower bound "PCIe traffic alone": the time to copy the half weights in twice (forward and
backward) and the half gradients out once, from/to pinned host memory, nothing else running.

Copies go in chunks of at most --chunk-mib through one reused device buffer, so the device needs
little memory; the figure is the median of --reps timed repetitions. Writes a JSON object:
{"ok", "ms", "h2d_gbs", "d2h_gbs", "weight_bytes", "grad_bytes"}.
"""
import argparse
import json
import statistics
import sys
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--weight-bytes", type=int, required=True)
    ap.add_argument("--grad-bytes", type=int, required=True)
    ap.add_argument("--chunk-mib", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", required=True)
    a = ap.parse_args()
    out = dict(ok=False)
    try:
        import torch
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device")
        chunk = a.chunk_mib << 20
        # Pinned host buffers as big as the traffic (up to 4 GiB), so no host cache warms the copies.
        host_n = min(max(a.weight_bytes, a.grad_bytes), 4 << 30)
        host = torch.empty(host_n, dtype=torch.uint8, pin_memory=True)
        dev = torch.empty(min(chunk, host_n), dtype=torch.uint8, device="cuda")

        def copy(total, h2d):
            done = 0
            while done < total:
                k = min(chunk, total - done, dev.numel())
                off = done % max(1, host_n - k + 1)
                if h2d:
                    dev[:k].copy_(host[off:off + k], non_blocking=True)
                else:
                    host[off:off + k].copy_(dev[:k], non_blocking=True)
                done += k

        def timed(fn):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            return (time.perf_counter() - t0) * 1e3

        copy(min(a.weight_bytes, 1 << 30), True)  # warm-up
        total, h2d, d2h = [], [], []
        for _ in range(a.reps):
            t_in = timed(lambda: copy(a.weight_bytes, True))
            t_in2 = timed(lambda: copy(a.weight_bytes, True))
            t_out = timed(lambda: copy(a.grad_bytes, False))
            total.append(t_in + t_in2 + t_out)
            h2d.append(a.weight_bytes / (t_in / 1e3) / 1e9)
            d2h.append(a.grad_bytes / (t_out / 1e3) / 1e9)
        out = dict(ok=True, ms=statistics.median(total), h2d_gbs=statistics.median(h2d), d2h_gbs=statistics.median(d2h),
                   weight_bytes=a.weight_bytes, grad_bytes=a.grad_bytes)
    except Exception as e:
        out = dict(ok=False, error="%s: %s" % (type(e).__name__, e))
    with open(a.json, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
