"""scripts/bench.sh --gpus N (issue 15): ferry's data-parallel ranks on 1..N GPUs beside FSDP2 CPU
offload on the same GPU counts, one run.

Per GPU count (--gpus N: 1, 2, ..., N; --gpus 1,2,4: those, 1 added when missing, since every
ratio is against the 1-GPU run) and per ferry mode (--modes, default overlapped):
  - ferry-train with batch_size = --batch per rank (global batch count x batch), the same shape,
    seq, dtype, steps and warm-up as every other count; 1 GPU runs plain ferry-train, more run
    `python -m torch.distributed.run --no-python --standalone --nproc-per-node N ferry-train ...`
    (what scripts/train.sh --gpus N runs);
  - step time: median of rank 0's metrics.jsonl step_ms after the warm-up (rank 0 alone writes
    metrics); global tokens/s = count x grad_accum x batch x seq / step time; scaling efficiency
    = tokens/s / (count x the 1-GPU run's tokens/s of the same mode);
  - per-rank peak GPU memory: each rank's caching-allocator peak (allocated), from the rank's own
    <output_dir>/ranks/rank<R>.json that ferry-train writes when WORLD_SIZE > 1 (1 GPU: metrics.jsonl);
  - host memory of the machine's ranks together, two ways: the sum of the ranks' peak resident
    sets (each rank's VmHWM; 1 GPU: the one process's, sampled; pages of shared libraries and
    the CUDA driver count once per rank, so an upper bound) and the machine's used memory
    (MemTotal - MemAvailable, sampled every 0.1 s) at its peak less just before the launch (other
    processes' changes count too: a quiet machine is assumed; torchrun's agent counts with ranks).
    Both against the 1-GPU run's; the goal is judged on the machine's used memory.
FSDP2 CPU offload (peer_fsdp2.py) under the same launcher with N ranks (NCCL for GPU tensors,
Gloo for CPU ones), same model shape, seq, batch per GPU, steps and warm-up: global tokens/s,
scaling efficiency, per-rank peak, and ferry's tokens/s over FSDP2's per count.
Every multi-rank launch (ferry's and the peer's) gets NCCL_NVLS_ENABLE=0 and OMP_NUM_THREADS =
cores / count (torchrun would set 1, starving FSDP2's CPU AdamW; ferry sets its own split).
Counts above the visible GPUs are skipped with one line. --device cpu runs ferry's ranks on the
host backend (Gloo): the plumbing and the tables, testable without a GPU; the peer then runs only
with --peers (FSDP2 on Gloo without the CPU offload policy, which needs CUDA).
"""
import os
import shutil
import subprocess
import threading
import time

import ferrylib as fl

GOAL_SCALING = {2: 1.85, 4: 3.4}   # issue 15: tokens/s of N GPUs over 1 GPU's
GOAL_HOST = 1.15                   # host memory of the machine over the 1-GPU run's
GOAL_FSDP2 = 5.0                   # ferry tokens/s over FSDP2 CPU offload's


def parse_counts(text):
    """--gpus N -> [1..N]; --gpus 1,2,4 -> [1, 2, 4] (1 added when missing). Exits on bad input."""
    try:
        if "," in text:
            counts = sorted({int(x) for x in text.split(",") if x.strip()})
        else:
            counts = list(range(1, int(text) + 1))
    except ValueError:
        raise SystemExit("bench: --gpus %s: give a count (4) or a list of counts (1,2,4)" % text)
    if not counts or counts[0] < 1:
        raise SystemExit("bench: --gpus %s: counts must be at least 1" % text)
    if counts[0] != 1:
        counts.insert(0, 1)
    return counts


def visible_gpus():
    """CUDA devices this process would see: nvidia-smi's list, cut by CUDA_VISIBLE_DEVICES."""
    try:
        p = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=30)
        n = len([l for l in p.stdout.splitlines() if l.strip()]) if p.returncode == 0 else 0
    except (OSError, subprocess.SubprocessError):
        n = 0
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        n = min(n, len([x for x in cvd.split(",") if x.strip()]))
    return n


def machine_used():
    """MemTotal - MemAvailable in bytes."""
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            info[k] = int(v.split()[0]) * 1024
    return info["MemTotal"] - info["MemAvailable"]


