#!/usr/bin/env bash
# bench_gpus_cpu_test.sh OUT: scripts/bench.sh --gpus 1,2 on the host backend (ferry's two ranks
# and FSDP2's talk through Gloo) on the tiny shape, then check_bench_scaling.py recomputes the
# table's tokens/s, scaling efficiency and host sums from the runs' own files.
set -eu
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="$1"
"$root/scripts/bench.sh" --gpus 1,2 --device cpu --shape tiny --seq 32 --steps 4 --warmup 1 --ferry-warmup 1 \
  --peers --out "$out"
python3 "$here/check_bench_scaling.py" "$out" 1 2
