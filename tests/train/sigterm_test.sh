#!/usr/bin/env bash
# Interrupted training leaves a checkpoint that loads:
#  1. SIGTERM: the current step finishes, a checkpoint is written, exit code 143; then
#     `--resume latest` continues from it for two more steps and exits 0.
#  2. SIGKILL while checkpointing every step: whatever `latest` names (the last checkpoint whose
#     rename completed) loads and training continues from it.
set -u
train="$1"
dir="$(mktemp -d)"
trap 'rm -rf "$dir"' EXIT
printf 'a tiny corpus for a signal test, repeated.\n%.0s' $(seq 1 300) > "$dir/corpus.txt"
common=(--device cpu --model-config tiny --set max_length=32 --set batch_size=2 --set tensorboard=false
        --data "$dir/corpus.txt")
fail() { echo "FAIL: $*"; [ -f "$dir/log" ] && tail -20 "$dir/log"; exit 1; }
step_of() { sed -E 's/.*checkpoint-0*([0-9]+).*/\1/' "$1/latest"; }

# 1. SIGTERM, then resume
"$train" "${common[@]}" --steps 100000 --output-dir "$dir/run" > "$dir/log" 2>&1 &
pid=$!
for _ in $(seq 1 200); do
  [ -s "$dir/run/metrics.jsonl" ] && break
  sleep 0.1
done
kill -TERM "$pid"
wait "$pid"
rc=$?
[ "$rc" = 143 ] || fail "exit code $rc after SIGTERM, expected 143"
grep -q "checkpoint (SIGTERM)" "$dir/log" || fail "no SIGTERM checkpoint"
[ -f "$dir/run/latest" ] || fail "latest pointer missing after SIGTERM"
s=$(step_of "$dir/run")
"$train" "${common[@]}" --steps $((s + 2)) --resume latest --output-dir "$dir/run" > "$dir/log" 2>&1 \
  || fail "resuming the SIGTERM checkpoint (step $s) failed"
grep -q "resumed from .*checkpoint-0*$s at step $s" "$dir/log" || fail "no 'resumed from' step $s line"
[ "$(step_of "$dir/run")" = $((s + 2)) ] || fail "the resumed run did not reach step $((s + 2))"
echo "ok: SIGTERM -> exit 143 at step $s; resumed to step $((s + 2))"

# 2. SIGKILL during a run that checkpoints every step
"$train" "${common[@]}" --steps 100000 --set save_every=1 --set keep_last=2 --output-dir "$dir/kill" > "$dir/log" 2>&1 &
pid=$!
for _ in $(seq 1 300); do
  [ -f "$dir/kill/latest" ] && [ "$(step_of "$dir/kill")" -ge 3 ] 2>/dev/null && break
  sleep 0.05
done
kill -KILL "$pid"
wait "$pid" 2>/dev/null
[ -f "$dir/kill/latest" ] || fail "no latest pointer after SIGKILL"
s=$(step_of "$dir/kill")
"$train" "${common[@]}" --steps $((s + 1)) --resume latest --output-dir "$dir/kill" > "$dir/log" 2>&1 \
  || fail "resuming after SIGKILL (latest: step $s) failed"
grep -q "resumed from .*checkpoint-0*$s at step $s" "$dir/log" || fail "no 'resumed from' step $s line after SIGKILL"
echo "ok: SIGKILL -> latest (step $s) loads and training continues"
