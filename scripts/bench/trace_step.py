#!/usr/bin/env python3
"""Prints one training step of a FERRY_TRACE file (src/engine/trace.h) as a timeline, in ms from
the step's start: the update thread's tasks and updates (and those of the previous step still
running), the engine thread's waits, and when the device finished each unit's forward/backward.
    python3 scripts/bench/trace_step.py TRACE.jsonl [--step N]   (default: the last but one)
With --summary [--skip K], one line of medians over the steps after the first K (default: a
third of them, at least one): the step, the update thread's busy and idle time in it, the engine
thread's waits for updates (all, and the embedding's), for earlier tasks, the step's tail, and on
CUDA when the device finished the first block's forward and the last unit's.
With --phases [--skip K] (CUDA traces), one line of medians of where each step's device time went:
the time between consecutive device marks charged to the later mark's part (forward, head,
backward; a group of micro-batches after another adds to the same parts), before the first mark,
after the last one (the step's end on the device and host), and the step's tail (from the
backward's end to its return, on the host).
"""
import argparse
import json
import signal
import statistics


def clipped(r, t0, t1):
    """The part of record r's span inside [t0, t1], in ms."""
    return max(0.0, min(r["t1"], t1) - max(r["t0"], t0))


def within(recs, t0, t1):
    """The records other than steps whose spans meet [t0, t1], in the order they started."""
    return sorted((r for r in recs if r["what"] != "step" and r["t1"] >= t0 and r["t0"] <= t1), key=lambda r: r["t0"])


def busy_ms(recs, t0, t1):
    """The update thread's time in [t0, t1] running tasks and updates, of records from within()."""
    return sum(clipped(r, t0, t1) for r in recs if r["what"] in ("task", "update"))


def summary(recs, steps, skip, embed_unit=0):
    """Medians over steps[skip:] of what each step spent where (see the module's doc)."""
    use = steady(steps, skip)
    rows = []
    for st in use:
        t0, t1 = st["t0"], st["t1"]
        inside = within(recs, t0, t1)
        busy = busy_ms(inside, t0, t1)
        waits = [r for r in inside if r["what"] == "wait_update"]
        fwd = [r["t0"] - t0 for r in inside if r["what"] == "gpu_fwd"]
        rows.append(dict(
            step=t1 - t0, busy=busy, idle=(t1 - t0) - busy,
            wait_update=sum(clipped(r, t0, t1) for r in waits),
            wait_embed=sum(clipped(r, t0, t1) for r in waits if r["unit"] == embed_unit),
            wait_tasks=sum(clipped(r, t0, t1) for r in inside if r["what"] == "wait_tasks"),
            tail=sum(clipped(r, t0, t1) for r in inside if r["what"] == "tail"),
            first_fwd=min(fwd) if fwd else None, last_fwd=max(fwd) if fwd else None))
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k not in ("first_fwd", "last_fwd")}
    firsts = [r["first_fwd"] for r in rows if r["first_fwd"] is not None]
    lasts = [r["last_fwd"] for r in rows if r["last_fwd"] is not None]
    line = ("steps %d-%d (%d), medians: step %.1f ms, update thread busy %.1f (idle %.1f), "
            "waits for updates %.1f (embedding %.1f), for tasks %.1f, tail %.1f"
            % (use[0]["unit"], use[-1]["unit"], len(use), med["step"], med["busy"], med["idle"],
               med["wait_update"], med["wait_embed"], med["wait_tasks"], med["tail"]))
    if firsts:
        line += ", first block's forward done at %.1f, the last unit's at %.1f" % (
            statistics.median(firsts), statistics.median(lasts))
    return line


