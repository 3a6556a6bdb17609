#!/usr/bin/env bash
# The largest-model finder of issue 7: which LLaMA-shaped model trains under a GPU and a host
# memory limit? Predicts every candidate from ferry's own memory plan (ferry-train --plan-json),
# then verifies the largest that fit with a few real steps under a GPU memory cap.
#   scripts/find_largest_model.sh [--gpu-mem 24GiB] [--host-mem auto|SIZE] [--seq 4096] [--batch 1]
#       [--offload overlapped] [--fp16|--bf16] [--verify 3] [--steps 3] [--out DIR]
#       [--device auto|cuda|cpu] [--family llama|small] [--gpu-reserve 0.5GiB] [--ferry-set k=v]
#       [--optimizer-state fp32|bf16|int8]   (the AdamW moments' form planned and verified; the
#       what-if rows and the "pred host fp32/bf16/int8" column show every kind from the plans)
#       [--ferry-set optimizer_state_on=nvme --ferry-set nvme_path=DIR]   (the state on disk:
#       planned with its host buffers, its disk bytes judged against DIR's free space, verified)
#       [--verify-what-if]   (every what-if row, option and combination, verified by a run of its own)
#       [--disk-bytes 4GiB]   (the file of the disk measurement behind each disk run's bound)
#       [--max-params 17B]   (verify only candidates up to this size; larger ones are planned, not run)
#       --batch B > 1 (without grad_accum set): also plans the same effective batch as grad_accum=B of
#       batch 1 and recommends the route that fits the larger model (grad_accum on a tie)
# CI / CPU: scripts/find_largest_model.sh --device cpu --family small --gpu-mem 64MiB --seq 64
# Writes DIR/finder.json and DIR/finder.md (default out/finder-<time>); exit 1 when nothing fits.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
ferry_load_env
py="$(ferry_stdlib_python)"
[ -n "$py" ] || ferry_die "find_largest_model.sh needs python3 (standard library only)"
export FERRY_BUILD_DIR
args=()
for a in "$@"; do
  case "$a" in
    --fp16|--bf16|--fp32) args+=(--dtype "${a#--}") ;;
    *) args+=("$a") ;;
  esac
done
exec "$py" "$FERRY_ROOT/scripts/finder/find_largest.py" "${args+"${args[@]}"}"
