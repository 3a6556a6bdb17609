#!/usr/bin/env bash
# Downloads the Debian packages ferry needs into a folder, for an offline GPU server that has
# libtorch (e.g. a PyTorch install) but lacks oneTBB, Boost.Program_options, Highway, liburing
# and friends. Copy the folder to the server as deps/bundle (or pass --bundle DIR to setup.sh there);
# setup.sh unpacks it without root into .deps/prefix.
#   scripts/bundle-deps.sh [DIR]          (default: deps/bundle)
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
dest="${1:-$FERRY_ROOT/deps/bundle}"
command -v apt-get >/dev/null || ferry_die "bundle-deps.sh needs apt-get (a Debian/Ubuntu machine with a network)"
pkgs=(
  libtbb-dev libtbb12 libtbbmalloc2 libtbbbind-2-5 libhwloc15
  libboost-program-options-dev libboost-program-options1.74-dev libboost-program-options1.74.0 libboost1.74-dev
  libhwy-dev libhwy1
  nlohmann-json3-dev
  libsentencepiece-dev libsentencepiece0
  libpcre2-dev libpcre2-8-0 libpcre2-16-0 libpcre2-32-0 libpcre2-posix3
  libgtest-dev googletest
  liburing-dev liburing2
  libgloo-dev
)
mkdir -p "$dest"
cd "$dest"
available=()
for p in "${pkgs[@]}"; do
  apt-cache show "$p" >/dev/null 2>&1 && available+=("$p") || ferry_log "not in this machine's apt sources, skipped: $p"
done
apt-get -o APT::Sandbox::User=root download "${available[@]}" >/dev/null
ferry_log "bundle in $dest: $(ls ./*.deb | wc -l) packages, $(du -sh . | cut -f1)"
