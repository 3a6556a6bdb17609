#!/usr/bin/env bash
# Loss curves of the optimizer-state kinds (fp32, bf16, int8) on one training run, compared with
# fp32's; see scripts/bench/convergence.py for the flags and the pass rule.
#   scripts/convergence.sh [--model tiny] [--device cpu|cuda] [--steps 300] [--plot FILE.png] ...
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
ferry_load_env
py="$(ferry_stdlib_python)"
[ -n "$py" ] || ferry_die "convergence.sh needs python3 (standard library only)"
export FERRY_BUILD_DIR
exec "$py" "$FERRY_ROOT/scripts/bench/convergence.py" "$@"