def vm_hwm(pid):
    """VmHWM (peak resident set of the process's current image) in bytes, or 0 once it is gone."""
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def run_sampled(cmd, log_path, timeout, env=None):
    """Runs cmd (output to log_path) under a timeout while sampling, every 0.1 s, the machine's
    used memory and the child's VmHWM. Returns dict(rc, timed_out, seconds, host_peak: the child's
    last VmHWM read (its peak resident set, to within the last 0.1 s; not wait4's ru_maxrss, which
    Linux carries over from the forking parent across execve), used_delta: peak used memory during
    the run less the value before it)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    base = machine_used()
    peak = [base]
    hwm = [0]
    done = threading.Event()

    def sample():
        while not done.wait(0.1):
            peak[0] = max(peak[0], machine_used())
            hwm[0] = max(hwm[0], vm_hwm(p.pid))

    t0 = time.time()
    with open(log_path, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        try:
            p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=full_env)
        except OSError as e:
            f.write(str(e) + "\n")
            return dict(rc=127, timed_out=False, seconds=0, host_peak=0, used_delta=0, out=str(e))
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        killed = threading.Event()
        timer = threading.Timer(timeout, lambda: (killed.set(), p.kill()))
        timer.start()
        _, status, ru = os.wait4(p.pid, 0)
        timer.cancel()
        done.set()
        sampler.join()
    with open(log_path, errors="replace") as f:
        out = f.read()
    return dict(rc=os.waitstatus_to_exitcode(status), timed_out=killed.is_set(), seconds=time.time() - t0,
                host_peak=hwm[0] or ru.ru_maxrss * 1024, used_delta=max(0, peak[0] - base), out=out[-20000:])


def launcher(py, n):
    """The command prefix that starts n ranks of a program on this machine (torchrun)."""
    return [py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n)]


def rank_env(n):
    """Environment of an n-rank launch: NVLink multicast off, the cores split between the ranks."""
    cores = os.cpu_count() or 1
    return dict(NCCL_NVLS_ENABLE="0", OMP_NUM_THREADS=str(max(1, cores // n)))


def ferry_row(a, bench, dev, mode, n, tokfile, out, py):
    """One ferry run with n ranks: the row's dict (ok, step_ms, tokens_per_s, rank_peaks, host...)."""
    train = fl.tool("ferry-train")
    if not train:
        return dict(ok=False, error="ferry-train not built in %s" % fl.build_dir())
    d = os.path.join(out, "ferry-%s-g%d" % (mode, n))
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    warm = bench.ferry_warmup(a, mode)
    sets = dict(fl.train_run_sets(warm + bench.measured_steps(a), a.seq, a.batch, tokfile, d), log_every=1)
    if a.grad_accum > 1:
        sets["grad_accum"] = a.grad_accum
    cmd = fl.ferry_cmd(train, a.shape, dev, mode, a.dtype, sets, a.ferry_set)
    env = {}
    if n > 1:
        cmd = launcher(py, n) + ["--no-python"] + cmd
        env = rank_env(n)
    fl.ferry_log("ferry %s, %d %s: %s" % (mode, n, "GPU(s)" if dev == "cuda" else "rank(s)", " ".join(cmd)))
    res = run_sampled(cmd, os.path.join(d, "log.txt"), a.timeout, env)
    metrics = fl.read_metrics(os.path.join(d, "metrics.jsonl"))
    row = dict(ok=res["rc"] == 0 and len(metrics) > 0, count=n, mode=mode, command=" ".join(cmd), warmup=warm,
               log=os.path.join(d, "log.txt"), metrics=os.path.join(d, "metrics.jsonl"),
               host_used_delta=res["used_delta"])
    if not row["ok"]:
        row["error"] = fl.failure_reason(res, "ferry-train")
        return row
    s = fl.summarize_steps(metrics, warm)
    row.update(step_ms=s["step_ms"], step_ms_spread=s["step_ms_spread"], measured=len(metrics[warm:]) or len(metrics),
               speculated=sum(1 for r in metrics[warm:] if r.get("speculated")))
    if "host_rss_anon" in metrics[-1]:   # rank 0's resident memory by kind after its last step
        row["rss_anon"], row["rss_shmem"] = metrics[-1]["host_rss_anon"], metrics[-1]["host_rss_shmem"]
    row["tokens_per_s"] = n * bench.tokens_per_step(a) / (row["step_ms"] / 1e3)
    if n == 1:
        row["rank_peaks"] = [s["gpu_alloc_peak"]]
        row["rank_rss"] = [res["host_peak"]]
    else:
        peaks, rss, nodes = [], [], []
        for r in range(n):
            st = fl.read_json(os.path.join(d, "ranks", "rank%d.json" % r))
            if not st:
                row.update(ok=False, error="rank %d wrote no %s/ranks/rank%d.json (see %s)" % (r, d, r, row["log"]))
                return row
            peaks.append(st.get("gpu_alloc_peak", 0))
            rss.append(st.get("host_peak_rss", 0))
            nodes.append(st.get("numa_node", -1))
        row["rank_peaks"], row["rank_rss"], row["numa_nodes"] = peaks, rss, nodes
    row["host_rss_sum"] = sum(row["rank_rss"])
    return row


