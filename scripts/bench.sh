#!/usr/bin/env bash
# Training (and inference) benchmark of issue 5: ferry none / blocked / overlapped, the step's
# three lower bounds and the peers of shared/BASELINES.md (PyTorch AMP, FSDP2 CPU offload,
# torchao offload) in one run, each peer in its own process with a timeout.
#   scripts/bench.sh [--shape debug|1b|3b] [--seq 4096] [--steps N] [--dtype fp16|bf16]
#                    [--peers|--no-peers] [--peer-list amp,fsdp2,torchao] [--out DIR] [--batch B] [--grad-accum K] [--warmup 3]
#                    [--ferry-warmup N] [--timeout S] [--modes none,blocked,overlapped]
#                    [--ferry-set key=value] [--no-bounds] [--no-infer]
#   scripts/bench.sh --gpus N|1,2,4 [--shape ...] [--modes overlapped] [--no-peers] [--device cpu]
#       data-parallel scaling (issue 15, scripts/bench/scaling.py): ferry on 1..N GPUs (or the
#       listed counts) with --batch per GPU beside FSDP2 CPU offload on the same counts (torchrun);
#       tokens/s, scaling efficiency, per-rank peak GPU, host memory against 1 GPU's.
# Effective batch: K micro-batches of B sequences per optimizer step, for ferry (grad_accum=K;
# --ferry-set grad_accum=K works too, but not together with --grad-accum) and the peers (their
# own accumulation), so ratios are same-run; the tables give tokens/s = K x B x seq / step time.
# Warm-up: every row measures steps - warmup steps; ferry's overlapped runs leave out
# max(--warmup, 9) steps first (--ferry-warmup), since speculate=auto speculates only after 8
# clean steps: the median is the steady state (see bench.md's notes).
# Writes DIR/bench.json and DIR/bench.md (default out/bench-<shape>-<time>). Uses the build in
# $FERRY_BUILD_DIR (default build/); Python with torch from $FERRY_PYTHON, .venv, or python3.
# torchao: a wheel in .whl/ (pip download --no-deps --only-binary=:all: -d .whl torchao==0.18.0, for
# the GPU machine's python and platform) is installed into a private
# --target folder on first use; without it the torchao row says so.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
ferry_load_env

py="$(ferry_torch_python)"
[ -n "$py" ] || ferry_die "bench.sh needs python3"
export FERRY_PYTHON="$py" FERRY_BUILD_DIR

site="${FERRY_BENCH_SITE:-/tmp/ferry-bench-site}"
shopt -s nullglob
wheels=("$FERRY_ROOT"/.whl/torchao-*.whl)
if [ ${#wheels[@]} -gt 0 ] && ! PYTHONPATH="$site" "$py" -c "import torchao" >/dev/null 2>&1; then
  ferry_log "installing ${wheels[0]##*/} into $site"
  "$py" -m pip install -q --no-index --no-deps --target "$site" "${wheels[@]}" >&2 \
    || ferry_log "torchao wheel did not install; its row will say so"
fi
[ -d "$site" ] && export FERRY_BENCH_SITE="$site"
exec "$py" "$FERRY_ROOT/scripts/bench/bench.py" "$@"
