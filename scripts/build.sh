#!/usr/bin/env bash
# Configures (once) and builds ferry incrementally in build/ (FERRY_BUILD_DIR overrides).
#   scripts/build.sh [extra cmake -D options...]
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
[ -f "$FERRY_ENV_FILE" ] || "$FERRY_ROOT/scripts/setup.sh"
ferry_load_env

prefix_path="$FERRY_TORCH_PREFIX"
[ -n "${FERRY_DEPS_PREFIX:-}" ] && prefix_path="$prefix_path;$FERRY_DEPS_PREFIX"
if [ ! -f "$FERRY_BUILD_DIR/build.ninja" ] || [ $# -gt 0 ]; then
  extra=()
  [ -n "${FERRY_DEPS_PREFIX:-}" ] && extra+=("-DBOOST_ROOT=$FERRY_DEPS_PREFIX" "-DCMAKE_LIBRARY_ARCHITECTURE=x86_64-linux-gnu")
  cmake -S "$FERRY_ROOT" -B "$FERRY_BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE="${FERRY_BUILD_TYPE:-Release}" \
    -DCMAKE_PREFIX_PATH="$prefix_path" -DFERRY_PYTHON="$FERRY_PYTHON" -DCMAKE_POLICY_VERSION_MINIMUM=3.5 "${extra[@]}" "$@" >"$FERRY_BUILD_DIR.configure.log" 2>&1 \
    || { cat "$FERRY_BUILD_DIR.configure.log" >&2; ferry_die "cmake configure failed (log above)"; }
  grep -A12 '^-- ferry ' "$FERRY_BUILD_DIR.configure.log" >&2 || true
fi
# FERRY_NINJA_FLAGS="-k 0" keeps building past a failed target (gpu_check uses it).
ninja -C "$FERRY_BUILD_DIR" -j "$(ferry_jobs)" ${FERRY_NINJA_FLAGS:-} >&2
