#!/usr/bin/env bash
# ferry-train with optimizer_state_on=nvme on a temp directory, end to end:
#  1. a run trains, logs its disk figures (log line, metrics.jsonl), and removes its scratch file
#     on a normal exit;
#  2. SIGTERM: the step finishes, a checkpoint is written, exit 143, the scratch file is gone;
#  3. a second SIGINT exits at once (130) and still removes the scratch file;
#  4. checkpoints move between tiers: a host-tier checkpoint resumes into an nvme run and that run's
#     checkpoint resumes into a host run;
#  5. the dry run reports the disk bytes; an nvme_path that does not exist is one line, exit 2,
#     before the first step.
set -u
train="$1"
dir="$(mktemp -d)"
trap 'rm -rf "$dir"' EXIT
mkdir -p "$dir/tier"
printf 'a tiny corpus for the nvme tier test, repeated.\n%.0s' $(seq 1 300) > "$dir/corpus.txt"
common=(--device cpu --model-config tiny --set max_length=32 --set batch_size=2 --set tensorboard=false
        --data "$dir/corpus.txt")
nvme=(--set optimizer_state_on=nvme --set nvme_path="$dir/tier")
fail() { echo "FAIL: $*"; [ -f "$dir/log" ] && tail -20 "$dir/log"; exit 1; }
tier_empty() { [ -z "$(ls -A "$dir/tier")" ] || fail "$1: scratch files left in nvme_path: $(ls "$dir/tier")"; }
step_of() { sed -E 's/.*checkpoint-0*([0-9]+).*/\1/' "$1/latest"; }

# 1. a normal run
"$train" "${common[@]}" "${nvme[@]}" --steps 3 --output-dir "$dir/run" > "$dir/log" 2>&1 || fail "the nvme run failed"
grep -q "optimizer state on disk: $dir/tier/ferry-state-" "$dir/log" || fail "no tier line in the log"
grep -q "disk read .* GB, write .* GB, wait .* ms" "$dir/log" || fail "no disk figures in the step lines"
grep -q '"disk_wait_ms"' "$dir/run/metrics.jsonl" || fail "no disk_wait_ms in metrics.jsonl"
grep -q '"optimizer_state_on":"nvme"' "$dir/run/metrics.jsonl" || fail "metrics.jsonl does not name the tier"
tier_empty "normal exit"
echo "ok: normal exit, disk figures logged, nvme_path empty"

# 2. SIGTERM
"$train" "${common[@]}" "${nvme[@]}" --steps 100000 --output-dir "$dir/term" > "$dir/log" 2>&1 &
pid=$!
for _ in $(seq 1 300); do
  [ -s "$dir/term/metrics.jsonl" ] && break
  sleep 0.1
done
[ -n "$(ls -A "$dir/tier")" ] || fail "no scratch file while the run trains"
kill -TERM "$pid"
wait "$pid"
rc=$?
[ "$rc" = 143 ] || fail "exit code $rc after SIGTERM, expected 143"
grep -q "checkpoint (SIGTERM)" "$dir/log" || fail "no SIGTERM checkpoint"
tier_empty "SIGTERM"
echo "ok: SIGTERM -> exit 143, checkpoint written, nvme_path empty"

# 3. two SIGINTs: the second exits at once, in the middle of a step (steps of 0.3-0.4 s here on a
#    2-core machine: the second signal comes 0.1 s after the first; an attempt where the step ended
#    first is retried, up to 5 times).
fast=0
for attempt in 1 2 3 4 5; do
  rm -rf "$dir/int"
  "$train" "${common[@]}" "${nvme[@]}" --set max_length=256 --set batch_size=16 --steps 100000 \
    --output-dir "$dir/int" > "$dir/log" 2>&1 &
  pid=$!
  for _ in $(seq 1 600); do
    [ -s "$dir/int/metrics.jsonl" ] && break
    sleep 0.1
  done
  kill -INT "$pid"
  sleep 0.1
  kill -INT "$pid" 2>/dev/null
  wait "$pid"
  rc=$?
  [ "$rc" = 130 ] || fail "exit code $rc after two SIGINTs, expected 130"
  tier_empty "second SIGINT"
  if ! grep -q "checkpoint (SIGINT)" "$dir/log"; then fast=1; break; fi
  echo "attempt $attempt: the step ended before the second SIGINT; again"
done
[ "$fast" = 1 ] || fail "the second SIGINT never arrived during a step"
echo "ok: second SIGINT -> exit 130 at once, nvme_path empty"

# 4. host checkpoint -> nvme run -> host run
"$train" "${common[@]}" --steps 2 --output-dir "$dir/mix" > "$dir/log" 2>&1 || fail "the host run failed"
"$train" "${common[@]}" "${nvme[@]}" --steps 4 --resume latest --output-dir "$dir/mix" > "$dir/log" 2>&1 \
  || fail "resuming a host-tier checkpoint into an nvme run failed"
grep -q "resumed from .*checkpoint-0*2 at step 2" "$dir/log" || fail "the nvme run did not resume at step 2"
[ "$(step_of "$dir/mix")" = 4 ] || fail "the nvme run did not reach step 4"
"$train" "${common[@]}" --steps 5 --resume latest --output-dir "$dir/mix" > "$dir/log" 2>&1 \
  || fail "resuming an nvme-tier checkpoint into a host run failed"
grep -q "resumed from .*checkpoint-0*4 at step 4" "$dir/log" || fail "the host run did not resume at step 4"
tier_empty "resume between tiers"
echo "ok: host -> nvme -> host resumes"

# 5. dry run and a missing nvme_path
"$train" "${common[@]}" "${nvme[@]}" --dry-run > "$dir/log" 2>&1 || fail "the nvme dry run failed"
grep -qE "^disk +[0-9.]+ GiB = fp32 master \+ moments on nvme_path \([0-9]+ bytes\)" "$dir/log" || fail "no disk line in the dry run"
grep -qE "host +[0-9.]+ GiB = nvme buffers" "$dir/log" || fail "no nvme buffers in the dry run's host line"
err="$("$train" "${common[@]}" --set optimizer_state_on=nvme --set nvme_path="$dir/missing" --steps 1 \
       --output-dir "$dir/missing-run" 2>&1 >/dev/null)"
rc=$?
[ "$rc" = 2 ] || fail "exit code $rc for a missing nvme_path, expected 2 ($err)"
[ "$(printf '%s\n' "$err" | grep -c .)" = 1 ] || fail "expected one line on stderr: $err"
case "$err" in *"nvme_path $dir/missing does not exist"*) ;; *) fail "stderr does not name nvme_path: $err" ;; esac
[ ! -e "$dir/missing-run/metrics.jsonl" ] || fail "a step ran despite the missing nvme_path"
echo "ok: dry run reports the disk; a missing nvme_path stops before the first step"
