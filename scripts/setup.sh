#!/usr/bin/env bash
# Installs what ferry needs, idempotently, and records where it is in .ferry-env.
#
#   scripts/setup.sh [--bundle DIR] [--no-venv]
#
# Order for libtorch: Torch_DIR / CMAKE_PREFIX_PATH from the environment; the machine's Python
# torch (python3 -c 'import torch'); otherwise PyTorch's wheel, pinned to 2.11.0, in the project
# venv .venv (with transformers, for the HF parity tests); Debian's libtorch-dev as the last
# fallback. Other packages: apt on Debian/Ubuntu when running as root with a network; on an
# offline machine, the Debian packages of an offline bundle (scripts/bundle-deps.sh) unpacked
# without root into .deps/prefix.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

TORCH_VERSION=2.11.0
bundle="${FERRY_BUNDLE:-$FERRY_ROOT/deps/bundle}"
use_venv=1
while [ $# -gt 0 ]; do
  case "$1" in
    --bundle) bundle="$2"; shift 2 ;;
    --no-venv) use_venv=0; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) ferry_die "setup.sh: unknown argument '$1' (valid: --bundle DIR, --no-venv)" 2 ;;
  esac
done

prefix="$FERRY_ROOT/.deps/prefix"

# header that proves each package is usable -> Debian package that provides it
declare -A need=(
  [tbb/tbb.h]=libtbb-dev
  [boost/program_options.hpp]=libboost-program-options-dev
  [hwy/highway.h]=libhwy-dev
  [nlohmann/json.hpp]=nlohmann-json3-dev
  [sentencepiece_processor.h]=libsentencepiece-dev
  [pcre2.h]=libpcre2-dev
  [gtest/gtest.h]=libgtest-dev
  [liburing.h]=liburing-dev
  [gloo/context.h]=libgloo-dev   # headers only: c10d's ProcessGroupGloo.hpp includes them; the code is libtorch's
)

# Debian package -> the bundle's .deb files that make it usable (the -dev package and its runtime libs).
bundle_glob() {
  case "$1" in
    libtbb-dev) echo "libtbb*.deb libhwloc*.deb" ;;
    libboost-program-options-dev) echo "libboost*.deb" ;;
    libhwy-dev) echo "libhwy*.deb" ;;
    nlohmann-json3-dev) echo "nlohmann*.deb" ;;
    libsentencepiece-dev) echo "libsentencepiece*.deb" ;;
    libpcre2-dev) echo "libpcre2*.deb" ;;
    libgtest-dev) echo "libgtest*.deb googletest*.deb" ;;
    liburing-dev) echo "liburing*.deb" ;;
    libgloo-dev) echo "libgloo-dev*.deb" ;;
    *) echo "$1_*.deb" ;;
  esac
}

have_header() {
  local h="$1"
  [ -e "/usr/include/$h" ] || [ -e "/usr/local/include/$h" ] || [ -e "$prefix/usr/include/$h" ]
}

have_lib() {
  local l="$1" d
  for d in /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/lib /usr/local/lib "$prefix/usr/lib/x86_64-linux-gnu"; do
    ls "$d/$l".so* >/dev/null 2>&1 && return 0
  done
  return 1
}

missing=()
for h in "${!need[@]}"; do
  have_header "$h" || missing+=("${need[$h]}")
done
# Headers alone are not enough where a package ships a compiled library (Ubuntu's libboost-dev
# has the program_options headers without the library).
for pair in libboost_program_options:libboost-program-options-dev libtbb:libtbb-dev libhwy:libhwy-dev \
            libsentencepiece:libsentencepiece-dev libpcre2-8:libpcre2-dev liburing:liburing-dev; do
  lib="${pair%%:*}" pkg="${pair##*:}"
  if ! have_lib "$lib" && [[ " ${missing[*]} " != *" $pkg "* ]]; then missing+=("$pkg"); fi
done
for tool in cmake ninja g++; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$( [ "$tool" = ninja ] && echo ninja-build || ([ "$tool" = g++ ] && echo g++ || echo cmake))")
done

