#!/usr/bin/env bash
# The request's entry point: sets up what is missing, builds incrementally, then runs ferry-train.
# With no arguments it trains the embedded default (the request's debug model on a GPU machine, the
# CPU-sized tiny model without one) on text every Debian/Ubuntu system carries.
#   scripts/train.sh [ferry-train arguments...]      e.g. --model-config 1b --offload blocked --bf16
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
"$FERRY_ROOT/scripts/setup.sh" >&2
"$FERRY_ROOT/scripts/build.sh"
exec "$FERRY_BUILD_DIR/bin/ferry-train" "$@"
