#!/usr/bin/env bash
# FERRY_TRACE=FILE end to end (src/engine/trace.h): a 3-step overlapped run on the host backend
# writes every step's span, one update per unit per step and each unit's waits for its tasks,
# metrics.jsonl has cpu_tasks_ms, and scripts/bench/trace_step.py prints a step of it, its summary
# and (on a made-up CUDA trace) its device parts; an unwritable FERRY_TRACE is one line naming it.
set -u
train="$1"
root="$(cd "$(dirname "$0")/../.." && pwd)"
dir="$(mktemp -d)"
trap 'rm -rf "$dir"' EXIT
printf 'a tiny corpus for the trace test, repeated.\n%.0s' $(seq 1 300) > "$dir/corpus.txt"
common=(--device cpu --model-config tiny --set max_length=32 --set batch_size=2 --set tensorboard=false
        --set offload=overlapped --data "$dir/corpus.txt")
fail() { echo "FAIL: $*"; [ -f "$dir/log" ] && tail -20 "$dir/log"; exit 1; }

FERRY_TRACE="$dir/trace.jsonl" "$train" "${common[@]}" --steps 3 --output-dir "$dir/run" > "$dir/log" 2>&1 \
  || fail "the traced run failed"
[ "$(grep -c '"what":"step"' "$dir/trace.jsonl")" = 3 ] || fail "not 3 step records: $(grep -c '"what":"step"' "$dir/trace.jsonl")"
units=$(python3 -c "import json;c=json.load(open('$root/configs/models/tiny.json'));print(c['num_hidden_layers']+2)")
updates=$(grep -c '"what":"update"' "$dir/trace.jsonl")
# Each step queues one update per unit; the run's start (params_changed) queues one more per unit.
[ "$updates" -ge $((3 * units)) ] || fail "$updates update records for $units units over 3 steps"
grep -q '"cpu_tasks_ms"' "$dir/run/metrics.jsonl" || fail "no cpu_tasks_ms in metrics.jsonl"
# Every unit's gradient copy waits for its earlier tasks, the embedding's rows included.
waited=$(python3 -c "import json;print(len({r['unit'] for r in map(json.loads,open('$dir/trace.jsonl')) if r['what']=='wait_tasks'}))")
[ "$waited" = "$units" ] || fail "wait_tasks records for $waited of $units units"
python3 "$root/scripts/bench/trace_step.py" "$dir/trace.jsonl" --step 2 > "$dir/step" 2>&1 || fail "trace_step.py: $(cat "$dir/step")"
# The step's statistics tasks run inside it; its updates may run behind the next step (deferred).
grep -q '^step 2: ' "$dir/step" && grep -q ' task ' "$dir/step" || fail "trace_step.py printed: $(head -5 "$dir/step")"
# --summary: medians over steps 2-3 (a third left out), busy and idle adding up to the step.
python3 "$root/scripts/bench/trace_step.py" "$dir/trace.jsonl" --summary > "$dir/sum" 2>&1 || fail "--summary: $(cat "$dir/sum")"
python3 - "$dir/sum" <<'PY' || fail "--summary printed: $(cat "$dir/sum")"
import re, sys
line = open(sys.argv[1]).read().strip()
m = re.match(r"steps 2-3 \(2\), medians: step ([0-9.]+) ms, update thread busy ([0-9.]+) \(idle ([0-9.]+)\), "
             r"waits for updates ([0-9.]+) \(embedding ([0-9.]+)\), for tasks ([0-9.]+), tail ([0-9.]+)$", line)
assert m, line
step, busy, idle, wu, we, wt, tail = map(float, m.groups())
assert step > 0 and abs(busy + idle - step) <= 0.2 and we <= wu and tail <= step, line
PY
python3 "$root/scripts/bench/trace_step.py" "$dir/trace.jsonl" --summary --skip 3 > "$dir/sum" 2>&1
grep -q -- "--skip 3 leaves no steps" "$dir/sum" || fail "--skip past the steps: $(cat "$dir/sum")"

# --phases: a CPU run's trace has no device marks, which it says; on a trace made up here (three
# steps, the first one left out, the third with two groups of micro-batches) the medians are known.
python3 "$root/scripts/bench/trace_step.py" "$dir/trace.jsonl" --phases > "$dir/ph" 2>&1
grep -q "only a CUDA run's trace has" "$dir/ph" || fail "--phases on a CPU trace: $(cat "$dir/ph")"
python3 - "$dir/made.jsonl" <<'PY'
import json, sys
recs = [("step", 1, 0, 100), ("tail", -1, 99, 100), ("step", 2, 100, 200), ("tail", -1, 190, 200),
        ("step", 3, 200, 320), ("tail", -1, 300, 320)]
marks = [("gpu_start", 50), ("gpu_fwd", 60), ("gpu_head", 70), ("gpu_bwd", 99),
         ("gpu_start", 102), ("gpu_fwd", 110), ("gpu_fwd", 120), ("gpu_head", 125), ("gpu_bwd", 140), ("gpu_bwd", 190),
         ("gpu_start", 204), ("gpu_fwd", 210), ("gpu_head", 215), ("gpu_bwd", 230), ("gpu_fwd", 240),
         ("gpu_head", 250), ("gpu_bwd", 300)]
with open(sys.argv[1], "w") as f:
    for what, u, a, b in recs:
        f.write(json.dumps(dict(what=what, unit=u, t0=a, t1=b)) + "\n")
    for what, t in marks:
        f.write(json.dumps(dict(what=what, unit=-1, t0=t, t1=t)) + "\n")
PY
python3 "$root/scripts/bench/trace_step.py" "$dir/made.jsonl" --phases > "$dir/ph" 2>&1
want="steps 2-3 (2), medians: step 110.0 ms, device: before the first mark 3.0, forward 17.0, head 10.0, backward 65.0, after the last mark 15.0; tail 15.0"
[ "$(cat "$dir/ph")" = "$want" ] || fail "--phases printed: $(cat "$dir/ph"); want: $want"
python3 "$root/scripts/bench/trace_step.py" "$dir/made.jsonl" --phases --summary > "$dir/ph" 2>&1
grep -q "two reports; give one" "$dir/ph" || fail "--phases with --summary: $(cat "$dir/ph")"

FERRY_TRACE="$dir/no/such/dir/t.jsonl" "$train" "${common[@]}" --steps 1 --output-dir "$dir/run2" > "$dir/log" 2>&1
rc=$?
[ "$rc" = 1 ] || [ "$rc" = 2 ] || fail "an unwritable FERRY_TRACE exited $rc (want a refusal: 1 or 2)"
grep -q "FERRY_TRACE=$dir/no/such/dir/t.jsonl" "$dir/log" || fail "the error does not name FERRY_TRACE: $(tail -3 "$dir/log")"
echo "trace: OK ($updates updates, $units units)"
