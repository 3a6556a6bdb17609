#!/usr/bin/env bash
# Sets up what is missing, builds incrementally, and runs the whole test suite with ctest.
# On a machine without a CUDA device the suites labelled "gpu" report themselves skipped.
#   scripts/test.sh [ctest arguments...]     e.g. scripts/test.sh -L gpu, scripts/test.sh -R adamw
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
"$FERRY_ROOT/scripts/setup.sh"
"$FERRY_ROOT/scripts/build.sh"
cd "$FERRY_BUILD_DIR"
exec ctest --output-on-failure -j "$(ferry_jobs)" "$@"
