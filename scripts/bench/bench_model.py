"""The model benchmark behind scripts/bench_model.sh (issue 4, "the model"): forward + backward with
every weight resident, per decoder layer and for the whole model, ferry (ferry-bench-model)
against HF LlamaForCausalLM with attn_implementation sdpa and eager (model_hf.py), in one run on
one machine. The issue's goal, judged per shape: ferry at least as fast as the faster HF at both
levels, with fewer saved activation bytes per layer than either.

Prints one combined table (and the per-run detail) and writes bench_model.json + bench_model.md to
--out. Standard library only; each side runs in its own process under --timeout (a failure or a
timeout is that cell's text, never the bench's end). ferry runs all shapes in one process, HF one
process per shape.
"""
import argparse
import datetime
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ferrylib as fl  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
IMPLS = ["ferry", "hf-sdpa", "hf-eager"]
MIB = float(1 << 20)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="debug,1b", help="configs/models NAMEs, comma-separated")
    fl.add_model_bench_args(ap)
    ap.add_argument("--timeout", type=int, default=600, help="seconds for ferry-bench-model, and per HF shape")
    ap.add_argument("--out", default=None, help="results folder (default out/bench-model-<date>)")
    return ap.parse_args()


def json_lines(text):
    recs = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                recs.append(json.loads(line))
            except ValueError:
                pass
    return recs


def run_ferry(a, shapes, out):
    """{(shape, level): record} from ferry-bench-model; a missing key means it did not report."""
    tool = fl.tool("ferry-bench-model")
    if not tool:
        return {}, "ferry-bench-model not built in %s" % fl.build_dir()
    cmd = [tool, "--shapes", ",".join(shapes)] + fl.model_bench_flags(a)
    fl.ferry_log("ferry: " + " ".join(cmd))
    res = fl.run(cmd, a.timeout, os.path.join(out, "ferry.log"))
    recs = {(r["shape"], r["level"]): r for r in json_lines(res["out"])}
    return recs, fl.failure_reason(res, "ferry-bench-model")


def run_hf(a, shapes, out, py):
    recs, errors = {}, {}
    for s in shapes:
        cmd = [py, os.path.join(HERE, "model_hf.py"), "--shapes", s] + fl.model_bench_flags(a)
        fl.ferry_log("HF %s: %s" % (s, " ".join(cmd)))
        res = fl.run(cmd, a.timeout, os.path.join(out, "hf_%s.log" % s))
        for r in json_lines(res["out"]):
            recs[(r["shape"], r["impl"], r["level"])] = r
        errors[s] = fl.failure_reason(res, "model_hf.py")
    return recs, errors


def collect(a, shapes, out, py):
    """rows[(shape, impl, level)] = record with ok, or {ok: False, error}."""
    ferry, ferry_err = run_ferry(a, shapes, out)
    hf, hf_err = run_hf(a, shapes, out, py)
    rows = {}
    for s in shapes:
        for lv in ("layer", "model"):
            rows[(s, "ferry", lv)] = ferry.get((s, lv)) or dict(ok=False, error=ferry_err)
            for impl in IMPLS[1:]:
                rows[(s, impl, lv)] = hf.get((s, impl, lv)) or dict(ok=False, error=hf_err[s])
    return rows


def ms(r):
    return "%.2f" % r["fwd_bwd_ms"] if r.get("ok") else "-"


def mib(r, key="saved_bytes"):
    return "%.1f" % (r[key] / MIB) if r.get("ok") and r.get(key) is not None else "-"


def best_hf(rows, s, lv, key):
    vals = [rows[(s, i, lv)][key] for i in IMPLS[1:] if rows[(s, i, lv)].get("ok")]
    return min(vals) if vals else None


def speedup(rows, s, lv):
    f, h = rows[(s, "ferry", lv)], best_hf(rows, s, lv, "fwd_bwd_ms")
    return "%.2fx" % (h / f["fwd_bwd_ms"]) if f.get("ok") and h else "-"


def goals(rows, shapes):
    g = []
    for s in shapes:
        parts, ok = [], True
        for lv in ("layer", "model"):
            f, h = rows[(s, "ferry", lv)], best_hf(rows, s, lv, "fwd_bwd_ms")
            if not (f.get("ok") and h):
                parts.append("%s: not measured" % lv)
                ok = False
                continue
            parts.append("%s %.2f vs %.2f ms" % (lv, f["fwd_bwd_ms"], h))
            ok = ok and f["fwd_bwd_ms"] <= h
        f = rows[(s, "ferry", "layer")]
        hs = [rows[(s, i, "layer")]["saved_bytes"] for i in IMPLS[1:] if rows[(s, i, "layer")].get("ok")]
        if f.get("ok") and hs:
            parts.append("saved/layer %.1f vs >= %.1f MiB" % (f["saved_bytes"] / MIB, min(hs) / MIB))
            ok = ok and f["saved_bytes"] < min(hs)
        else:
            ok = False
        g.append([s, "; ".join(parts), "met" if ok else "NOT MET"])
    return g


