#!/usr/bin/env bash
# CPU tests of scripts/nightly.sh (ctest label cpu). The shared CI machine's step times vary by
# several x (10x under a parallel ctest on a loaded host), so the time check is exercised with
# injected slowdowns far beyond that (100x against a re-compared record, 10000x for the transient),
# not by real timing.
#   nightly_cpu_test.sh pass|regression WORKDIR
# pass:       a baseline written by one run, a second full run compared against it: exit 0, and
#             the history file holds both nights; a third run whose first measurements are slowed
#             10000x (FERRY_NIGHTLY_INJECT=slow_once) is measured again and still passes.
# regression: one run writes the baseline; its record, re-compared with an injected slowdown,
#             memory growth and loss drift (FERRY_NIGHTLY_INJECT) and against a tampered
#             baseline, must each exit 1 naming what regressed; the untouched record passes.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
nightly="$here/../../scripts/nightly.sh"
what="$1" work="$2"
rm -rf "$work" && mkdir -p "$work"
common=(--cpu --baseline "$work/base.json" --history "$work/history" --time-tol 50)
fail() { echo "FAIL: $*"; exit 1; }

expect() {  # expect RC PATTERN LOGNAME -- nightly args...
  local rc="$1" pat="$2" name="$3" log="$work/$3.log"; shift 4
  "$@" >"$log" 2>&1
  local got=$?
  [ "$got" -eq "$rc" ] || { cat "$log"; fail "$name: exit $got, expected $rc"; }
  grep -Eq "$pat" "$log" || { cat "$log"; fail "$name: output lacks /$pat/"; }
  echo "ok: $name (exit $got, /$pat/)"
}

expect 0 "baseline updated" baseline -- "$nightly" "${common[@]}" --update-baseline --out "$work/n1"
[ -f "$work/base.json" ] || fail "no baseline written"
if [ "$what" = pass ]; then
  expect 0 "nightly .*: pass" second -- "$nightly" "${common[@]}" --out "$work/n2"
  [ "$(grep -c '^## nightly' "$work/history.md")" -eq 2 ] || fail "history.md should hold 2 nights"
  [ "$(wc -l < "$work/history.jsonl")" -eq 2 ] || fail "history.jsonl should hold 2 records"
  FERRY_NIGHTLY_INJECT=slow_once=10000 expect 0 "tiny/overlapped: slower than the limit on the first measurement.*measured 2 times" \
    transient -- "$nightly" "${common[@]}" --out "$work/n3"
  grep -q "measuring again to confirm" "$work/transient.log" || fail "no confirmation run logged"
  exit 0
fi
rec=(--record "$work/n1/record.json")
expect 0 "nightly .*: pass" same -- "$nightly" "${common[@]}" "${rec[@]}" --out "$work/r0"
FERRY_NIGHTLY_INJECT=slow=100 expect 1 "REGRESSION" slow -- "$nightly" "${common[@]}" "${rec[@]}" --out "$work/r1"
grep -q "step time" "$work/slow.log" || fail "slowdown report does not name the step time"
FERRY_NIGHTLY_INJECT=mem=1.05 expect 1 "host_peak .*limit \+3%" mem -- "$nightly" "${common[@]}" "${rec[@]}" --out "$work/r2"
FERRY_NIGHTLY_INJECT=loss=0.05 expect 1 "loss curve off the reference" loss -- "$nightly" "${common[@]}" "${rec[@]}" --out "$work/r3"
# A tampered baseline (every step twice as fast as measured) is caught the same way.
python3 - "$work/base.json" "$work/fast.json" <<'PY'
import json, sys
b = json.load(open(sys.argv[1]))
for r in b["runs"].values():
    if r.get("step_ms"):
        r["step_ms"] /= 100
json.dump(b, open(sys.argv[2], "w"))
PY
expect 1 "step time .*limit" tampered -- "$nightly" --cpu --baseline "$work/fast.json" --history "$work/history" --time-tol 50 "${rec[@]}" --out "$work/r4"
expect 2 "no baseline" nobase -- "$nightly" --cpu --baseline "$work/missing.json" --history "$work/history" "${rec[@]}" --out "$work/r5"
exit 0
