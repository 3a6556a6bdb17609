"""The training (and inference) benchmark behind scripts/bench.sh (issue 5, "Benchmark").

One run measures, on one shape and one machine:
  - ferry-train in none / blocked / overlapped mode on random tokens: median step time after
    warm-up, peak GPU memory (allocated; reserved in the JSON);
  - the step's three lower bounds: GPU compute alone (= ferry's `none` mode step: weights,
    master and moments resident, so no PCIe and no CPU work), PCIe traffic alone (pcie_bound.py:
    half weights in twice, half gradients out once, pinned), CPU AdamW alone (ferry-bench-adamw
    over the model's parameter count, else PyTorch's fused CPU AdamW);
  - the peers of ../../shared/BASELINES.md, each in its own process under a timeout (a failure
    is that row's text, never the bench's): PyTorch AMP, FSDP2 CPU offload, torchao offload;
  - with ferry-infer / ferry-bench-infer built: the inference table, with HF resident and
    accelerate cpu_offload peers.
Prints the request's tables and writes bench.json + bench.md to --out. Standard library only;
the torch work happens in the peer_*.py / *_bound.py subprocesses.

Effective batch (issue 19): --batch B sequences per micro-batch, --grad-accum K micro-batches per
optimizer step (ferry: --set grad_accum=K; `--ferry-set grad_accum=K` is taken the same way, and
both at once is an error). The peers run the same K x B sequences per step through their own
accumulation (peer_common.accumulate: backward of loss / K per micro-batch, one optimizer step),
so every row's step does the same work and the ratios are same-run. tokens/s = K x B x seq / the
row's median step time (bench.json: grad_accum and tokens_per_s per row).

Warm-up: --steps counts warm-up and measured steps; every row measures steps - warmup steps. The
peers and ferry's none/blocked runs drop the first --warmup steps. ferry's overlapped runs drop
--ferry-warmup steps (default max(--warmup, 9)) and so run that many + the measured steps: with
speculate=auto the engine speculates (updates during backward) only after 8 clean steps in a row
(engine::step_validator::kRecentSteps), so a shorter warm-up would time the non-speculating start
instead of the steady state. The overlapped row notes how many measured steps speculated.
"""
import argparse
import datetime
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ferrylib as fl  # noqa: E402
import scaling  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
MODES = ["none", "blocked", "overlapped"]
SPECULATE_WARMUP = 9   # step_validator::kRecentSteps (8) clean steps, then one speculating step, left out
MODE_LABEL = {"none": "w/o offload", "blocked": "w/ blocked offload", "overlapped": "w/ overlapped offload"}
PEERS = [("amp", "PyTorch AMP (no offload)", "peer_amp.py"), ("fsdp2", "FSDP2 CPU offload", "peer_fsdp2.py"),
         ("torchao", "torchao offload", "peer_torchao.py")]


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="debug", help="configs/models NAME (debug, 1b, 3b, tiny, ...) or a config.json")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1, help="sequences per micro-batch")
    ap.add_argument("--grad-accum", type=int, default=None, metavar="K",
                    help="micro-batches per optimizer step, ferry and peers alike (default 1)")
    ap.add_argument("--steps", type=int, default=12, help="steps per run, warm-up included")
    ap.add_argument("--warmup", type=int, default=3, help="steps left out of the median")
    ap.add_argument("--ferry-warmup", type=int, default=None, metavar="N",
                    help="warm-up of ferry's overlapped runs (default max(--warmup, %d): speculation's "
                         "steady state); they run N + steps - warmup steps" % SPECULATE_WARMUP)
    ap.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    ap.add_argument("--modes", default=None, help="ferry modes (default none,blocked,overlapped; with --gpus overlapped)")
    ap.add_argument("--gpus", default=None, metavar="N|LIST",
                    help="data-parallel scaling (issue 15): ferry on 1..N GPUs (or the listed counts, e.g. 1,2,4) "
                         "with --batch per GPU, beside FSDP2 CPU offload on the same counts (torchrun); "
                         "with --device cpu the ranks run on the host backend (Gloo). See scaling.py")
    ap.add_argument("--peers", dest="peers", action="store_true", default=None,
                    help="run the peers (default; without a GPU only when given: then on the CPU, a smoke test)")
    ap.add_argument("--no-peers", dest="peers", action="store_false")
    ap.add_argument("--peer-list", default=None, metavar="KEYS",
                    help="only these training peers, comma-separated (%s; default all)" % ",".join(k for k, _, _ in PEERS))
    ap.add_argument("--no-bounds", dest="bounds", action="store_false", default=True)
    ap.add_argument("--no-infer", dest="infer", action="store_false", default=True)
    ap.add_argument("--no-train", dest="train", action="store_false", default=True,
                    help="only the inference table and its peers (no training rows, bounds or training peers)")
    ap.add_argument("--ferry-set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra run-config override for every ferry run (repeatable)")
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per ferry run or peer")
    ap.add_argument("--out", default=None, help="results folder (default out/bench-<shape>-<date>)")
    return ap.parse_args()


