#!/usr/bin/env bash
# The request's entry point: sets up what is missing, builds incrementally, then runs ferry-train.
# With no arguments it trains the embedded default (the request's debug model on a GPU machine, the
# CPU-sized tiny model without one) on text every Debian/Ubuntu system carries.
#   scripts/train.sh [ferry-train arguments...]      e.g. --model-config 1b --offload blocked --bf16
#   scripts/train.sh --gpus N [ferry-train arguments...]
#       N data-parallel ranks on this machine, one per GPU (torchrun --no-python --nproc-per-node N
#       --standalone ferry-train ...): each rank takes batch_size sequences of every step (the
#       global batch is N x batch_size) and keeps 1/N of the optimizer state. With --device cpu the
#       ranks run on the host backend.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
gpus=1
if [ "${1:-}" = --gpus ]; then
  [[ "${2:-}" =~ ^[1-9][0-9]*$ ]] || ferry_die "train.sh: --gpus needs a positive number of ranks (got '${2:-}')" 2
  gpus="$2"
  shift 2
fi
"$FERRY_ROOT/scripts/setup.sh" >&2
"$FERRY_ROOT/scripts/build.sh"
if [ "$gpus" -gt 1 ]; then
  py="$(ferry_torch_python)"
  torchrun="$(dirname "${py:-/nonexistent}")/torchrun"
  [ -x "$torchrun" ] || torchrun="$(command -v torchrun || true)"
  [ -n "$torchrun" ] || ferry_die "train.sh --gpus $gpus needs torchrun (PyTorch's launcher): install torch in .venv (scripts/setup.sh) or put torchrun on PATH" 1
  exec "$torchrun" --no-python --standalone --nproc-per-node "$gpus" "$FERRY_BUILD_DIR/bin/ferry-train" "$@"
fi
exec "$FERRY_BUILD_DIR/bin/ferry-train" "$@"
