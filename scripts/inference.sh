#!/usr/bin/env bash
# The request's evaluation entry point: sets up, builds incrementally, then runs ferry-infer.
# With no arguments it evaluates and generates with the embedded default model and data.
#   scripts/inference.sh [ferry-infer arguments...]
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
"$FERRY_ROOT/scripts/setup.sh" >&2
"$FERRY_ROOT/scripts/build.sh"
exec "$FERRY_BUILD_DIR/bin/ferry-infer" "$@"