def fsdp2_row(a, bench, n, out, py, have_cuda, env):
    """FSDP2 CPU offload with n ranks under torchrun: global tokens/s and per-rank peaks."""
    if not have_cuda and not a.peers_on_cpu:
        return dict(ok=False, count=n, error="not run: needs CUDA (--peers --device cpu runs FSDP2 on Gloo "
                                             "without the CPU offload policy)")
    j = fl.fresh_output(os.path.join(out, "peer_fsdp2_g%d.json" % n))
    for r in range(1, n):
        fl.fresh_output(os.path.join(out, "peer_fsdp2_g%d.rank%d.json" % (n, r)))
    cmd = launcher(py, n) + [
        os.path.join(bench.HERE, "peer_fsdp2.py"), "--config", fl.config_path(a.shape), "--seq", str(a.seq), "--batch",
        str(a.batch), "--grad-accum", str(a.grad_accum), "--steps", str(bench.measured_steps(a)), "--warmup",
        str(a.warmup), "--dtype", "bf16" if a.dtype == "bf16" else "fp16", "--json", j]
    if not have_cuda:
        cmd += ["--device", "cpu"]
    full_env = dict(env)
    full_env.update(rank_env(n))
    fl.ferry_log("FSDP2 CPU offload, %d rank(s): %s" % (n, " ".join(cmd)))
    res = run_sampled(cmd, os.path.join(out, "peer_fsdp2_g%d.log" % n), a.timeout, full_env)
    r = fl.read_json(j) or dict(ok=False, error=fl.failure_reason(res, "peer_fsdp2.py"))
    r.update(count=n, command=" ".join(cmd), host_used_delta=res["used_delta"])
    if r.get("ok"):
        r["tokens_per_s"] = n * bench.tokens_per_step(a) / (r["step_ms"] / 1e3)
        peaks = [r.get("peak_alloc", 0)]
        for k in range(1, n):
            peaks.append((fl.read_json(os.path.join(out, "peer_fsdp2_g%d.rank%d.json" % (n, k))) or {}).get("peak_alloc"))
        r["rank_peaks"] = peaks
    return r


def run(a, bench, dev, have_cuda, tokfile, out, py, env):
    """All counts: returns the report's "scaling" dict (counts, skipped, ferry rows, fsdp2 rows)."""
    counts = parse_counts(a.gpus)
    sc = dict(counts=counts, skipped=[], ferry={}, fsdp2={}, modes=a.modes)
    if have_cuda:
        vis = visible_gpus()
        sc["visible_gpus"] = vis
        for n in counts:
            if n > vis:
                line = "%d GPUs: skipped, %d visible" % (n, vis)
                fl.ferry_log(line)
                sc["skipped"].append(n)
    run_counts = [n for n in counts if n not in sc["skipped"]]
    for m in a.modes:
        sc["ferry"][m] = {}
        for n in run_counts:
            row = ferry_row(a, bench, dev, m, n, tokfile, out, py)
            sc["ferry"][m][str(n)] = row
            fl.ferry_log("  -> %s" % ("%s, %s tokens/s" % (fl.fmt_ms(row["step_ms"]), fmt_tok(row["tokens_per_s"]))
                                      if row["ok"] else row["error"]))
    if a.peers:
        for n in run_counts:
            r = fsdp2_row(a, bench, n, out, py, have_cuda, env)
            sc["fsdp2"][str(n)] = r
            fl.ferry_log("  -> %s" % ("%s, %s tokens/s" % (fl.fmt_ms(r["step_ms"]), fmt_tok(r["tokens_per_s"]))
                                      if r.get("ok") else r.get("error")))
    derive(sc)
    return sc