def render(rep, rows, shapes):
    out = ["ferry model bench: seq %d, batch %d, %s, %s; %s; commit %s" % (
        rep["seq"], rep["batch"], rep["dtype"], rep["card"], rep["date"], rep["commit"]),
        "command: " + rep["command"],
        "fwd+bwd ms: median over timed runs (%s); saved: activation bytes kept for backward by one layer "
        "(distinct storages, weights excluded); speedup: the faster HF / ferry" % (
            "host clock" if rep["card"].startswith("no GPU") else "CUDA events")]
    t = []
    for s in shapes:
        r = lambda i, lv: rows[(s, i, lv)]  # noqa: E731
        t.append([s] + [ms(r(i, "layer")) for i in IMPLS] + [ms(r(i, "model")) for i in IMPLS] +
                 [mib(r(i, "layer")) for i in IMPLS] + [speedup(rows, s, "layer"), speedup(rows, s, "model")])
    hdr = (["shape", "layer ferry ms", "layer HF sdpa ms", "layer HF eager ms", "model ferry ms", "model HF sdpa ms",
            "model HF eager ms", "saved/layer ferry MiB", "saved/layer HF sdpa MiB", "saved/layer HF eager MiB",
            "speedup layer", "speedup model"])
    out += ["", "Forward + backward, all weights resident", fl.table(hdr, t, markdown=True)]
    d = []
    for s in shapes:
        for lv in ("layer", "model"):
            for i in IMPLS:
                r = rows[(s, i, lv)]
                if r.get("ok"):
                    note = "formula %.1f MiB" % (r["saved_bytes_formula"] / MIB) if "saved_bytes_formula" in r else ""
                    if r.get("loss") is not None:
                        note = (note + "; " if note else "") + "loss %.3f" % r["loss"]
                    d.append([s, lv, i, "%.2f" % r["fwd_ms"], "%.2f" % r["bwd_ms"], ms(r), mib(r), mib(r, "peak_bytes"),
                              note])
                else:
                    d.append([s, lv, i, "-", "-", "-", "-", "-", "FAILED: " + str(r.get("error", ""))])
    out += ["", "Per run (layer peak: above what was allocated before the forward; model peak: in all, "
                "weights and gradients included; model saved: all that the forward keeps for backward, which for "
                "ferry is the blocks' block_saved: its chunked head keeps nothing; ferry's model fwd is embedding + "
                "blocks, its head runs forward and backward in one pass, counted in bwd)",
            fl.table(["shape", "level", "impl", "fwd ms", "bwd ms", "fwd+bwd ms", "saved MiB", "peak MiB", "notes"], d,
                     markdown=True)]
    out += ["", "Goal (issue 4): ferry at least as fast as the faster HF per layer and for the model, fewer saved "
                "bytes per layer",
            fl.table(["shape", "measured", "result"], rep["goals"], markdown=True)]
    return "\n".join(out)


def main():
    a = parse_args()
    shapes = [s for s in a.shapes.split(",") if s]
    gpu = fl.gpu_info()
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    out = a.out or os.path.join(fl.ROOT, "out", "bench-model-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    os.makedirs(out, exist_ok=True)
    py = fl.python_exe()
    rows = collect(a, shapes, out, py)
    rep = dict(shapes=shapes, seq=a.seq, batch=a.batch, device=a.device,
               dtype=a.dtype or ("fp16" if gpu and a.device != "cpu" else "fp32"),
               card=gpu["card"] if gpu and a.device != "cpu" else "no GPU (cpu)", cpu=fl.cpu_name(), date=date,
               commit=fl.git_commit(), command="scripts/bench_model.sh " + " ".join(sys.argv[1:]), python=py,
               runs=[dict(r, key=list(k)) for k, r in rows.items()])
    rep["goals"] = goals(rows, shapes)
    text = render(rep, rows, shapes)
    print(text)
    fl.write_report(out, "bench_model", rep, text)
    return 0 if any(r.get("ok") for k, r in rows.items() if k[1] == "ferry") else 1


if __name__ == "__main__":
    sys.exit(main())