if [ ${#missing[@]} -gt 0 ]; then
  if ls "$bundle"/*.deb >/dev/null 2>&1; then
    ferry_log "unpacking the offline bundle $bundle into $prefix (missing: ${missing[*]})"
    mkdir -p "$prefix"
    # Unpack only the packages of what is missing, so a library the machine already has (say its
    # own sentencepiece or GoogleTest) is not shadowed by the bundle's copy.
    for pkg in "${missing[@]}"; do
      for glob in $(bundle_glob "$pkg"); do
        for deb in "$bundle"/$glob; do
          if [ -e "$deb" ]; then dpkg -x "$deb" "$prefix"; fi
        done
      done
    done
  elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    ferry_log "installing with apt: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || ferry_die "apt-get update failed: no network? Build an offline bundle with scripts/bundle-deps.sh on a machine with one and pass --bundle DIR"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" python3-venv >/dev/null \
      || ferry_die "apt-get install ${missing[*]} failed"
  else
    ferry_die "missing packages: ${missing[*]}. Install them (sudo apt-get install ${missing[*]}), or copy an offline bundle made by scripts/bundle-deps.sh to deps/bundle and rerun" 1
  fi
fi

# ---- libtorch ----
torch_prefix=""
python=""
if [ -n "${Torch_DIR:-}" ]; then
  torch_prefix="$Torch_DIR"
elif [ -n "${CMAKE_PREFIX_PATH:-}" ] && ls "${CMAKE_PREFIX_PATH%%:*}"/share/cmake/Torch/TorchConfig.cmake >/dev/null 2>&1; then
  torch_prefix="${CMAKE_PREFIX_PATH%%:*}/share/cmake"
fi
if [ -z "$torch_prefix" ] && [ -x "$FERRY_ROOT/.venv/bin/python" ] && "$FERRY_ROOT/.venv/bin/python" -c 'import torch' 2>/dev/null; then
  python="$FERRY_ROOT/.venv/bin/python"
fi
if [ -z "$torch_prefix" ] && [ -z "$python" ] && command -v python3 >/dev/null && python3 -c 'import torch' 2>/dev/null; then
  python="$(command -v python3)"
fi
if [ -z "$torch_prefix" ] && [ -z "$python" ] && [ "$use_venv" = 1 ]; then
  ferry_log "installing PyTorch $TORCH_VERSION and transformers into $FERRY_ROOT/.venv (once; a few GB)"
  python3 -m venv "$FERRY_ROOT/.venv" 2>/dev/null || {
    [ "$(id -u)" = 0 ] && apt-get install -y -qq python3-venv >/dev/null && python3 -m venv "$FERRY_ROOT/.venv"; } \
    || ferry_die "cannot create a Python venv: install python3-venv"
  # No pip cache by default (the torch wheel would be stored twice); FERRY_PIP_CACHE_DIR names one
  # to share between checkouts (CI's fresh-machine check shares it with its Debian root).
  cache=(--no-cache-dir)
  [ -n "${FERRY_PIP_CACHE_DIR:-}" ] && cache=(--cache-dir "$FERRY_PIP_CACHE_DIR")
  if "$FERRY_ROOT/.venv/bin/pip" install -q "${cache[@]}" "torch==$TORCH_VERSION" && \
     "$FERRY_ROOT/.venv/bin/pip" install -q "${cache[@]}" transformers safetensors numpy sentencepiece; then
    python="$FERRY_ROOT/.venv/bin/python"
  else
    ferry_log "pip could not install torch==$TORCH_VERSION; falling back to Debian's libtorch-dev"
  fi
fi
if [ -z "$torch_prefix" ] && [ -n "$python" ]; then
  torch_prefix="$("$python" -c 'import torch;print(torch.utils.cmake_prefix_path)')"
fi
if [ -z "$torch_prefix" ]; then
  if [ ! -e /usr/lib/x86_64-linux-gnu/cmake/Torch/TorchConfig.cmake ] && [ ! -e /usr/share/cmake/Torch/TorchConfig.cmake ]; then
    [ "$(id -u)" = 0 ] || ferry_die "no libtorch found: install PyTorch (pip install torch==$TORCH_VERSION) or libtorch-dev"
    apt-get install -y -qq libtorch-dev >/dev/null || ferry_die "apt-get install libtorch-dev failed"
  fi
  torch_prefix="/usr"
fi

{
  echo "# written by scripts/setup.sh on $(date -u +%F)"
  echo "FERRY_TORCH_PREFIX='$torch_prefix'"
  echo "FERRY_PYTHON='${python:-python3}'"
  echo "FERRY_DEPS_PREFIX='$( [ -d "$prefix/usr" ] && echo "$prefix/usr" )'"
} > "$FERRY_ENV_FILE.tmp" && mv "$FERRY_ENV_FILE.tmp" "$FERRY_ENV_FILE"
ferry_log "setup done: libtorch from $torch_prefix"
