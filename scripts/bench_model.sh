#!/usr/bin/env bash
# The model benchmark of issue 4: forward + backward with every weight resident, per decoder layer
# and for the whole model, ferry (ferry-bench-model) against HF LlamaForCausalLM sdpa and eager
# (scripts/bench/model_hf.py) in one run, one combined table.
#   scripts/bench_model.sh [--shapes debug,1b] [--seq 4096] [--batch 1] [--dtype fp16|bf16|fp32]
#                          [--device auto|cuda|cpu] [--iters 20] [--model-iters 5] [--warmup 3]
#                          [--timeout S] [--out DIR]
# Writes DIR/bench_model.json and DIR/bench_model.md (default out/bench-model-<time>). Uses the
# build in $FERRY_BUILD_DIR (default build/); Python with torch + transformers from $FERRY_PYTHON,
# .venv, or python3. CPU smoke test: --shapes tiny --seq 128 --device cpu --iters 3 --model-iters 2
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
ferry_load_env

py="$(ferry_torch_python)"
[ -n "$py" ] || ferry_die "bench_model.sh needs python3"
export FERRY_PYTHON="$py" FERRY_BUILD_DIR
exec "$py" "$FERRY_ROOT/scripts/bench/bench_model.py" "$@"
