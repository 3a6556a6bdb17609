# Sourced by the scripts in this folder: paths, logging, and the environment setup.sh records.
FERRY_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FERRY_BUILD_DIR="${FERRY_BUILD_DIR:-$FERRY_ROOT/build}"
FERRY_ENV_FILE="$FERRY_ROOT/.ferry-env"

ferry_log() { printf '[ferry] %s\n' "$*" >&2; }
# The message alone on stderr (the exit status, $2, is not part of it).
ferry_die() { printf 'ferry: %s\n' "$1" >&2; exit "${2:-1}"; }

ferry_load_env() {
  # shellcheck disable=SC1090
  [ -f "$FERRY_ENV_FILE" ] && . "$FERRY_ENV_FILE"
  return 0
}

# The Python with torch for benchmarks and peers: $FERRY_PYTHON (setup.sh records it), the
# project's .venv, or python3; empty when there is none.
ferry_torch_python() {
  local py="${FERRY_PYTHON:-}"
  if [ -z "$py" ] && [ -x "$FERRY_ROOT/.venv/bin/python" ]; then py="$FERRY_ROOT/.venv/bin/python"; fi
  if [ -z "$py" ]; then py="$(command -v python3 || true)"; fi
  printf '%s' "$py"
}

# The Python for the standard-library-only scripts (finder, nightly): python3, else $FERRY_PYTHON;
# empty when there is none.
ferry_stdlib_python() {
  local py
  py="$(command -v python3 || true)"
  [ -n "$py" ] || py="${FERRY_PYTHON:-}"
  printf '%s' "$py"
}

ferry_jobs() {
  local n
  n=$(nproc 2>/dev/null || echo 2)
  echo "${FERRY_JOBS:-$n}"
}