def resolve_grad_accum(a):
    """a.grad_accum from --grad-accum or `--ferry-set grad_accum=K` (taken out of a.ferry_set; it
    goes to ferry through train_run_sets' keys); exits naming both when both are given."""
    given = [kv for kv in a.ferry_set if kv.split("=", 1)[0].strip() == "grad_accum"]
    if given and a.grad_accum is not None:
        sys.exit("bench: --grad-accum %d and --ferry-set %s both given; pass --grad-accum alone" % (
            a.grad_accum, given[-1]))
    if given:
        try:
            a.grad_accum = int(given[-1].split("=", 1)[1])
        except ValueError:
            sys.exit("bench: --ferry-set %s: grad_accum must be an integer" % given[-1])
        a.ferry_set = [kv for kv in a.ferry_set if kv not in given]
    a.grad_accum = 1 if a.grad_accum is None else a.grad_accum
    if a.grad_accum < 1 or a.batch < 1:
        sys.exit("bench: --grad-accum and --batch must be at least 1")


def measured_steps(a):
    """Steps every row measures: --steps less --warmup (at least 1)."""
    return max(1, a.steps - a.warmup)


def ferry_warmup(a, mode):
    """Steps a ferry run leaves out: --warmup, and for overlapped at least SPECULATE_WARMUP (or
    --ferry-warmup), so the median is speculation's steady state."""
    if mode != "overlapped":
        return a.warmup
    return a.ferry_warmup if a.ferry_warmup is not None else max(a.warmup, SPECULATE_WARMUP)


def tokens_per_step(a):
    return a.grad_accum * a.batch * a.seq


def tokens_per_s(a, step_ms):
    return tokens_per_step(a) / (step_ms / 1e3) if step_ms else None


def ferry_train_rows(a, dev, tokfile, out):
    train = fl.tool("ferry-train")
    rows = {}
    if not train:
        for m in a.modes:
            rows[m] = dict(ok=False, error="ferry-train not built in %s" % fl.build_dir())
        return rows
    has_plan = "plan-json" in fl.run([train, "--help"], 60)["out"]
    for m in a.modes:
        d = os.path.join(out, "ferry-" + m)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        warm = ferry_warmup(a, m)
        sets = dict(fl.train_run_sets(warm + measured_steps(a), a.seq, a.batch, tokfile, d), log_every=1)
        if a.grad_accum > 1:
            sets["grad_accum"] = a.grad_accum
        cmd = fl.ferry_cmd(train, a.shape, dev, m, a.dtype, sets, a.ferry_set,
                           plan_json=os.path.join(d, "plan.json") if has_plan else None)
        fl.ferry_log("ferry-train %s: %s" % (m, " ".join(cmd)))
        res = fl.run(cmd, a.timeout, os.path.join(d, "log.txt"))
        metrics = fl.read_metrics(os.path.join(d, "metrics.jsonl"))
        row = dict(ok=res["rc"] == 0 and len(metrics) > 0, command=" ".join(cmd), log=os.path.join(d, "log.txt"),
                   grad_accum=a.grad_accum, warmup=warm)
        if metrics:
            row.update(fl.summarize_steps(metrics, warm))
            row["peak"] = row["gpu_alloc_peak"]
            row["ferry_tokens_per_s"] = row["tokens_per_s"]   # ferry's own figure: median of per-step tok/s
            row["tokens_per_s"] = tokens_per_s(a, row["step_ms"])
            used = metrics[warm:] if len(metrics) > warm else metrics
            row["measured"] = len(used)
            row["speculated"] = sum(1 for r in used if r.get("speculated"))
        if not row["ok"]:
            row["error"] = fl.failure_reason(res, "ferry-train")
        if has_plan and os.path.exists(os.path.join(d, "plan.json")):
            with open(os.path.join(d, "plan.json")) as f:
                row["plan"] = json.load(f)
        rows[m] = row
        fl.ferry_log("  -> %s" % (fl.fmt_ms(row.get("step_ms")) if row["ok"] else row["error"]))
    return rows


