"""Checks a `scripts/bench.sh --gpus ...` report against the runs' own files (issue 15).

usage: check_bench_scaling.py OUT COUNT...

For every COUNT and mode in OUT/bench.md's ferry table: the row is there and ran; its tokens/s
is COUNT x grad_accum x batch x seq over the median step_ms, after the warm-up, of rank 0's
OUT/ferry-<mode>-g<COUNT>/metrics.jsonl; its scaling efficiency is that tokens/s over COUNT x
the 1-count row's; with COUNT > 1 every rank wrote ranks/rank<R>.json (world COUNT) and the
"host: sum of ranks' RSS" cell is the sum of their host_peak_rss (on CUDA also: every rank's GPU
peak is positive and printed as its file says). The FSDP2 table's rows, where
they ran, the same from peer_fsdp2_g<COUNT>.json's steps_ms. Prints one line per row checked;
exit 1 naming the first mismatch. Standard library only.
"""
import json
import os
import re
import statistics
import sys


def fail(msg):
    print("check_bench_scaling: FAILED: " + msg)
    sys.exit(1)


def tables(md):
    """{title line: [row cells...]} for every Markdown table in bench.md (the line before it)."""
    out, title, rows = {}, None, None
    lines = md.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|"):
            if rows is None:
                title, rows = lines[i - 1] if i else "", []
                out[title] = rows
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        else:
            rows = None
    return {t: r[2:] for t, r in out.items()}   # header and --- line dropped


def tok(cell):
    return float(cell[:-1]) * 1e3 if cell.endswith("k") else float(cell)


def close(printed, value, what, rel=0.006, abs_=0.0):
    if abs(printed - value) > max(rel * abs(value), abs_):
        fail("%s: printed %g, computed from the runs' files %g" % (what, printed, value))


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    out, counts = sys.argv[1], [int(x) for x in sys.argv[2:]]
    with open(os.path.join(out, "bench.md")) as f:
        t = tables(f.read())
    with open(os.path.join(out, "bench.json")) as f:
        rep = json.load(f)
    per_step = rep["grad_accum"] * rep["batch"] * rep["seq"]
    cuda = rep["device"] == "cuda"
    ferry = [rows for title, rows in t.items() if title.startswith("ferry data-parallel ranks")]
    if not ferry:
        fail("no ferry data-parallel table in %s/bench.md" % out)
    rows = {(r[0], r[1]): r for r in ferry[0]}
    checked = 0
    for mode in rep["scaling"]["modes"]:
        measured = {}
        for n in counts:
            r = rows.get((str(n), mode))
            if r is None:
                fail("no row for %d ranks, mode %s" % (n, mode))
            if r[2] == "-":
                fail("the %d-rank %s row did not run: %s" % (n, mode, r[-1]))
            d = os.path.join(out, "ferry-%s-g%d" % (mode, n))
            with open(os.path.join(d, "metrics.jsonl")) as f:
                metrics = [json.loads(l) for l in f if l.strip()]
            warm = rep["scaling"]["ferry"][mode][str(n)]["warmup"]
            used = metrics[warm:] if len(metrics) > warm else metrics
            measured[n] = n * per_step / (statistics.median(m["step_ms"] for m in used) / 1e3)
            close(tok(r[3]), measured[n], "%d ranks %s tokens/s" % (n, mode), abs_=0.051)
            close(float(r[4]), measured[n] / (n * measured[1]), "%d ranks %s scaling efficiency" % (n, mode),
                  rel=0.01, abs_=0.0006)
            # rank 0's resident memory by kind after its last step, from its metrics.jsonl
            m = re.search(r"anon ([0-9.]+) GB, shmem ([0-9.]+) GB", r[-1])
            if not m:
                fail("%d ranks %s: no anon/shmem note (%s)" % (n, mode, r[-1]))
            close(float(m.group(1)), metrics[-1]["host_rss_anon"] / 1e9, "%d ranks %s anon (GB)" % (n, mode), abs_=0.0051)
            close(float(m.group(2)), metrics[-1]["host_rss_shmem"] / 1e9, "%d ranks %s shmem (GB)" % (n, mode),
                  abs_=0.0051)
            if n > 1:
                rss, peaks = 0, []
                for k in range(n):
                    with open(os.path.join(d, "ranks", "rank%d.json" % k)) as f:
                        st = json.load(f)
                    if st["rank"] != k or st["world"] != n or st["host_peak_rss"] <= 0:
                        fail("%s/ranks/rank%d.json: %s" % (d, k, st))
                    if cuda and st["gpu_alloc_peak"] <= 0:
                        fail("%s/ranks/rank%d.json: no GPU peak on a CUDA run: %s" % (d, k, st))
                    rss += st["host_peak_rss"]
                    peaks.append(st["gpu_alloc_peak"])
                close(float(r[6].split()[0]), rss / 1e9, "%d ranks %s sum of RSS (GB)" % (n, mode), abs_=0.0051)
                if cuda:   # "a / b GB": rank 0's, rank 1's, ... from their own files
                    cells = [float(x) for x in r[5].replace("GB", "").split("/")]
                    if len(cells) != n:
                        fail("%d ranks %s: %d per-rank peaks printed (%s)" % (n, mode, len(cells), r[5]))
                    for k in range(n):
                        close(cells[k], peaks[k] / 1e9, "%d ranks %s rank %d peak GPU (GB)" % (n, mode, k), abs_=0.0051)
            print("check_bench_scaling: %d ranks %s: %s tokens/s, efficiency %s (computed %.4f) ok" % (
                n, mode, r[3], r[4], measured[n] / (n * measured[1])))
            checked += 1
    fsdp = [rows for title, rows in t.items() if title.startswith("FSDP2 CPU offload")]
    for r in (fsdp[0] if fsdp else []):
        n = int(r[0])
        if r[1] == "-":
            print("check_bench_scaling: FSDP2 %d ranks not run: %s" % (n, r[-1]))
            continue
        with open(os.path.join(out, "peer_fsdp2_g%d.json" % n)) as f:
            p = json.load(f)
        v = n * per_step / (statistics.median(p["steps_ms"]) / 1e3)
        close(tok(r[2]), v, "FSDP2 %d ranks tokens/s" % n, abs_=0.051)
        print("check_bench_scaling: FSDP2 %d ranks: %s tokens/s ok" % (n, r[2]))
        checked += 1
    print("check_bench_scaling: %d rows checked" % checked)


if __name__ == "__main__":
    main()