def steady(steps, skip):
    """steps[skip:] (default: a third left out, at least one), refusing an empty remainder."""
    if skip is None:
        skip = max(1, len(steps) // 3) if len(steps) > 1 else 0
    use = steps[skip:]
    if not use:
        raise SystemExit("trace_step.py: --skip %d leaves no steps (the trace has %d)" % (skip, len(steps)))
    return use


def phases(recs, steps, skip):
    """Medians over the steady steps of the device's time per part (see the module's doc)."""
    marks = sorted((r for r in recs if r["what"].startswith("gpu_")), key=lambda r: r["t0"])
    if not marks:
        raise SystemExit("trace_step.py: --phases needs the device's marks (gpu_start, gpu_fwd, ...), "
                         "which only a CUDA run's trace has")
    use = steady(steps, skip)
    parts = ("before", "fwd", "head", "bwd", "after", "tail")
    rows = []
    for st in use:
        t0, t1 = st["t0"], st["t1"]
        m = [r for r in marks if t0 <= r["t0"] <= t1]
        if not m:
            continue
        d = dict.fromkeys(parts, 0.0)
        d["step"] = t1 - t0
        d["before"] = m[0]["t0"] - t0
        d["after"] = t1 - m[-1]["t0"]
        for a, b in zip(m, m[1:]):
            part = b["what"][len("gpu_"):]
            d[part] = d.get(part, 0.0) + b["t0"] - a["t0"]
        d["tail"] = sum(clipped(r, t0, t1) for r in within(recs, t0, t1) if r["what"] == "tail")
        rows.append(d)
    if not rows:
        raise SystemExit("trace_step.py: no device marks within the steady steps")
    med = {k: statistics.median(r[k] for r in rows) for k in ("step",) + parts}
    return ("steps %d-%d (%d), medians: step %.1f ms, device: before the first mark %.1f, forward %.1f, "
            "head %.1f, backward %.1f, after the last mark %.1f; tail %.1f"
            % (use[0]["unit"], use[-1]["unit"], len(rows), med["step"], med["before"], med["fwd"], med["head"],
               med["bwd"], med["after"], med["tail"]))


def main():
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)   # quiet when piped into head
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--step", type=int, default=None, help="train_step call number (1-based)")
    ap.add_argument("--summary", action="store_true", help="one line of medians over the steady steps")
    ap.add_argument("--phases", action="store_true",
                    help="one line of medians of the device's time per part (forward, head, backward; CUDA)")
    ap.add_argument("--skip", type=int, default=None, metavar="K",
                    help="with --summary or --phases: steps left out first")
    a = ap.parse_args()
    if a.summary and a.phases:
        raise SystemExit("trace_step.py: --summary and --phases are two reports; give one")
    if a.skip is not None and (a.skip < 0 or not (a.summary or a.phases)):
        raise SystemExit("trace_step.py: --skip takes a count >= 0, with --summary or --phases")
    try:
        with open(a.trace) as f:
            recs = [json.loads(l) for l in f if l.strip()]
    except (OSError, ValueError) as e:
        raise SystemExit("trace_step.py: %s: %s (a FERRY_TRACE file of JSON lines)" % (a.trace, e))
    steps = [r for r in recs if r["what"] == "step"]
    if not steps:
        raise SystemExit("no step records in %s" % a.trace)
    if a.summary:
        print(summary(recs, steps, a.skip))
        return
    if a.phases:
        print(phases(recs, steps, a.skip))
        return
    st = next((r for r in steps if r["unit"] == a.step), None) if a.step else steps[-2 if len(steps) > 1 else -1]
    if st is None:
        raise SystemExit("no step %d in %s" % (a.step, a.trace))
    t0, t1 = st["t0"], st["t1"]
    near = within(recs, t0, t1)
    print("step %d: %.1f ms" % (st["unit"], t1 - t0))
    busy = busy_ms(near, t0, t1)
    print("update thread busy %.1f ms of it" % busy)
    for r in near:
        span = r["t1"] - r["t0"]
        print("%8.1f %8.1f  %-12s %3d%s" % (r["t0"] - t0, r["t1"] - t0, r["what"], r["unit"],
                                           "  (%.1f ms)" % span if span >= 0.05 else ""))


if __name__ == "__main__":
    main()