def lower_bounds(a, cfg, rows, out, py, have_cuda):
    params = fl.llama_params(cfg)
    embed = cfg["vocab_size"] * cfg["hidden_size"]
    e = 4 if a.dtype == "fp32" else 2
    lb = {}
    none = rows.get("none", {})
    lb["compute"] = dict(ok=bool(none.get("ok")), ms=none.get("step_ms"),
                         how="ferry `none` mode step (weights, master and moments resident; includes its GPU AdamW)",
                         error=none.get("error", "none mode not run"))
    if have_cuda:
        j = os.path.join(out, "pcie_bound.json")
        res = fl.run([py, os.path.join(HERE, "pcie_bound.py"), "--weight-bytes", str(params * e), "--grad-bytes",
                      str((params - embed) * e), "--json", j], a.timeout, os.path.join(out, "pcie_bound.log"))
        lb["pcie"] = load_json(j, res, "pcie_bound.py")
        lb["pcie"]["how"] = "half weights in twice (%.2f GB each), half grads out once (%.2f GB), pinned" % (
            params * e / 1e9, (params - embed) * e / 1e9)
        if a.grad_accum > 1 and lb["pcie"].get("ok"):   # the weights stream in, the grads out, per micro-batch
            lb["pcie"]["ms_per_micro_batch"] = lb["pcie"]["ms"]
            lb["pcie"]["ms"] *= a.grad_accum
            lb["pcie"]["how"] += ", per micro-batch, x %d" % a.grad_accum
    else:
        lb["pcie"] = dict(ok=False, error="no CUDA device")
    bench_adamw = fl.tool("ferry-bench-adamw")
    j = os.path.join(out, "adamw_bound.json")
    if bench_adamw:
        res = fl.run([bench_adamw, "--sizes", str(params), "--targets", "AVX3,AVX2", "--reps", "3", "--json", j],
                     a.timeout, os.path.join(out, "adamw_bound.log"))
        lb["adamw"] = dict(ok=False, error=fl.failure_reason(res, "ferry-bench-adamw"))
        try:
            # The rows of the run's optimizer_state kind (fp32: the "f16->f16 ..." variants).
            state = "fp32"
            for kv in a.ferry_set:
                if kv.startswith("optimizer_state="):
                    state = kv.split("=", 1)[1]
            prefix = "f16->f16" if state == "fp32" else "%s moments f16->f16" % state
            with open(j) as f:
                recs = [r for r in json.load(f) if r["kind"] == "adamw" and r["variant"].startswith(prefix)
                        and "fast roots" not in r["variant"]]
            best = min(recs, key=lambda r: r["seconds"])
            lb["adamw"] = dict(ok=True, ms=best["seconds"] * 1e3, gparam_s=best["gparam_s"],
                               how="ferry-bench-adamw %s %s, %d threads, %d params" % (
                                   best["target"], best["variant"], best["threads"], params))
        except (OSError, ValueError, KeyError):
            pass
    else:
        res = fl.run([py, os.path.join(HERE, "adamw_bound.py"), "--params", str(params), "--json", j], a.timeout,
                     os.path.join(out, "adamw_bound.log"))
        lb["adamw"] = load_json(j, res, "adamw_bound.py")
        if lb["adamw"].get("ok"):
            lb["adamw"]["how"] = lb["adamw"].get("impl", "") + " (ferry-bench-adamw not built)"
    return lb


def load_json(path, res, what):
    """A peer's or bound's --json result, or a failed row saying why the run wrote none."""
    return fl.read_json(path) or dict(ok=False, error=fl.failure_reason(res, what))


