"""The largest-model finder behind scripts/find_largest_model.sh (issue 7).

Candidates: the configs/models shapes and a continuous LLaMA-scaled family between them (hidden
size in steps of one head, layers interpolated between the LLaMA anchors, heads = hidden / head
dim, intermediate = 8/3 hidden rounded up to 256, as LLaMA does). Each candidate's GPU and host
memory comes from ferry's own plan (`ferry-train --dry-run --plan-json`), so the search costs
one cheap process per shape. The largest candidates that fit both limits are then verified by
real runs of a few steps with the GPU capped at the target (`--set gpu_mem_limit_gib`), measuring
the GPU peak (metrics.jsonl) and the host peak (the child's max RSS from wait4).

--optimizer-state KIND plans and verifies with that form of the AdamW moments (run-config
optimizer_state); the plan's what-if rows ("optimizer_state fp32|bf16|int8", ferry's own bytes)
give the answer for every kind. The optimizer state on disk (`--ferry-set optimizer_state_on=nvme
--ferry-set nvme_path=DIR`) plans and verifies with the tier's host buffers in place of master and
moments, and the plans' disk bytes judged against what DIR has free; the what-if rows
"optimizer_state_on nvme, optimizer_state KIND" give the answer with the state on disk for every
kind (their disk bytes judged only where the run names an nvme_path). A verified run on disk
reports its disk bytes per step and the time its steps waited on the disk; the disk's sequential
read and write rates are measured once (`ferry-bench-adamw --nvme DIR`, the tier's own I/O path)
and each such run's step is set against its disk bound (bytes read / read rate + bytes written /
write rate). The what-if rows also combine checkpointing with each kind, in memory and on disk.
--verify-what-if verifies each what-if row's largest candidate by a run with that change (the
rows on disk only where an nvme_path is given), so the report names the largest *verified* model
per option and combination, with its step time.

--family small with --device cpu is the CI mode: tiny-ish shapes, host backend, no cap.
Standard library only.
"""
import argparse
import datetime
import json
import os
import re
import shutil
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import ferrylib as fl  # noqa: E402

# (hidden, layers) of the LLaMA family (configs/ 1b, 3b, 7b, 13b, 30b, 65b); layers are
# interpolated linearly in hidden between them.
LLAMA_ANCHORS = [(2048, 22), (3200, 26), (4096, 32), (5120, 40), (6656, 60), (8192, 80)]
SMALL_ANCHORS = [(128, 4), (256, 6), (384, 8), (512, 10), (768, 12)]
# ferry-train's optimizer_state kinds; the plan JSON has a what-if row "optimizer_state KIND" for each
# the offload mode can run.
STATE_KINDS = ["fp32", "bf16", "int8"]
# The plan's what-if row of each kind with the optimizer state on disk (optimizer_state_on=nvme).
NVME_ROW = "optimizer_state_on nvme, optimizer_state %s"
# A row combined with activation checkpointing.
CKPT_ROW = "activation checkpointing, %s"


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu-mem", default="24GiB", help="the target card's memory (default 24GiB: an RTX 4090)")
    ap.add_argument("--gpu-reserve", default="auto",
                    help="kept back from --gpu-mem for the CUDA context and driver (auto: 0.5GiB on cuda, 0 on cpu)")
    ap.add_argument("--host-mem", default="auto", help="auto (MemTotal of /proc/meminfo) or a size")
    ap.add_argument("--host-reserve", default="4GiB", help="host memory kept for the OS and the process (default 4GiB)")
    ap.add_argument("--pinned-fraction", type=float, default=0.8,
                    help="pinned memory may use at most this fraction of host memory (default 0.8)")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--offload", default="overlapped", choices=["none", "blocked", "overlapped"])
    ap.add_argument("--dtype", default=None, choices=["fp16", "bf16", "fp32"])
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--optimizer-state", default="fp32", choices=STATE_KINDS,
                    help="the AdamW moments' form on the host (run-config optimizer_state) of the plans and the "
                         "verification runs (default fp32); the what-if rows show every kind")
    ap.add_argument("--family", default="llama", choices=["llama", "small"],
                    help="llama: configs/ shapes + the LLaMA-scaled family; small: CPU-sized (CI)")
    ap.add_argument("--verify", type=int, default=3, help="verified candidates (0: plan only)")
    ap.add_argument("--max-tries", type=int, default=8, help="verification runs at most")
    ap.add_argument("--steps", type=int, default=3,
                    help="steps per verification run (a step time needs 2 or more: a step's update runs in the next)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per verification run")
    ap.add_argument("--max-params", default=None, metavar="N",
                    help="verify only candidates of at most N parameters (e.g. 17e9 or 17B): larger ones are "
                         "planned and listed, not run (a disk-bound step of a 30 B model takes minutes)")
    ap.add_argument("--ferry-set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--verify-what-if", action="store_true",
                    help="also verify the largest candidate of every what-if row (option and combination) by a run")
    ap.add_argument("--disk-bytes", default="4GiB",
                    help="the file size of the disk measurement when the state is on disk (default 4GiB)")
    ap.add_argument("--out", default=None)
    return ap.parse_args()


