#!/usr/bin/env bash
# ferry-train under torchrun's environment on the host backend (Gloo on the loopback):
#  1. a bad launch (WORLD_SIZE without MASTER_ADDR) stops with one line naming the variable, exit 2;
#  2. ranks started with different configs all stop before the first step with one line naming
#     the rank and the key, exit 2;
#  3. two ranks with batch_size 1 train what one rank with batch_size 2 trains: the same loss on
#     every step (the step line's 4 decimals; the engine-level comparison is dist_test's), launched
#     by torchrun --no-python when the venv has it, else by hand;
#  4. sharded checkpoints: both runs of 3 save at step 2 (save_every=2); two ranks resume from the
#     one-rank checkpoint and one rank from the two ranks' checkpoint, and steps 3 and 4 give the
#     losses of the uninterrupted run (the data cursor and step carry over at another world size).
#   tests/dist/cli_ranks.sh FERRY_TRAIN [TORCHRUN]
set -u
train="$1"
torchrun="${2:-}"
dir="$(mktemp -d)"
trap 'rm -rf "$dir"' EXIT
printf 'a tiny corpus for the data-parallel test, repeated with some variety %s.\n' $(seq 1 400) > "$dir/corpus.txt"
common=(--device cpu --model-config tiny --set max_length=32 --set tensorboard=false --set save_final=false
        --set log_every=1 --set clip_grad=0.5 --data "$dir/corpus.txt" --steps 4)
fail() { echo "FAIL: $*"; for f in "$dir"/log*; do echo "== $f"; tail -5 "$f"; done; exit 1; }
port() { "${PYTHON:-python3}" -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }

# 1. bad launch
WORLD_SIZE=2 RANK=0 "$train" "${common[@]}" --output-dir "$dir/bad" > "$dir/log.bad" 2>&1
rc=$?
[ "$rc" = 2 ] || fail "bad launch: exit $rc, expected 2"
[ "$(wc -l < "$dir/log.bad")" = 1 ] || fail "bad launch: not one line"
grep -q "MASTER_ADDR is not set" "$dir/log.bad" || fail "bad launch: no line naming MASTER_ADDR"
echo "ok: $(cat "$dir/log.bad")"

# 2. config mismatch
p=$(port)
for r in 0 1; do
  RANK=$r WORLD_SIZE=2 LOCAL_RANK=$r LOCAL_WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=$p \
    "$train" "${common[@]}" --set dist_timeout_s=30 --set learning_rate=0.00$((r + 1)) --output-dir "$dir/mm" \
    > "$dir/log.mm$r" 2>&1 &
  pids[$r]=$!
done
for r in 0 1; do
  wait "${pids[$r]}"
  rc=$?
  [ "$rc" = 2 ] || fail "config mismatch: rank $r exit $rc, expected 2"
  grep -q "rank 1's run config differs from rank 0's at key 'learning_rate'" "$dir/log.mm$r" \
    || fail "config mismatch: rank $r did not name rank 1 and learning_rate"
  [ "$(grep -c . "$dir/log.mm$r")" = 1 ] || fail "config mismatch: rank $r printed more than one line"
done
echo "ok: $(cat "$dir/log.mm0")"

# Two ranks of ferry-train: torchrun --no-python when the venv has it, else by hand; log in $1.
two_ranks() {
  local log="$1"
  shift
  if [ -n "$torchrun" ] && [ -x "$torchrun" ]; then
    "$torchrun" --no-python --standalone --nproc-per-node 2 "$train" "$@" > "$log" 2>&1 || return 1
  else
    local p r
    p=$(port)
    for r in 0 1; do
      RANK=$r WORLD_SIZE=2 LOCAL_RANK=$r LOCAL_WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=$p \
        "$train" "$@" > "$log.$r" 2>&1 &
      pids[$r]=$!
    done
    for r in 0 1; do wait "${pids[$r]}" || return 1; done
    cp "$log.0" "$log"
  fi
}

# 3. two ranks against one
"$train" "${common[@]}" --set batch_size=2 --set save_every=2 --output-dir "$dir/one" > "$dir/log.one" 2>&1 \
  || fail "one rank failed"
two_ranks "$dir/log.two" "${common[@]}" --set batch_size=1 --set save_every=2 --output-dir "$dir/two" \
  || fail "two ranks failed"
how=$([ -n "$torchrun" ] && [ -x "$torchrun" ] && echo torchrun || echo "by hand")
losses() { grep -oE '^step [0-9]+/[0-9]+ \| loss [0-9.]+' "$1" | sed -E 's/.*loss //'; }
one=$(losses "$dir/log.one")
two=$(losses "$dir/log.two")
[ "$(echo "$one" | wc -l)" = 4 ] || fail "one rank: expected 4 step lines"
[ "$one" = "$two" ] || fail "losses differ: one rank [$(echo $one)] two ranks [$(echo $two)]"
grep -q "ranks: 2 (batch 1 per rank, global batch 2)" "$dir/log.two" || fail "no ranks line"
echo "ok: two ranks ($how) = one rank with the global batch: losses $(echo $one)"

# 4. resume at another world size
[ -f "$dir/two/checkpoint-000002/shards.json" ] || fail "two ranks wrote no sharded checkpoint-000002"
[ -f "$dir/one/checkpoint-000002/optimizer.safetensors" ] || fail "one rank wrote no checkpoint-000002"
two_ranks "$dir/log.one-two" "${common[@]}" --set batch_size=1 --resume "$dir/one/checkpoint-000002" \
  --output-dir "$dir/one-two" || fail "two ranks resuming the one-rank checkpoint failed"
"$train" "${common[@]}" --set batch_size=2 --resume "$dir/two/checkpoint-000002" --output-dir "$dir/two-one" \
  > "$dir/log.two-one" 2>&1 || fail "one rank resuming the two-rank checkpoint failed"
tail2=$(echo "$one" | tail -n 2)
for run in one-two two-one; do
  got=$(losses "$dir/log.$run")
  [ "$(echo "$got" | wc -l)" = 2 ] || fail "$run: expected the 2 step lines after the checkpoint"
  [ "$got" = "$tail2" ] || fail "$run: losses [$(echo $got)], the uninterrupted run's [$(echo $tail2)]"
done
grep -q "resumed from $dir/two/checkpoint-000002 at step 2" "$dir/log.two-one" || fail "two-one: no resume line"
echo "ok: 1 -> 2 and 2 -> 1 ranks resume onto the uninterrupted losses $(echo $tail2)"