def peer_rows(a, out, py, have_cuda, env):
    rows = {}
    for key, label, script in PEERS:
        if not a.peers or (a.peer_list is not None and key not in a.peer_list):
            continue
        if not have_cuda and not a.peers_on_cpu:
            rows[key] = dict(ok=False, error="no CUDA device (--peers --device cpu runs them on the CPU)")
            continue
        j = fl.fresh_output(os.path.join(out, "peer_%s.json" % key))
        cmd = [py, os.path.join(HERE, script), "--config", fl.config_path(a.shape), "--seq", str(a.seq), "--batch",
               str(a.batch), "--grad-accum", str(a.grad_accum), "--steps", str(measured_steps(a)), "--warmup",
               str(a.warmup), "--dtype", "bf16" if a.dtype == "bf16" else "fp16", "--json", j]
        if not have_cuda:
            cmd += ["--device", "cpu"]
        fl.ferry_log("peer %s: %s" % (key, " ".join(cmd)))
        res = fl.run(cmd, a.timeout, os.path.join(out, "peer_%s.log" % key), env=env)
        r = load_json(j, res, script)
        r["grad_accum"] = a.grad_accum
        r["warmup"] = a.warmup
        if r.get("ok"):
            r["peak"] = r.get("peak_alloc")
            r["tokens_per_s"] = tokens_per_s(a, r.get("step_ms"))
        rows[key] = r
        fl.ferry_log("  -> %s" % (fl.fmt_ms(r.get("step_ms")) if r.get("ok") else r.get("error")))
    return rows


def infer_rows(a, dev, tokfile, out, py, have_cuda, env):
    """Inference: ferry-bench-infer (forward per mode at --seq, generation at batch 1/8/64) when
    built, else ferry-infer evaluate per mode; HF resident / accelerate cpu_offload peers."""
    infer, bench_infer = fl.tool("ferry-infer"), fl.tool("ferry-bench-infer")
    if not a.infer or not (infer or bench_infer):
        return None
    res_all = dict(rows={}, peers={}, raw={})
    if bench_infer:
        j = fl.fresh_output(os.path.join(out, "bench_infer.json"))
        cmd = [bench_infer, "--model-config", a.shape, "--dtype", a.dtype, "--device", dev, "--modes",
               ",".join(a.modes), "--seqs", ",".join(str(x) for x in sorted({min(512, a.seq), a.seq})), "--json", j]
        fl.ferry_log("ferry-bench-infer: " + " ".join(cmd))
        r = fl.run(cmd, a.timeout, os.path.join(out, "bench_infer.log"))
        res_all["raw"]["ferry-bench-infer"] = dict(command=" ".join(cmd), rc=r["rc"], tail=r["out"][-4000:])
        for m in a.modes:
            res_all["rows"][m] = dict(ok=False, error=fl.failure_reason(r, "ferry-bench-infer"))
        for row in fl.read_json(j, {}).get("forward", []):
            if row["mode"] in MODES and row["seq"] == a.seq:
                res_all["rows"][row["mode"]] = dict(ok=True, forward_ms=row["ms"], peak=row["peak"]) if not row[
                    "error"] else dict(ok=False, error=row["error"])
    elif infer:
        for m in a.modes:
            d = os.path.join(out, "infer-" + m)
            os.makedirs(d, exist_ok=True)
            metrics = fl.fresh_output(os.path.join(d, "metrics.json"))
            cmd = fl.ferry_cmd(infer, a.shape, dev, m, a.dtype, dict(max_length=a.seq, eval_batches=4),
                               extra=["--job", "evaluate", "--data", tokfile, "--metrics-json", metrics])
            fl.ferry_log("ferry-infer %s: %s" % (m, " ".join(cmd)))
            r = fl.run(cmd, a.timeout, os.path.join(d, "log.txt"))
            res_all["rows"][m] = infer_row(r, metrics, a.seq)
    if a.peers and have_cuda:
        half = "bf16" if a.dtype == "bf16" else "fp16"
        jobs = [("resident forward", ["--mode", "resident", "--job", "forward", "--seq", str(a.seq)]),
                ("accelerate cpu_offload forward", ["--mode", "cpu_offload", "--job", "forward", "--seq", str(a.seq)]),
                ("resident generate, batch 1", ["--mode", "resident", "--job", "generate", "--batch", "1", "--reps", "2"]),
                ("resident generate, batch 8", ["--mode", "resident", "--job", "generate", "--batch", "8", "--reps", "2"]),
                ("accelerate cpu_offload generate, batch 1 (16 new)",
                 ["--mode", "cpu_offload", "--job", "generate", "--batch", "1", "--new", "16", "--reps", "1"])]
        for i, (label, extra) in enumerate(jobs):
            j = os.path.join(out, "peer_infer_%d.json" % i)
            cmd = [py, os.path.join(HERE, "peer_infer.py"), "--config", fl.config_path(a.shape), "--dtype", half,
                   "--json", j] + extra
            fl.ferry_log("peer infer %s" % label)
            r = fl.run(cmd, a.timeout, os.path.join(out, "peer_infer_%d.log" % i), env=env)
            res_all["peers"][label] = load_json(j, r, "peer_infer.py")
    return res_all