def interp_layers(h, anchors):
    if h <= anchors[0][0]:
        return anchors[0][1]
    for (h0, l0), (h1, l1) in zip(anchors, anchors[1:]):
        if h <= h1:
            return int(round(l0 + (l1 - l0) * (h - h0) / (h1 - h0)))
    return anchors[-1][1]


def family(kind, seq):
    """List of (name, config dict). configs/ shapes first, then the scaled family."""
    shapes = []
    if kind == "llama":
        names = ["debug", "1b", "3b", "7b", "13b", "30b", "65b"]
        template = fl.model_config("7b")
        head_dim, vocab, step, lo, hi = 128, 32000, 128, 2048, 8192
        anchors = LLAMA_ANCHORS
    else:
        names = ["tiny"]
        template = fl.model_config("tiny")
        head_dim, vocab, step, lo, hi = 32, template["vocab_size"], 128, 256, 512
        anchors = SMALL_ANCHORS
    for n in names:
        p = fl.config_path(n)
        if os.path.exists(p):
            shapes.append((n, fl.model_config(n), p))
    for h in range(lo, hi + 1, step):
        c = dict(template)
        heads = h // head_dim
        c.update(hidden_size=h, num_hidden_layers=interp_layers(h, anchors), num_attention_heads=heads,
                 num_key_value_heads=heads, intermediate_size=-(-8 * h // 3 // 256) * 256 if kind == "llama"
                 else -(-8 * h // 3 // 8) * 8, vocab_size=vocab, max_position_embeddings=max(seq, 2048))
        c["_name_or_path"] = "ferry finder: LLaMA-scaled h%d L%d" % (h, c["num_hidden_layers"])
        shapes.append(("h%d-L%d" % (h, c["num_hidden_layers"]), c, None))
    return shapes


def parse_count(text, flag):
    """A parameter count: 17e9, 17000000000, 17B or 500M."""
    t = text.strip()
    scale = {"B": 1e9, "M": 1e6, "K": 1e3}.get(t[-1:].upper(), 1)
    try:
        v = float(t[:-1] if scale != 1 else t) * scale
    except ValueError:
        v = -1
    if v <= 0:
        raise SystemExit("find_largest_model: %s %r is not a parameter count (e.g. 17e9, 17B or 500M)" % (flag, text))
    return v


def plan(train, name, cfg_path, a, dev, out, grad_accum=None, extra=None, tag=""):
    """ferry's plan of one candidate at --batch, or (grad_accum=K) of K micro-batches of batch 1;
    extra: more run-config keys (its file named with tag)."""
    j = os.path.join(out, "plans", name + ("-accum%d" % grad_accum if grad_accum else "") + tag + ".json")
    # The GPU limit goes into the plan too: activation_checkpointing=auto recomputes the fewest
    # blocks that fit under it (without a limit it plans none).
    sets = dict(max_length=a.seq, batch_size=1 if grad_accum else a.batch, optimizer_state=a.optimizer_state,
                gpu_mem_limit_gib="%.4f" % (a.gpu_limit / fl.GIB))
    if grad_accum:
        sets["grad_accum"] = grad_accum
    sets.update(extra or {})
    cmd = fl.ferry_cmd(train, cfg_path, dev, a.offload, a.dtype, sets, a.ferry_set, dry_run=True, plan_json=j)
    res = fl.run(cmd, 120)
    if res["rc"] != 0 or not os.path.exists(j):
        raise SystemExit("find_largest_model: ferry-train --plan-json failed for %s: %s" % (
            name, fl.failure_reason(res)))
    with open(j) as f:
        return json.load(f)


def judge(p, lim):
    """Why a plan does not fit the limits, or "" when it fits. The disk (the optimizer state tier's
    file) is judged against the free bytes the plan found at nvme_path, where it found any."""
    why = []
    disk = p.get("disk", {})
    if disk.get("state", 0) > 0 and disk.get("free", -1) >= 0 and disk["state"] > disk["free"]:
        why.append("disk (needs %s, %s free in %s)" % (fl.fmt_bytes(disk["state"]), fl.fmt_bytes(disk["free"]),
                                                     disk.get("path", "?")))
    if p["device"]["total"] > lim["gpu"]:
        why.append("GPU (needs %s, activations %s)" % (fl.fmt_bytes(p["device"]["total"]),
                                                       fl.fmt_bytes(p["device"]["activations"])))
    if p["host"]["total"] > lim["host"]:
        why.append("host (needs %s)" % fl.fmt_bytes(p["host"]["total"]))
    if p["host"]["pinned"] > lim["pinned"]:
        why.append("pinned (needs %s)" % fl.fmt_bytes(p["host"]["pinned"]))
    return ", ".join(why)


def what_if(p, change):
    """The plan with one capability added, as ferry's planner computed it (--plan-json's what_if)."""
    w = p.get("what_if", {}).get(change)
    if w is None:
        raise SystemExit("find_largest_model: the plan has no what-if row %r (ferry-train too old?)" % change)
    return dict(p, device=w["device"], host=w["host"], disk=w.get("disk", {}))


def what_if_changes(p):
    """The what-if rows of a plan, in the order the finder reports them: activation checkpointing,
    each optimizer_state kind the plan has a row for (offload none: fp32 only), then each kind with
    the state on disk (offloaded modes)."""
    rows = p.get("what_if", {})
    kinds = ["optimizer_state " + k for k in STATE_KINDS if "optimizer_state " + k in rows]
    nvme = [NVME_ROW % k for k in STATE_KINDS if NVME_ROW % k in rows]
    combined = [CKPT_ROW % c for c in kinds + nvme if CKPT_ROW % c in rows]
    return ["activation checkpointing"] + kinds + nvme + combined


def change_sets(change):
    """The run-config keys a what-if row stands for ({} for a row name the finder does not know)."""
    sets = {}
    for part in change.split(", "):
        if part == "activation checkpointing":
            sets["activation_checkpointing"] = "blocks"
        elif part == "optimizer_state_on nvme":
            sets["optimizer_state_on"] = "nvme"
        elif part.startswith("optimizer_state "):
            sets["optimizer_state"] = part.split(" ", 1)[1]
            sets.setdefault("optimizer_state_on", "host")   # the kind rows alone are in host memory
        else:
            raise SystemExit("find_largest_model: unknown what-if row %r" % change)
    return sets


def route(train, cands, a, dev, out, lim):
    """--batch B > 1 without grad_accum set: the same effective batch of B sequences as grad_accum=B
    of batch 1 (micro_batch_group auto: the largest group that fits), planned for every candidate.
    The recommendation is grad_accum unless the batch fits a larger model: a group costs what the
    batch of the same sequences costs (BENCHMARKS.md "Gradient accumulation"), and auto shrinks the
    group where the batch would not fit; the price is the host's fp32 sums of the groups (4 B/param)
    when the group is smaller than B."""
    sets = dict(kv.split("=", 1) for kv in a.ferry_set if "=" in kv)
    if a.batch <= 1 or "grad_accum" in sets:
        return None
    fit_b = [c for c in cands if not judge(c["plan"], lim)]
    fit_a = []
    for c in cands:
        p = plan(train, c["name"], c["path"], a, dev, out, grad_accum=a.batch)
        if not judge(p, lim):
            fit_a.append(dict(name=c["name"], params=c["params"], group=p["run"]["micro_batch_group"],
                              device=p["device"]["total"], host=p["host"]["total"]))
    big_b = max(fit_b, key=lambda c: c["params"]) if fit_b else None
    big_a = max(fit_a, key=lambda c: c["params"]) if fit_a else None
    accum = big_a is not None and (big_b is None or big_a["params"] >= big_b["params"])
    return dict(effective_batch=a.batch,
                batch=big_b and dict(name=big_b["name"], params=big_b["params"]),
                grad_accum=big_a, recommended="grad_accum" if accum else "batch_size")


def route_line(r):
    """The report's line for route()."""
    def largest(x):
        return "%s (%.3f B params)" % (x["name"], x["params"] / 1e9) if x else "none fits"
    b, k = r["effective_batch"], r["grad_accum"]
    rec = ("grad_accum=%d, batch_size=1" % b if r["recommended"] == "grad_accum" else "batch_size=%d" % b)
    return ("effective batch of %d sequences: as batch_size=%d, largest %s; as grad_accum=%d of batch 1, "
            "largest %s%s; recommended: %s (planned)" % (
                b, b, largest(r["batch"]), b, largest(k),
                ", groups of %d" % k["group"] if k else "", rec))


def measure_disk(path, size):
    """Sequential read and write GB/s of the disk under `path` through the tier's I/O path
    (ferry-bench-adamw --nvme), or None when the tool is missing or fails."""
    bench = fl.tool("ferry-bench-adamw")
    if not bench:
        return None
    cmd = [bench, "--nvme", path, "--nvme-bytes", str(fl.parse_size(size)), "--nvme-depths", "16",
           "--nvme-buffers", "2", "--nvme-units", "3", "--sizes", "1M", "--reps", "2"]
    res = fl.run(cmd, 600)
    m = re.search(r"best: write ([0-9.]+) GB/s .*read ([0-9.]+) GB/s", res.get("out", ""))
    if res["rc"] != 0 or not m:
        fl.ferry_log("disk measurement failed (%s); no disk bound" % fl.failure_reason(res))
        return None
    return dict(write=float(m.group(1)) * 1e9, read=float(m.group(2)) * 1e9, command=" ".join(cmd),
                direct="O_DIRECT" in res.get("out", ""))


def disk_bound(r, disk):
    """A verified run's disk bound per step in ms (its median bytes read and written at the measured
    rates), or None."""
    if not disk or "disk_read" not in r:
        return None
    return 1e3 * (r["disk_read"] / disk["read"] + r["disk_write"] / disk["write"])


def host_by_state(p):
    """Predicted host bytes per optimizer_state kind, from the plan's rows ("a / b / c")."""
    rows = p.get("what_if", {})
    return " / ".join(fl.fmt_bytes(rows["optimizer_state " + k]["host"]["total"]) if "optimizer_state " + k in rows
                      else "-" for k in STATE_KINDS)


def bound_note(r, disk):
    """", bound X ms, step x Y" for a verified run on disk, when the disk was measured."""
    b = disk_bound(r, disk)
    if not b or not r.get("step_ms"):
        return ""
    return ", bound %s, step %.2fx" % (fl.fmt_ms(b), r["step_ms"] / b)


def verified_note(w, disk):
    """The what-if row's verification run, for the report line ("" when none was asked for)."""
    if not w:
        return ""
    if "skipped" in w:
        return "; not verified (%s)" % w["skipped"]
    r = w["run"]
    if "error" in r:
        return "; verification of %s failed: %s" % (w["name"], r["error"])
    return "; verified %s (%.2f B params), step %s%s" % (
        w["name"], w["params"] / 1e9, fl.fmt_ms(r.get("step_ms")),
        (" (disk %s, waited %s%s)" % (fl.fmt_bytes(r["disk_bytes"]), fl.fmt_ms(r["disk_wait_ms"]), bound_note(r, disk))
         if "disk_bytes" in r else ""))


def run_verify(train, name, cfg_path, a, dev, lim, tokfile, out, extra=None, tag=""):
    """One verification run of candidate `name` (with the run-config keys `extra` on top of the
    finder's, for a what-if row; its folder verify/NAME[-TAG])."""
    d = os.path.join(out, "verify", name + ("-" + tag if tag else ""))
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    sets = fl.train_run_sets(a.steps, a.seq, a.batch, tokfile, d)
    # As in the plan (on the host backend the limit caps nothing, but auto checkpointing plans by it).
    sets["gpu_mem_limit_gib"] = "%.4f" % (lim["gpu"] / fl.GIB)
    # The run itself refuses a plan over the host limit the finder judged by (before its first step).
    sets["host_mem_limit_gib"] = "%.4f" % (lim["host"] / fl.GIB)
    sets["optimizer_state"] = a.optimizer_state
    overrides = list(a.ferry_set) + ["%s=%s" % kv for kv in (extra or {}).items()]
    cmd = fl.ferry_cmd(train, cfg_path, dev, a.offload, a.dtype, sets, overrides)
    log = os.path.join(d, "log.txt")
    res = fl.run_measured(cmd, log, a.timeout)
    rows = fl.read_metrics(os.path.join(d, "metrics.jsonl"))
    r = dict(rc=res["rc"], host_peak=res["host_peak"], command=" ".join(cmd), log=log)
    if rows:
        s = fl.summarize_steps(rows, 1)
        r.update(gpu_alloc=s["gpu_alloc_peak"], gpu_reserved=s["gpu_reserved_peak"])
        # A step's update runs during the next step (or the run's final flush): a run of one step
        # has no step time that includes its update, so it reports none.
        if len(rows) > 1:
            r["step_ms"] = s["step_ms"]
        if any("disk_wait_ms" in x for x in rows):   # optimizer_state_on=nvme: the tier's traffic
            use = rows[1:] if len(rows) > 1 else rows
            r.update(disk_read=fl.median([x.get("disk_read_bytes", 0) for x in use]),
                     disk_write=fl.median([x.get("disk_write_bytes", 0) for x in use]),
                     disk_wait_ms=fl.median([x.get("disk_wait_ms", 0) for x in use]))
            r["disk_bytes"] = r["disk_read"] + r["disk_write"]
    if res["rc"] != 0 or not rows:
        r["error"] = "exit %d: %s" % (res["rc"], fl.error_line(log, 200))
    return r


def main():
    a = parse_args()
    max_params = parse_count(a.max_params, "--max-params") if a.max_params else None
    train = fl.tool("ferry-train")
    if not train:
        sys.exit("find_largest_model: %s/bin/ferry-train is missing; run scripts/build.sh first" % fl.build_dir())
    gpu = fl.gpu_info()
    dev = a.device if a.device != "auto" else ("cuda" if gpu else "cpu")
    if dev == "cuda" and not gpu:
        print("find_largest_model: --device cuda but no GPU is usable here; skipped")
        return 77
    if a.dtype is None:
        a.dtype = "fp16" if dev == "cuda" else "fp32"
    if a.gpu_reserve == "auto":
        a.gpu_reserve = "0.5GiB" if dev == "cuda" else "0"
    host_total = fl.host_mem_bytes() if a.host_mem == "auto" else fl.parse_size(a.host_mem)
    a.gpu_limit = fl.parse_size(a.gpu_mem) - fl.parse_size(a.gpu_reserve)
    lim = dict(gpu=fl.parse_size(a.gpu_mem) - fl.parse_size(a.gpu_reserve),
               host=host_total - fl.parse_size(a.host_reserve), pinned=int(host_total * a.pinned_fraction))
    if dev == "cuda" and gpu and lim["gpu"] > gpu["mem_bytes"]:
        sys.exit("find_largest_model: --gpu-mem %s is more than this card's %.1f GiB; the cap can only lower it" % (
            a.gpu_mem, gpu["mem_bytes"] / fl.GIB))
    out = a.out or os.path.join(fl.ROOT, "out", "finder-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    for sub in ("plans", "shapes", "verify"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)

    cands = []
    for name, cfg, path in family(a.family, a.seq):
        if path is None:
            path = os.path.join(out, "shapes", name + ".json")
            with open(path, "w") as f:
                json.dump(cfg, f, indent=1)
        p = plan(train, name, path, a, dev, out)
        cands.append(dict(name=name, path=path, plan=p, params=p["model"]["params"], why=judge(p, lim)))
    cands.sort(key=lambda c: c["params"])
    fitting = [c for c in cands if not c["why"]]

    # Verify from the largest fitting candidate down until `verify` of them ran (or max-tries).
    verified, tries = [], 0
    tok = []

    def tokens():
        """The verification runs' token file (one for all of them), written on first use."""
        if not tok:
            vocab = max(x["plan"]["model"]["vocab"] for x in cands)
            tok.append(fl.write_tokens(os.path.join(out, "tokens.bin"),
                                       (a.steps * a.batch + 8) * (a.seq + 1) * 2 + 4096, vocab))
        return tok[0]

    for c in sorted(fitting, key=lambda c: -c["params"]):
        if len(verified) >= a.verify or tries >= a.max_tries:
            break
        if max_params is not None and c["params"] > max_params:
            c["unverified"] = "over --max-params %s" % a.max_params
            continue
        tries += 1
        fl.ferry_log("verifying %s (%.2f B params)" % (c["name"], c["params"] / 1e9))
        c["run"] = run_verify(train, c["name"], c["path"], a, dev, lim, tokens(), out)
        if "error" in c["run"]:
            c["why"] = "run failed: " + c["run"]["error"]
        else:
            verified.append(c)

    sets = dict(kv.split("=", 1) for kv in a.ferry_set if "=" in kv)
    nvme_path = sets.get("nvme_path")

    # --verify-what-if: each what-if row's largest fitting candidate, run with that change (one run,
    # or the next smaller candidate once when it fails).
    checked = {}
    base = fitting and max(fitting, key=lambda c: c["params"])
    if a.verify_what_if and (base or cands):
        for k, change in enumerate(what_if_changes((base or cands[0])["plan"])):
            extra = change_sets(change)
            if extra.get("optimizer_state_on") == "nvme" and not nvme_path:
                checked[change] = dict(skipped="no --ferry-set nvme_path=DIR")
                continue
            fit = sorted([c for c in cands if not judge(what_if(c["plan"], change), lim)
                          and (max_params is None or c["params"] <= max_params)], key=lambda c: -c["params"])
            for c in fit[:2]:
                fl.ferry_log("verifying %s with %s (%.2f B params)" % (c["name"], change, c["params"] / 1e9))
                r = run_verify(train, c["name"], c["path"], a, dev, lim, tokens(), out, extra, "whatif%d" % k)
                checked[change] = dict(name=c["name"], params=c["params"], run=r)
                if "error" not in r:
                    break

    # The disk under the state tier, once, where any run put the state on disk.
    disk = None
    on_disk_runs = [c["run"] for c in cands if "disk_read" in c.get("run", {})] + \
                   [w["run"] for w in checked.values() if "disk_read" in w.get("run", {})]
    if on_disk_runs and nvme_path:
        disk = measure_disk(nvme_path, a.disk_bytes)

    largest = max(verified, key=lambda c: c["params"]) if verified else None
    largest_pred = max(fitting, key=lambda c: c["params"]) if fitting else None
    best = largest or largest_pred
    report = dict(date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), card=gpu["card"] if gpu else "no GPU",
                  device=dev, commit=fl.git_commit(), command="scripts/find_largest_model.sh " + " ".join(sys.argv[1:]),
                  limits=lim, seq=a.seq, batch=a.batch, offload=a.offload, dtype=a.dtype,
                  optimizer_state=a.optimizer_state, disk=disk,
                  largest_verified=largest and largest["name"], largest_predicted=largest_pred and largest_pred["name"],
                  candidates=[dict((k, v) for k, v in c.items() if k != "path") for c in cands])

    # The next limit, and how far each change would move the answer (plan arithmetic).
    lines = []
    rt = route(train, cands, a, dev, out, lim)
    if rt:
        report["route"] = rt
        lines.append(route_line(rt))
    if best:
        above = [c for c in cands if c["params"] > best["params"]]
        if above:
            lines.append("next limit: %s (%.2f B) does not fit: %s" % (above[0]["name"], above[0]["params"] / 1e9,
                                                                          judge(above[0]["plan"], lim) or above[0]["why"]))
        for change in what_if_changes(best["plan"]):
            fit = [c for c in cands if not judge(what_if(c["plan"], change), lim)]
            big = max(fit, key=lambda c: c["params"]) if fit else None
            disk_note = (" (disk %s)" % fl.fmt_bytes(what_if(big["plan"], change)["disk"].get("state", 0))
                         if big and what_if(big["plan"], change)["disk"].get("state", 0) else "")
            lines.append("with %s: largest %s (%.2f B params)%s%s" % (change, big["name"] if big else "none",
                                                                     big["params"] / 1e9 if big else 0, disk_note,
                                                                     verified_note(checked.get(change), disk)))
            report.setdefault("what_if", {})[change] = big and dict(name=big["name"], params=big["params"],
                                                                    verified=checked.get(change))

    # Offloaded, fp32 state in host memory: how many of the largest model's blocks the GPU memory it
    # leaves would keep resident (resident_blocks=-1, the planner's count; each takes its update off
    # the host's AdamW).
    if (best and a.offload != "none" and "resident_blocks" not in sets and a.optimizer_state == "fp32"
            and sets.get("optimizer_state_on", "host") == "host"):
        rp = plan(train, best["name"], best["path"], a, dev, out, extra=dict(resident_blocks=-1), tag="-resident")
        n, layers = rp["run"].get("resident_blocks", 0), rp["model"]["layers"]
        report["resident_blocks"] = n
        lines.append("%s with the GPU memory it leaves: resident_blocks=%d of its %d blocks (resident_blocks=-1, "
                     "planned; they take their update off the host's AdamW)" % (best["name"], n, layers))

    rows = []
    for c in cands:
        r = c.get("run", {})
        meas_gpu = r.get("gpu_alloc")
        dev_err = ""
        if meas_gpu:
            err = 100.0 * (meas_gpu - c["plan"]["device"]["total"]) / c["plan"]["device"]["total"]
            dev_err = " (%+.1f%%%s)" % (err, ", OVER 5%" if abs(err) > 5 else "")
        rows.append([c["name"], "%.2f B" % (c["params"] / 1e9) if c["params"] >= 1e8 else "%.1f M" % (c["params"] / 1e6),
                     "%d x %d" % (c["plan"]["model"]["layers"], c["plan"]["model"]["hidden"]),
                     fl.fmt_bytes(c["plan"]["device"]["total"]), fl.fmt_bytes(c["plan"]["host"]["total"]),
                     host_by_state(c["plan"]),
                     (fl.fmt_bytes(meas_gpu) + dev_err) if meas_gpu else "-",
                     fl.fmt_bytes(r["host_peak"]) if r.get("host_peak") and "error" not in r else "-",
                     (fl.fmt_ms(r.get("step_ms")) if r.get("step_ms") else "-") +
                     (" (disk %s, waited %s%s)" % (fl.fmt_bytes(r["disk_bytes"]), fl.fmt_ms(r["disk_wait_ms"]),
                                                   bound_note(r, disk))
                      if "disk_bytes" in r else ""),
                     ("fits, verified" if c in verified else
                      "fits (predicted; %s)" % c["unverified"] if "unverified" in c else "fits (predicted)")
                     if not c["why"] else c["why"]])
    on_disk = (" on disk in %s" % sets.get("nvme_path", "?")) if sets.get("optimizer_state_on") == "nvme" else ""
    hdr = ("largest-model finder: target GPU %s (usable %.2f GiB), host %.1f GiB (usable %.1f, pinned up to %.1f), "
           "seq %d, batch %d, offload %s, %s, optimizer_state %s%s; run on %s (%s), %s, commit %s" % (
               a.gpu_mem, lim["gpu"] / fl.GIB, host_total / fl.GIB, lim["host"] / fl.GIB, lim["pinned"] / fl.GIB, a.seq,
               a.batch, a.offload, a.dtype, a.optimizer_state, on_disk, report["card"], dev, report["date"],
               report["commit"]))
    text = "\n".join([hdr, "command: " + report["command"], "",
                      fl.table(["shape", "params", "layers x hidden", "pred GPU", "pred host",
                                "pred host " + "/".join(STATE_KINDS), "meas GPU (vs pred)",
                                "meas host", "step", "fits / why not"], rows, markdown=True), "",
                      "largest trainable: %s" % (
                          "%s (%.3f B params, verified)" % (largest["name"], largest["params"] / 1e9) if largest else
                          ("%s (%.3f B params, predicted only: no verification run passed)" % (
                              largest_pred["name"], largest_pred["params"] / 1e9) if largest_pred else "none fits"))]
                     + ([("disk under %s: read %.2f GB/s, write %.2f GB/s (%s; %s); disk bound = bytes read / read "
                          "rate + bytes written / write rate") % (nvme_path, disk["read"] / 1e9, disk["write"] / 1e9,
                                                                  "O_DIRECT" if disk["direct"] else "buffered",
                                                                  disk["command"])] if disk else [])
                     + lines)
    print(text)
    fl.write_report(out, "finder", report, text)
    return 0 if largest_pred else 1


if __name__ == "__main__":
    sys.exit(main())
