#!/usr/bin/env bash
# On a GPU machine: set up (from the offline bundle in deps/bundle when there is no network),
# build with CUDA, run the whole ctest suite including the "gpu" label, then every benchmark that
# exists, and print a short summary table last. Logs go to $OUT (or out/gpu_check).
#   scripts/gpu_check.sh [--no-bench] [--bench-only] [--no-train] [--kernel-bench] [--quick] [--gpu-tests]
# --gpu-tests: only the ctest label gpu (the CUDA suites; CI runs the rest without a GPU), so that
# tests and the training check fit one time-limited call.
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
bench=1 tests=1 quick=0 train=1 full_bench=1 gpu_tests=0
for a in "$@"; do
  case "$a" in
    --no-bench) bench=0 ;;
    --bench-only) tests=0 ;;
    --quick) quick=1 ;;
    --no-train) train=0 ;;
    --kernel-bench) full_bench=0 ;;   # the optimizer, kernel and inference benchmarks, not bench.sh
    --gpu-tests) gpu_tests=1 ;;
    *) ferry_die "gpu_check.sh: unknown argument $a (valid: --no-bench, --bench-only, --no-train, --kernel-bench, --quick, --gpu-tests)" 2 ;;
  esac
done
out="$FERRY_ROOT/out/gpu_check"
mkdir -p "$out"
# The build every script uses (common.sh: build/, or FERRY_BUILD_DIR), so nightly.sh and bench.sh
# afterwards find this CUDA build instead of making another.
export FERRY_BUILD_DIR
summary="$out/summary.txt"
: > "$summary"
# Each row lands in the summary at once (and in $OUT on the lent GPU machine, so a run cut off by
# its time limit still reports what it finished).
row() {
  printf '%-44s %s\n' "$1" "$2" >> "$summary"
  if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then cp "$summary" "$OUT/summary.txt"; fi
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt" 2>&1 || true
row "card" "$(head -1 "$out/gpu.txt")"
row "date" "$(date -u +%F)"
row "commit" "$(git -C "$FERRY_ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"

t0=$(date +%s)
if ! "$FERRY_ROOT/scripts/setup.sh" > "$out/setup.log" 2>&1; then row "setup" "FAILED (see setup.log)"; cat "$out/setup.log"; exit 1; fi
# Build kernels for this card only (the default build covers the RTX 4090 and H100).
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1)
arch="${CMAKE_CUDA_ARCHITECTURES:-${cap/./}}"
arch="${arch:-90}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-${cap:-9.0}}"
status=0
if ! FERRY_NINJA_FLAGS="-k 0" "$FERRY_ROOT/scripts/build.sh" -DCMAKE_CUDA_ARCHITECTURES="$arch" > "$out/build.log" 2>&1; then
  row "build" "FAILED: $(grep -c '^FAILED' "$out/build.log") targets (see build.log); going on with what built"
  grep -A5 '^FAILED' "$out/build.log" | head -40
  status=1
  [ -x "$FERRY_BUILD_DIR/bin/ferry-train" ] || { cat "$summary"; exit 1; }
fi
grep -E "CUDA code|libtorch" "$FERRY_BUILD_DIR.configure.log" | sed 's/^-- *//' | while read -r l; do row "configure" "$l"; done
row "setup + build" "$(( $(date +%s) - t0 )) s"

if [ "$tests" = 1 ]; then
  labels=() which="all labels"
  if [ "$gpu_tests" = 1 ]; then labels=(-L gpu) which="label gpu only"; fi
  (cd "$FERRY_BUILD_DIR" && ctest -j "$(ferry_jobs)" "${labels[@]}" --output-on-failure --timeout 900) > "$out/ctest.log" 2>&1 || status=1
  row "ctest ($which)" "$(grep -E 'tests passed|tests failed' "$out/ctest.log" | tail -1)"
  (cd "$FERRY_BUILD_DIR" && ctest -L gpu -N) > "$out/ctest_gpu_list.log" 2>&1
  # ctest lists skipped/disabled tests and failed ones in separate sections after the run.
  failed_list=$(sed -n '/The following tests FAILED/,$p' "$out/ctest.log" | grep -E '^\s+[0-9]+ - ' || true)
  notrun_list=$(sed -n '/The following tests did not run/,/^$/p' "$out/ctest.log" | grep -E '^\s+[0-9]+ - ' || true)
  row "ctest label gpu" "$(grep -c 'Test *#' "$out/ctest_gpu_list.log") registered"
  row "ctest not run (skipped/disabled)" "$(printf '%s' "$notrun_list" | grep -c . || true)"
  printf '%s\n' "$failed_list" | grep . | head -20 | while read -r l; do row "  failed" "$l"; done