def infer_row(r, metrics_path, seq):
    """The inference row of a ferry-infer evaluate run from its --metrics-json: the time of one
    sequence of `seq` tokens at the measured tokens/s, and the GPU peak. Keeps the output tail."""
    row = dict(ok=r["rc"] == 0, tail=r["out"][-2000:])
    if r["rc"] != 0:
        row["error"] = fl.failure_reason(r, "ferry-infer")
        return row
    ev = fl.read_json(metrics_path, {}).get("evaluate") or {}
    v = ev.get("tokens_per_s") or 0
    row["forward_ms"] = seq / v * 1e3 if v > 0 else None
    if ev.get("gpu_alloc_peak"):
        row["peak"] = ev["gpu_alloc_peak"]
    if row.get("forward_ms") is None:
        row["ok"] = False
        row["error"] = "no evaluate tokens_per_s in ferry-infer's %s (see log)" % metrics_path
    return row


def ratio(x, y):
    return "%.2fx" % (x / y) if x and y else "-"


def render(rep):
    """The request's layout (memory, time; inference | training) plus peers, bounds and goals."""
    t, p, lb = rep["ferry"], rep["peers"], rep["bounds"]
    inf = rep.get("infer") or {}
    out = []
    hdr = "ferry bench: shape %s (%.2f B params), seq %d, batch %d, grad_accum %d (%d tokens per step), %s, %s; %s; " \
          "%s; commit %s" % (rep["shape"], rep["params"] / 1e9, rep["seq"], rep["batch"], rep["grad_accum"],
                             rep["tokens_per_step"], rep["dtype"], rep["card"], rep["cpu"], rep["date"], rep["commit"])
    out.append(hdr)
    out.append("command: " + rep["command"])
    out.append("GB = 1e9 bytes; peak = allocated (torch.cuda.max_memory_allocated for peers, ferry's gpu_alloc_peak)")

    def cell_mem(r):
        return fl.fmt_gb(r.get("peak")) if r and r.get("ok") else "-"

    def cell_ms(r, key="step_ms"):
        return fl.fmt_ms(r.get(key)) if r and r.get("ok") else "-"

    def cell_tok(r):
        return fmt_tok_s(r.get("tokens_per_s")) if r and r.get("ok") else "-"

    for title, fn, ikey in (("Memory", cell_mem, None), ("Time", cell_ms, "forward_ms")):
        rows = []
        for m in MODES:
            if m in t or m in inf.get("rows", {}):
                ir = inf.get("rows", {}).get(m)
                icell = (fn(ir) if ikey is None else cell_ms(ir, ikey)) if ir else "-"
                rows.append([MODE_LABEL[m], icell, fn(t.get(m))])
        out += ["", title, fl.table(["", "Inference", "Training"], rows, markdown=True)]

    amp, fsdp = p.get("amp", {}), p.get("fsdp2", {})
    amp_ms = amp.get("step_ms") if amp.get("ok") else None
    fsdp_ms = fsdp.get("step_ms") if fsdp.get("ok") else None
    rows = []
    for m in MODES:
        if m in t:
            r = t[m]
            rows.append(["ferry " + m, cell_ms(r), cell_tok(r), cell_mem(r),
                         ratio(r.get("step_ms"), amp_ms) if r.get("ok") else "-",
                         ratio(r.get("step_ms"), fsdp_ms) if r.get("ok") else "-",
                         ferry_notes(m, r) if r.get("ok") else "FAILED: " + r.get("error", "")])
    for key, label, _ in PEERS:
        if key in p:
            r = p[key]
            rows.append([label, cell_ms(r), cell_tok(r), cell_mem(r),
                         ratio(r.get("step_ms"), amp_ms) if r.get("ok") else "-",
                         ratio(r.get("step_ms"), fsdp_ms) if r.get("ok") else "-",
                         r.get("notes", "") if r.get("ok") else "FAILED: " + r.get("error", "")])
    if rows:
        out += ["", "Training step, ferry and peers (same run; %d x %d x %d = %d tokens per optimizer step)" % (
            rep["grad_accum"], rep["batch"], rep["seq"], rep["tokens_per_step"]),
                fl.table(["", "time", "tokens/s", "peak GPU", "vs PyTorch AMP", "vs FSDP2", "notes"], rows,
                         markdown=True)]

    rows = []
    for key, label in (("compute", "GPU compute alone"), ("pcie", "PCIe traffic alone"), ("adamw", "CPU AdamW alone")):
        r = lb.get(key, {})
        rows.append([label, fl.fmt_ms(r.get("ms")) if r.get("ok") else "-",
                     r.get("how", "") if r.get("ok") else "not measured: " + str(r.get("error", ""))])
    if t:
        out += ["", "Lower bounds of one step", fl.table(["bound", "time", "how"], rows, markdown=True)]
    if lb.get("pcie", {}).get("ok"):
        out.append("PCIe rates: H2D %.1f GB/s, D2H %.1f GB/s" % (lb["pcie"]["h2d_gbs"], lb["pcie"]["d2h_gbs"]))

    if inf.get("peers"):
        rows = [[k, fl.fmt_ms(v.get("ms")) if v.get("ok") else "-", fl.fmt_gb(v.get("peak_alloc")) if v.get("ok") else "-",
                 "%.1f tok/s" % v["tok_s"] if v.get("tok_s") else "",
                 "" if v.get("ok") else "FAILED: " + v.get("error", "")] for k, v in inf["peers"].items()]
        out += ["", "Inference peers (HF transformers, %s; forward of %d tokens; generate: prompt 128, 64 new, greedy)" % (
            rep["dtype"], rep["seq"]), fl.table(["", "time", "peak GPU", "throughput", "notes"], rows, markdown=True)]
    if inf.get("raw", {}).get("ferry-bench-infer"):
        out += ["", "ferry-bench-infer (%s):" % inf["raw"]["ferry-bench-infer"]["command"], "",
                inf["raw"]["ferry-bench-infer"]["tail"][-3000:].strip()]

    if rep.get("goals"):
        out += ["", "Goals (issues 5 and 19)", fl.table(["goal", "measured", "result"], rep["goals"], markdown=True)]
    if t or p:
        out += ["", "Notes"] + ["- " + x for x in notes(rep)]
    return "\n".join(out)


