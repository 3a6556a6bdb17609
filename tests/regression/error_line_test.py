#!/usr/bin/env python3
"""Why a ferry run failed, as the finder, nightly and convergence scripts report it
(ferrylib.error_line): ferry-train's error goes to stderr at once while its stdout lines wait in
a buffer until exit, so in a log holding both the error line comes first and an info line last.
The reason must be the error line. Runs ferry-train (host backend, tiny) with a host limit it
cannot fit, output to a file.
  error_line_test.py FERRY_TRAIN WORKDIR
Standard library only; exit 0 pass, 1 fail (one line per failed check).
"""
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "scripts", "bench"))
import ferrylib as fl  # noqa: E402


def main():
    train, work = sys.argv[1], sys.argv[2]
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    log = os.path.join(work, "log.txt")
    with open(log, "w") as f:
        rc = subprocess.call([train, "--model-config", "tiny", "--device", "cpu", "--set", "steps=1",
                              "--set", "host_mem_limit_gib=0.001", "--set", "output_dir=" + os.path.join(work, "out")],
                             stdout=f, stderr=subprocess.STDOUT)
    lines = [l.strip() for l in open(log) if l.strip()]
    fails = []
    if rc != 2:
        fails.append("ferry-train exited %d, expected 2 (a config error)" % rc)
    reason = fl.error_line(log)
    if not reason.startswith("ferry-train: model tiny needs") or "host_mem_limit_gib" not in reason:
        fails.append("error_line gave %r" % reason)
    if lines and lines[-1].startswith("ferry-train:"):
        fails.append("the log's last line is the error itself, so this run does not show the reordering: %r" % lines[-1])
    # A log without an error line gives its last line.
    plain = os.path.join(work, "plain.txt")
    with open(plain, "w") as f:
        f.write("first\n\nlast line\n\n")
    if fl.error_line(plain) != "last line":
        fails.append("error_line of a log without an error gave %r" % fl.error_line(plain))
    for l in fails:
        print("FAIL: " + l)
    if not fails:
        print("ok: %s" % reason[:120])
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
