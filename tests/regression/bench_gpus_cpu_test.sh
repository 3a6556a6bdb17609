#!/usr/bin/env bash
# bench_gpus_cpu_test.sh OUT [cuda]: scripts/bench.sh --gpus 1,2 on the tiny shape, then
# check_bench_scaling.py recomputes the table's tokens/s, scaling efficiency, host sums (and on
# CUDA the per-rank GPU peaks) from the runs' own files. Default: the host backend (ferry's two
# ranks and FSDP2's talk through Gloo). With `cuda`: one GPU per rank, FSDP2 CPU offload beside
# it; exit 77 (skipped) with fewer than 2 GPUs.
set -eu
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="$1"
if [ "${2:-cpu}" = cuda ]; then
  n="$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | grep -c . || true)"
  [ "${n:-0}" -ge 2 ] || { echo "bench_gpus_cuda: needs 2 GPUs, ${n:-0} visible: skipped"; exit 77; }
  "$root/scripts/bench.sh" --gpus 1,2 --device cuda --shape tiny --seq 256 --steps 12 --warmup 2 --out "$out"
else
  "$root/scripts/bench.sh" --gpus 1,2 --device cpu --shape tiny --seq 32 --steps 4 --warmup 1 --ferry-warmup 1 \
    --peers --out "$out"
fi
python3 "$here/check_bench_scaling.py" "$out" 1 2