def fmt_tok_s(v):
    return "-" if not v else ("%.1fk" % (v / 1e3) if v >= 1e4 else "%.0f" % v)


def ferry_notes(mode, r):
    """The notes cell of a ferry row: its warm-up, and for overlapped how many measured steps
    speculated (all of them in the steady state of speculate=auto)."""
    n = "warm-up %d" % r.get("warmup", 0)
    if mode == "overlapped" and r.get("measured"):
        n += ", speculated %d/%d measured steps" % (r.get("speculated", 0), r["measured"])
    return n


def notes(rep):
    """How the training rows were measured (the bench.md "notes")."""
    t = rep["ferry"]
    k = rep["grad_accum"]
    n = ["Every training row measures %d steps (median) after leaving out the first %d (--warmup)%s." % (
             rep["measured_steps"], rep["warmup"],
             "; ferry overlapped leaves out the first %d (--ferry-warmup, default max(--warmup, %d)): with "
             "speculate=auto ferry speculates (updates during backward) only after 8 clean steps in a row (no "
             "clipping, no overflow), so its median is the steady state" % (
                 rep["ferry_warmup_overlapped"], SPECULATE_WARMUP) if "overlapped" in t else ""),
         "tokens/s = grad_accum x batch x seq / step time = %d x %d x %d / step time, the same effective batch for "
         "every row; ratios are of step times in this run." % (k, rep["batch"], rep["seq"])]
    if k > 1:
        n.append("grad_accum %d: ferry --set grad_accum=%d; each peer runs %d forward+backward passes of loss / %d and "
                 "one optimizer step (GradScaler and clipping once per step where it uses them)." % (k, k, k, k))
    ov = t.get("overlapped", {})
    if ov.get("ok") and ov.get("measured") and ov.get("speculated", 0) < ov["measured"]:
        n.append("ferry overlapped speculated on %d of %d measured steps only (clipping or overflow fired, or "
                 "speculate is not auto): its median is not speculation's steady state." % (
                     ov.get("speculated", 0), ov["measured"]))
    return n