def derive(sc):
    """Scaling efficiency and host-memory ratios against each mode's (and FSDP2's) 1-GPU row."""
    for rows in list(sc["ferry"].values()) + [sc["fsdp2"]]:
        one = rows.get("1", {})
        for key, r in rows.items():
            n = int(key)
            if not r.get("ok"):
                continue
            if one.get("ok"):
                r["efficiency"] = r["tokens_per_s"] / (n * one["tokens_per_s"])
                r["speedup"] = r["tokens_per_s"] / one["tokens_per_s"]
                if one.get("host_rss_sum") and r.get("host_rss_sum") is not None:
                    r["host_rss_vs_1"] = r["host_rss_sum"] / one["host_rss_sum"]
                if one.get("host_used_delta") and r.get("host_used_delta") is not None:
                    r["host_used_vs_1"] = r["host_used_delta"] / one["host_used_delta"]
    for m, rows in sc["ferry"].items():
        for key, r in rows.items():
            f = sc["fsdp2"].get(key, {})
            if r.get("ok") and f.get("ok"):
                r["vs_fsdp2"] = r["tokens_per_s"] / f["tokens_per_s"]


def fmt_tok(v):
    return "-" if not v else ("%.1fk" % (v / 1e3) if v >= 1e4 else "%.1f" % v)


def fmt_ratio(v):
    return "-" if v is None else "%.3f" % v


def fmt_peaks(r, have_cuda):
    if not have_cuda:
        return "n/a (host backend)"
    p = r.get("rank_peaks") or []
    return " / ".join("-" if x is None else "%.2f" % (x / 1e9) for x in p) + " GB"


