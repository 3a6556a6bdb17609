#!/usr/bin/env python3
"""Prints one training step of a FERRY_TRACE file (src/engine/trace.h) as a timeline, in ms from
the step's start: the update thread's tasks and updates (and those of the previous step still
running), the engine thread's waits, and when the device finished each unit's forward/backward.
    python3 scripts/bench/trace_step.py TRACE.jsonl [--step N]   (default: the last but one)
"""
import argparse
import json
import signal


def main():
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)   # quiet when piped into head
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--step", type=int, default=None, help="train_step call number (1-based)")
    a = ap.parse_args()
    try:
        with open(a.trace) as f:
            recs = [json.loads(l) for l in f if l.strip()]
    except (OSError, ValueError) as e:
        raise SystemExit("trace_step.py: %s: %s (a FERRY_TRACE file of JSON lines)" % (a.trace, e))
    steps = [r for r in recs if r["what"] == "step"]
    if not steps:
        raise SystemExit("no step records in %s" % a.trace)
    st = next((r for r in steps if r["unit"] == a.step), None) if a.step else steps[-2 if len(steps) > 1 else -1]
    if st is None:
        raise SystemExit("no step %d in %s" % (a.step, a.trace))
    t0, t1 = st["t0"], st["t1"]
    near = sorted((r for r in recs if r["what"] != "step" and r["t1"] >= t0 and r["t0"] <= t1), key=lambda r: r["t0"])
    print("step %d: %.1f ms" % (st["unit"], t1 - t0))
    busy = sum(min(r["t1"], t1) - max(r["t0"], t0) for r in near if r["what"] in ("task", "update"))
    print("update thread busy %.1f ms of it" % busy)
    for r in near:
        span = r["t1"] - r["t0"]
        print("%8.1f %8.1f  %-12s %3d%s" % (r["t0"] - t0, r["t1"] - t0, r["what"], r["unit"],
                                           "  (%.1f ms)" % span if span >= 0.05 else ""))


if __name__ == "__main__":
    main()