def goals(rep):
    """The issue's goals for the debug and 1b shapes, judged on this run's numbers."""
    t, p, lb = rep["ferry"], rep["peers"], rep["bounds"]
    ov = t.get("overlapped", {})
    if not ov.get("ok"):
        return []
    ms, peak = ov["step_ms"], ov.get("peak") or 0
    g = []

    def add(name, measured, ok):
        g.append([name, measured, "met" if ok else "NOT MET"])

    amp, fsdp, tao = (p.get(k, {}) for k in ("amp", "fsdp2", "torchao"))
    bounds = [b["ms"] for b in lb.values() if b.get("ok") and b.get("ms")]
    shape = os.path.basename(rep["shape"]).replace(".json", "")
    none, ga = t.get("none", {}), rep["grad_accum"]
    if ga > 1 and none.get("ok") and shape in ("debug", "1b"):   # issue 19, at this run's accumulation
        add("overlapped <= 1.15x none at grad_accum %d (issue 19)" % ga, "%.0f vs %.0f ms (%.2fx)" % (
            ms, none["step_ms"], ms / none["step_ms"]), ms <= 1.15 * none["step_ms"])
    if shape == "debug":
        if amp.get("ok"):
            add("overlapped <= 1.0x PyTorch AMP", "%.0f vs %.0f ms (%.2fx)" % (ms, amp["step_ms"], ms / amp["step_ms"]),
                ms <= amp["step_ms"])
        if fsdp.get("ok"):
            add("overlapped <= 1/8 FSDP2", "%.0f vs %.0f ms (1/%.1f)" % (ms, fsdp["step_ms"], fsdp["step_ms"] / ms),
                ms * 8 <= fsdp["step_ms"])
        if tao.get("ok"):
            add("overlapped < torchao", "%.0f vs %.0f ms" % (ms, tao["step_ms"]), ms < tao["step_ms"])
        add("peak GPU <= 5.0 GB", "%.2f GB" % (peak / 1e9), peak <= 5.0e9)
    if shape == "1b":
        if fsdp.get("ok"):
            add("overlapped <= 1/10 FSDP2", "%.0f vs %.0f ms (1/%.1f)" % (ms, fsdp["step_ms"], fsdp["step_ms"] / ms),
                ms * 10 <= fsdp["step_ms"])
        if tao.get("ok"):
            add("overlapped < torchao at < 1/3 its memory", "%.0f vs %.0f ms, %.2f vs %.2f GB" % (
                ms, tao["step_ms"], peak / 1e9, (tao.get("peak") or 0) / 1e9),
                ms < tao["step_ms"] and peak * 3 < (tao.get("peak") or 0))
    if ga > 1 and amp.get("ok") and shape in ("debug", "1b"):
        want = 1.5 if shape == "debug" else 1.0
        a_tok, a_peak = amp.get("tokens_per_s") or 0, amp.get("peak") or 0
        add("overlapped >= %.1fx PyTorch AMP tokens/s at < 1/4 its memory (issue 19)" % want,
            "%.0f vs %.0f tok/s (%.2fx), %.2f vs %.2f GB" % (ov.get("tokens_per_s") or 0, a_tok,
                                                            (ov.get("tokens_per_s") or 0) / a_tok if a_tok else 0,
                                                            peak / 1e9, a_peak / 1e9),
            a_tok > 0 and (ov.get("tokens_per_s") or 0) >= want * a_tok and peak * 4 < a_peak)
    if bounds and shape in ("debug", "1b"):
        add("overlapped <= 1.15x largest lower bound", "%.0f vs %.0f ms (%.2fx)" % (ms, max(bounds), ms / max(bounds)),
            ms <= 1.15 * max(bounds))
    return g