def render(rep, sc, have_cuda):
    """The scaling tables, goals and notes (bench.md)."""
    unit = "GPUs" if have_cuda else "ranks"
    out = ["ferry bench --gpus: shape %s (%.2f B params), seq %d, batch %d per %s, grad_accum %d, %s, %s; %s; %s; "
           "commit %s" % (rep["shape"], rep["params"] / 1e9, rep["seq"], rep["batch"], unit[:-1], rep["grad_accum"],
                          rep["dtype"], rep["card"], rep["cpu"], rep["date"], rep["commit"]),
           "command: " + rep["command"]]
    for n in sc["skipped"]:
        out.append("%d GPUs: skipped, %d visible" % (n, sc.get("visible_gpus", 0)))
    rows = []
    for m, by in sc["ferry"].items():
        for key in sorted(by, key=int):
            r = by[key]
            if not r.get("ok"):
                rows.append([key, m] + ["-"] * 8 + ["FAILED: " + r.get("error", "")])
                continue
            note = "warm-up %d" % r["warmup"]
            if m == "overlapped":
                note += ", speculated %d/%d" % (r.get("speculated", 0), r.get("measured", 0))
            if "rss_anon" in r:
                note += ", rank 0 after its last step: anon %s, shmem %s" % (fl.fmt_gb(r["rss_anon"]),
                                                                         fl.fmt_gb(r["rss_shmem"]))
            if any(x >= 0 for x in r.get("numa_nodes", [])):
                note += ", NUMA nodes " + "/".join(str(x) for x in r["numa_nodes"])
            rows.append([key, m, fl.fmt_ms(r["step_ms"]), fmt_tok(r["tokens_per_s"]), fmt_ratio(r.get("efficiency")),
                         fmt_peaks(r, have_cuda), fl.fmt_gb(r.get("host_rss_sum")), fmt_ratio(r.get("host_rss_vs_1")),
                         fl.fmt_gb(r.get("host_used_delta")), fmt_ratio(r.get("host_used_vs_1")), note])
    out += ["", "ferry data-parallel ranks (global tokens/s = %s x %d x %d x %d / step time)" % (
        unit, rep["grad_accum"], rep["batch"], rep["seq"]),
            fl.table([unit, "mode", "step", "tokens/s", "scaling eff", "peak GPU per rank", "host: sum of ranks' RSS",
                      "vs 1", "host: machine used", "vs 1", "notes"], rows, markdown=True)]
    if sc["fsdp2"]:
        rows = []
        for key in sorted(sc["fsdp2"], key=int):
            r = sc["fsdp2"][key]
            vs = "; ".join("%s %s" % (m, fmt_ratio(by.get(key, {}).get("vs_fsdp2"))) for m, by in sc["ferry"].items())
            if not r.get("ok"):
                rows.append([key, "-", "-", "-", "-", vs, r.get("error", "")])
                continue
            rows.append([key, fl.fmt_ms(r["step_ms"]), fmt_tok(r["tokens_per_s"]), fmt_ratio(r.get("efficiency")),
                         fmt_peaks(r, have_cuda), vs, r.get("notes", "")])
        out += ["", "FSDP2 CPU offload on the same %s (torchrun; same shape, seq, batch per %s, steps)" % (
            unit, unit[:-1]),
                fl.table([unit, "step", "tokens/s", "scaling eff", "peak GPU per rank", "ferry tokens/s / FSDP2's",
                          "notes"], rows, markdown=True)]
    g = goals(sc) if have_cuda else []
    if g:
        out += ["", "Goals (issue 15)", fl.table(["goal", "measured", "result"], g, markdown=True)]
    out += ["", "Notes",
            "- step: median of rank 0's step_ms (metrics.jsonl) after the warm-up; scaling eff = tokens/s / "
            "(count x the 1-%s tokens/s of the same mode)." % unit[:-1],
            "- peak GPU per rank: each rank's caching-allocator peak (allocated), rank 0 first (ranks/rank<R>.json "
            "under each run's folder; 1 %s: metrics.jsonl)." % unit[:-1],
            "- host: sum of ranks' RSS adds each rank's peak resident set (shared library and driver pages count "
            "once per rank: an upper bound); machine used is MemTotal - MemAvailable at its peak during the run "
            "less just before it (sampled every 0.1 s; assumes a quiet machine; with ranks it includes torchrun's own "
            "Python process, a few hundred MB, which the 1-%s run, plain ferry-train, does not have)." % unit[:-1],
            "- notes: rank 0's resident memory after its last step by kind (metrics.jsonl host_rss_anon and "
            "host_rss_shmem): the shadows that the ranks share are shmem, counted once on the machine."]
    if not have_cuda:
        out.append("- host backend (--device cpu): the ranks are processes on the CPU talking through Gloo, the "
                   "plumbing and the tables only; FSDP2 runs there without CPUOffloadPolicy (it needs CUDA).")
    return "\n".join(out)


def goals(sc):
    """Issue 15's goals on the overlapped rows (else the first mode's)."""
    m = "overlapped" if "overlapped" in sc["ferry"] else next(iter(sc["ferry"]), None)
    if m is None:
        return []
    by = sc["ferry"][m]
    g = []
    for n, want in GOAL_SCALING.items():
        r = by.get(str(n), {})
        if r.get("ok") and r.get("speedup") is not None:
            g.append(["%d GPUs >= %.2fx the tokens/s of 1 (%s)" % (n, want, m), "%.2fx" % r["speedup"],
                      "met" if r["speedup"] >= want else "NOT MET"])
    for key in sorted(by, key=int):
        r = by[key]
        if key != "1" and r.get("ok") and r.get("host_used_vs_1") is not None:
            g.append(["host memory, %s GPUs <= %.2fx 1 GPU's (machine used)" % (key, GOAL_HOST),
                      "%.2fx (sum of RSS %s)" % (r["host_used_vs_1"], fmt_ratio(r.get("host_rss_vs_1"))),
                      "met" if r["host_used_vs_1"] <= GOAL_HOST else "NOT MET"])
    for key in sorted(by, key=int):
        r = by[key]
        if r.get("vs_fsdp2") is not None:
            g.append(["%s GPUs >= %.1fx FSDP2 CPU offload tokens/s (%s)" % (key, GOAL_FSDP2, m), "%.2fx" % r["vs_fsdp2"],
                      "met" if r["vs_fsdp2"] >= GOAL_FSDP2 else "NOT MET"])
    return g