fi

bin="$FERRY_BUILD_DIR/bin"
if [ "$train" = 1 ]; then
  # The embedded default (no arguments): the debug model on the licence texts; the loss must fall
  # and the checkpoint must load in transformers.
  if "$bin/ferry-train" --output-dir "$out/default_run" --set steps=30 > "$out/train_default.log" 2>&1; then
    first=$(grep -m1 -oE 'loss [0-9.]+' "$out/train_default.log" | cut -d' ' -f2)
    last=$(grep -oE 'loss [0-9.]+' "$out/train_default.log" | tail -1 | cut -d' ' -f2)
    ms=$(grep -oE '\| [0-9]+ ms' "$out/train_default.log" | tail -5 | grep -oE '[0-9]+' | sort -n | sed -n 3p)
    row "train.sh default (debug, fp16, overlapped)" "loss $first -> $last over 30 steps, median step ~${ms} ms"
    ckpt=$(ls -d "$out"/default_run/checkpoint-* 2>/dev/null | tail -1)
    if [ -n "$ckpt" ] && python3 "$FERRY_ROOT/scripts/check_hf_load.py" "$ckpt" > "$out/hf_load.log" 2>&1; then
      row "checkpoint loads in transformers" "$(tail -1 "$out/hf_load.log")"
    else
      row "checkpoint loads in transformers" "FAILED (see hf_load.log)"; status=1
    fi
    rm -rf "$out/default_run"
  else
    row "train.sh default" "FAILED: $(tail -1 "$out/train_default.log")"; status=1
  fi
fi

if [ "$bench" = 1 ]; then
  if [ -x "$bin/ferry-bench-adamw" ]; then
    "$bin/ferry-bench-adamw" --sizes 64M,256M --threads 0 > "$out/bench_adamw.log" 2>&1 || true
    row "cpu AdamW (ferry-bench-adamw)" "see below"
    tail -14 "$out/bench_adamw.log" | sed 's/^/    /' >> "$summary"
  fi
  if [ -x "$bin/ferry-bench-kernels" ]; then
    timeout 90 "$bin/ferry-bench-kernels" fp16 > "$out/bench_kernels.log" 2>&1 || true
    tail -20 "$out/bench_kernels.log" | sed 's/^/    /' >> "$summary"
  fi
  if [ -x "$bin/ferry-bench-infer" ]; then
    timeout 150 "$bin/ferry-bench-infer" --model-config debug --reps 2 > "$out/bench_infer.log" 2>&1 || true
    grep -E '^\|' "$out/bench_infer.log" | sed 's/^/    /' >> "$summary"
  fi
  if [ -x "$bin/ferry-bench-model" ]; then
    timeout 900 "$FERRY_ROOT/scripts/bench_model.sh" --timeout 280 --out "$out/bench_model" > "$out/bench_model.log" 2>&1 || true
    row "model fwd+bwd vs HF (bench_model.sh)" "see below"
    grep -E '^\|' "$out/bench_model.log" | sed 's/^/    /' >> "$summary"
  fi
  if [ "$full_bench" = 1 ] && [ -x "$FERRY_ROOT/scripts/bench.sh" ]; then
    steps=$([ "$quick" = 1 ] && echo 6 || echo 12)
    "$FERRY_ROOT/scripts/bench.sh" --shape debug --steps "$steps" --out "$out/bench_debug" > "$out/bench_debug.log" 2>&1 || true
    tail -25 "$out/bench_debug.log" | sed 's/^/    /' >> "$summary"
  fi
fi
# On the lent GPU machine $OUT is the folder that comes back: a summary and the logs, packed.
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
  cp "$summary" "$OUT/summary.txt"
  tar czf "$OUT/gpu_check_logs.tgz" -C "$out/.." "$(basename "$out")" 2>/dev/null || true
fi
echo
echo "==== ferry gpu_check summary ===="
cat "$summary"
exit $status