def main():
    a = parse_args()
    resolve_grad_accum(a)
    if a.modes is None:
        a.modes = "overlapped" if a.gpus else ",".join(MODES)
    a.modes = [m for m in a.modes.split(",") if m]
    for m in a.modes:
        if m not in MODES:
            sys.exit("bench: unknown mode %s; use none, blocked, overlapped" % m)
    gpu = fl.gpu_info()
    dev = a.device if a.device != "auto" else ("cuda" if gpu else "cpu")
    have_cuda = dev == "cuda" and gpu is not None
    a.peers_on_cpu = a.peers is True and not have_cuda   # asked for explicitly: the peers' CPU smoke path
    a.peers = a.peers is not False
    if a.peer_list is not None:
        a.peer_list = [k for k in a.peer_list.split(",") if k]
        bad = [k for k in a.peer_list if k not in [p[0] for p in PEERS]]
        if bad:
            sys.exit("bench.py: --peer-list %s: not a peer; valid: %s" % (",".join(bad), ",".join(p[0] for p in PEERS)))
    if dev == "cpu" and a.dtype == "fp16":
        fl.ferry_log("no GPU: ferry runs on the CPU in bf16 (fp16 needs a GPU)")
        a.dtype = "bf16"
    cfg = fl.model_config(a.shape)
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    out = a.out or os.path.join(fl.ROOT, "out", "bench-%s-%s" % (os.path.basename(a.shape).replace(".json", ""),
                                                                 datetime.datetime.now().strftime("%Y%m%d-%H%M%S")))
    os.makedirs(out, exist_ok=True)
    py = fl.python_exe()
    env = {}
    site = os.environ.get("FERRY_BENCH_SITE")
    if site:
        env["PYTHONPATH"] = site + (":" + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")
    env["PYTHONPATH"] = HERE + ":" + env.get("PYTHONPATH", os.environ.get("PYTHONPATH", ""))

    # Enough sequences for the longest run (ferry overlapped's longer warm-up) x batch x grad_accum
    # (x the most ranks with --gpus), at most 512 per rank (ferry's reader wraps around, in a new
    # order each epoch; the peers draw their own).
    longest = max(a.steps, ferry_warmup(a, "overlapped") + measured_steps(a))
    ranks = max(scaling.parse_counts(a.gpus)) if a.gpus else 1
    n_seq = min(512 * ranks, longest * a.batch * a.grad_accum * ranks + 16)
    n_tok = int(n_seq * (a.seq + 1) * 1.1) + 4096
    tokfile = fl.write_tokens(os.path.join(out, "tokens.bin"), n_tok, cfg["vocab_size"])

    rep = dict(shape=a.shape, params=fl.llama_params(cfg), seq=a.seq, batch=a.batch, dtype=a.dtype, device=dev,
               card=gpu["card"] if gpu else "no GPU (" + dev + ")", driver=gpu["driver"] if gpu else None,
               cpu=fl.cpu_name(), date=date, commit=fl.git_commit(), steps=a.steps, warmup=a.warmup,
               grad_accum=a.grad_accum, tokens_per_step=tokens_per_step(a), measured_steps=measured_steps(a),
               ferry_warmup_overlapped=ferry_warmup(a, "overlapped"),
               command="scripts/bench.sh " + " ".join(sys.argv[1:]), python=py)
    if a.gpus:   # the scaling run alone: its own tables (no bounds, inference or single-GPU peers)
        rep["scaling"] = scaling.run(a, sys.modules[__name__], dev, have_cuda, tokfile, out, py, env)
        text = scaling.render(rep, rep["scaling"], have_cuda)
        print(text)
        fl.write_report(out, "bench", rep, text)
        return 0 if any(r.get("ok") for by in rep["scaling"]["ferry"].values() for r in by.values()) else 1
    rep["ferry"] = ferry_train_rows(a, dev, tokfile, out) if a.train else {}
    rep["bounds"] = lower_bounds(a, cfg, rep["ferry"], out, py, have_cuda) if a.bounds and a.train else {}
    rep["peers"] = peer_rows(a, out, py, have_cuda, env) if a.train else {}
    rep["infer"] = infer_rows(a, dev, tokfile, out, py, have_cuda, env)
    rep["goals"] = goals(rep)
    text = render(rep)
    print(text)
    fl.write_report(out, "bench", rep, text)
    # Exit 0 even when rows failed (they say why); non-zero only when no ferry mode ran at all.
    ran = list(rep["ferry"].values()) + list((rep["infer"] or {}).get("rows", {}).values())
    return 0 if any(r.get("ok") for r in ran) else 1


if __name__ == "__main__":
    sys.exit(main())
