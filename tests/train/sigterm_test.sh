#!/usr/bin/env bash
# SIGTERM during training: the current step finishes, a checkpoint is written, exit code 143.
set -u
train="$1"
dir="$(mktemp -d)"
trap 'rm -rf "$dir"' EXIT
printf 'a tiny corpus for a signal test, repeated.\n%.0s' $(seq 1 300) > "$dir/corpus.txt"
"$train" --device cpu --model-config tiny --steps 100000 --set max_length=32 --set batch_size=2 \
  --set tensorboard=false --data "$dir/corpus.txt" --output-dir "$dir/run" > "$dir/log" 2>&1 &
pid=$!
for _ in $(seq 1 200); do
  [ -s "$dir/run/metrics.jsonl" ] && break
  sleep 0.1
done
kill -TERM "$pid"
wait "$pid"
rc=$?
[ "$rc" = 143 ] || { echo "exit code $rc, expected 143"; cat "$dir/log"; exit 1; }
grep -q "checkpoint (SIGTERM)" "$dir/log" || { echo "no SIGTERM checkpoint"; cat "$dir/log"; exit 1; }
[ -f "$dir/run/latest" ] || { echo "latest pointer missing"; exit 1; }
echo "ok: exit 143 with $(cat "$dir/run/latest")"
